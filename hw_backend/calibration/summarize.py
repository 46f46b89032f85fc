"""From raw measurements to the figures a profile holds, each with the sentence that justifies it.

Every figure is a ``Figure(value, what)``; ``what`` says which measurement (or system file) the
value came from, and ends up as the figure's YAML comment. The choices that are not obvious:

* ``stream_inflight_bytes`` is what one thread keeps in flight on a streaming read, by Little's
  law its read rate x the loaded latency at that rate; ``gather_inflight_bytes`` the plateau of
  one core's N-chain pointer chases, and a tier's ``queue_delay_at_half_load_ns`` the M/M/1 fit
  to its loaded latency (all in ``summarize_mlp``). A tier's read bandwidth is the best over
  thread counts (what all cores together reach).
* ``attention_gflops_per_core`` is the C kernel's single-thread rate on the operations the
  executor runs on the host, in FLOPs as the simulator counts them (``cpu_kernel``), net of a
  call's fixed cost (``op_overhead_us``, timed directly on a one-block call).
* The stand-in accelerator: ``hbm_bandwidth_gbps`` is the streaming read rate of its own threads,
  ``attention_efficiency`` its measured attention rate over that (under the host kernel's
  concurrent load, as the executor runs them), ``kernel_launch_overhead_us`` the per-op
  overhead, ``peak_tflops`` the GEMM rates it reaches (so ``compute_efficiency`` is 1), and the
  PCIe link the host->device copy fitted as latency + size / bandwidth.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from hw_backend.calibration.records import Measurements
from hw_backend.calibration.settings import HEADS
from hw_backend.calibration.timing import fit_line, net_rate, representative

#: Host operations whose single-thread rate sets ``attention_gflops_per_core``: the streaming
#: part of the host work (exact partial attention). Top-k heap inserts and scattered V-row
#: gathers are charged separately (``topk_ns_per_insert``, ``gather_ns_per_row``).
HOST_OPS = ("partial_attention_flops",)


@dataclass(frozen=True)
class Figure:
    value: Any
    what: str

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "what": self.what}


def _best(rows, key=lambda m: m.value):
    return max(rows, key=key) if rows else None


def memory_figures(ms: Measurements, node: int) -> dict[str, Figure]:
    reads = [m for m in ms.select("memory", "read_bandwidth", node=node) if not m.params["remote"]]
    writes = ms.select("memory", "write_bandwidth", node=node)
    lat = [m for m in ms.select("memory", "latency", node=node) if not m.params["remote"]]
    out: dict[str, Figure] = {}
    if reads:
        best = _best(reads)
        one = [m for m in reads if m.params["threads"] == 1]
        apart = [m.params["threads"] for m in reads if m.params.get("clock") == "wall"]
        note = (f"; {', '.join(map(str, apart))} thread(s) never ran together, wall clock: a "
                "lower bound" if apart else "")
        out["read_bandwidth_gbps"] = Figure(
            round(best.value, 1),
            f"streaming read, {best.params['threads']} thread(s) of socket "
            f"{best.params['socket']}, {best.params['bytes'] >> 20} MiB buffer bound to node {node}"
            f" ({_series(reads, 'threads')}{note}), CPU time per thread")
        if one:
            out["single_thread_read_gbps"] = Figure(round(one[0].value, 1),
                                                    "streaming read by one thread")
    if writes:
        best = _best(writes)
        out["write_bandwidth_gbps"] = Figure(
            round(best.value, 1),
            f"torch fill_, {best.params['threads']} thread(s), buffer bound to node {node} "
            f"({_series(writes, 'threads')})")
    if lat:
        from hw_backend.calibration.summarize_mlp import pooled_latency

        pooled = pooled_latency(ms, node, remote=False)
        sizes = ms.select("memory", "latency_footprint", node=node, remote=False)
        smaller = "".join(f", {m.value:.0f} ns over {m.params['bytes'] >> 20} MiB" for m in
                          sorted(sizes, key=lambda m: m.params["bytes"]))
        out["latency_ns"] = Figure(round(pooled.ns, 1), (
            f"{pooled.describe()} on node {node}; the latency grows with the footprint "
            f"(address translation{smaller})" if smaller else f"{pooled.describe()} on node "
            f"{node}"))
    return out


def remote_figures(ms: Measurements, node: int, reader: int) -> dict[str, Figure]:
    rows = [m for m in ms.select("memory", "read_bandwidth", node=node, socket=reader)
            if m.params["remote"]]
    lat = [m for m in ms.select("memory", "latency", node=node, socket=reader)
           if m.params["remote"]]
    out = {}
    if rows:
        out["read_bandwidth_gbps"] = Figure(round(rows[0].value, 1),
                                            f"socket {reader} threads reading node {node}")
    if lat:
        from hw_backend.calibration.summarize_mlp import pooled_latency

        pooled = pooled_latency(ms, node, reader, remote=True)
        out["latency_ns"] = Figure(round(pooled.ns, 1),
                                   f"socket {reader} reading node {node}: {pooled.describe()}")
    return out


def _series(rows, key: str) -> str:
    return ", ".join(f"{m.params[key]}: {m.value:.1f}" for m in sorted(rows, key=lambda m:
                                                                        m.params[key]))


def _time_over_flops(rows, small=()) -> tuple[float, float]:
    """(fixed s, s/FLOP) of a kernel call across context lengths: time = fixed + FLOPs x slope.

    With ``small``, the directly timed one-block call (``call_overhead``), the fixed cost is its
    time less its little work, and the rate (1 / slope) is the median over contexts of FLOPs /
    (time - fixed). A line fitted through the big calls alone extrapolated the fixed cost from
    tens of milliseconds, where their noise swamped it, and the slope swung against it
    (docs/calibration.md, history). Without ``small`` (older data) that line it is.
    """
    times = [representative(m.seconds) for m in rows]
    flops = [m.value * t * 1e9 for m, t in zip(rows, times, strict=True)]  # value is GFLOP/s
    if not small:
        return fit_line(flops, times)
    small_work_s = small[0].params["flops"] / net_rate(flops, times, 0)
    fixed = max(0.0, small[0].value * 1e-6 - small_work_s)
    return fixed, 1 / net_rate(flops, times, fixed)


def _small_call(ms: Measurements, socket: int, threads: int):
    return ms.select("cpu_kernel", "call_overhead", socket=socket, threads=threads)


def _per_core_rate(rows, small=()) -> float | None:
    """GFLOP/s of the per-FLOP part of a call's time (one thread)."""
    if not rows:
        return None
    return 1 / _time_over_flops(rows, small)[1] / 1e9


