"""``hgsim profiles``: list, show and check hardware profiles.

Profiles are hand-edited YAML; ``check`` lets people validate a file before a long study uses
it, and ``show`` prints what the simulator will actually read (units applied, grouped).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from hgsim.errors import UserError, one_line
from hgsim.profiles import list_profiles, load_profile, resolve_profile
from hgsim.search_path import user_path
from hgsim.specs.hardware import HardwareProfile


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profiles",
        help="list, show or check hardware profiles",
        description="List hardware profiles (default), show one, or validate profile files.",
    )
    actions = parser.add_subparsers(dest="profiles_action", metavar="ACTION")
    actions.add_parser("list", help="table of all known profiles (the default)")
    show = actions.add_parser("show", help="print one profile, grouped, with units")
    show.add_argument("name", help="profile name (see `hgsim profiles`) or path to a YAML file")
    check = actions.add_parser("check", help="validate profile files (exit 2 if any is invalid)")
    check.add_argument("files", nargs="+", metavar="FILE", help="profile YAML files")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "profiles_action", None) or "list"
    if action == "show":
        return _show(args.name)
    if action == "check":
        return _check(args.files)
    return _list()


def console() -> Console:
    """Rich console; wide when piped so tables are not squeezed into 80 columns."""
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)


def fmt(value: float) -> str:
    """Numbers as people write them: 1,555 / 19.5 / 0.75 (no float noise)."""
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.3f}".rstrip("0").rstrip(".")


# ------------------------------------------------------------------ list
def _list() -> int:
    table = Table(title="Hardware profiles")
    table.add_column("name", no_wrap=True)
    table.add_column("GPU", max_width=30)
    for header in ("HBM GB", "host DRAM GB", "CXL GB", "PCIe GB/s"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("description", min_width=40)
    for name in list_profiles():
        try:
            profile = load_profile(name)
        except UserError as exc:  # one broken file in a search dir should not hide the rest
            print(f"hgsim profiles: warning: {one_line(str(exc))}", file=sys.stderr)
            continue
        table.add_row(name, *_summary(profile))
    console().print(table)
    return 0


def _summary(profile: HardwareProfile) -> list[str]:
    gpu = profile.gpus[profile.primary_gpu]
    ddr = sum(profile.tiers[t].capacity_gb for t in profile.tiers_of_kind("ddr"))
    cxl = sum(profile.tiers[t].capacity_gb for t in profile.tiers_of_kind("cxl"))
    from hgsim.tensor_parallel import host_link

    pcie = host_link(profile, profile.primary_gpu).bandwidth_gbps  # through its switch, if any
    gpus = gpu.model if len(profile.gpus) == 1 else f"{len(profile.gpus)}x {gpu.model}"
    return [gpus, fmt(gpu.hbm_capacity_gb), fmt(ddr), fmt(cxl) if cxl else "-", fmt(pcie),
            profile.description]


# ------------------------------------------------------------------ show
def _show(name: str) -> int:
    path = resolve_profile(name)
    profile = load_profile(path)
    out = console()
    out.print(f"[bold]{profile.name}[/bold]  {profile.description}")
    out.print(f"file: {path}")
    out.print(
        f"host memory: {fmt(profile.host_capacity_bytes() / 1e9)} GB in {len(profile.tiers)} "
        f"tier(s); {len(profile.gpus)} GPU(s), {len(profile.sockets)} socket(s)\n"
    )
    out.print(_topology(profile))
    for gpu_name, gpu in profile.gpus.items():
        out.print(_gpu_table(gpu_name, gpu))
    out.print(_sockets_table(profile))
    out.print(_tiers_table(profile))
    out.print(_links_table(profile))
    energy = _energy_table(profile)
    if energy.row_count:
        out.print(energy)
    sources = [
        (f"{group}.{key}", spec.source)
        for group, items in (("gpus", profile.gpus), ("sockets", profile.sockets),
                             ("tiers", profile.tiers), ("links", profile.links),
                             ("pcie_switches", profile.pcie_switches))
        for key, spec in items.items()
        if spec.source
    ]
    if profile.cost is not None and profile.cost.source:
        sources.append(("cost", profile.cost.source))
    if sources:
        out.print("[bold]Sources[/bold] (per-figure citations are comments in the YAML file)")
        for where, text in sources:
            out.print(f"  {where}: {text}")
    return 0


def _topology(profile: HardwareProfile) -> Tree:
    """The machine as a tree: each socket with its cores, the memory behind it and the GPUs on
    its root complex (through their PCIe switch, if any); then what joins sockets and GPUs."""
    tree = Tree("[bold]topology[/bold] (bandwidth per direction, achievable)")
    for name, sock in profile.sockets.items():
        branch = tree.add(f"{name}: {sock.model}, {sock.cores} cores")
        for tier_name, tier in profile.tiers.items():
            if tier.socket != name:
                continue
            via = (f", behind {tier.link} ({fmt(profile.links[tier.link].bandwidth_gbps)} GB/s)"
                   if tier.link else "")
            branch.add(f"{tier_name}: {tier.kind.upper()} {tier.capacity_gb:,.4g} GB, "
                       f"{fmt(tier.read_bandwidth_gbps)} GB/s read, {fmt(tier.latency_ns)} ns"
                       f"{via}")
        switches = {s: branch.add(f"{s}: PCIe switch, uplink {fmt(spec.uplink_bandwidth_gbps)} "
                                  f"GB/s, {fmt(spec.latency_ns)} ns")
                    for s, spec in profile.pcie_switches.items() if spec.socket == name}
        for gpu_name, gpu in profile.gpus.items():
            if gpu.socket != name:
                continue
            parent = switches.get(gpu.pcie_switch, branch)
            link = profile.links[gpu.link]
            parent.add(f"{gpu_name}: {gpu.model}, {gpu.hbm_capacity_gb:,.4g} GB HBM, over "
                       f"{gpu.link} ({fmt(link.bandwidth_gbps)} GB/s)")
    for name, link in profile.links.items():
        if link.kind == "upi":
            tree.add(f"{name}: {' <-> '.join(link.endpoints)}, {fmt(link.bandwidth_gbps)} GB/s, "
                     f"{fmt(link.latency_ns)} ns")
    nvlinks = [link for link in profile.links.values() if link.kind == "nvlink"]
    if nvlinks:
        tree.add(f"NVLink: {len(nvlinks)} GPU pairs, {fmt(min(x.bandwidth_gbps for x in nvlinks))}"
                 f" GB/s, {fmt(max(x.latency_ns for x in nvlinks))} ns per ring step")
    return tree


def _gpu_table(name: str, gpu) -> Table:
    table = Table(title=f"GPU {name}: {gpu.model}", show_header=False, title_justify="left")
    table.add_column("field")
    table.add_column("value", justify="right")
    table.add_column("unit")
    rows = [
        ("memory capacity", fmt(gpu.hbm_capacity_gb), "GB"),
        ("memory bandwidth", fmt(gpu.hbm_bandwidth_gbps), "GB/s"),
        *((f"peak {dtype}", fmt(v), "TFLOP/s dense") for dtype, v in gpu.peak_tflops.items()),
        ("kernel launch overhead", fmt(gpu.kernel_launch_overhead_us), "us"),
        ("compute efficiency", f"{gpu.compute_efficiency:.0%}", "of peak FLOP/s"),
        ("memory efficiency", f"{gpu.memory_efficiency:.0%}", "of peak bandwidth"),
        ("attention efficiency", f"{gpu.attention_efficiency:.0%}", "of peak bandwidth"),
        ("copy engines", str(gpu.copy_engines), ""),
        ("DMA bytes in flight", fmt(gpu.dma_inflight_bytes), "per copy engine"),
        ("socket / host link", f"{gpu.socket} / {gpu.link}", ""),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def _sockets_table(profile: HardwareProfile) -> Table:
    table = Table(title="CPU sockets", title_justify="left")
    for header, right in (("name", False), ("model", False), ("cores", True), ("GHz", True),
                          ("SIMD", False), ("attn GFLOP/s/core", True), ("stream B in flight", True),
                          ("gather B in flight", True)):
        table.add_column(header, justify="right" if right else "left")
    for name, sock in profile.sockets.items():
        table.add_row(name, sock.model, str(sock.cores), fmt(sock.frequency_ghz), sock.simd,
                      fmt(sock.attention_gflops_per_core), fmt(sock.stream_inflight_bytes),
                      fmt(sock.gather_inflight_bytes))
    return table


def _tiers_table(profile: HardwareProfile) -> Table:
    table = Table(title="Memory tiers (latency from the tier's own socket)", title_justify="left")
    for header, right in (("name", False), ("kind", False), ("socket", False), ("link", False),
                          ("capacity GB", True), ("read GB/s", True), ("write GB/s", True),
                          ("latency ns", True), ("queueing at half load ns", True)):
        table.add_column(header, justify="right" if right else "left")
    for name, tier in profile.tiers.items():
        table.add_row(name, tier.kind, tier.socket, tier.link or "-", fmt(tier.capacity_gb),
                      fmt(tier.read_bandwidth_gbps), fmt(tier.write_bandwidth_gbps),
                      fmt(tier.latency_ns), fmt(tier.queue_delay_at_half_load_ns))
    return table


def _links_table(profile: HardwareProfile) -> Table:
    table = Table(title="Links (bandwidth per direction, achievable)", title_justify="left")
    for header, right in (("name", False), ("kind", False), ("endpoints", False),
                          ("GB/s", True), ("latency ns", True)):
        table.add_column(header, justify="right" if right else "left")
    behind = {name: [g for g, spec in profile.gpus.items() if spec.pcie_switch == name]
              for name in profile.pcie_switches}
    for name, link in profile.links.items():
        table.add_row(name, link.kind, " <-> ".join(link.endpoints), fmt(link.bandwidth_gbps),
                      fmt(link.latency_ns))
    for name, switch in profile.pcie_switches.items():  # one uplink for the GPUs behind it
        gpus = ", ".join(behind[name]) or "no GPU"
        table.add_row(f"{name} uplink", "pcie switch", f"{switch.socket} <-> {gpus}",
                      fmt(switch.uplink_bandwidth_gbps), fmt(switch.latency_ns))
    return table


def _energy_table(profile: HardwareProfile) -> Table:
    """Power, energy per bit and price figures that are set (hgsim/energy.py, hgsim/tco.py)."""
    table = Table(title="Energy and cost", title_justify="left")
    for header in ("where", "figure", "value", "unit"):
        table.add_column(header, justify="right" if header == "value" else "left")
    units = {"_w": "W", "_w_per_gb": "W/GB", "_pj_per_flop": "pJ/FLOP", "_pj_per_bit": "pJ/bit",
             "_usd": "USD", "_usd_per_gb": "USD/GB", "_usd_per_kwh": "USD/kWh",
             "_years": "years", "pue": ""}
    fields = ("idle_power_w", "tdp_w", "active_core_power_w", "energy_pj_per_flop",
              "hbm_energy_pj_per_bit", "background_power_w_per_gb", "read_energy_pj_per_bit",
              "write_energy_pj_per_bit", "energy_pj_per_bit", "price_usd", "price_usd_per_gb")
    groups = [(f"{group}.{key}", spec) for group, items in (
        ("gpus", profile.gpus), ("sockets", profile.sockets), ("tiers", profile.tiers),
        ("links", profile.links)) for key, spec in items.items()]
    if profile.cost is not None:
        groups.append(("cost", profile.cost))
    for where, spec in groups:
        for name, value in spec.model_dump().items():
            if value is None or not (name in fields or where == "cost") or name == "source":
                continue
            unit = next((u for suffix, u in sorted(units.items(), key=lambda kv: -len(kv[0]))
                         if name.endswith(suffix)), "")
            table.add_row(where, name, fmt(value), unit)
    return table


# ------------------------------------------------------------------ check
def _check(files: list[str]) -> int:
    failed = 0
    for file in files:
        try:
            path = user_path(file)  # an empty name or one too long: a one-line error
            if not path.is_file():  # a FILE argument is never looked up as a name
                raise UserError("not a regular file" if path.exists() else "file not found",
                                source=file)
            profile = load_profile(path)
        except UserError as exc:
            print(f"hgsim profiles check: error: {one_line(str(exc))}", file=sys.stderr)
            failed += 1
            continue
        note = "" if profile.name == Path(file).stem else f" (note: name '{profile.name}')"
        print(f"ok: {file}{note}")
    return 2 if failed else 0
