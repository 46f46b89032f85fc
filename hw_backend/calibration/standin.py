"""The CPU stand-in accelerator, measured the way the executor drives it.

Without CUDA the executor's device role is torch on CPU cores reserved for it
(``hw_backend.devices.StandInAccelerator``). For the simulator to predict such runs, the
profile's GPU entry must describe *that* device, so every figure here is timed through the
stand-in's own queues, exactly as the executor submits work:

* attention: ``merge.partial_attention`` over device-resident K/V on the compute queue, at several
  context lengths taken in turns; the median over them of bytes / (time - a one-token call's
  time) is the rate the simulator gets from ``hbm_bandwidth_gbps * attention_efficiency``. The
  merge of received rows (``merge.softmax_union``) is timed over sizes too, for the raw data.
* per-op overhead (``kernel_launch_overhead_us``): submit-to-done of a one-token attention.
* GEMM FLOP/s (``peak_tflops``) on the compute queue, per dtype.
* the "PCIe link": a host tensor copied into a fresh device allocation on the copy queue (what
  ``EagerDeviceSide._to_device`` does), fitted as latency + size / bandwidth up to
  ``Settings.copy_fit_max``; larger copies land in fresh mmaps whose page faults set the rate,
  which a single link bandwidth cannot also describe (kept in the raw data and the comment).

Both roles share one memory system here, so the attention rate is also measured while the C
kernel streams KV on the host cores (``*_loaded`` rows): the executor runs them concurrently.
The mirror image, the host kernel's time alone and while the stand-in attends (``host_loaded``),
gives the slowdown HybridGen's host scan sees next to the stand-in (on a shared VM it depends on
what the host shares with other guests at the time; figures: docs/calibration.md).
"""

from __future__ import annotations

import math
import statistics
import threading
from collections.abc import Callable
from contextlib import contextmanager

from hw_backend.calibration.records import Measurement
from hw_backend.calibration.settings import HEAD_DIM, HEADS, KV_HEADS, Job, Settings
from hw_backend.calibration.timing import (
    fit_line,
    net_rate,
    representative,
    timed,
    timed_round_robin,
)
from hw_backend.streams import ResponsiveGil

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
GEMM_BUDGET_S = 0.5  # longest single GEMM call the stand-in benchmark will make


def _on_queue(queue, fn, repeats: int, warmup: int = 1) -> tuple[float, ...]:
    """Durations of ``fn`` run on a device queue (its own time, without the queue hop)."""
    return _on_queue_in_turns(queue, [fn], repeats, warmup)[0]


def _on_queue_in_turns(queue, fns, repeats: int, warmup: int = 1) -> list[tuple[float, ...]]:
    """Durations of each of ``fns`` on a device queue, taken in turns (one call of each per
    round), so that a machine drifting between fast and slow phases affects all of them alike."""
    return timed_round_robin(fns, repeats, warmup, run=lambda fn: queue.submit(fn).duration_s())


