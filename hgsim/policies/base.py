"""What every KV-management policy provides: a memory footprint and a plan per decode step.

A policy never touches SimPy or tensors. It decides placement and work split and returns
``StepPlan`` objects; the simulator and ``hw_backend`` execute them. Policies that adapt
(HybridGen) receive host/device latency through ``observe`` from whichever executor runs them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, field_validator

from hgsim.capacity import (
    HbmReserve,
    HostReserve,
    MemoryFootprint,
    PlacementStrategy,
    hbm_capacity_bytes,
    host_capacities,
    place_host_kv,
)
from hgsim.costs import prefill_chunks
from hgsim.errors import OptionError
from hgsim.plan import KvPlacement, LayerPlan, StepPlan
from hgsim.scheduler import FeedbackScheduler
from hgsim.specs.base import SpecModel
from hgsim.specs.hardware import HardwareProfile
from hgsim.specs.model import DTYPE_BYTES, ModelSpec
from hgsim.units import size_text
from hgsim.workload import Workload

if TYPE_CHECKING:
    from hgsim.accuracy.synthetic import AttentionModelSpec


class PolicyOptions(SpecModel):
    """Knobs shared by all policies; each policy extends this with its own."""

    hbm_reserve_fraction: float = Field(default=0.06, ge=0, lt=1)
    hbm_reserve_gb: float = Field(default=1.0, ge=0)
    # Host memory the OS and the serving process keep (hgsim.capacity.HostReserve).
    host_reserve_gb: float = Field(default=8.0, ge=0)
    host_kernel_fraction: float = Field(default=1 / 64, ge=0, lt=1)
    # Weights that do not fit beside a minimum of KV space are kept in host DRAM and streamed
    # over PCIe layer by layer (FlexGen-style), instead of declaring the model infeasible.
    weight_offload: Literal["auto", "none"] = "auto"
    min_kv_hbm_fraction: float = Field(default=0.1, ge=0, lt=1)
    # The socket whose cores run the host work (CPU attention, top-k, gathers) and whose
    # threads allocate the host KV store: its index in the profile's list of sockets, or its
    # name; None: the GPU's socket. Checked against the profile by ``host_socket_name``.
    # ``all``: every socket of the profile, each with an equal share of the KV heads
    # (``host_split_sockets``; NUMA-aware CPU attention).
    host_socket: int | str | None = None

    @field_validator("host_socket")
    @classmethod
    def _socket_index(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"a socket index is >= 0, got {value}")
        return value

    @property
    def reserve(self) -> HbmReserve:
        return HbmReserve(self.hbm_reserve_gb, self.hbm_reserve_fraction)

    @property
    def host_reserve(self) -> HostReserve:
        return HostReserve(self.host_reserve_gb, self.host_kernel_fraction)


SPLIT_ALL = "all"  # option ``host_socket``'s value for the host work split over every socket


def host_shared(options: object) -> bool:
    """Whether policy options (a dict or a ``PolicyOptions``; None: none) put every rank's
    host work on the same sockets under tensor parallelism: option ``host_socket`` set, to a
    socket (every rank runs there, whichever socket its GPU hangs off) or to ``all`` (every
    rank splits its work over every socket). Unset, each rank works on its own GPU's socket."""
    value = (options.get("host_socket") if isinstance(options, dict)
             else getattr(options, "host_socket", None))
    return value is not None


def host_split_sockets(profile: HardwareProfile,
                       host_socket: int | str | None) -> tuple[str, ...] | None:
    """The sockets that share the host work under option ``host_socket``: every socket of the
    profile, in its listed order, for ``all`` on a profile with several; None otherwise (one
    socket runs it all: ``host_socket_name``)."""
    if host_socket != SPLIT_ALL or len(profile.sockets) < 2:
        return None
    return tuple(profile.sockets)