def _op_overhead_us(rows, small=()) -> float | None:
    """Microseconds a call costs beyond its FLOPs."""
    if len(rows) < 2 and not (rows and small):
        return None
    return _time_over_flops(rows, small)[0] * 1e6


def _op_rates(ms: Measurements, socket: int, threads: int) -> dict[str, float]:
    """Per-core GFLOP/s of each host op (per top-k ratio) with ``threads`` kernel threads."""
    rates: dict[str, float] = {}
    for op in HOST_OPS:
        rows = ms.select("cpu_kernel", op, socket=socket, threads=threads)
        for ratio in sorted({m.params.get("topk_ratio") for m in rows}, key=lambda r: r or 0):
            subset = [m for m in rows if m.params.get("topk_ratio") == ratio]
            label = op.removesuffix("_flops") + (f"@{ratio:g}" if ratio is not None else "")
            rate = _per_core_rate(subset, _small_call(ms, socket, threads))
            if rate is not None:
                rates[label] = rate / threads
    return rates


def cpu_kernel_figures(ms: Measurements, socket: int) -> dict[str, Figure]:
    rates = _op_rates(ms, socket, 1)
    if not rates:
        return {}
    value = statistics.mean(rates.values())
    detail = ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
    scaling = _scaling(ms, socket)
    return {
        "attention_gflops_per_core": Figure(
            round(value, 2),
            f"C kernel, 1 thread, mean of the host ops' FLOP/s as the simulator counts them "
            f"({detail}; net of the fixed cost, contexts {_contexts(ms)}){scaling}"),
        **_overhead_figure(ms, socket),
        **_dtype_factor_figure(ms, socket),
        "op_rates": Figure(rates, "per-op single-thread GFLOP/s"),
        "per_threads": Figure(per_thread_figures(ms, socket),
                              "per kernel-thread count: per-core figures measured at that count"),
        **selection_figures(ms, socket),
    }


