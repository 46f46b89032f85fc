"""Energy of a simulated decode: joules per component, from the simulator's activity record.

One physically motivated form per component, each a pure function of profile figures and of
what the simulator recorded over a window of ``T`` seconds (never re-derived from formulas):

* GPU: ``idle_power_w x T + energy_pj_per_flop x FLOPs + hbm_energy_pj_per_bit x 8 x HBM
  bytes``, the average capped at ``tdp_w`` (a board cannot draw more; the cap only binds when
  the per-operation figures disagree with the power limit). FLOPs and HBM bytes are those of
  the kernels on its streams, plus what its copy engines moved in and out of device memory.
* CPU socket: ``idle_power_w x T + active_core_power_w x core-seconds`` the simulated work held
  (a core waiting on memory inside a held task still draws active power).
* memory tier (DDR, CXL expander): ``background_power_w_per_gb x capacity_gb x T`` (refresh,
  standby, an expander's controller: installed capacity, used or not) ``+ read_energy_pj_per_bit
  x 8 x bytes read + write_energy_pj_per_bit x 8 x bytes written`` at the device.
* link (PCIe, CXL, UPI): ``energy_pj_per_bit x 8 x bytes`` crossing it, both directions.

Components are keyed by their profile names (``gpu0``, ``cpu0``, ``ddr0``, ``cxl0``, ``pcie0``,
``cxl0-link``). A profile without every energy figure gets no energy (``missing_fields``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hgsim.specs.hardware import CpuSocketSpec, GpuSpec, HardwareProfile, LinkSpec, MemoryTierSpec

PJ = 1e-12
BITS_PER_BYTE = 8

GPU_FIELDS = ("idle_power_w", "tdp_w", "energy_pj_per_flop", "hbm_energy_pj_per_bit")
SOCKET_FIELDS = ("idle_power_w", "active_core_power_w")
TIER_FIELDS = ("background_power_w_per_gb", "read_energy_pj_per_bit", "write_energy_pj_per_bit")
LINK_FIELDS = ("energy_pj_per_bit",)


@dataclass(frozen=True)
class Activity:
    """What each component did over a window of ``window_s`` simulated seconds."""

    window_s: float
    gpu_flops: dict[str, float] = field(default_factory=dict)
    gpu_hbm_bytes: dict[str, float] = field(default_factory=dict)
    core_seconds: dict[str, float] = field(default_factory=dict)  # per socket
    tier_read_bytes: dict[str, float] = field(default_factory=dict)
    tier_write_bytes: dict[str, float] = field(default_factory=dict)
    link_bytes: dict[str, float] = field(default_factory=dict)  # both directions, PCIe included


# ---------------------------------------------------------------------- per component


def gpu_energy_j(spec: GpuSpec, window_s: float, flops: float, hbm_bytes: float) -> float:
    """Idle power over the window plus energy per FLOP and per bit of device-memory traffic;
    at most the board's power limit over the window."""
    joules = (spec.idle_power_w * window_s + spec.energy_pj_per_flop * PJ * flops
              + spec.hbm_energy_pj_per_bit * PJ * BITS_PER_BYTE * hbm_bytes)
    return min(joules, spec.tdp_w * window_s)


def socket_energy_j(spec: CpuSocketSpec, window_s: float, core_seconds: float) -> float:
    """Package idle power over the window plus active power per core-second held."""
    return spec.idle_power_w * window_s + spec.active_core_power_w * core_seconds


def tier_energy_j(spec: MemoryTierSpec, window_s: float, read_bytes: float,
                  write_bytes: float) -> float:
    """Background power of the installed capacity plus energy per bit read and written."""
    return (spec.background_power_w_per_gb * spec.capacity_gb * window_s
            + spec.read_energy_pj_per_bit * PJ * BITS_PER_BYTE * read_bytes
            + spec.write_energy_pj_per_bit * PJ * BITS_PER_BYTE * write_bytes)


