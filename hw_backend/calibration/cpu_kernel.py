"""Throughput of the C attention kernel (``hw_backend.cpu_attention``) versus threads and context.

These are the operations the executor runs on the host for each plan kind: the fused logits +
top-k scan (HybridGen, at the ratios its scheduler uses), the V-row gather that follows it (and
the two together, ``hybrid_host_op``, as the executor's host worker runs them per layer), and
partial attention with LSE (CPU offload, HGCA). Plain ``logits`` is the scan alone, for
reference. Each is reported in bytes of KV read per second
and in FLOP/s *as the simulator counts them* (``hgsim.costs.layer_work``), because that is the
rate ``attention_gflops_per_core`` must hold for the simulator's CPU phase to last as long as
the kernel does.
"""

from __future__ import annotations

import math
import warnings
from functools import cache
from itertools import cycle

import numpy as np

from hw_backend.calibration.pinned import run_on_cpus
from hw_backend.calibration.records import Measurement
from hw_backend.calibration.settings import HEAD_DIM, HEADS, KV_HEADS, Job, Settings
from hw_backend.calibration.timing import (
    on_cpu_seconds,
    representative,
    timed,
    timed_cpu_round_robin,
)
from hw_backend.calibration.topology import Machine


@cache
def _model():
    from hgsim.specs.model import ModelSpec

    return ModelSpec(
        name="calibration-shape", family="llama", num_layers=1, hidden_size=HEADS * HEAD_DIM,
        num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, ffn_size=1, ffn_kind="swiglu",
        vocab_size=1, max_context=1 << 30,
    )


def sim_cpu_work(op: str, tokens: int, selected: int, kv_dtype: str) -> tuple[float, float]:
    """(FLOPs, bytes) the simulator charges the CPU for ``op`` over ``tokens`` host tokens."""
    from hgsim.costs import layer_work
    from hgsim.plan import CpuWork, KvPlacement, LayerPlan, Merge, Selector, Transfer

    if op == "partial_attention":
        cpu, transfer, merge, sel = (CpuWork.PARTIAL_ATTENTION, Transfer.PARTIAL_OUTPUT,
                                     Merge.LSE, tokens)
    else:
        cpu, transfer, merge, sel = (CpuWork.LOGITS_TOPK, Transfer.LOGITS_AND_V,
                                     Merge.SOFTMAX_UNION, selected)
    plan = LayerPlan(context=tokens, gpu_recent_tokens=0, sink_tokens=0, host_selected=sel,
                     cpu_work=cpu, transfer=transfer, merge=merge, selector=Selector.EXACT_TOPK,
                     placement=KvPlacement.single("ddr0"))
    work = layer_work(_model(), 1, plan, kv_dtype, "fp16", attention_only=True)
    return work.cpu_flops, work.cpu_k_bytes + work.cpu_v_bytes


#: NumPy storage and torch view per KV dtype (bfloat16 lives in uint16 storage).
_STORAGE = {"fp32": (np.float32, None), "fp16": (np.float16, None),
            "bf16": ("bfloat16", "bfloat16")}


def _kv(tokens: int, kv_dtype: str, node: int):
    """Random K and V (1, KV_HEADS, tokens, HEAD_DIM) in memory bound to ``node``."""
    import torch

    from hw_backend.numa import alloc_on_node, to_torch

    shape = (1, KV_HEADS, tokens, HEAD_DIM)
    storage, view = _STORAGE[kv_dtype]
    out = []
    for _ in range(2):
        with warnings.catch_warnings():  # one-node machines: placement is implicit, and known
            warnings.simplefilter("ignore", RuntimeWarning)
            tensor = to_torch(alloc_on_node(shape, storage, node), view)
        tensor.copy_(torch.randn(shape))
        out.append(tensor)
    return out


def _kv_copies(tokens: int, kv_dtype: str, node: int, settings: Settings):
    """([(K, V), ...], bytes of one K): enough copies of random KV to fill the kernel
    footprint together, so that calls rotating through them start from a cold cache."""
    first = _kv(tokens, kv_dtype, node)
    kv_bytes = first[0].numel() * first[0].element_size()
    copies = max(1, math.ceil(settings.kernel_footprint_bytes / (2 * kv_bytes)))
    return [first] + [_kv(tokens, kv_dtype, node) for _ in range(copies - 1)], kv_bytes


