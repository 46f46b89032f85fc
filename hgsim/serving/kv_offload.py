"""A host KV store for a server's prefix cache (vLLM's KV offloading, LMCache's CPU backend).

A policy that keeps its KV in HBM (``gpu_only``) can retain few conversations there between
their turns. With a store, every finished turn's KV is also written to host memory (DRAM or a
CXL expander, ``tier``), least recently used evicted past ``capacity_gb``, and a later turn
whose KV has left HBM loads its prefix back over PCIe, layer by layer as its prefill runs
(``PrefillChunk.past_from``), instead of computing it again. The write to the store rides
on the device-to-host copy engine, which such a policy leaves idle, while the GPU decodes, so
it delays nothing and is not timed. Policies that keep KV in host memory themselves retain
their conversations there already: their prefix cache spans the host tiers, and they take
no store.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from hgsim.errors import UserError, quoted
from hgsim.specs.hardware import HardwareProfile


@dataclass(frozen=True)
class KvOffload:
    """The store: ``capacity_gb`` of the host tier ``tier``."""

    capacity_gb: float
    tier: str


def default_tier(profile: HardwareProfile, field: str = "kv_offload_tier") -> str:
    """The DRAM tier of the first GPU's socket (where LMCache's CPU backend puts it), else the
    profile's first DRAM tier; a profile without one is a mistake naming ``field``."""
    from hgsim.capacity import host_tier_order

    ddr = host_tier_order(profile, ("ddr",))  # the GPU's socket's first
    if not ddr:
        raise UserError(f"profile {profile.name} has no DRAM tier for a KV store: name one",
                        field=field)
    return ddr[0]


def kv_offload(profile: HardwareProfile, policy: str, capacity_gb: object,
               tier: str | None = None, *, gb_field: str = "kv_offload_gb",
               tier_field: str = "kv_offload_tier") -> KvOffload | None:
    """The store ``capacity_gb`` of ``tier`` asks for (0: none), checked against the profile and
    the policy; a mistake names ``gb_field`` or ``tier_field``."""
    if isinstance(capacity_gb, bool) or not isinstance(capacity_gb, (int, float)) or not (
            math.isfinite(capacity_gb) and capacity_gb >= 0):
        raise UserError(f"must be a number of GB >= 0, got {capacity_gb!r}", field=gb_field)
    if not capacity_gb:
        if tier is not None:
            raise UserError(f"names the store's tier, and {gb_field} asks for none",
                            field=tier_field)
        return None
    from hgsim.policies.registry import lookup

    if lookup(policy)[0].reads_kv_back:
        raise UserError(f"{policy} keeps KV in host memory itself, so its prefix cache already "
                        "spans the host tiers; a store is for a policy that keeps KV in HBM "
                        "(gpu_only)", field=gb_field)
    name = default_tier(profile, tier_field) if tier is None else tier
    spec = profile.tiers.get(name)
    if spec is None or spec.kind == "hbm":
        host = ", ".join(n for n, t in profile.tiers.items() if t.kind != "hbm")
        raise UserError(f"expected a host memory tier of {profile.name} ({host}), got "
                        f"{quoted(name)}", field=tier_field)
    if capacity_gb > spec.capacity_gb:
        raise UserError(f"{capacity_gb:g} GB is more than {name}'s {spec.capacity_gb:g} GB",
                        field=gb_field)
    return KvOffload(float(capacity_gb), name)


@dataclass
class KvStore:
    """The store's contents: conversations' KV tokens, least recently used first, within
    ``capacity_bytes`` (``bytes_per_token`` each)."""

    capacity_bytes: float
    bytes_per_token: float
    held: OrderedDict[int, int] = field(default_factory=OrderedDict)
    used_bytes: float = 0.0

    def put(self, conversation: int, tokens: int) -> None:
        """Write a conversation's KV (its latest turn's: it replaces the earlier one),
        evicting the least recently used; one larger than the store is not kept."""
        self.used_bytes -= self.held.pop(conversation, 0) * self.bytes_per_token
        size = tokens * self.bytes_per_token
        if size > self.capacity_bytes:
            return
        while self.held and self.used_bytes + size > self.capacity_bytes:
            _, evicted = self.held.popitem(last=False)
            self.used_bytes -= evicted * self.bytes_per_token
        self.held[conversation] = tokens
        self.used_bytes += size

    def get(self, conversation: int) -> int:
        """Tokens held for ``conversation`` (0: none), now the most recently used."""
        if conversation not in self.held:
            return 0
        self.held.move_to_end(conversation)
        return self.held[conversation]
