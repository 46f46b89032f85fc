"""CUDA device benchmarks: HBM bandwidth, GEMM FLOP/s (square and at decode's shapes), decode
attention (eager and as the graph path runs it), launch costs (one eager kernel, one graph
replay, the gap between kernels inside a graph), the executor's per-op cost (eager and graph
path), and pinned host<->device copies versus transfer size.

Timed with CUDA events on one stream, so the numbers are device time (what the simulator's
roofline kernels and PCIe flows stand for), not host time. Only planned when
``torch.cuda.is_available()``; on other machines calibration says it skipped them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from hw_backend.calibration.records import Measurement
from hw_backend.calibration.settings import HEAD_DIM, HEADS, KV_HEADS, Job, Settings
from hw_backend.calibration.timing import fit_line, representative

_DTYPES = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _event_times(fn: Callable[[], object], repeats: int, warmup: int = 2) -> tuple[float, ...]:
    """Seconds of ``fn``'s device work, between two events on the current stream."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        out.append(begin.elapsed_time(end) / 1e3)
    return tuple(out)


def device_info() -> dict:
    """Name, memory and the NUMA node of the PCIe root the GPU hangs off (when known)."""
    import torch

    props = torch.cuda.get_device_properties(0)
    info = {"name": props.name, "total_memory": int(props.total_memory), "numa_node": None,
            "pci": None}
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        domain = getattr(props, "pci_domain_id", 0)
        device = getattr(props, "pci_device_id", 0)
        address = f"{domain:04x}:{bus:02x}:{device:02x}.0"
        info["pci"] = address
        try:
            node = int(Path(f"/sys/bus/pci/devices/{address}/numa_node").read_text())
            info["numa_node"] = node if node >= 0 else None
        except (OSError, ValueError):
            pass
    return info


def hbm_bandwidth(settings: Settings) -> list[Measurement]:
    import torch

    nbytes = (256 if settings.quick else 2048) << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = _event_times(lambda: dst.copy_(src), settings.repeats * 2)
    t = representative(seconds)
    return [Measurement("cuda", "hbm_copy", 2 * nbytes / t / 1e9, "GB/s", {"bytes": nbytes},
                        seconds)]


def gemm(settings: Settings) -> list[Measurement]:
    import torch

    n = 2048 if settings.quick else 8192
    rows = []
    for name in ("fp16", "bf16", "tf32", "fp32"):
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        a = torch.randn(n, n, device="cuda", dtype=getattr(torch, _DTYPES[name]))
        b = torch.randn(n, n, device="cuda", dtype=a.dtype)
        seconds = _event_times(lambda a=a, b=b: torch.matmul(a, b), settings.repeats)
        t = representative(seconds)
        rows.append(Measurement("cuda", "gemm", 2 * n**3 / t / 1e12, "TFLOP/s",
                                {"dtype": name, "n": n}, seconds))
    torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def attention(settings: Settings) -> list[Measurement]:
    """``merge.partial_attention`` (the executor's device attention) over fp16 K/V."""
    import torch

    from hw_backend.merge import partial_attention

    q = torch.randn(1, HEADS, HEAD_DIM, device="cuda")
    rows, sizes, times = [], [], []
    for tokens in settings.cuda_attention_tokens:
        shape = (1, KV_HEADS, tokens, HEAD_DIM)
        K = torch.randn(shape, device="cuda", dtype=torch.float16)
        V = torch.randn(shape, device="cuda", dtype=torch.float16)
        seconds = _event_times(lambda K=K, V=V: partial_attention(q, K, V, 1 / math.sqrt(HEAD_DIM)),
                               settings.repeats)
        nbytes = 2 * K.numel() * K.element_size()
        t = representative(seconds)
        rows.append(Measurement("cuda", "attention", nbytes / t / 1e9, "GB/s",
                                {"context": tokens, "bytes": nbytes, "kv_dtype": "fp16"}, seconds))
        sizes.append(nbytes)
        times.append(t)
        del K, V
    fixed, slope = fit_line(sizes, times)
    rows.append(Measurement("cuda", "attention_fit", 1 / slope / 1e9, "GB/s",
                            {"fixed_us": fixed * 1e6}))
    return rows


def launch_overhead(settings: Settings) -> list[Measurement]:
    """Device time per tiny kernel when many are queued back to back."""
    import torch

    x = torch.zeros(1, device="cuda")
    count = 200 if settings.quick else 2000

    def many() -> None:
        for _ in range(count):
            x.add_(1.0)

    seconds = _event_times(many, settings.repeats)
    return [Measurement("cuda", "launch_overhead", representative(seconds) / count * 1e6, "us",
                        {"kernels": count}, seconds)]