def _context_ops(ca, node: int, threads: int, tokens: int, settings: Settings):
    """(name, call, flops, bytes, extra params) of every operation timed at one context, and
    the number of KV copies its calls rotate through."""
    import torch

    sets, kv_bytes = _kv_copies(tokens, settings.kv_dtype, node, settings)
    first, copies = sets[0], len(sets)

    def rotating():
        """Every call takes the next (K, V) copy: calls start from a cold cache, as the
        executor's do (its layers take turns)."""
        return cycle(sets).__next__

    q = torch.randn(1, HEADS, HEAD_DIM)
    # A fresh query per call (warm-up included): each decode step selects different rows, so a
    # gather timed with the same indices again would read rows the previous call left in cache
    # (up to 2x faster than the executor's gathers at 16k tokens, measured).
    queries = [torch.randn(1, HEADS, HEAD_DIM) for _ in range(settings.repeats + 1)]
    ops = []
    kv = rotating()
    flops, _ = sim_cpu_work("logits_topk", tokens, 1, settings.kv_dtype)
    ops.append(("logits", lambda kv=kv: ca.logits(q, kv()[0], num_threads=threads), flops,
                kv_bytes, {}))
    for ratio in settings.topk_ratios:
        k = max(1, math.ceil(ratio * tokens))
        flops, _ = sim_cpu_work("logits_topk", tokens, k, settings.kv_dtype)
        kv = rotating()
        ops.append(("logits_topk", lambda k=k, kv=kv: ca.logits_topk(q, kv()[0], k,
                                                                      num_threads=threads),
                    flops, kv_bytes, {"topk_ratio": ratio}))
        indices = cycle([ca.logits_topk(x, first[0], k, num_threads=threads)[1]
                         for x in queries])
        kv = rotating()
        rows_bytes = HEADS * k * HEAD_DIM * first[0].element_size()
        ops.append(("gather_rows", lambda i=indices, kv=kv: ca.gather_rows(
            kv()[1], next(i), num_threads=threads), 0.0, rows_bytes, {"topk_ratio": ratio}))
        # What the executor's host worker runs per HybridGen layer (HostKernels
        # .logits_and_values): the fused scan + top-k, then the gather of the selected V rows.
        fresh, kv = cycle(queries), rotating()
        ops.append(("hybrid_host_op", lambda k=k, f=fresh, kv=kv: _host_op(
            ca, kv(), next(f), k, threads), flops, kv_bytes, {"topk_ratio": ratio}))
    kv = rotating()
    flops, _ = sim_cpu_work("partial_attention", tokens, tokens, settings.kv_dtype)
    ops.append(("partial_attention", lambda kv=kv: ca.partial_attention(
        q, *kv(), num_threads=threads), flops, 2 * kv_bytes, {}))
    return ops, copies


def _suite(node: int, threads: int, settings: Settings) -> list[Measurement]:
    """Every operation at every context, all calls interleaved repeat by repeat.

    Times are CPU time per thread (``timing.cpu_timing``): on a shared machine a call can wait
    for a core longer than it runs. A shared machine's speed also drifts over seconds. Timing
    one context after another would give each context its own machine state and bend the fit
    of time over size (its slope is the rate, its intercept a call's fixed cost); timing one
    operation after another would do the same to differences between operations (top-k's cost
    is logits_topk minus logits). In turns, every call sees the same mix of states.
    """
    from hw_backend import cpu_attention as ca

    contexts = settings.contexts
    prepared = [_context_ops(ca, node, threads, n, settings) for n in contexts]
    calls = [(tokens, copies, op) for tokens, (ops, copies) in zip(contexts, prepared, strict=True)
             for op in ops]
    if threads == 1:  # the rate with the other KV types, in the same turns
        calls += [(tokens, copies, op) for tokens, dtype in _dtype_points(settings)
                  for op, copies in [_other_dtype_op(ca, node, tokens, dtype, settings)]]
    calls.append((settings.overhead_context, 1, _overhead_op(ca, node, threads, settings)))
    fns = [op[1] for _, _, op in calls]
    runs = timed_cpu_round_robin(fns, [threads] * len(fns), settings.repeats)
    rows = []
    for (tokens, copies, op), timings in zip(calls, runs, strict=True):
        name, _, flops, nbytes, extra = op
        seconds, clock = on_cpu_seconds(timings, threads)
        t = representative(seconds)
        p = {"socket": node, "threads": threads, "context": tokens,
             "kv_dtype": settings.kv_dtype, "kv_copies": copies, "clock": clock,
             "share_each": [round(x.share, 3) for x in timings], **extra}
        if name == "call_overhead":
            rows.append(Measurement("cpu_kernel", name, t * 1e6, "us", p, seconds))
            continue
        rows.append(Measurement("cpu_kernel", name, nbytes / t / 1e9, "GB/s", p, seconds))
        if flops:
            rows.append(Measurement("cpu_kernel", name + "_flops", flops / t / 1e9, "GFLOP/s",
                                    p, seconds))
    return rows