def _dtype_factor_figure(ms: Measurements, socket: int) -> dict[str, Figure]:
    """``attention_rate_by_kv_dtype``: one-thread partial attention's FLOP rate with KV of each
    other element type (``partial_attention_by_dtype``, timed in the same turns) over its rate
    with the calibrated type at the same contexts (the rate falls with context, so a base taken
    over other contexts would bias the ratio), both net of the same fixed cost of a call."""
    rows = ms.select("cpu_kernel", "partial_attention_by_dtype_flops", socket=socket, threads=1)
    if not rows:
        return {}
    contexts = {m.params["context"] for m in rows}
    own_rows = [m for m in ms.select("cpu_kernel", HOST_OPS[0], socket=socket, threads=1)
                if m.params["context"] in contexts]
    small = _small_call(ms, socket, 1)
    base = _per_core_rate(own_rows, small)
    if not base:
        return {}
    factors, parts = {}, []
    for dtype in sorted({m.params["kv_dtype"] for m in rows}):
        rate = _per_core_rate([m for m in rows if m.params["kv_dtype"] == dtype], small)
        if rate is not None:
            factors[dtype] = round(rate / base, 3)
            parts.append(f"{dtype} {rate:.1f}")
    if not factors:
        return {}
    own = own_rows[0].params["kv_dtype"]
    factors[own] = 1.0
    shown = "/".join(str(c) for c in sorted(contexts))
    return {"attention_rate_by_kv_dtype": Figure(
        dict(sorted(factors.items())),
        f"C kernel, 1 thread, partial_attention's FLOP rate with KV of each type over its "
        f"{own} rate at the same contexts, {base:.1f} GFLOP/s: {', '.join(parts)} (net of the "
        f"fixed cost, contexts {shown}, in the same turns)")}


def _overhead_figure(ms: Measurements, socket: int) -> dict[str, Figure]:
    rows = ms.select("cpu_kernel", HOST_OPS[0], socket=socket, threads=1)
    small = _small_call(ms, socket, 1)
    fixed = _op_overhead_us(rows, small)
    if fixed is None:
        return {}
    how = (f"time of a {small[0].params['context']}-token call less its FLOPs" if small else
           f"intercept of time over size (contexts {_contexts(ms)})")
    return {"op_overhead_us": Figure(
        round(fixed, 1), f"C kernel, 1 thread, {HOST_OPS[0].removesuffix('_flops')}: {how}, "
        f"the fixed cost of a call")}


def selection_figures(ms: Measurements, socket: int) -> dict[str, Figure]:
    """Costs of HybridGen's host work that the simulator's FLOP count does not see (one thread):

    * ``gather_ns_per_row``: the core work of copying one selected V row, timed on rows already
      in the cache (``row_cost``): a cold gather's time per row is mostly memory time, which the
      simulator charges separately (``hgsim.memory.gather_time_s``), so it would count twice.
      The cold figure, ``gather_rows`` time / (heads x k), is kept for reference
      (``gather_rows_cold_ns_per_row``).
    * ``topk_ns_per_insert``: per expected heap insertion ``heads x k x (1 + ln(n / k))``
      (bounded heap over scores without structure), from ``logits_topk`` at two ratios of the
      largest context: the same scan, different numbers of insertions, so the scan and the call
      cancel. The cost per insertion grows with k as the selection buffers outgrow L1 (on the
      Zen 4 VM 5-8 ns at 8k-16k tokens, 11-14 ns at 32k-64k), so the largest context's is the
      one long contexts meet. With one ratio (quick mode) it falls back to ``logits_topk``
      minus the plain ``logits`` scan, which also pays writing every score.

    The simulator charges them after the CPU scan (``hgsim/sim/decode.py``).
    """
    from hw_backend.calibration.summarize_mlp import row_cost_figure

    out: dict[str, Figure] = {}
    gathers, inserts = [], []
    for m in ms.select("cpu_kernel", "gather_rows", socket=socket, threads=1):
        n, ratio = m.params["context"], m.params["topk_ratio"]
        k = max(1, math.ceil(ratio * n))
        gathers.append(representative(m.seconds) / (HEADS * k) * 1e9)
        scan = ms.select("cpu_kernel", "logits", socket=socket, threads=1, context=n)
        topk = ms.select("cpu_kernel", "logits_topk", socket=socket, threads=1, context=n,
                         topk_ratio=ratio)
        if scan and topk:
            extra = representative(topk[0].seconds) - representative(scan[0].seconds)
            inserts.append(max(extra, 0.0) / (HEADS * k * (1 + math.log(n / k))) * 1e9)
    cached = row_cost_figure(ms, socket)
    if cached is not None:
        out["gather_ns_per_row"] = cached
    if gathers:
        out["gather_rows_cold_ns_per_row"] = Figure(
            round(statistics.median(gathers), 1), "median over contexts and ratios of cold "
            "gather_rows time per (head, selected token): memory time included")
    paired = _insert_cost_by_ratios(ms, socket)
    if paired is not None:
        out["topk_ns_per_insert"] = paired
    elif inserts:
        out["topk_ns_per_insert"] = Figure(round(statistics.median(inserts), 1),
                                           "median of (logits_topk - logits) per expected heap "
                                           "insertion heads*k*(1+ln(n/k))")
    return out