def executor_ops(settings: Settings) -> list[Measurement]:
    """The executor's own device ops on one token, each started on an idle GPU.

    Each is a dozen small torch ops, so from idle its event time is how long Python takes to
    issue them: the per-op cost the stand-in's ``kernel_launch_overhead_us`` stands for, which
    the back-to-back kernel figure leaves out (on a GPU the executor's queued device time per
    layer was tens of times the prediction from that figure). Recorded beside the profile and
    in its comment, not yet charged: see docs/calibration.md, "Known gaps".
    """
    import torch

    from hw_backend.merge import lse_merge, partial_attention, softmax_union

    scale = 1 / math.sqrt(HEAD_DIM)
    q = torch.randn(1, HEADS, HEAD_DIM, device="cuda")
    k = torch.randn(1, KV_HEADS, 1, HEAD_DIM, device="cuda")
    v = torch.randn_like(k)
    part = partial_attention(q, k, v, scale)
    logits = torch.randn(1, HEADS, 1, device="cuda")
    rows = torch.randn(1, HEADS, 1, HEAD_DIM, device="cuda")
    ops = {
        "partial_attention": lambda: partial_attention(q, k, v, scale),
        "lse_merge": lambda: lse_merge([part, part]),
        "softmax_union": lambda: softmax_union(part, logits, rows),
    }
    out = []
    for name, fn in ops.items():
        seconds = _event_times(fn, settings.repeats * 2)
        out.append(Measurement("cuda", "executor_op", representative(seconds) * 1e6, "us",
                               {"op": name, "tokens": 1}, seconds))
    return out


def _graphs():
    from hw_backend.graphs import GraphCache

    return GraphCache(capture=True)


def graph_launch(settings: Settings) -> list[Measurement]:
    """Device time per replay of a one-kernel graph, replayed back to back (what the graph
    path pays per executor op beyond its kernels), the host's time to issue one replay, and the
    device's gap between kernels inside a graph (a 20-kernel graph against the 1-kernel one)."""
    import time

    import torch

    x = torch.zeros(1, device="cuda")
    kernels = 20
    cache = _graphs()
    one = cache.graph("one", lambda: x.add_(1.0))
    many = cache.graph("many", lambda: [x.add_(1.0) for _ in range(kernels)])
    count = 200 if settings.quick else 2000

    def replays(graph, n):
        def run() -> None:
            for _ in range(n):
                graph.replay()
        return run

    seconds = _event_times(replays(one, count), settings.repeats)
    per_replay = representative(seconds) / count
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    replays(one, count)()
    host = (time.perf_counter() - t0) / count
    torch.cuda.synchronize()
    many_count = max(1, count // 10)
    many_seconds = _event_times(replays(many, many_count), settings.repeats)
    per_many = representative(many_seconds) / many_count
    gap = max(per_many - per_replay, 0.0) / (kernels - 1)
    return [
        Measurement("cuda", "graph_launch", per_replay * 1e6, "us",
                    {"replays": count, "host_us": host * 1e6}, seconds),
        Measurement("cuda", "graph_kernel_gap", gap * 1e6, "us",
                    {"kernels": kernels, "replay_us": per_many * 1e6}, many_seconds),
    ]


def graph_ops(settings: Settings) -> list[Measurement]:
    """The graph path's device ops (``graph_programs``) at their smallest bucket, each one
    captured graph replayed from an idle GPU: the fixed device cost of an executor op there."""
    import torch

    from hw_backend import graph_programs as gp
    from hw_backend.buckets import MIN_BUCKET

    dtype = torch.bfloat16
    n, scale = MIN_BUCKET, 1 / math.sqrt(HEAD_DIM)
    q = torch.randn(1, HEADS, HEAD_DIM, device="cuda")
    k = torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    valid = torch.tensor([n], device="cuda")
    out = torch.zeros(1, HEADS, HEAD_DIM, device="cuda")
    lse = torch.zeros(1, HEADS, device="cuda")
    part = (torch.zeros_like(out), torch.zeros_like(lse))
    logits = torch.randn(HEADS * n, device="cuda")
    rows = torch.randn(HEADS * n * HEAD_DIM, device="cuda", dtype=dtype)

    def keep(result) -> None:
        out.copy_(result[0])

    programs = {
        "attention": lambda: keep(gp.masked_partial_attention(q, k, v, valid, scale)),
        "softmax_union": lambda: keep(gp.softmax_union_padded(part, logits, rows, valid,
                                                              per_head=True)),
        "lse_merge": lambda: keep(gp.lse_merge_pair(part, (out, lse))),
        "stream_merge": lambda: keep(gp.stream_merge(part, q, k, v, valid, scale)),
        "rows_merge": lambda: keep(gp.rows_merge(part, q, rows, rows, valid, n, scale)),
    }
    cache, measured = _graphs(), []
    for name, program in programs.items():
        graph = cache.graph(name, program)
        seconds = _event_times(graph.replay, settings.repeats * 2)
        measured.append(Measurement("cuda", "graph_op", representative(seconds) * 1e6, "us",
                                    {"op": name, "bucket": n}, seconds))
    return measured


def graph_attention(settings: Settings) -> list[Measurement]:
    """The graph path's device attention (masked, over a bucket of slots) per context, bf16
    K/V, as a captured graph: the rate the simulator gets from ``hbm_bandwidth_gbps *
    attention_efficiency`` when the executor runs graphs."""
    import torch

    from hw_backend import graph_programs as gp

    scale = 1 / math.sqrt(HEAD_DIM)
    q = torch.randn(1, HEADS, HEAD_DIM, device="cuda")
    out = torch.zeros(1, HEADS, HEAD_DIM, device="cuda")
    rows, sizes, times = [], [], []
    cache = _graphs()
    for tokens in settings.cuda_attention_tokens:
        shape = (1, KV_HEADS, tokens, HEAD_DIM)
        K = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        V = torch.randn_like(K)
        valid = torch.tensor([tokens], device="cuda")
        graph = cache.graph(("attention", tokens), lambda K=K, V=V, valid=valid: out.copy_(
            gp.masked_partial_attention(q, K, V, valid, scale)[0]))
        seconds = _event_times(graph.replay, settings.repeats)
        nbytes = 2 * K.numel() * K.element_size()
        t = representative(seconds)
        rows.append(Measurement("cuda", "graph_attention", nbytes / t / 1e9, "GB/s",
                                {"context": tokens, "bytes": nbytes, "kv_dtype": "bf16"},
                                seconds))
        sizes.append(nbytes)
        times.append(t)
    fixed, slope = fit_line(sizes, times)
    rows.append(Measurement("cuda", "graph_attention_fit", 1 / slope / 1e9, "GB/s",
                            {"fixed_us": fixed * 1e6}))
    cache.clear()
    return rows


#: Weight matrices of one decode step's linear layers at Llama-3.1-8B's shapes: QKV, output
#: projection, SwiGLU gate|up and down (input, output features).
DECODE_GEMMS = ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))