#: KV element types the host kernel's rate is measured with besides the calibrated one
#: (``attention_rate_by_kv_dtype``): what studies run (bf16, fp16) or validation uses (fp32).
RATE_DTYPES = ("fp32", "bf16", "fp16")


def _dtype_points(settings: Settings) -> list[tuple[int, str]]:
    """(context, KV type) of the one-thread partial attention timed with each other KV type:
    the two largest contexts (where a call's fixed cost is a small share; two keep the extra
    KV copies, and the time to fill them, small)."""
    large = sorted(settings.contexts)[-2:]
    return [(n, dtype) for dtype in RATE_DTYPES if dtype != settings.kv_dtype for n in large]


def _other_dtype_op(ca, node: int, tokens: int, kv_dtype: str, settings: Settings):
    """One-thread partial attention over KV of ``kv_dtype``, rotating through copies as the
    suite's own calls do; (op, copies) with the op named ``partial_attention_by_dtype``."""
    import torch

    sets, kv_bytes = _kv_copies(tokens, kv_dtype, node, settings)
    turn = cycle(sets)
    q = torch.randn(1, HEADS, HEAD_DIM)
    flops, _ = sim_cpu_work("partial_attention", tokens, tokens, kv_dtype)
    op = ("partial_attention_by_dtype",
          lambda: ca.partial_attention(q, *next(turn), num_threads=1), flops, 2 * kv_bytes,
          {"kv_dtype": kv_dtype})
    return op, len(sets)


def _overhead_op(ca, node: int, threads: int, settings: Settings):
    """Partial attention over one block of tokens per KV head: what a call costs besides its
    FLOPs (argument checks, thread fork and join, scratch buffers), measured directly. Its
    FLOPs ride along (``flops`` param) so the fixed cost can be told from the little work."""
    import torch

    tokens = settings.overhead_context
    K, V = _kv(tokens, settings.kv_dtype, node)
    q = torch.randn(1, HEADS, HEAD_DIM)
    flops, _ = sim_cpu_work("partial_attention", tokens, tokens, settings.kv_dtype)
    return ("call_overhead", lambda: ca.partial_attention(q, K, V, num_threads=threads), 0.0,
            0, {"flops": flops})


def _host_op(ca, kv, q, k: int, threads: int):
    K, V = kv
    return ca.gather_rows(V, ca.logits_topk(q, K, k, num_threads=threads)[1], num_threads=threads)


class KernelProbe:
    """A few-millisecond re-run of one calibration measurement (1-thread partial attention).

    ``hgsim validate`` runs it before every case: compared with the value calibration recorded
    for the same operation, context and dtype, it shows how far the machine has drifted from
    the state the profile describes.
    """

    def __init__(self, tokens: int, kv_dtype: str = "fp32", node: int = 0, repeats: int = 5):
        import torch

        self.K, self.V = _kv(tokens, kv_dtype, node)
        self.q = torch.randn(1, HEADS, HEAD_DIM)
        self.repeats = repeats
        self.nbytes = 2 * self.K.numel() * self.K.element_size()

    def gbps(self) -> float:
        from hw_backend import cpu_attention as ca

        seconds = timed(lambda: ca.partial_attention(self.q, self.K, self.V, num_threads=1),
                        self.repeats)
        return self.nbytes / representative(seconds) / 1e9


def calibrated_probe(doc: dict, kv_dtype: str = "fp32") -> tuple[int, float] | None:
    """(context, GB/s) of calibration's 1-thread partial attention nearest 16k tokens, from a
    calibration JSON document; None when it has none."""
    found = [(m["params"]["context"], m["value"]) for m in doc.get("measurements", [])
             if m.get("group") == "cpu_kernel" and m.get("name") == "partial_attention"
             and m["params"].get("threads") == 1 and m["params"].get("kv_dtype") == kv_dtype]
    if not found:
        return None
    return min(found, key=lambda cv: abs(math.log2(cv[0] / 16384)))


def plan(machine: Machine, settings: Settings, also_threads: tuple[int, ...] = ()) -> list[Job]:
    """The kernel suite per socket at 1, 2, 4, ... threads, plus ``also_threads`` (a count the
    executor will use, e.g. every core but one next to CUDA, so validation finds its figures)."""
    jobs = []
    for socket in machine.cpu_nodes:
        cpus = machine.cpus_of(socket)
        extra = {n for n in also_threads if 1 <= n <= len(cpus)}
        for threads in sorted(set(settings.thread_counts(len(cpus))) | extra):
            jobs.append(Job(
                f"C kernel on socket {socket.id}: {threads} thread(s), "
                f"{'/'.join(str(n) for n in settings.contexts)} tokens",
                lambda s=socket.id, c=cpus, t=threads: run_on_cpus(c, _suite, s, t, settings),
            ))
    return jobs