@contextmanager
def host_load(split, tokens: int, kv_dtype: str):
    """The C kernel streaming KV on the host role's cores until the block ends."""
    import os

    import torch

    from hw_backend import cpu_attention as ca

    dtype = getattr(torch, DTYPES[kv_dtype])
    K = torch.randn(1, KV_HEADS, tokens, HEAD_DIM).to(dtype)
    V = torch.randn(1, KV_HEADS, tokens, HEAD_DIM).to(dtype)
    q = torch.randn(1, HEADS, HEAD_DIM)
    stop = threading.Event()

    def loop() -> None:
        cores = split.host_cores()
        if cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)
        while not stop.is_set():
            ca.partial_attention(q, K, V, num_threads=split.host_threads)

    gil = ResponsiveGil()  # as in the executor, whose threads this load stands for
    thread = threading.Thread(target=loop, name="calibration-host-load", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        gil.close()


class _DeviceLoad:
    """Attention over device-resident KV kept running on the stand-in's compute queue while
    ``on`` is set: the work the device role does next to HybridGen's host scan."""

    def __init__(self, queue, fn) -> None:
        self.on = threading.Event()
        self._stop = threading.Event()
        self._busy = threading.Lock()  # held while an op runs
        self._queue, self._fn = queue, fn
        self._thread = threading.Thread(target=self._loop, name="calibration-device-load",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.on.wait(0.01):
                with self._busy:
                    if self.on.is_set():
                        self._queue.submit(self._fn).wait()

    def pause(self) -> None:
        """Stop submitting and return once the op in flight (if any) has finished, so that an
        'alone' timing does not overlap the tail of the load."""
        self.on.clear()
        with self._busy:
            pass

    def close(self) -> None:
        self._stop.set()
        self.pause()
        self._thread.join()


class StandInBench:
    """The stand-in accelerator plus the tensors its benchmarks reuse."""

    def __init__(self, settings: Settings, split) -> None:
        import torch

        from hw_backend.devices import StandInAccelerator

        self.settings = settings
        self.split = split
        self.accel = StandInAccelerator(split)
        self.dtype = getattr(torch, DTYPES[settings.kv_dtype])
        self.f32 = torch.float32
        self.params = {"device_threads": split.device_threads, "host_threads": split.host_threads,
                       "pinned": split.pin, "kv_dtype": settings.kv_dtype}

    def close(self) -> None:
        self.accel.close()

    def _kv(self, tokens: int):
        import torch

        shape = (1, KV_HEADS, tokens, HEAD_DIM)
        K, V = self.accel.empty(shape, self.dtype), self.accel.empty(shape, self.dtype)
        K.copy_(torch.randn(shape))
        V.copy_(torch.randn(shape))
        return K, V

    # -------------------------------------------------------------- device compute
    def attention(self, loaded: bool = False) -> list[Measurement]:
        """Attention over device-resident KV at every context, contexts taken in turns, and a
        one-token call among them for the fixed cost. The rate (``*_fit``) is the median over
        contexts of bytes / (time - fixed): a least-squares line through the contexts, timed
        one after another, scattered the fixed cost between runs minutes apart and once gave a
        rate above every context's own (docs/calibration.md, history)."""
        import torch

        from hw_backend.merge import partial_attention

        name = "attention_loaded" if loaded else "attention"
        q = torch.randn(1, HEADS, HEAD_DIM)
        scale = 1 / math.sqrt(HEAD_DIM)
        largest = max(self.settings.contexts)
        load = host_load(self.split, largest, self.settings.kv_dtype) if loaded else _nothing()
        kvs = [self._kv(tokens) for tokens in (*self.settings.contexts, 1)]
        calls = [lambda K=K, V=V: partial_attention(q, K, V, scale) for K, V in kvs]
        with load:
            timings = _on_queue_in_turns(self.accel.compute, calls, self.settings.repeats)
        fixed = representative(timings[-1])
        rows, sizes, times = [], [], []
        for tokens, (K, _), seconds in zip(self.settings.contexts, kvs, timings, strict=False):
            nbytes = 2 * K.numel() * K.element_size()
            t = representative(seconds)
            rows.append(Measurement("standin", name, nbytes / t / 1e9, "GB/s",
                                    {**self.params, "context": tokens, "bytes": nbytes},
                                    seconds))
            sizes.append(nbytes)
            times.append(t)
        rows.append(Measurement("standin", name + "_fit", net_rate(sizes, times, fixed) / 1e9,
                                "GB/s", {**self.params, "fixed_us": fixed * 1e6}, timings[-1]))
        return rows

    def host_loaded(self, settle_s: float = 0.005) -> list[Measurement]:
        """The host kernel (1-thread partial attention on the host cores) alone and while the
        stand-in attends over a tenth as many device-resident tokens, in turns, so that drift
        between the two does not pass for contention.

        Value: mean loaded time / mean alone time. Not the median: the loaded calls can split
        into two groups, as fast as alone or twice as slow, and the share of each is what a step
        meets.
        """
        import time

        import torch

        from hw_backend import cpu_attention as ca
        from hw_backend.merge import partial_attention
        from hw_backend.streams import WorkerStream

        tokens = min(self.settings.contexts, key=lambda n: abs(math.log2(n / 16384)))
        dtype = self.dtype
        K = torch.randn(1, KV_HEADS, tokens, HEAD_DIM).to(dtype)
        V = torch.randn(1, KV_HEADS, tokens, HEAD_DIM).to(dtype)
        q = torch.randn(1, HEADS, HEAD_DIM)
        Kd, Vd = self._kv(max(1, tokens // 10))
        load = _DeviceLoad(self.accel.compute,
                           lambda: partial_attention(q, Kd, Vd, 1 / math.sqrt(HEAD_DIM)))
        host = WorkerStream("calibration-host", cores=self.split.host_cores())
        gil = ResponsiveGil()  # as in the executor, whose two roles this pair stands for

        def timed_host(loaded: bool) -> float:
            if loaded:
                load.on.set()
                time.sleep(settle_s)  # the device loop is running before the host op starts
            try:
                return host.submit(lambda: ca.partial_attention(q, K, V, num_threads=1)
                                   ).duration_s()
            finally:
                load.pause()

        try:
            alone, loaded = timed_round_robin(
                [lambda: False, lambda: True], 4 * self.settings.repeats, warmup=1,
                run=lambda which: timed_host(which()))
        finally:
            load.close()
            host.close()
            gil.close()
        ratio = statistics.fmean(loaded) / statistics.fmean(alone)
        return [Measurement("standin", "host_loaded", ratio, "x",
                            {**self.params, "context": tokens, "device_tokens": Kd.shape[2],
                             "alone_s": statistics.fmean(alone)}, loaded)]

    def merge(self) -> list[Measurement]:
        """softmax_union of received rows into a device partial: the merge kernel's rate."""
        import torch

        from hw_backend.merge import partial_attention, softmax_union

        K, V = self._kv(64)
        q = torch.randn(1, HEADS, HEAD_DIM)
        device_part = partial_attention(q, K, V, 1 / math.sqrt(HEAD_DIM))
        rows, sizes, times = [], [], []
        for tokens in self.settings.contexts:
            k = max(1, tokens // 20)
            logits = torch.randn(1, HEADS, k)
            values = torch.randn(1, HEADS, k, HEAD_DIM).to(self.dtype)
            seconds = _on_queue(self.accel.compute,
                                lambda lg=logits, v=values: softmax_union(device_part, lg, v),
                                self.settings.repeats)
            nbytes = values.numel() * values.element_size() + logits.numel() * 4
            t = representative(seconds)
            rows.append(Measurement("standin", "merge", nbytes / t / 1e9, "GB/s",
                                    {**self.params, "rows": k, "bytes": nbytes}, seconds))
            sizes.append(nbytes)
            times.append(t)
        fixed, slope = fit_line(sizes, times)
        rows.append(Measurement("standin", "merge_fit", 1 / slope / 1e9, "GB/s",
                                {**self.params, "fixed_us": fixed * 1e6}))
        return rows

    def op_overhead(self) -> list[Measurement]:
        """Submit-to-done wall time of a one-token attention: the fixed cost of a device op."""
        import torch

        from hw_backend.merge import partial_attention

        K, V = self._kv(1)
        q = torch.randn(1, HEADS, HEAD_DIM)
        compute = self.accel.compute
        seconds = timed(lambda: compute.submit(lambda: partial_attention(q, K, V, 1.0)).wait(),
                        max(20, 10 * self.settings.repeats), warmup=5)
        return [Measurement("standin", "op_overhead", representative(seconds) * 1e6, "us",
                            dict(self.params), seconds)]

    def gemm(self) -> list[Measurement]:
        """Square matmuls per dtype, growing until one call takes ``GEMM_BUDGET_S`` (CPUs
        without native fp16 emulate it ~100x slower; a fixed size would take minutes)."""
        import torch

        rows = []
        for dtype in ("fp32", "bf16", "fp16"):
            sizes = sorted({256, *self.settings.gemm_sizes})
            for n, bigger in zip(sizes, [*sizes[1:], None], strict=True):
                a = torch.randn(n, n).to(getattr(torch, DTYPES[dtype]))
                b = torch.randn(n, n).to(a.dtype)
                seconds = _on_queue(self.accel.compute, lambda a=a, b=b: torch.matmul(a, b),
                                    self.settings.repeats)
                t = representative(seconds)
                rows.append(Measurement("standin", "gemm", 2 * n**3 / t / 1e12, "TFLOP/s",
                                        {**self.params, "dtype": dtype, "n": n}, seconds))
                if bigger is None or t * (bigger / n) ** 3 > GEMM_BUDGET_S:
                    break
        return rows

    def decode_gemm(self) -> list[Measurement]:
        """One token through weight matrices (a GEMV streaming the weights), in the KV dtype,
        matrices together well beyond the last-level cache and taken in turns: the rate at
        which a whole model's projections and FFN read their weights on the stand-in."""
        import torch

        width = 1024 if self.settings.quick else 4096
        count = max(2, self.settings.read_bytes // (width * width * 4 * 4))
        weights = [torch.randn(width, 4 * width).to(self.dtype) for _ in range(count)]
        x = torch.randn(1, width).to(self.dtype)
        state = {"next": 0}

        def one() -> None:
            w = weights[state["next"] % count]
            state["next"] += 1
            torch.matmul(x, w)

        seconds = _on_queue(self.accel.compute, one, self.settings.repeats * count)
        nbytes = weights[0].numel() * weights[0].element_size()
        return [Measurement("standin", "decode_gemm", nbytes / representative(seconds) / 1e9,
                            "GB/s", {**self.params, "shape": [width, 4 * width],
                                     "bytes": nbytes, "matrices": count}, seconds)]

    def device_copy(self) -> list[Measurement]:
        """Device-to-device copy (read + write), the stand-in's streaming-kernel rate."""
        nbytes = self.settings.read_bytes
        src = self.accel.empty((nbytes // 4,), self.f32)
        src.fill_(1.0)
        dst = self.accel.empty((nbytes // 4,), self.f32)
        seconds = _on_queue(self.accel.compute, lambda: dst.copy_(src), self.settings.repeats)
        t = representative(seconds)
        return [Measurement("standin", "device_copy", 2 * nbytes / t / 1e9, "GB/s",
                            {**self.params, "bytes": nbytes}, seconds)]

    # -------------------------------------------------------------- the "PCIe link"
    def h2d(self) -> list[Measurement]:
        """Host tensor into a fresh device allocation on the copy queue, per transfer size."""
        accel = self.accel
        rows, sizes, times = [], [], []
        for nbytes in self.settings.copy_sizes:
            src = accel.host_empty((nbytes // 4,), self.f32)
            src.fill_(1.0)

            def upload(src=src) -> None:
                accel.empty(tuple(src.shape), src.dtype).copy_(src)

            seconds = _on_queue(accel.copy, upload, self.settings.repeats)
            t = representative(seconds)
            rows.append(Measurement("standin", "h2d_copy", nbytes / t / 1e9, "GB/s",
                                    {**self.params, "bytes": nbytes}, seconds))
            if nbytes <= self.settings.copy_fit_max:
                sizes.append(nbytes)
                times.append(t)
        fixed, slope = fit_line(sizes, times)
        rows.append(Measurement("standin", "h2d_fit", 1 / slope / 1e9, "GB/s",
                                {**self.params, "latency_us": fixed * 1e6}))
        return rows

    def d2h_fetch(self) -> list[Measurement]:
        """A host thread fetching a query-sized tensor after device work: the D2H latency."""
        import torch

        accel = self.accel
        src = accel.empty((1, HEADS, HEAD_DIM), torch.float32)
        dst = accel.host_empty((1, HEADS, HEAD_DIM), torch.float32)

        def fetch() -> None:
            accel.fetch(dst, src, accel.compute.submit(lambda: None))

        seconds = timed(fetch, max(20, 10 * self.settings.repeats), warmup=5)
        return [Measurement("standin", "d2h_fetch", representative(seconds) * 1e6, "us",
                            {**self.params, "bytes": src.numel() * 4}, seconds)]


@contextmanager
def _nothing():
    yield


def plan(settings: Settings, split) -> tuple[list[Job], Callable[[], None]]:
    """Jobs sharing one stand-in accelerator, and the cleanup that closes it."""
    state: dict[str, StandInBench] = {}

    def bench() -> StandInBench:
        if "b" not in state:
            state["b"] = StandInBench(settings, split)
        return state["b"]

    def close() -> None:
        if "b" in state:
            state.pop("b").close()

    jobs = [
        Job("stand-in: attention on its compute queue", lambda: bench().attention()),
        Job("stand-in: attention while the C kernel runs", lambda: bench().attention(True)),
        Job("stand-in: host kernel while the stand-in attends", lambda: bench().host_loaded()),
        Job("stand-in: merge of received rows", lambda: bench().merge()),
        Job("stand-in: per-op overhead", lambda: bench().op_overhead()),
        Job("stand-in: GEMM FLOP/s", lambda: bench().gemm()),
        Job("stand-in: one-token GEMMs (weight streaming)", lambda: bench().decode_gemm()),
        Job("stand-in: device copy", lambda: bench().device_copy()),
        Job("stand-in: host->device copies by size", lambda: bench().h2d()),
        Job("stand-in: device->host fetch", lambda: bench().d2h_fetch()),
    ]
    return jobs, close