def _insert_cost_by_ratios(ms: Measurements, socket: int) -> Figure | None:
    """ns per expected insertion from ``logits_topk`` at the two extreme ratios of the largest
    context that has both (see ``selection_figures``)."""
    runs = ms.select("cpu_kernel", "logits_topk", socket=socket, threads=1)
    by_context: dict[int, dict[float, float]] = {}
    for m in runs:
        by_context.setdefault(m.params["context"], {})[m.params["topk_ratio"]] = \
            representative(m.seconds)
    both = sorted(n for n, r in by_context.items() if len(r) >= 2)
    if not both:
        return None

    def inserts(n: int, ratio: float) -> float:
        k = max(1, math.ceil(ratio * n))
        return HEADS * k * (1 + math.log(n / k)) if k < n else 0.0

    costs = {}
    for n in both:
        times = by_context[n]
        lo, hi = min(times), max(times)
        more = inserts(n, hi) - inserts(n, lo)
        if more > 0:
            costs[n] = max(times[hi] - times[lo], 0.0) / more * 1e9
    if not costs:
        return None
    n = max(costs)
    lo, hi = min(by_context[n]), max(by_context[n])
    shown = ", ".join(f"{c // 1024}k {v:.1f}" for c, v in sorted(costs.items()))
    return Figure(round(costs[n], 1), (
        f"logits_topk at ratios {hi:g} minus {lo:g} over the extra expected insertions "
        f"heads*k*(1+ln(n/k)), at the largest context, {n // 1024}k (ns by context: {shown})"))


def per_thread_figures(ms: Measurements, socket: int) -> dict[int, dict[str, float]]:
    """Per-core figures at each calibrated kernel-thread count n.

    The simulator scales one per-core figure linearly with cores, but n threads share the
    memory system. So for n threads: ``attention_gflops_per_core`` is the single-thread figure
    times the scaling efficiency of the streaming kernel (partial attention's per-core rate at n
    over its rate at 1; top-k's chunked heaps scale differently and are left out), and
    ``stream_inflight_bytes`` is the n-thread read bandwidth / n x the local latency (what one of
    n cores keeps in flight), and ``op_overhead_us``
    the fixed cost of a call at n threads (fork and join grow with n); from the memory probes
    (``summarize_mlp.per_thread_memory``), ``stream_inflight_bytes`` (what each of n cores keeps
    in flight on the n-thread read, by Little's law over the loaded latency) and
    ``gather_inflight_bytes`` (likewise on n-thread random row gathers of the KV row size; by
    row size in ``gather_inflight_by_row_bytes``). Validation runs with n kernel threads scale
    the profile's rate by ``scaling_efficiency`` and use those in-flight figures and that
    overhead.
    """
    from hw_backend.calibration.summarize_mlp import per_thread_memory

    memory = per_thread_memory(ms, socket)
    one = _op_rates(ms, socket, 1)
    if not one:
        return {}
    base = statistics.mean(one.values())
    counts = sorted({m.params["threads"] for m in ms
                     if m.group == "cpu_kernel" and m.params.get("socket") == socket})
    out = {}
    for n in counts:
        efficiency = 1.0 if n == 1 else _efficiency(ms, socket, n)
        out[n] = dict(memory.get(n, {}))
        if efficiency is None:  # the n threads never ran together: no kernel figures at n
            continue
        rates = _op_rates(ms, socket, n)
        out[n].update({"attention_gflops_per_core": round(base * efficiency, 3),
                       "scaling_efficiency": round(efficiency, 3),
                       "op_rates": {k: round(v, 3) for k, v in rates.items()}})
        fixed = _op_overhead_us(
            _ran_together(ms.select("cpu_kernel", HOST_OPS[0], socket=socket, threads=n)),
            _ran_together(_small_call(ms, socket, n)))
        if fixed is not None:
            out[n]["op_overhead_us"] = round(fixed, 1)
    return out