def decode_gemm(settings: Settings) -> list[Measurement]:
    """One token (batch 1) through a weight matrix, bf16: a GEMV that streams the weights, so
    its rate in GB/s of weights is what decode's projections and FFN achieve of the HBM."""
    import torch

    shapes = ((1024, 4096),) if settings.quick else DECODE_GEMMS
    out = []
    for n_in, n_out in shapes:
        w = torch.randn(n_in, n_out, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, n_in, device="cuda", dtype=torch.bfloat16)
        seconds = _event_times(lambda x=x, w=w: x @ w, settings.repeats * 2)
        nbytes = w.numel() * w.element_size()
        out.append(Measurement("cuda", "decode_gemm", nbytes / representative(seconds) / 1e9,
                               "GB/s", {"shape": [n_in, n_out], "bytes": nbytes,
                                        "dtype": "bf16"}, seconds))
        del w
    return out


def pinned_copies(settings: Settings) -> list[Measurement]:
    """Pinned host <-> device copies per size, each direction fitted as latency + size / rate."""
    import torch

    sizes = list(settings.copy_sizes) + ([] if settings.quick else [1 << 28])
    rows = []
    for direction in ("h2d", "d2h"):
        fit_x, fit_y = [], []
        for nbytes in sizes:
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            if direction == "h2d":
                seconds = _event_times(lambda d=dev, h=host: d.copy_(h, non_blocking=True),
                                       settings.repeats * 2)
            else:
                seconds = _event_times(lambda d=dev, h=host: h.copy_(d, non_blocking=True),
                                       settings.repeats * 2)
            t = representative(seconds)
            rows.append(Measurement("cuda", f"{direction}_copy", nbytes / t / 1e9, "GB/s",
                                    {"bytes": nbytes, "pinned": True}, seconds))
            fit_x.append(nbytes)
            fit_y.append(t)
            del host, dev
        fixed, slope = fit_line(fit_x, fit_y)
        rows.append(Measurement("cuda", f"{direction}_fit", 1 / slope / 1e9, "GB/s",
                                {"latency_us": fixed * 1e6}))
    return rows


def plan(settings: Settings) -> list[Job]:
    """The CUDA benchmarks. Those whose figures a profile can do without are optional (a
    failure leaves them out); HBM bandwidth, GEMM peaks and the pinned copies (the PCIe link)
    are required fields of the profile, so their failure still ends the calibration at once
    rather than after every other benchmark, at the check of the written profile."""
    required = [
        Job("CUDA: HBM bandwidth (device copy)", lambda: hbm_bandwidth(settings)),
        Job("CUDA: GEMM FLOP/s", lambda: gemm(settings)),
    ]
    optional = [
        Job("CUDA: decode attention throughput", lambda: attention(settings)),
        Job("CUDA: decode GEMMs (one token, weight streaming)", lambda: decode_gemm(settings)),
        Job("CUDA: graph-path attention throughput", lambda: graph_attention(settings)),
        Job("CUDA: kernel launch overhead", lambda: launch_overhead(settings)),
        Job("CUDA: graph replay cost and in-graph kernel gap", lambda: graph_launch(settings)),
        Job("CUDA: executor ops on one token, from idle", lambda: executor_ops(settings)),
        Job("CUDA: graph-path ops at their smallest bucket, from idle",
            lambda: graph_ops(settings)),
    ]
    return [*required, *(replace(job, optional=True) for job in optional),
            Job("CUDA: pinned H2D/D2H copies by size", lambda: pinned_copies(settings))]