def link_energy_j(spec: LinkSpec, bytes_: float) -> float:
    """Energy per bit that crosses the link (its PHYs and controllers at both ends)."""
    return spec.energy_pj_per_bit * PJ * BITS_PER_BYTE * bytes_


# ---------------------------------------------------------------------- whole profile


def missing_fields(profile: HardwareProfile) -> list[str]:
    """Dotted names of the energy figures ``profile`` lacks (empty: it has every one)."""
    out: list[str] = []
    for section, specs, names in (("gpus", profile.gpus, GPU_FIELDS),
                                  ("sockets", profile.sockets, SOCKET_FIELDS),
                                  ("tiers", profile.tiers, TIER_FIELDS),
                                  ("links", profile.links, LINK_FIELDS)):
        for key, spec in specs.items():
            out += [f"{section}.{key}.{n}" for n in names if getattr(spec, n) is None]
    return out


def energy_by_component_j(profile: HardwareProfile, activity: Activity) -> dict[str, float]:
    """Joules of each component over ``activity.window_s``; empty when the profile lacks an
    energy figure (see ``missing_fields``)."""
    if missing_fields(profile):
        return {}
    t = activity.window_s
    out: dict[str, float] = {}
    for name, gpu in profile.gpus.items():
        out[name] = gpu_energy_j(gpu, t, activity.gpu_flops.get(name, 0.0),
                                 activity.gpu_hbm_bytes.get(name, 0.0))
    for name, sock in profile.sockets.items():
        out[name] = socket_energy_j(sock, t, activity.core_seconds.get(name, 0.0))
    for name, tier in profile.tiers.items():
        out[name] = tier_energy_j(tier, t, activity.tier_read_bytes.get(name, 0.0),
                                  activity.tier_write_bytes.get(name, 0.0))
    for name, link in profile.links.items():
        out[name] = link_energy_j(link, activity.link_bytes.get(name, 0.0))
    return out


def activity_between(machine, before: dict[str, tuple[float, float, float]],
                     after: dict[str, tuple[float, float, float]], window_s: float) -> Activity:
    """The components' activity between two ``Recorder.snapshot()`` of ``machine`` (a
    ``hgsim.sim.machine.Machine``): its resources mapped onto the profile's components."""

    def delta(resource: str, what: int) -> float:
        return after.get(resource, (0.0,) * 3)[what] - before.get(resource, (0.0,) * 3)[what]

    carried, flops, core_s = 0, 1, 2
    profile = machine.profile
    gpu_flops, hbm, links = {}, {}, {}
    for name, gpu in profile.gpus.items():
        streams = [s.name for s in machine.gpu_streams(name)]
        copies = {c.name for c in (machine.pcie(name, "h2d"), machine.pcie(name, "d2h"))}
        dma = sum(delta(c, carried) for c in copies)
        gpu_flops[name] = sum(delta(s, flops) for s in streams)
        hbm[name] = sum(delta(s, carried) for s in streams) + dma
        links[gpu.link] = links.get(gpu.link, 0.0) + dma
    gpu_links = {gpu.link for gpu in profile.gpus.values()}  # their bytes are the copies'
    for name, link in profile.links.items():
        if name in gpu_links or link.kind == "nvlink":  # NVLink: no channel (system_activity)
            continue
        a, b = link.endpoints
        links[name] = links.get(name, 0.0) + sum(
            delta(machine.link(name, x, y).name, carried) for x, y in ((a, b), (b, a)))
    return Activity(
        window_s=window_s, gpu_flops=gpu_flops, gpu_hbm_bytes=hbm,
        core_seconds={s: delta(machine.cores(s).name, core_s) for s in profile.sockets},
        tier_read_bytes={t: delta(machine.tier_read(t).name, carried) for t in profile.tiers},
        tier_write_bytes={t: delta(machine.tier_write(t).name, carried) for t in profile.tiers},
        link_bytes=links,
    )