def _ran_together(rows):
    """The kernel rows whose threads ran together (CPU time per thread): a wall-clock row of
    several threads (they only took turns on a busy machine) says nothing about scaling."""
    return [m for m in rows if m.params.get("clock") != "wall" or m.params.get("threads") == 1]


def _efficiency(ms: Measurements, socket: int, n: int) -> float | None:
    """Median over contexts of partial attention's speed-up at n threads, divided by n (a
    median, not a slope: one context caught in a slow phase of a shared machine must not set
    the figure); None where the n threads never ran together."""
    ratios = []
    for m in _ran_together(ms.select("cpu_kernel", "partial_attention", socket=socket,
                                     threads=n)):
        single = ms.select("cpu_kernel", "partial_attention", socket=socket, threads=1,
                           context=m.params["context"])
        if single:
            ratios.append(representative(single[0].seconds) / representative(m.seconds) / n)
    return statistics.median(ratios) if ratios else None


def _contexts(ms: Measurements) -> str:
    return "/".join(str(c) for c in sorted({m.params["context"] for m in ms
                                            if m.group == "cpu_kernel"
                                            and m.name != "call_overhead"}))


def _scaling(ms: Measurements, socket: int) -> str:
    """How partial attention scales with threads (the simulator assumes linearly)."""
    counts = sorted({m.params["threads"] for m in ms.select("cpu_kernel", "partial_attention",
                                                             socket=socket)})
    if len(counts) < 2:
        return ""
    parts = ", ".join(f"{n} thr {e:.2f}" if (e := _efficiency(ms, socket, n)) is not None
                      else f"{n} thr not measured (its threads never ran together)"
                      for n in counts if n > 1)
    return f"; per-thread scaling efficiency of partial attention: {parts}"


def socket_inflight(ms: Measurements, node: int) -> dict[str, Figure]:
    """Bytes one core keeps in flight on streams and on random rows (``summarize_mlp``)."""
    from hw_backend.calibration.summarize_mlp import (
        gather_inflight_figure,
        stream_inflight_figure,
    )

    out: dict[str, Figure] = {}
    for key, fig in (("stream_inflight_bytes", stream_inflight_figure(ms, node)),
                     ("gather_inflight_bytes", gather_inflight_figure(ms, node))):
        if fig is not None:
            out[key] = fig
    return out