def host_socket_name(profile: HardwareProfile, host_socket: int | str | None) -> str | None:
    """The profile socket that option ``host_socket`` names (an index into the profile's
    sockets in their listed order, or a name), or None where that is the GPU's own socket:
    a default plan, whatever the spelling (and ``all``, the host work split over every socket,
    which keeps the GPU's socket as the plan's own: ``host_split_sockets``). An
    ``OptionError`` for a socket the profile lacks."""
    if host_socket is None or host_socket == SPLIT_ALL:
        return None
    names = list(profile.sockets)
    if isinstance(host_socket, int):
        name = names[host_socket] if host_socket < len(names) else None
    else:
        name = host_socket if host_socket in profile.sockets else None
    if name is None:
        known = ", ".join(f"{i} ({n})" for i, n in enumerate(names))
        raise OptionError("host_socket", f"profile {profile.name} has no socket "
                                         f"{host_socket!r}; its sockets: {known} (or "
                                         f"{SPLIT_ALL}: every one)", unknown=False)
    return None if name == profile.gpus[profile.primary_gpu].socket else name


class Policy(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    lossy: ClassVar[bool] = False
    # whether K and V may live in host memory, to be read back by a chunked prefill (False:
    # all in HBM, or dropped as H2O does; the prefill then holds no landing blocks)
    reads_kv_back: ClassVar[bool] = True
    # the ``hgsim.accuracy.SelectionModel`` fields a lossy policy's accuracy depends on (its
    # approximate selector's); None: all of them, for a policy that does not say
    selector_parameters: ClassVar[tuple[str, ...] | None] = None
    Options: ClassVar[type[PolicyOptions]] = PolicyOptions

    @classmethod
    def lossy_with(cls, options: PolicyOptions) -> bool:
        """Whether the policy drops attention with these options (a lossy method can be set
        to attend to everything, e.g. HybridGen with every host token selected)."""
        return cls.lossy

    def __init__(
        self,
        model: ModelSpec,
        profile: HardwareProfile,
        workload: Workload,
        options: PolicyOptions | None = None,
        *,
        attention: AttentionModelSpec | None = None,
    ):
        self.model = model
        self.profile = profile
        self.workload = workload
        self.options = options if options is not None else self.Options()
        # the synthetic attention the accuracy model assumes (None: its defaults); a policy
        # whose buffers depend on the data's attention (HybridGen's group union) sizes by it
        self.attention = attention
        self.host_socket = host_socket_name(profile, self.options.host_socket)
        self.host_split = host_split_sockets(profile, self.options.host_socket)
        # per split socket, the placement of its share of the host KV (``place_host``)
        self.split_placements: tuple[KvPlacement, ...] | None = None
        self.scheduler: FeedbackScheduler | None = None
        self.footprint = MemoryFootprint(capacity_bytes={"hbm": hbm_capacity_bytes(profile)})
        self.footprint.capacity_bytes.update(host_capacities(profile))
        self.footprint.add("hbm", self.options.reserve.bytes_(hbm_capacity_bytes(profile)))
        for tier, bytes_ in self.options.host_reserve.bytes_(profile).items():
            self.footprint.add(tier, bytes_)
        self.prefill_workspace_bytes = workload.prefill_workspace_bytes(
            model, reads_back=self.reads_kv_back)
        self.offloaded_weight_bytes = self._place_weights()
        self._hold_prefill_workspace()
        self.setup()

    # ---------------------------------------------------------------- to implement
    @abstractmethod
    def setup(self) -> None:
        """Decide residency and placement; account every byte in ``self.footprint``."""

    @abstractmethod
    def layer_plan(self, context: int) -> LayerPlan:
        """The plan of one layer when ``context`` tokens are in the cache."""

    # ---------------------------------------------------------------- shared
    def step_plan(self, context: int) -> StepPlan:
        return StepPlan(
            policy=self.name,
            batch=self.workload.batch,
            layer=self.layer_plan(context),
            num_layers=self.model.num_layers,
            offloaded_weight_bytes_per_layer=self.offloaded_weight_bytes / self.model.num_layers,
            weight_tier=self.weight_tier,
            host_socket=self.host_socket,
            host_split=self._host_split_plan(),
        )

    def _host_split_plan(self) -> tuple[tuple[str, KvPlacement | None], ...] | None:
        """Each split socket with the placement of its share (None: no host KV); None where
        the host work is not split."""
        if self.host_split is None:
            return None
        placements = self.split_placements or (None,) * len(self.host_split)
        return tuple(zip(self.host_split, placements, strict=True))

    def _place_weights(self) -> float:
        """Put weights in HBM, offloading to host DRAM what would leave too little KV room.

        Returns the offloaded bytes. Offloaded layers stream through a two-layer HBM buffer.
        An attention-only workload has no weights (the executor runs attention alone and holds
        none), so none take room or stream.
        """
        capacity = hbm_capacity_bytes(self.profile)
        weights = self.workload.weight_bytes(self.model)
        reserve = self.options.reserve.bytes_(capacity)
        room = (capacity - reserve - self.prefill_workspace_bytes
                - self.options.min_kv_hbm_fraction * capacity)
        ddr = [n for n, t in self.profile.tiers.items() if t.kind == "ddr"]
        self.weight_tier = ddr[0] if ddr else next(iter(self.profile.tiers), None)
        if weights <= room or self.options.weight_offload == "none" or self.weight_tier is None:
            self.footprint.add("hbm", weights)
            return 0.0
        buffer = 2 * self.model.layer_weight_bytes(self.workload.weight_dtype)
        resident = max(0.0, room - buffer)
        offloaded = weights - resident
        self.footprint.add("hbm", resident + buffer)
        self.footprint.add(self.weight_tier, offloaded)
        return offloaded

    def _hold_prefill_workspace(self) -> None:
        """Set the prefill's peak activations aside in HBM before any KV is placed (as vLLM
        sizes its KV cache after profiling a forward pass of its token budget), so the KV the
        plan keeps in HBM leaves room for them; a prompt whose activations cannot fit beside
        the weights and the reserve is infeasible, naming what would let it run."""
        need = self.prefill_workspace_bytes
        if not need:
            return
        hbm = self.footprint
        left = hbm.capacity_bytes["hbm"] - hbm.used_bytes.get("hbm", 0.0)
        if 0 <= left < need and hbm.reason is None:  # (weights that overflow are reported)
            held = self.workload.held_prefill_chunk(self.model, reads_back=self.reads_kv_back)
            chunk = prefill_chunks(self.workload.context, held)[0][1]
            hbm.reason = (
                f"hbm short by {size_text(need - left)} for the prefill: one layer's activations "
                f"over {chunk} tokens x batch {self.workload.batch} need {size_text(need)}, "
                f"{size_text(max(left, 0.0))} left after weights and reserve (set "
                "prefill_chunk_tokens to prefill the prompt in smaller chunks)")
        hbm.add("hbm", need)

    def observe(self, host_s: float, device_s: float, variable_s: float | None = None) -> None:
        """Feedback from the executor (simulated or measured): host and device time, and the
        part of the host time that grows with the top-k ratio; static policies ignore it."""
        if self.scheduler is not None:
            self.scheduler.observe(host_s, device_s, variable_s)

    @property
    def feasible(self) -> bool:
        return self.footprint.feasible

    def infeasibility(self) -> str | None:
        return None if self.feasible else self.footprint.explain()

    # ---------------------------------------------------------------- helpers
    @property
    def kv_token_bytes(self) -> float:
        """K+V bytes of one token of one sequence across all layers."""
        return self.model.kv_bytes_per_token(self.workload.kv_dtype)

    @property
    def kv_elem_bytes(self) -> float:
        return DTYPE_BYTES[self.workload.kv_dtype]

    def gpu_token_capacity(self, extra_bytes: float = 0.0) -> int:
        """Tokens of KV (per sequence) that fit in what HBM has left, minus ``extra_bytes``."""
        free = self.footprint.capacity_bytes["hbm"] - self.footprint.used_bytes.get("hbm", 0.0)
        free -= extra_bytes
        if free <= 0:
            return 0
        return int(free // (self.workload.batch * self.kv_token_bytes))

    def keep_recent_on_gpu(self, strategy: PlacementStrategy) -> None:
        """The common split: as many recent tokens as HBM has left stay resident, the older
        ones go to host tiers by ``strategy``. Sets ``recent`` and ``placement``."""
        final = self.workload.final_context
        self.recent = max(0, min(self.gpu_token_capacity(), final))
        self.account_gpu_kv(self.recent)
        self.placement = self.place_host(final - self.recent, strategy)

    def account_gpu_kv(self, tokens: int) -> None:
        self.footprint.add("hbm", tokens * self.workload.batch * self.kv_token_bytes)

    def host_kv_placement(self) -> KvPlacement:
        """Where this policy puts KV it keeps in host memory, by its own placement options
        (semantic mapping: keys in DRAM, values on CXL; Linux's first touch for a policy
        without one), whether or not this workload puts any there: where a prefix cache keeps
        a finished turn's KV. Accounts nothing."""
        strategy = getattr(self.options, "placement", "first_touch")
        placement, _ = place_host_kv(
            self.profile, 1.0, 1.0, strategy,
            allow_cxl=getattr(self.options, "allow_cxl", True),
            important_fraction=getattr(self.options, "important_fraction", 0.0),
            host_socket=self.host_socket)
        return placement

    def place_host(
        self, tokens: int, strategy: PlacementStrategy, *, allow_cxl: bool = True,
        important_fraction: float = 0.0,
    ) -> KvPlacement | None:
        """Place ``tokens`` per sequence of host KV and account it; None when no host KV."""
        if tokens <= 0:
            return None
        half = tokens * self.workload.batch * self.kv_token_bytes / 2
        capacity, used_now = self.footprint.capacity_bytes, self.footprint.used_bytes
        free = {n: capacity[n] - used_now.get(n, 0.0) for n in self.profile.tiers}
        sockets = self.host_split or (self.host_socket,)
        share = 1 / len(sockets)
        placements: list[KvPlacement] = []
        used: dict[str, float] = {}
        try:
            # Split: each socket's threads first-touch their equal share of the KV heads (as
            # fractions: heads need not divide evenly), seen from that socket, in the listed
            # order of sockets, one after the other on what the ones before left free.
            for socket in sockets:
                placement, part = place_host_kv(
                    self.profile, half * share, half * share, strategy, allow_cxl=allow_cxl,
                    important_fraction=important_fraction, free_bytes=free,
                    host_socket=socket,
                )
                placements.append(placement)
                for tier, bytes_ in part.items():
                    used[tier] = used.get(tier, 0.0) + bytes_
                    if len(sockets) > 1:  # the next socket sees what this one took
                        free[tier] -= bytes_
        except ValueError as exc:
            self.footprint.reason = str(exc)
            return None
        for tier, bytes_ in used.items():
            self.footprint.add(tier, bytes_)
        if len(sockets) == 1:
            return placements[0]
        self.split_placements = tuple(placements)
        return merged_placement(placements)


def merged_placement(placements: list[KvPlacement]) -> KvPlacement:
    """The placement of the whole host KV made of equal shares placed as ``placements``: the
    mean of their fractions (what the GPU writes and reads back by DMA sees)."""
    n = len(placements)

    def mean(parts: list[dict[str, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for fractions in parts:
            for tier, f in fractions.items():
                out[tier] = out.get(tier, 0.0) + f / n
        total = sum(out.values())
        return {tier: f / total for tier, f in out.items()}

    gathers = [p.v_gather_fractions for p in placements]
    return KvPlacement(
        mean([p.k_fractions for p in placements]), mean([p.v_fractions for p in placements]),
        mean([p.gather_fractions for p in placements]) if any(gathers) else None)
