"""Energy and cost figures borrowed from another profile (``hgsim calibrate --energy-from``).

Calibration measures speeds, not prices, and watts only where the machine exposes them
(``calibration.power``); without these figures a calibrated profile's energy and cost columns
are NaN. So they are copied by component kind from a profile that cites them (the GPU's to
gpu0, the first socket's to every socket, a tier's or link's to every one of its kind, the
``cost:`` block), each comment naming the profile and the figure's original source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hgsim.config_io import load_yaml
from hgsim.errors import UserError
from hw_backend.calibration.profile_writer import Node

OPTION = "--energy-from"
GPU_FIELDS = ("idle_power_w", "tdp_w", "energy_pj_per_flop", "hbm_energy_pj_per_bit", "price_usd")
SOCKET_FIELDS = ("idle_power_w", "active_core_power_w", "price_usd")
TIER_FIELDS = ("background_power_w_per_gb", "read_energy_pj_per_bit", "write_energy_pj_per_bit",
               "price_usd_per_gb")
LINK_FIELDS = ("energy_pj_per_bit",)
COST_FIELDS = ("server_base_usd", "amortisation_years", "electricity_usd_per_kwh", "pue")

Borrowed = dict[str, tuple[Any, str]]  # field -> (value, comment naming where it came from)


@dataclass(frozen=True)
class EnergySource:
    """The figures of one profile, per component kind, ready to be written elsewhere."""

    name: str
    gpu: Borrowed = field(default_factory=dict)
    socket: Borrowed = field(default_factory=dict)
    tiers: dict[str, Borrowed] = field(default_factory=dict)  # tier kind -> figures
    links: dict[str, Borrowed] = field(default_factory=dict)  # link kind -> figures
    cost: Borrowed = field(default_factory=dict)
    cost_source: str | None = None

    def empty(self) -> bool:
        return not (self.gpu or self.socket or any(self.tiers.values())
                    or any(self.links.values()) or self.cost)


def load(name_or_path: str) -> EnergySource:
    """Read a shipped profile name or a YAML path; every problem is a UserError naming the
    option (checked before any measuring, so a typo costs no minutes)."""
    from hgsim.profiles import load_profile, resolve_profile

    try:
        path = resolve_profile(name_or_path)
        profile = load_profile(path)
    except UserError as exc:
        raise UserError(str(exc), field=OPTION) from None
    doc = load_yaml(path)
    lines = path.read_text().splitlines()
    name = profile.name

    def pick(model: Any, loc: tuple[str, ...], names: tuple[str, ...]) -> Borrowed:
        out = {}
        for key in names:
            value = getattr(model, key, None)
            if value is not None:
                line = doc.lines.get((*loc, key))
                why = trailing_comment(lines[line - 1]) if line else None
                out[key] = (value, f"from {name}: {why}" if why else f"copied from profile {name}")
        return out

    gpu_name = profile.primary_gpu
    sock_name = next(iter(profile.sockets))
    src = EnergySource(
        name,
        gpu=pick(profile.gpus[gpu_name], ("gpus", gpu_name), GPU_FIELDS),
        socket=pick(profile.sockets[sock_name], ("sockets", sock_name), SOCKET_FIELDS),
        tiers=_first_of_kind(profile.tiers, "tiers", TIER_FIELDS, pick),
        links=_first_of_kind(profile.links, "links", LINK_FIELDS, pick),
        cost=pick(profile.cost, ("cost",), COST_FIELDS) if profile.cost else {},
        cost_source=profile.cost.source if profile.cost else None,
    )
    if src.empty():
        raise UserError(f"{path}: profile {name} has no energy or cost figures to copy",
                        field=OPTION)
    return src


def _first_of_kind(group: dict[str, Any], key: str, names: tuple[str, ...], pick) -> dict:
    out: dict[str, Borrowed] = {}
    for item_name, item in group.items():
        if item.kind not in out:
            out[item.kind] = pick(item, (key, item_name), names)
    return out


def trailing_comment(line: str) -> str | None:
    """The ``# ...`` comment ending a YAML line (a ``#`` inside quotes is not one)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[i + 1:].strip() or None
    return None


def apply(root: Node, src: EnergySource) -> list[str]:
    """Add the borrowed figures to a calibrated profile's tree; figures already there (measured
    ones) win. Returns one warning per component kind the source has nothing for."""
    warnings: list[str] = []

    def put(node: Node, figures: Borrowed, what: str) -> None:
        if not figures:
            line = f"{OPTION} {src.name}: no {what} energy/cost figures; left out"
            if line not in warnings:  # one line per kind, however many components share it
                warnings.append(line)
            return
        for key, (value, comment) in figures.items():
            if node.get(key) is None:
                node.insert_before("source", key, value, comment)

    for _, gpu in _children(root.get("gpus"))[:1]:
        figures = dict(src.gpu)
        idle, tdp = gpu.get("idle_power_w"), figures.get("tdp_w", (None,))[0]
        if idle is not None and tdp is not None and idle >= tdp:  # measured idle vs a smaller card
            figures.pop("tdp_w")
            warnings.append(f"{OPTION} {src.name}: its tdp_w {tdp:g} W is not above the measured "
                            f"idle {idle:g} W; tdp_w left out")
        put(gpu, figures, "GPU")
    for _, sock in _children(root.get("sockets")):
        put(sock, src.socket, "socket")
    for kind_of, group, what in ((src.tiers, "tiers", "tier"), (src.links, "links", "link")):
        for _, node in _children(root.get(group)):
            kind = node.get("kind")
            put(node, kind_of.get(kind, {}), f"{kind} {what}")
    if src.cost:
        cost = root.child("cost")
        for key, (value, comment) in src.cost.items():
            cost.add(key, value, comment)
        cost.add("source", f"copied from profile {src.name}"
                           + (f": {src.cost_source}" if src.cost_source else ""))
    else:
        warnings.append(f"{OPTION} {src.name}: no cost block; left out")
    return warnings


def _children(node: Any) -> list[tuple[str, Node]]:
    if not isinstance(node, Node):
        return []
    return [(key, value) for key, value, _ in node.entries if isinstance(value, Node)]