def standin_figures(ms: Measurements, read_gbps: float, fit_max: int) -> dict[str, Figure]:
    """The stand-in accelerator's GPU entry; ``read_gbps`` is its threads' read bandwidth and
    ``fit_max`` the largest copy in the link's fit."""
    out: dict[str, Figure] = {}
    loaded = ms.value("standin", "attention_loaded_fit")
    alone = ms.value("standin", "attention_fit")
    attn = loaded or alone
    fit = ms.select("standin", "attention_loaded_fit" if loaded else "attention_fit")
    gemv = ms.value("standin", "decode_gemm")
    hbm = max(read_gbps, attn or 0.0, gemv or 0.0)
    seen = [f"streaming read {read_gbps:.1f}"] + ([f"one-token GEMM {gemv:.1f}"] if gemv else [])
    out["hbm_bandwidth_gbps"] = Figure(
        round(hbm, 1), "fastest read rate of the stand-in's own threads (its 'HBM' is host "
        f"DRAM; GB/s: {', '.join(seen)})")
    if attn:
        how = "while the C kernel ran on the host cores" if loaded else "alone"
        also = f"; alone {alone:.2f} GB/s" if loaded and alone else ""
        out["attention_efficiency"] = Figure(
            round(min(attn / hbm, 1.0), 4),
            f"merge.partial_attention on the stand-in's queue: {attn:.2f} GB/s of KV "
            f"(median over contexts net of a one-token call, {how}{also}) / "
            f"hbm_bandwidth_gbps")
        out["attention_fixed_us"] = Figure(round(fit[0].params["fixed_us"], 1),
                                           "a one-token attention on the compute queue")
        if loaded and alone:
            out["attention_efficiency_alone"] = Figure(
                round(min(alone / hbm, 1.0), 4),
                f"merge.partial_attention on the stand-in's queue with the host kernel idle: "
                f"{alone:.2f} GB/s / hbm_bandwidth_gbps (validate predicts cases without host "
                "work with it)")
    host = ms.select("standin", "host_loaded")
    if host:
        p = host[0].params
        out["host_loaded_slowdown"] = Figure(
            round(host[0].value, 3),
            f"1-thread C kernel over {p['context']} tokens on the host cores: mean time while "
            f"the stand-in attends over {p['device_tokens']} resident tokens / mean time alone "
            f"({p['alone_s'] * 1e3:.2f} ms), taken in turns")
    copy = ms.value("standin", "device_copy")
    if gemv:  # a whole model's projections and FFN are such GEMVs
        also = f"; device-to-device copy {copy:.1f} GB/s read+write" if copy else ""
        out["memory_efficiency"] = Figure(
            round(min(gemv / hbm, 1.0), 4),
            f"one-token GEMMs stream their weights at {gemv:.1f} GB/s on the compute queue / "
            f"hbm_bandwidth_gbps{also}")
    elif copy:
        out["memory_efficiency"] = Figure(
            round(min(copy / 2 / hbm, 1.0), 4),
            f"device-to-device copy {copy:.1f} GB/s (read+write), read half / hbm_bandwidth_gbps")
    overhead = ms.value("standin", "op_overhead")
    if overhead is not None:
        out["kernel_launch_overhead_us"] = Figure(
            round(overhead, 1), "submit-to-done of a one-token attention on the compute queue")
    gemms = ms.select("standin", "gemm")
    peaks = {}
    for dtype in ("fp32", "bf16", "fp16"):
        best = _best([m for m in gemms if m.params["dtype"] == dtype])
        if best:
            peaks[dtype] = Figure(round(best.value, 4),
                                  f"torch.matmul {best.params['n']}^2 {dtype} on the compute queue")
    out["peak_tflops"] = Figure(peaks, "GEMM")
    h2d = ms.select("standin", "h2d_fit")
    copies = ms.select("standin", "h2d_copy")
    if h2d:
        fitted = [m for m in copies if m.params["bytes"] <= fit_max]
        beyond = [m for m in copies if m.params["bytes"] > fit_max]
        note = "".join(f"; {_human(m.params['bytes'])} copies reach {m.value:.1f} GB/s (fresh "
                       "mmap, page faults)" for m in beyond)
        out["pcie_bandwidth_gbps"] = Figure(
            round(h2d[0].value, 2),
            "host tensor into a fresh stand-in allocation on the copy queue (as the executor "
            f"uploads), slope over {_sizes(fitted)}{note}")
        fetch = ms.value("standin", "d2h_fetch")
        latency_us = h2d[0].params["latency_us"]
        if fetch is not None:
            out["pcie_latency_ns"] = Figure(
                round(1e3 * fetch, 0), f"a host thread fetching a query after device work (d2h) "
                f"{fetch:.1f} us; upload fit intercept {latency_us:.1f} us")
        else:
            out["pcie_latency_ns"] = Figure(round(1e3 * latency_us, 0), "upload fit intercept")
    return out


def _sizes(rows) -> str:
    sizes = sorted(m.params["bytes"] for m in rows)
    return f"{_human(sizes[0])}..{_human(sizes[-1])}" if sizes else "?"


