"""The executor's parts: split KV cache, device-side merges, work queues, accelerator choice."""

from __future__ import annotations

import math
import random
import threading
import time

import pytest
import torch

from hw_backend.devices import STANDIN_LABEL, CoreSplit, StandInAccelerator, make_accelerator
from hw_backend.kv_store import KvStore
from hw_backend.merge import (
    attend_logits,
    empty_partial,
    lse_merge,
    partial_attention,
    softmax_union,
)
from hw_backend.streams import (
    GIL_SWITCH_INTERVAL_S,
    HostMarker,
    Marker,
    ResponsiveGil,
    WorkerStream,
)


@pytest.fixture(scope="module")
def accel():
    with make_accelerator("standin", CoreSplit(1, 1)) as a:
        yield a


# ------------------------------------------------------------------------- KV store
def test_repartition_and_append_keep_every_token_where_the_plan_says(accel):
    gen = torch.Generator().manual_seed(0)
    total = 300
    k = torch.randn(2, 2, total, 16, generator=gen)
    v = torch.randn(2, 2, total, 16, generator=gen)
    store = KvStore(accel, num_layers=1, batch=2, kv_heads=2, head_dim=16, capacity=8)
    kv = store[0]
    kv.load(k[:, :, :200], v[:, :, :200])
    rng = random.Random(0)
    for _ in range(40):
        sinks, recent = rng.choice([0, 4]), rng.choice([0, 1, 30, 90])
        append = kv.length < total and rng.random() < 0.7
        context = kv.length + append
        kv.repartition(sinks, recent, context)
        if append:
            p = kv.length
            kv.append(k[:, :, p : p + 1], v[:, :, p : p + 1])
        wanted = set(range(sinks)) | set(range(context - recent, context))
        assert sorted(kv.slot_pos) == sorted(wanted)
        dev_k, dev_v = kv.device_kv()
        positions = torch.tensor(kv.slot_pos, dtype=torch.long)
        assert torch.equal(dev_k, k[:, :, positions]) and torch.equal(dev_v, v[:, :, positions])
        host = slice(sinks, context - recent)
        assert torch.equal(kv.host_k[:, :, host], k[:, :, host])
        assert torch.equal(kv.host_v[:, :, host], v[:, :, host])
    assert kv.capacity >= kv.length  # the host buffer grew from 8 tokens


def test_device_buffers_are_separate_from_host_memory(accel):
    store = KvStore(accel, num_layers=1, batch=1, kv_heads=1, head_dim=8, capacity=64)
    kv = store[0]
    kv.load(torch.ones(1, 1, 32, 8), torch.ones(1, 1, 32, 8))
    kv.repartition(0, 16, 32)
    kv.host_k.zero_()  # a stand-in "transfer" copied the rows: the device keeps them
    assert torch.equal(kv.device_kv()[0], torch.ones(1, 1, 16, 8))


def test_policies_sharing_a_store_each_hold_only_their_own_device_slots(accel):
    """Benchmarks run policy after policy over one store under an HBM budget sized for each
    policy's own resident tokens: a reservation is exact (doubling 27k slots to 55k overran a
    22 GB budget beside 16 GB of weights), and truncating between policies releases it."""
    store = KvStore(accel, num_layers=2, batch=1, kv_heads=2, head_dim=8, capacity=600)
    for kv in store.layers:
        kv.load(torch.randn(1, 2, 500, 8), torch.randn(1, 2, 500, 8))
    store.reserve_device_slots(200)
    store.reserve_device_slots(201)  # the next policy keeps one token more
    assert [kv.dev_k.shape[2] for kv in store.layers] == [201, 201]
    for kv in store.layers:
        kv.repartition(4, 100, 501)
        kv.append(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    store.truncate(500)
    assert [(kv.dev_k.shape[2], kv.dev_v.shape[2]) for kv in store.layers] == [(0, 0), (0, 0)]
    store.reserve_device_slots(50)  # a policy keeping fewer tokens on the device
    assert [kv.dev_k.shape[2] for kv in store.layers] == [50, 50]


def test_partial_key_cache_keeps_the_largest_channels(accel):
    store = KvStore(accel, num_layers=1, batch=1, kv_heads=2, head_dim=8, capacity=16)
    kv = store[0]
    keys = torch.randn(1, 2, 10, 8)
    keys[:, 0, :, 3] *= 100
    keys[:, 1, :, 6] *= 100
    kv.load(keys, torch.randn(1, 2, 10, 8))
    kv.enable_partial_keys(0.125)  # one channel of eight
    assert kv.partial_channels.tolist() == [[3], [6]]
    assert torch.equal(kv.partial_k[:, 0, :10, 0], keys[:, 0, :, 3])


# ------------------------------------------------------------------------- merges
def full(q, k, v):
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    w = torch.softmax(torch.einsum("bhd,bhtd->bht", q, kk) / math.sqrt(q.shape[-1]), -1)
    return torch.einsum("bht,bhtd->bhd", w, vv)


def test_lse_merge_of_any_split_is_full_attention():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 32, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 100, 32, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, 100, 32, generator=gen, dtype=torch.float64)
    scale = 1 / math.sqrt(32)
    parts = [partial_attention(q, k[:, :, a:b], v[:, :, a:b], scale)
             for a, b in ((0, 0), (0, 37), (37, 38), (38, 100))]
    out, lse = lse_merge(parts)
    torch.testing.assert_close(out.double(), full(q, k, v), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(lse).all()


def test_softmax_union_is_one_softmax_over_both_logit_sets():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 16, generator=gen)
    k_dev, v_dev = torch.randn(1, 4, 10, 16, generator=gen), torch.randn(1, 4, 10, 16, generator=gen)
    host_logits = torch.randn(1, 4, 6, generator=gen)
    host_rows = torch.randn(1, 4, 6, 16, generator=gen)
    scale = 0.25
    dev_logits = torch.einsum("bhd,bhtd->bht", q, k_dev) * scale
    weights = torch.softmax(torch.cat([dev_logits, host_logits], -1), -1)
    want = torch.einsum("bht,bhtd->bhd", weights, torch.cat([v_dev, host_rows], 2))
    out, _ = softmax_union(partial_attention(q, k_dev, v_dev, scale), host_logits, host_rows)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_empty_blocks_contribute_nothing():
    q = torch.randn(1, 2, 4)
    out, lse = lse_merge([empty_partial(q), empty_partial(q)])
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
    block = attend_logits(torch.zeros(1, 2, 0), torch.zeros(1, 2, 0, 4))
    real = partial_attention(q, torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), 0.5)
    torch.testing.assert_close(lse_merge([real, block])[0], real[0])


