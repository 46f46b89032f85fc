"""Assembles the profile (sockets, tiers, links, GPU) from the machine and its figures.

Mapping from NUMA to the profile schema: every node with CPUs is a socket ``cpu<i>`` with a DDR
tier ``ddr<i>``; every CPU-less node with memory is a CXL tier ``cxl<j>`` behind a ``cxl`` link to
its nearest socket; sockets are joined by ``upi`` links. The GPU is the CUDA device when there
is one, else the CPU stand-in accelerator, described as such in its model name and comments.
Latency along a route is additive in the simulator (link + tier), so a CXL tier keeps the local
DDR latency and its link carries the difference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hw_backend.calibration import energy_source, power
from hw_backend.calibration import summarize as S
from hw_backend.calibration import summarize_mlp as M
from hw_backend.calibration.profile_writer import Node, Stamp, render
from hw_backend.calibration.records import Measurements
from hw_backend.calibration.summarize import Figure
from hw_backend.calibration.topology import Machine
from hw_backend.numa import node_online_bytes

GB = 1e9


@dataclass(frozen=True)
class Context:
    name: str
    date: str
    machine: Machine
    measurements: Measurements
    cuda: dict[str, Any] | None  # device_info() when CUDA was calibrated
    split: Any  # CoreSplit of the stand-in (None with CUDA)
    kv_dtype: str
    quick: bool
    copy_fit_max: int
    energy: energy_source.EnergySource | None = None  # --energy-from: figures to copy
    power_notes: dict[str, str] = field(default_factory=dict)  # why power was not measured
    # the profile file's stem, which names the raw data beside it (default: the profile's
    # name, which --name may set to something else)
    file_stem: str | None = None


def build(ctx: Context) -> tuple[str, dict[str, Any]]:
    """(YAML text, summary of every figure for the calibration JSON)."""
    stamp = Stamp(ctx.date)
    m, ms = ctx.machine, ctx.measurements
    sockets = {n.id: f"cpu{i}" for i, n in enumerate(m.cpu_nodes)}
    cxl_nodes = [n for n in m.memory_nodes if n.memory_only]
    summary: dict[str, Any] = {}

    root = Node()
    root.add("name", ctx.name)
    gpu_socket = _gpu_socket(ctx, sockets)
    root.add("description", _description(ctx, len(sockets), len(cxl_nodes)))

    gpus = root.child("gpus")
    gpu = gpus.child("gpu0")
    summary["gpu0"] = _gpu(ctx, gpu, stamp, gpu_socket)

    sock_root = root.child("sockets")
    for node in m.cpu_nodes:
        name = sockets[node.id]
        summary[name] = _socket(ctx, sock_root.child(name), stamp, node)

    tiers = root.child("tiers")
    links = root.child("links")
    pcie = summary["gpu0"].pop("_pcie")
    link = links.child("pcie0")
    link.add("kind", "pcie")
    link.add("endpoints", [gpu_socket, "gpu0"])
    stamp.figure(link, "bandwidth_gbps", pcie["bandwidth"])
    stamp.figure(link, "latency_ns", pcie["latency"])
    link.add("source", pcie["source"])
    for node in m.cpu_nodes:
        i = m.cpu_nodes.index(node)
        summary[f"ddr{i}"] = _tier(ctx, tiers.child(f"ddr{i}"), stamp, node, "ddr",
                                   sockets[node.id], None)
    local_latency = {sid: S.memory_figures(ms, sid).get("latency_ns") for sid in sockets}
    for j, node in enumerate(cxl_nodes):
        owner = m.nearest_socket(node)
        link_name = f"cxl{j}_link"
        figs = _tier(ctx, tiers.child(f"cxl{j}"), stamp, node, "cxl", sockets[owner.id],
                     link_name, local_latency.get(owner.id))
        summary[f"cxl{j}"] = figs
        cxl = links.child(link_name)
        cxl.add("kind", "cxl")
        cxl.add("endpoints", [sockets[owner.id], f"cxl{j}"])
        stamp.figure(cxl, "bandwidth_gbps", figs["_link_bw"])
        stamp.figure(cxl, "latency_ns", figs["_link_latency"])
        cxl.add("source", f"hgsim calibrate {ctx.date}: node {node.id} read from socket {owner.id}")
        figs.pop("_link_bw"), figs.pop("_link_latency")
    _upi(ctx, links, stamp, sockets, local_latency)
    summary["power"] = _power_summary(ctx, summary)
    if ctx.energy is not None:
        summary["energy_from"] = {"profile": ctx.energy.name,
                                  "warnings": energy_source.apply(root, ctx.energy)}
    # Which NUMA node each socket and tier is, for validate's micro-cases (the schema has no
    # place for it), and what a core keeps in flight reading another socket's node.
    summary["numa"] = {
        "sockets": {name: node_id for node_id, name in sockets.items()},
        "tiers": {**{f"ddr{i}": n.id for i, n in enumerate(m.cpu_nodes)},
                  **{f"cxl{j}": n.id for j, n in enumerate(cxl_nodes)}},
    }
    remote = {f"node{b}_from_socket{a}": M.remote_mlp(ms, b, a)
              for a in sockets for b in sockets if a != b}
    if any(remote.values()):
        summary["remote_mlp"] = remote

    quick = " (QUICK mode: small buffers, few repeats; not to be relied on)" if ctx.quick else ""
    header = [
        f"Calibrated by `hgsim calibrate` on {ctx.date}{quick}.",
        f"Machine: {m.cpu_model}; {len(m.usable_cpus)} usable CPUs; NUMA nodes "
        f"{[n.id for n in m.nodes]} ({len(cxl_nodes)} CPU-less).",
        "Raw measurements (every repeat) are saved beside this file as "
        f"{ctx.file_stem or ctx.name}.calibration.json / .csv.",
    ]
    if ctx.energy is not None:
        header.append(f"Energy and cost figures not measured here are copied from profile "
                      f"{ctx.energy.name} (each comment says so).")
    if ctx.cuda is None:
        header += [
            "There is NO CUDA device: gpu0 is the executor's CPU STAND-IN accelerator (torch on",
            f"{ctx.split.device_threads} reserved core(s)), measured through its own queues. Its "
            "'HBM' and this socket's DDR",
            "are the same memory and its 'PCIe' is a memory copy. Do not read GPU results from "
            "this profile.",
        ]
    return render(header, root), _jsonable(summary)


def _power_summary(ctx: Context, summary: dict[str, Any]) -> dict[str, str]:
    """What was measured of power, or why not (the profile then simply lacks the figure)."""
    rapl = sorted({key for name, figs in summary.items() if name.startswith("cpu")
                   and isinstance(figs, dict) for key in ("idle_power_w", "active_core_power_w")
                   if key in figs})
    gpu = "idle_power_w" in summary.get("gpu0", {})
    return {
        "rapl": f"measured: socket {', '.join(rapl)}" if rapl else
        f"not measured: {ctx.power_notes.get('rapl') or 'no RAPL readings'}",
        "gpu": "measured: gpu0 idle_power_w" if gpu else
        f"not measured: {ctx.power_notes.get('gpu') or 'no CUDA device'}",
    }


def _description(ctx: Context, sockets: int, cxl: int) -> str:
    what = (f"{ctx.cuda['name']}" if ctx.cuda else
            f"cpu-standin (no CUDA) on {ctx.split.device_threads} of the cores")
    return (f"calibrated {ctx.date}: {ctx.machine.cpu_model}, {sockets} socket(s), "
            f"{cxl} CXL node(s); gpu0 = {what}; kv {ctx.kv_dtype}")


def _gpu_socket(ctx: Context, sockets: dict[int, str]) -> str:
    if ctx.cuda and ctx.cuda.get("numa_node") in sockets:
        return sockets[ctx.cuda["numa_node"]]
    return next(iter(sockets.values()))


def _gpu(ctx: Context, node: Node, stamp: Stamp, socket: str) -> dict[str, Any]:
    ms = ctx.measurements
    if ctx.cuda is not None:
        figs = S.cuda_figures(ms)
        node.add("model", ctx.cuda["name"], stamp.measured("torch.cuda.get_device_name"))
        node.add("hbm_capacity_gb", round(ctx.cuda["total_memory"] / GB, 1),
                 stamp.measured("torch.cuda.get_device_properties total_memory"))
        pcie = {"bandwidth": figs.get("h2d_gbps"), "latency": _us_to_ns(figs.get("h2d_latency_us")),
                "source": f"hgsim calibrate {ctx.date}: pinned copies, CUDA events"}
        copy_engines = 2
        source = f"hgsim calibrate {ctx.date}: CUDA device {ctx.cuda.get('pci') or 0}"
    else:
        ms_read = [r for r in ms.select("memory", "read_bandwidth",
                                        threads=ctx.split.device_threads) if not r.params["remote"]]
        read = max((r.value for r in ms_read), default=0.0)
        figs = S.standin_figures(ms, read, ctx.copy_fit_max)
        node.add("model", f"cpu-standin (no CUDA): torch on {ctx.split.device_threads} reserved "
                          "CPU core(s)", stamp.measured("no CUDA device; the executor's stand-in"))
        total = sum(_node_bytes(ctx.machine, n)[0] for n in ctx.machine.memory_nodes)
        node.add("hbm_capacity_gb", round(total / 2 / GB, 1),
                 stamp.measured("half of MemTotal: the stand-in's buffers share host DRAM"))
        pcie = {"bandwidth": figs.get("pcie_bandwidth_gbps"),
                "latency": figs.get("pcie_latency_ns"),
                "source": f"hgsim calibrate {ctx.date}: stand-in copy queue (a memory copy, "
                          "not PCIe)"}
        copy_engines = 2
        source = (f"hgsim calibrate {ctx.date}: CPU stand-in accelerator, "
                  f"{ctx.split.device_threads} device / {ctx.split.host_threads} host threads"
                  f"{', pinned' if ctx.split.pin else ''}")
    missing = "no measurement of it"
    stamp.figure(node, "hbm_bandwidth_gbps", figs.get("hbm_bandwidth_gbps"))
    peaks = node.child("peak_tflops")
    for dtype, fig in figs["peak_tflops"].value.items():
        stamp.figure(peaks, dtype, fig)
    stamp.figure(node, "kernel_launch_overhead_us", figs.get("kernel_launch_overhead_us"),
                 default=0.0, fallback=missing)
    for key in ("single_launch_overhead_us", "graph_launch_overhead_us", "graph_kernel_gap_us"):
        stamp.figure(node, key, figs.get(key))  # CUDA only; absent when not measured
    node.add("compute_efficiency", 1.0,
             stamp.measured("1 because peak_tflops holds the GEMM rate actually reached"))
    stamp.figure(node, "memory_efficiency", figs.get("memory_efficiency"), default=1.0,
                 fallback=missing)
    stamp.figure(node, "attention_efficiency", figs.get("attention_efficiency"), default=1.0,
                 fallback=missing)
    node.add("copy_engines", copy_engines,
             stamp.measured("uploads and fetches use separate queues (full duplex)"))
    stamp.figure(node, "dma_inflight_bytes", _dma_inflight(pcie))
    gpu_power = power.gpu_figures(ms) if ctx.cuda is not None else {}
    for key, fig in gpu_power.items():
        stamp.figure(node, key, fig)
    node.add("socket", socket)
    node.add("link", "pcie0")
    node.add("source", source)
    return {**figs, **gpu_power, "_pcie": pcie}


def _socket(ctx: Context, node: Node, stamp: Stamp, numa) -> dict[str, Any]:
    m, ms = ctx.machine, ctx.measurements
    figs = S.cpu_kernel_figures(ms, numa.id)
    node.add("model", m.cpu_model, stamp.measured("/proc/cpuinfo model name"))
    node.add("cores", len(m.cpus_of(numa)),
             stamp.measured(f"usable CPUs of NUMA node {numa.id} (sched_getaffinity)"))
    node.add("frequency_ghz", round(m.frequency_ghz, 3), stamp.measured(m.frequency_source))
    node.add("simd", m.simd, stamp.measured("/proc/cpuinfo flags"))
    stamp.figure(node, "attention_gflops_per_core", figs.get("attention_gflops_per_core"))
    stamp.figure(node, "attention_rate_by_kv_dtype", figs.get("attention_rate_by_kv_dtype"))
    stamp.figure(node, "op_overhead_us", figs.get("op_overhead_us"))
    inflight = S.socket_inflight(ms, numa.id)
    stamp.figure(node, "stream_inflight_bytes", inflight.get("stream_inflight_bytes"))
    stamp.figure(node, "gather_inflight_bytes", inflight.get("gather_inflight_bytes"),
                 default=1024, fallback="no pointer chases measured; 16 L1 miss buffers x 64 B "
                                        "assumed")
    gains = M.row_gains(ms, numa.id)
    if gains:
        shown = ", ".join(f"{r} B {g:.2f}" for r, g in sorted(gains.items()))
        stamp.figure(node, "gather_row_gain", Figure(
            {int(r): round(g, 3) for r, g in sorted(gains.items())},
            f"one thread's random row gathers, lines in flight by row size / on one-line rows, "
            f"taken in turns (the prefetchers within a row): {shown}"))
    for key in ("topk_ns_per_insert", "gather_ns_per_row"):
        stamp.figure(node, key, figs.get(key))
    watts = power.socket_figures(ms, len(m.cpu_nodes), m.cpu_nodes.index(numa))
    for key, fig in watts.items():
        stamp.figure(node, key, fig)
    node.add("source", f"hgsim calibrate {ctx.date}: /proc/cpuinfo, C kernel, stream reads, "
                       "pointer chases and row gathers")
    extra = {}
    probe = M.probe_row_costs(ms, numa.id)
    if probe:
        extra["probe_ns_per_row"] = Figure(probe, "memory probe's row gather from cache-resident "
                                                  "rows, ns per row by row size")
    curve = M.mlp_curve(ms, numa.id, numa.id, False, M.tier(ms, numa.id))
    if curve:
        extra["mlp_curve"] = Figure({c: round(n, 2) for c, n in curve},
                                    "lines one core keeps in flight by interleaved chains "
                                    "(N x latency / time per step)")
    return {**figs, **inflight, **extra, **watts}


def _tier(ctx: Context, node: Node, stamp: Stamp, numa, kind: str, socket: str,
          link: str | None, local_latency: Figure | None = None) -> dict[str, Any]:
    figs = S.memory_figures(ctx.measurements, numa.id)
    node.add("kind", kind)
    node.add("capacity_gb", *_capacity(ctx.machine, numa, stamp))
    stamp.figure(node, "read_bandwidth_gbps", figs.get("read_bandwidth_gbps"))
    stamp.figure(node, "write_bandwidth_gbps", figs.get("write_bandwidth_gbps"))
    latency = figs.get("latency_ns")
    if link is not None and latency is not None and local_latency is not None:
        figs["_link_latency"] = Figure(
            round(max(latency.value - local_latency.value, 0.0), 1),
            f"node {numa.id} latency {latency.value:.0f} ns minus local DDR "
            f"{local_latency.value:.0f} ns (route latency = link + tier)")
        latency = Figure(local_latency.value, f"local DDR latency; the CXL link adds the rest "
                                              f"(node {numa.id} measured {latency.value:.0f} ns)")
    elif link is not None:
        figs["_link_latency"] = Figure(0.0, "no local latency to subtract")
    stamp.figure(node, "latency_ns", latency)
    queue, why = M.queue_figure(ctx.measurements, numa.id)
    stamp.figure(node, "queue_delay_at_half_load_ns", queue, default=0.0, fallback=why)
    if queue is not None:
        figs["queue_delay_at_half_load_ns"] = queue
    node.add("socket", socket)
    if link is not None:
        node.add("link", link)
        figs["_link_bw"] = figs.get("read_bandwidth_gbps")
    node.add("source", f"hgsim calibrate {ctx.date}: NUMA node {numa.id}")
    return figs


def _upi(ctx: Context, links: Node, stamp: Stamp, sockets: dict[int, str],
         local_latency: dict[int, Figure | None]) -> None:
    ids = list(sockets)
    for a_i, a in enumerate(ids):
        for b in ids[a_i + 1:]:
            remote = S.remote_figures(ctx.measurements, b, a)
            link = links.child(f"upi_{sockets[a]}_{sockets[b]}")
            link.add("kind", "upi")
            link.add("endpoints", [sockets[a], sockets[b]])
            stamp.figure(link, "bandwidth_gbps", remote.get("read_bandwidth_gbps"), default=1.0,
                         fallback="no remote read measured")
            lat, local = remote.get("latency_ns"), local_latency.get(b)
            mlp = M.remote_mlp(ctx.measurements, b, a)
            lines = (f"; a core of socket {a} keeps {mlp['inflight_lines']:g} lines in flight "
                     f"there (pointer chases)" if "inflight_lines" in mlp else "")
            if lat is not None and local is not None:
                stamp.figure(link, "latency_ns", Figure(
                    round(max(lat.value - local.value, 0.0), 1),
                    f"remote {lat.value:.0f} ns minus local {local.value:.0f} ns{lines}"))
            else:
                link.add("latency_ns", 0.0, "NOT measured")
            link.add("source", f"hgsim calibrate {ctx.date}: socket {a} reading node {b}")


def _node_bytes(machine: Machine, numa) -> tuple[int, str]:
    """Memory of a node. With one node, /proc/meminfo is authoritative: memory hot-plugged into a
    VM (virtio-mem, balloons) can be missing from the node's own meminfo."""
    if len(machine.memory_nodes) == 1:
        try:
            text = Path("/proc/meminfo").read_text()
            kib = int(re.search(r"MemTotal:\s+(\d+)", text).group(1))
            return kib * 1024, "/proc/meminfo MemTotal (the only NUMA node)"
        except (OSError, AttributeError, ValueError):
            pass
    return numa.mem_total_bytes, f"/sys/devices/system/node/node{numa.id}/meminfo MemTotal"