def _human(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def cuda_figures(ms: Measurements) -> dict[str, Figure]:
    """The GPU entry of a CUDA calibration. Where the graph path was measured it sets the
    figures the executor's default CUDA path runs at: ``kernel_launch_overhead_us`` is the
    median fixed device cost of a graph-path op (one replay, its kernels at the smallest
    bucket), since the simulator charges it once per simulated kernel and the executor issues
    one replay per such kernel; ``attention_efficiency`` is the graph path's attention rate;
    ``memory_efficiency`` the one-token GEMMs' weight-streaming rate (decode's projections and
    FFN are such GEMMs). One eager launch, one graph replay and the in-graph kernel gap are
    kept in their own fields."""
    out: dict[str, Figure] = {}
    hbm = ms.value("cuda", "hbm_copy")
    if hbm:
        out["hbm_bandwidth_gbps"] = Figure(round(hbm, 1),
                                           "device-to-device copy, bytes read + written")
        out["memory_efficiency"] = Figure(1.0, "hbm_bandwidth_gbps is the achieved copy rate")
        gemv = ms.select("cuda", "decode_gemm")
        if gemv:
            rate = statistics.median(m.value for m in gemv)
            out["memory_efficiency"] = Figure(
                round(min(rate / hbm, 1.0), 4),
                f"one-token bf16 GEMMs stream their weights at {rate:.0f} GB/s (median over "
                f"{', '.join('x'.join(map(str, m.params['shape'])) for m in gemv)}) / "
                "hbm_bandwidth_gbps")
    graph_attn = ms.value("cuda", "graph_attention_fit")
    attn = ms.value("cuda", "attention_fit")
    if (graph_attn or attn) and hbm:
        rate = graph_attn or attn
        how = ("graph_programs.masked_partial_attention (graph path) over bf16 KV" if graph_attn
               else "merge.partial_attention over fp16 KV")
        also = f"; eager merge.partial_attention {attn:.0f} GB/s" if graph_attn and attn else ""
        out["attention_efficiency"] = Figure(
            round(min(rate / hbm, 1.0), 4),
            f"{how}: {rate:.0f} GB/s (slope over contexts{also}) / hbm_bandwidth_gbps")
    launch = ms.value("cuda", "launch_overhead")
    graph_ops = ms.select("cuda", "graph_op")
    eager_ops = ", ".join(f"{m.params['op']} {m.value:.0f}"
                          for m in ms.select("cuda", "executor_op"))
    if graph_ops:
        fixed = statistics.median(m.value for m in graph_ops)
        detail = ", ".join(f"{m.params['op']} {m.value:.1f}" for m in graph_ops)
        note = f"; eager ops from idle (us): {eager_ops}" if eager_ops else ""
        out["kernel_launch_overhead_us"] = Figure(
            round(fixed, 2), f"median device time of a graph-path op at its smallest bucket, "
            f"one replay from idle (us: {detail}){note}")
    elif launch is not None:
        note = f"; the executor's one-token ops from idle (us): {eager_ops}" if eager_ops else ""
        out["kernel_launch_overhead_us"] = Figure(
            round(launch, 2), f"device time per tiny kernel, back to back{note}")
    if launch is not None:
        out["single_launch_overhead_us"] = Figure(round(launch, 2),
                                                  "device time per tiny kernel, back to back")
    replay = ms.select("cuda", "graph_launch")
    if replay:
        out["graph_launch_overhead_us"] = Figure(
            round(replay[0].value, 2), f"device time per replay of a one-kernel graph, back to "
            f"back (the host issues one in {replay[0].params['host_us']:.1f} us)")
    gap = ms.select("cuda", "graph_kernel_gap")
    if gap:
        out["graph_kernel_gap_us"] = Figure(
            round(gap[0].value, 2), f"(replay of a {gap[0].params['kernels']}-kernel graph - "
            "replay of a 1-kernel graph) / 19")
    peaks = {}
    for dtype in ("fp32", "tf32", "bf16", "fp16"):
        best = _best(ms.select("cuda", "gemm", dtype=dtype))
        if best:
            peaks[dtype] = Figure(round(best.value, 2),
                                  f"torch.matmul {best.params['n']}^2 {dtype}, CUDA events")
    out["peak_tflops"] = Figure(peaks, "GEMM")
    for direction in ("h2d", "d2h"):
        fit = ms.select("cuda", f"{direction}_fit")
        if fit:
            out[f"{direction}_gbps"] = Figure(
                round(fit[0].value, 2),
                f"pinned {direction.upper()} copies, slope over "
                f"{_sizes(ms.select('cuda', f'{direction}_copy'))}")
            out[f"{direction}_latency_us"] = Figure(round(fit[0].params["latency_us"], 2),
                                                    "intercept of the same fit")
    return out