# ------------------------------------------------------------------------- work queues
def test_worker_stream_runs_in_order_after_dependencies():
    first, second = WorkerStream("a"), WorkerStream("b")
    try:
        seen = []
        gate = threading.Event()
        blocker = first.submit(lambda: gate.wait(5))
        late = second.submit(lambda: seen.append("after"), after=[blocker])
        early = second.submit(lambda: seen.append("queued behind"))
        time.sleep(0.02)
        assert seen == []  # the queue is ordered: nothing overtakes the waiting item
        gate.set()
        early.wait()
        assert seen == ["after", "queued behind"]
        assert late.elapsed_since(blocker) >= 0 and early.duration_s() >= 0
    finally:
        first.close()
        second.close()


def test_a_failure_fails_its_dependents_instead_of_hanging():
    stream = WorkerStream("s")
    try:
        bad = stream.submit(lambda: 1 / 0, label="divide")
        dependent = stream.submit(lambda: "never", after=[bad])
        with pytest.raises(RuntimeError, match="divide"):
            dependent.wait()
        assert stream.submit(lambda: 42).result() == 42  # the queue keeps working
    finally:
        stream.close()


def test_markers_of_different_clocks_do_not_compare():
    class Other(Marker):  # e.g. a CUDA event pair: another clock
        def wait(self) -> None: ...

        def duration_s(self) -> float:
            return 0.0

        def elapsed_since(self, other: Marker) -> float:
            return 0.0

    with pytest.raises(TypeError):
        HostMarker.completed().elapsed_since(Other())


# ------------------------------------------------------------------------- accelerators
def test_core_split_and_standin_label():
    assert CoreSplit.even(2) == CoreSplit(1, 1)
    assert CoreSplit.even(8).device_threads == 4
    split = CoreSplit(1, 1, pin=True)
    assert split.device_cores() and split.host_cores()
    with pytest.raises(ValueError):
        CoreSplit(0, 1)
    before = torch.get_num_threads()
    with StandInAccelerator(CoreSplit(1, 1)) as standin:
        assert standin.label == STANDIN_LABEL and "no CUDA" in standin.label
        assert torch.get_num_threads() == 1  # the device role's share of the cores
    assert torch.get_num_threads() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_auto_falls_back_to_the_standin_and_cuda_request_fails_clearly():
    with make_accelerator("auto") as a:
        assert a.standin
    with pytest.raises(RuntimeError, match="CUDA"):
        make_accelerator("cuda")


def test_reloading_rebuilds_the_partial_key_cache(accel):
    store = KvStore(accel, num_layers=1, batch=1, kv_heads=1, head_dim=4, capacity=8)
    kv = store[0]
    kv.load(torch.zeros(1, 1, 6, 4), torch.zeros(1, 1, 6, 4))
    kv.enable_partial_keys(1.0)
    fresh = torch.randn(1, 1, 6, 4)
    kv.load(fresh, torch.zeros(1, 1, 6, 4))
    assert torch.equal(kv.partial_k[:, :, :6], fresh)
    new = torch.randn(1, 1, 1, 4)
    kv.append(new, new)
    assert torch.equal(kv.partial_k[:, :, 6:7], new)


def test_responsive_gil_holds_a_short_switch_interval_until_the_last_holder_closes():
    import sys

    before = sys.getswitchinterval()
    first, second = ResponsiveGil(), ResponsiveGil()
    assert sys.getswitchinterval() == pytest.approx(min(GIL_SWITCH_INTERVAL_S, before))
    first.close()
    first.close()  # closing twice releases once
    assert sys.getswitchinterval() == pytest.approx(min(GIL_SWITCH_INTERVAL_S, before))
    second.close()
    assert sys.getswitchinterval() == pytest.approx(before)