def _capacity(machine: Machine, numa, stamp: Stamp) -> tuple[float, str]:
    """A tier's capacity is the memory installed, as lsmem counts it (docs/profiles.md); what
    the kernel keeps of it is the policies' host reserve, so MemTotal, which leaves that out
    already, is only the fallback where sysfs lists no memory blocks."""
    online = node_online_bytes(numa.id)
    if online:
        return round(online / GB, 1), stamp.measured(
            f"/sys/devices/system/node/node{numa.id}/memory* online blocks (lsmem): installed")
    nbytes, where = _node_bytes(machine, numa)
    return round(nbytes / GB, 1), stamp.measured(
        f"{where}; no memory blocks in sysfs, so the kernel's share is left out twice")


def _dma_inflight(pcie: dict[str, Any]) -> Figure | None:
    """The least a copy engine must keep in flight to reach the measured rate over the link's
    latency (Little's law): a floor, so a DMA from local memory is never predicted slower."""
    bw, lat = pcie.get("bandwidth"), pcie.get("latency")
    if bw is None or lat is None or not bw.value or not lat.value:
        return None
    return Figure(round(bw.value * lat.value), f"copy bandwidth {bw.value:g} GB/s x link latency "
                                               f"{lat.value:g} ns (Little's law)")


def _us_to_ns(fig: Figure | None) -> Figure | None:
    return None if fig is None else Figure(round(fig.value * 1e3, 0), fig.what + " (us -> ns)")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Figure):
        return {"value": _jsonable(value.value), "what": value.what}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
