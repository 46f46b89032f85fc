"""Capacity accounting: does a configuration fit, and where does each byte of KV live?

Every tier has a capacity. A configuration that does not fit is reported infeasible with the
tier and the shortfall; it is never silently simulated. Host KV placement strategies live here
because placement is decided by capacity. They are the ones real systems have:

* ``first_touch``: Linux's default policy. Pages land on the nearest node with free memory,
  so KV fills local DRAM and spills to CXL once DRAM is full; K and V alike (they are
  allocated together, token by token).
* ``interleave``: ``MPOL_INTERLEAVE``, pages round-robin 1:1 over the host tiers (a tier
  that fills drops out of the rotation).
* ``weighted_interleave``: Linux's weighted interleave (6.9+), pages in proportion to each
  tier's read bandwidth, so a stream draws on every tier at once.
* ``semantic``: HybridGen's mapping. Keys, scanned every step, in local DRAM; values, read
  only for the selected rows, on CXL.
* ``importance``: semantic, plus a DRAM copy of the rows that are selected most often.

"Nearest" and "local" are seen from the socket that runs the host work (the policy option
``host_socket``, by default the GPU's socket): its threads allocate and first write the host
KV store, so Linux's first touch puts those pages on its node. Split over every socket
(``host_socket: all``), each socket's share is placed as seen from that socket
(``Policy.place_host``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from hgsim.plan import KvPlacement
from hgsim.specs.hardware import HardwareProfile
from hgsim.units import size_text

GB = 1e9
PlacementStrategy = Literal["first_touch", "interleave", "weighted_interleave", "semantic",
                            "importance"]


@dataclass(frozen=True)
class HbmReserve:
    """HBM kept back from KV: CUDA context, allocator slack and activations (assumption:
    1 GB plus 6% of capacity, in line with vLLM's default gpu_memory_utilization of 0.9)."""

    fixed_gb: float = 1.0
    fraction: float = 0.06

    def bytes_(self, capacity_bytes: float) -> float:
        return self.fixed_gb * GB + self.fraction * capacity_bytes


@dataclass(frozen=True)
class HostReserve:
    """Host memory kept back from KV. A host tier's ``capacity_gb`` is the DRAM installed, and
    neither the kernel nor the serving process leaves all of it to the KV cache:

    * ``kernel_fraction`` of every host tier: Linux keeps a 64-byte ``struct page`` for every
      4 KiB page of RAM it manages (x86-64), 1/64 of the tier, outside MemTotal; for a CXL
      expander onlined as system RAM it sits on the expander or on DRAM, the same bytes either way.
    * ``fixed_gb`` on the DRAM next to the GPU, where the OS and the serving process live
      (estimate: ~0.1 GB kernel image and bounce buffers, ~1 GB OS services, ~3 GB of the
      serving process's own memory (Python, PyTorch, the CUDA runtime's host side) and 4 GiB of
      pinned staging buffers, vLLM's default ``swap_space``). Weights offloaded to host DRAM are
      accounted apart, as what they are."""

    fixed_gb: float = 8.0
    kernel_fraction: float = 1 / 64

    def bytes_(self, profile: HardwareProfile) -> dict[str, float]:
        """Bytes kept back on each host tier of ``profile``."""
        reserved = {n: self.kernel_fraction * t.capacity_gb * GB for n, t in profile.tiers.items()}
        ddr = host_tier_order(profile, ("ddr",)) or host_tier_order(profile, ("cxl",))
        if ddr:
            reserved[ddr[0]] += self.fixed_gb * GB
        return reserved


@dataclass
class MemoryFootprint:
    """Bytes used and available per tier; ``hbm`` is the primary GPU's memory."""

    used_bytes: dict[str, float] = field(default_factory=dict)
    capacity_bytes: dict[str, float] = field(default_factory=dict)
    reason: str | None = None  # set when infeasible for a reason other than a tier overflow

    def add(self, tier: str, bytes_: float) -> None:
        self.used_bytes[tier] = self.used_bytes.get(tier, 0.0) + bytes_

    def shortfalls(self) -> dict[str, float]:
        return {
            tier: used - self.capacity_bytes.get(tier, 0.0)
            for tier, used in self.used_bytes.items()
            if used > self.capacity_bytes.get(tier, 0.0) * (1 + 1e-12)
        }

    @property
    def feasible(self) -> bool:
        return self.reason is None and not self.shortfalls()

    def explain(self) -> str:
        if self.reason:
            return self.reason
        parts = [
            f"{tier} short by {size_text(short)} (needs {size_text(self.used_bytes[tier])}, "
            f"has {size_text(self.capacity_bytes.get(tier, 0))})"
            for tier, short in sorted(self.shortfalls().items())
        ]
        return "; ".join(parts) if parts else "fits"


def hbm_capacity_bytes(profile: HardwareProfile) -> float:
    return profile.gpus[profile.primary_gpu].hbm_capacity_gb * GB


def host_tier_order(profile: HardwareProfile, kinds: tuple[str, ...],
                     near_socket: str | None = None) -> list[str]:
    """Host tiers of the given kinds, those of ``near_socket`` (default: the GPU's) first."""
    near = near_socket or profile.gpus[profile.primary_gpu].socket
    names = [n for n, t in profile.tiers.items() if t.kind in kinds]
    return sorted(names, key=lambda n: (profile.tiers[n].socket != near, n))


def place_host_kv(
    profile: HardwareProfile,
    k_bytes: float,
    v_bytes: float,
    strategy: PlacementStrategy,
    *,
    allow_cxl: bool = True,
    important_fraction: float = 0.0,
    free_bytes: Mapping[str, float] | None = None,
    host_socket: str | None = None,
) -> tuple[KvPlacement, dict[str, float]]:
    """Decide which host tier holds which share of K and of V.

    ``free_bytes`` is what each tier has left for KV (its capacity less the reserve and any
    offloaded weights already there); the whole capacity when not given. "Nearest" is nearest
    ``host_socket`` (default: the GPU's socket), the socket whose threads run the host work:
    they allocate and first write the host KV store, so first touch puts its pages on their
    node. Returns the placement (fractions) and the bytes per tier. When host memory is too
    small the bytes per tier exceed what is free and the caller's footprint reports the
    shortfall.
    """
    kinds = ("ddr", "cxl") if allow_cxl else ("ddr",)
    ddr = host_tier_order(profile, ("ddr",), host_socket)
    cxl = host_tier_order(profile, ("cxl",), host_socket) if allow_cxl else []
    free = {n: (profile.tiers[n].capacity_gb * GB if free_bytes is None else free_bytes[n])
            for n in host_tier_order(profile, kinds, host_socket)}
    if not free:
        raise ValueError("profile has no host memory tier to hold KV")

    if strategy in ("first_touch", "interleave", "weighted_interleave"):
        # K and V pages are allocated together, so both get the same split
        order = ddr + cxl
        if strategy == "first_touch":
            split = _fill(k_bytes + v_bytes, order, free, {})
        else:
            weights = {n: 1.0 if strategy == "interleave" else
                       profile.tiers[n].read_bandwidth_gbps for n in order}
            split = _water_fill(k_bytes + v_bytes, weights, free)
        fractions = _fractions(split, k_bytes + v_bytes, order)
        return KvPlacement(fractions, dict(fractions)), split

    # semantic and importance: keys local, values far
    k_order, v_order = ddr + cxl, cxl + list(reversed(ddr))

    used: dict[str, float] = {}
    k_split = _fill(k_bytes, k_order, free, used)
    v_split = _fill(v_bytes, v_order, free, used)
    gather = None
    if strategy == "importance" and important_fraction > 0 and v_bytes > 0:
        gather = _importance_gather(v_bytes, important_fraction, ddr, free, used, v_split)
    placement = KvPlacement(
        _fractions(k_split, k_bytes, k_order), _fractions(v_split, v_bytes, v_order), gather
    )
    return placement, used


def _importance_gather(v_bytes, important_fraction, ddr, free, used, v_split):
    """Keep V rows of the most-attended tokens in DRAM too, so most gathers hit DRAM.

    The copy costs DRAM capacity; gathers are assumed to hit the DRAM copy in proportion
    ``important_fraction`` (the share of selections that land on important tokens).
    """
    copy_bytes = min(v_bytes * 0.1, sum(free.values()))
    placed = _fill(copy_bytes, ddr, free, used) if ddr else {}
    if not placed:
        return None
    gather = {n: (1 - important_fraction) * b / v_bytes for n, b in v_split.items()}
    for n in placed:
        gather[n] = gather.get(n, 0.0) + important_fraction * placed[n] / copy_bytes
    total = sum(gather.values())
    return {n: g / total for n, g in gather.items()}


def _fill(bytes_: float, order: list[str], free: dict[str, float], used: dict[str, float]):
    """Greedy fill in preference order; overflow lands on the last tier (reported later)."""
    split: dict[str, float] = {}
    remaining = bytes_
    for name in order:
        take = min(remaining, max(free[name], 0.0))
        if take > 0:
            split[name] = take
            free[name] -= take
            used[name] = used.get(name, 0.0) + take
            remaining -= take
        if remaining <= 0:
            break
    if remaining > 0:
        last = order[-1]
        split[last] = split.get(last, 0.0) + remaining
        free[last] -= remaining
        used[last] = used.get(last, 0.0) + remaining
    return split


def _water_fill(bytes_: float, weights: dict[str, float], free: dict[str, float]):
    """Split ``bytes_`` over tiers in proportion to ``weights``; a tier that fills up keeps
    what fits and the rest is shared by the others the same way (an interleave policy whose
    node runs out of pages moves on to the next one). Overflow lands on the last tier."""
    split = {n: 0.0 for n in weights}
    left = bytes_
    active = [n for n in weights if weights[n] > 0 and free[n] > 0]
    while left > 1e-9 * max(bytes_, 1.0) and active:
        total = sum(weights[n] for n in active)
        full = [n for n in active if left * weights[n] / total >= free[n] - split[n]]
        if not full:
            for n in active:
                split[n] += left * weights[n] / total
            left = 0.0
            break
        for n in full:
            take = free[n] - split[n]
            split[n] += take
            left -= take
        active = [n for n in active if n not in full]
    if left > 1e-9 * max(bytes_, 1.0):
        last = list(weights)[-1]
        split[last] += left
    for n, b in split.items():
        free[n] -= b
    return {n: b for n, b in split.items() if b > 0}


def _fractions(split: dict[str, float], total: float, order: list[str]) -> dict[str, float]:
    if total <= 0:
        return {order[0]: 1.0}
    fractions = {n: b / total for n, b in split.items()}
    norm = sum(fractions.values())
    return {n: f / norm for n, f in fractions.items()}


def host_capacities(profile: HardwareProfile) -> dict[str, float]:
    return {n: t.capacity_gb * GB for n, t in profile.tiers.items()}
