"""BufferPool: views of one reused buffer per key, grown with headroom when outgrown."""

import math

import torch

from hw_backend.buffers import HEADROOM, BufferPool


def make_pool(calls):
    def allocate(shape, dtype):
        calls.append((shape, dtype))
        return torch.empty(shape, dtype=dtype)

    return BufferPool(allocate)


def test_same_key_reuses_memory_until_outgrown():
    calls = []
    pool = make_pool(calls)
    a = pool.take(("layer0", "rows"), (2, 3, 100), torch.float32)
    b = pool.take(("layer0", "rows"), (2, 3, 110), torch.float32)  # within the headroom
    assert a.shape == (2, 3, 100) and b.shape == (2, 3, 110)
    assert a.data_ptr() == b.data_ptr() and len(calls) == 1
    assert calls[0][0] == (math.ceil(600 * HEADROOM),)
    c = pool.take(("layer0", "rows"), (2, 3, 200), torch.float32)  # outgrown: reallocated
    assert len(calls) == 2 and c.shape == (2, 3, 200) and c.is_contiguous()


def test_keys_and_dtypes_are_separate_buffers():
    calls = []
    pool = make_pool(calls)
    x = pool.take(0, (10,), torch.float32)
    y = pool.take(1, (10,), torch.float32)
    z = pool.take(1, (10,), torch.int64)  # same key, new dtype: a new buffer
    assert x.data_ptr() != y.data_ptr()
    assert z.dtype == torch.int64 and len(calls) == 3
    assert pool.nbytes == math.ceil(10 * HEADROOM) * (4 + 8)
    pool.clear()
    assert pool.nbytes == 0


def test_empty_shapes_are_fine():
    pool = make_pool([])
    assert pool.take("k", (1, 4, 0), torch.float32).shape == (1, 4, 0)
