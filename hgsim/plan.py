"""The partition plan: one description of a decode step that both halves of hgsim execute.

``hgsim`` turns a plan into simulated work on a machine model; ``hw_backend`` runs the same plan
on real tensors. It is therefore plain data with no SimPy or torch in it. A plan says, for each
layer of one decode step: which tokens are resident on the GPU and which sit in host tiers (and
in which tier K and V live), who computes which logits, what crosses PCIe, and how partial
results merge.

Token order convention: token 0 is the oldest. The GPU holds ``sink_tokens`` oldest tokens and
the ``gpu_recent_tokens`` newest; host memory holds the tokens in between (HybridGen keeps the
recent window on the GPU because recent tokens draw most attention and change every step).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum


class CpuWork(str, Enum):
    """What the CPU computes over host-resident tokens."""

    NONE = "none"  # host tokens are streamed/prefetched to the GPU, or dropped
    LOGITS_TOPK = "logits_topk"  # HybridGen: q.k over host tokens, per-head top-k
    PARTIAL_ATTENTION = "partial_attention"  # HGCA / FastDecode: softmax-weighted V, plus LSE
    SPARSE_PARTIAL = "sparse_partial"  # HGCA's CPU side: top-k by logits, then attention on them


class Transfer(str, Enum):
    """What crosses PCIe host->device per layer."""

    NONE = "none"
    KV_ALL = "kv_all"  # FlexGen: every host K and V row
    KV_SELECTED = "kv_selected"  # InfiniGen: K and V rows of speculated top-k tokens
    LOGITS_AND_V = "logits_and_v"  # HybridGen: top-k logits and their V rows (no keys)
    PARTIAL_OUTPUT = "partial_output"  # HGCA / CPU offload: output vector + LSE per head


class Merge(str, Enum):
    """How the GPU combines host-side and device-side contributions."""

    NONE = "none"  # everything attended on one device
    SOFTMAX_UNION = "softmax_union"  # one softmax over GPU logits U received host logits
    LSE = "lse"  # log-sum-exp weighted merge of partial outputs


class Selector(str, Enum):
    """How host tokens are chosen when not all of them are attended (accuracy proxy)."""

    ALL = "all"  # exact: every host token contributes
    EXACT_TOPK = "exact_topk"  # per-head top-k of the true logits (HybridGen, HGCA)
    SPECULATIVE_TOPK = "speculative_topk"  # top-k of approximate logits (InfiniGen)
    HEAVY_HITTER = "heavy_hitter"  # accumulated past attention decides; evicted for good (H2O)
    DROPPED = "dropped"  # host tokens never attended


class GroupSelect(str, Enum):
    """At what granularity HybridGen's host top-k selects under grouped-query attention.

    The ``G = heads / kv_heads`` query heads of a KV group read the same K and V rows, so a row
    several of them select needs to be gathered and to cross PCIe only once.

    * ``PER_HEAD``: each query head keeps its own top-k and receives its own rows (a row picked
      by several heads of a group is gathered and sent once per head);
    * ``GROUP_UNION``: each head keeps its top-k; the group's distinct rows (the union) are
      gathered and sent once per KV head, and every head of the group is given its logits over
      the whole union (a superset of its own top-k: at least as accurate as per head);
    * ``GROUP_SHARED``: one top-k per KV group by an aggregate of the group's logits
      (``GroupScore``): k rows per KV head, the cheapest.

    With one query head per KV head (MHA) the three coincide.
    """

    PER_HEAD = "per_head"
    GROUP_UNION = "group_union"
    GROUP_SHARED = "group_shared"


class GroupScore(str, Enum):
    """The aggregate of the group's logits that ranks tokens in ``GroupSelect.GROUP_SHARED``."""

    MAX = "max"  # the best logit any head of the group gives the token
    SUM = "sum"  # the sum (equivalently the mean) of the group's logits


@dataclass(frozen=True, slots=True)
class KvPlacement:
    """Fraction of host-resident K rows and V rows in each host tier (each sums to 1).

    Semantic-aware mapping puts keys (scanned every step) in local DRAM and values (gathered
    sparsely) on CXL; first-touch and the interleave policies give K and V the same split.
    """

    k_fractions: dict[str, float]
    v_fractions: dict[str, float]
    # Where gathered (top-k) V rows are read from, when that differs from where V mostly
    # lives: the importance-based mapping keeps frequently selected rows in DRAM.
    v_gather_fractions: dict[str, float] | None = None

    def __post_init__(self) -> None:
        for name, fractions in (
            ("k_fractions", self.k_fractions),
            ("v_fractions", self.v_fractions),
            ("v_gather_fractions", self.v_gather_fractions or {}),
        ):
            if fractions and abs(sum(fractions.values()) - 1.0) > 1e-9:
                raise ValueError(f"{name} must sum to 1, got {sum(fractions.values())}")
            if any(f < 0 for f in fractions.values()):
                raise ValueError(f"{name} must be non-negative")

    def __hash__(self) -> int:  # dict fields: hash their items so plans can key caches
        return hash((
            tuple(sorted(self.k_fractions.items())),
            tuple(sorted(self.v_fractions.items())),
            tuple(sorted((self.v_gather_fractions or {}).items())),
        ))

    @staticmethod
    def single(tier: str) -> KvPlacement:
        return KvPlacement({tier: 1.0}, {tier: 1.0})

    @property
    def gather_fractions(self) -> dict[str, float]:
        return self.v_gather_fractions or self.v_fractions


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """One layer of one decode step, for every sequence in the batch."""

    context: int  # tokens attended to in total (before selection)
    gpu_recent_tokens: int  # newest tokens resident in HBM
    sink_tokens: int  # oldest tokens kept resident in HBM (attention sinks)
    host_selected: int  # per head: host tokens whose contribution reaches the GPU
    cpu_work: CpuWork
    transfer: Transfer
    merge: Merge
    selector: Selector
    placement: KvPlacement | None  # None when no token is host-resident
    lookahead: bool = False  # CPU works on layer i+1 while the GPU finishes layer i
    speculate_key_fraction: float = 0.0  # InfiniGen: share of key channels read to speculate
    # HybridGen under GQA: per query head, or per KV group (union / shared top-k); see
    # ``GroupSelect``. ``host_selected`` stays each head's (union) or each group's (shared) k.
    selection: GroupSelect = GroupSelect.PER_HEAD
    group_score: GroupScore = GroupScore.MAX  # the aggregate of GROUP_SHARED

    def __post_init__(self) -> None:
        if self.gpu_tokens > self.context:
            raise ValueError("GPU-resident tokens exceed the context")
        if not 0 <= self.host_selected <= self.host_tokens:
            raise ValueError("host_selected must lie in [0, host_tokens]")
        if self.host_tokens and self.placement is None and not self.host_evicted:
            raise ValueError("host-resident tokens need a placement")
        # plain strings (a YAML or JSON round trip) become the enums
        object.__setattr__(self, "selection", GroupSelect(self.selection))
        object.__setattr__(self, "group_score", GroupScore(self.group_score))

    @property
    def gpu_tokens(self) -> int:
        return self.gpu_recent_tokens + self.sink_tokens

    @property
    def host_tokens(self) -> int:
        return self.context - self.gpu_tokens

    @property
    def host_evicted(self) -> bool:
        """Tokens outside the GPU set were evicted (H2O) or dropped, not kept in host memory."""
        return self.cpu_work is CpuWork.NONE and self.transfer is Transfer.NONE

    @property
    def selected_on_gpu(self) -> int:
        """Selected tokens that are GPU-resident (H2O's heavy hitters), not fetched per step."""
        return self.host_selected if self.host_evicted else 0

    @property
    def attended_tokens(self) -> int:
        return self.gpu_tokens + self.host_selected

    @property
    def topk_ratio(self) -> float:
        return self.host_selected / self.host_tokens if self.host_tokens else 1.0

    @property
    def exact(self) -> bool:
        return self.selector is Selector.ALL or self.host_selected == self.host_tokens

    def host_range(self) -> tuple[int, int]:
        """[start, end) of host-resident token positions."""
        return self.sink_tokens, self.context - self.gpu_recent_tokens

    def group_selection(self, heads_per_group: int) -> GroupSelect:
        """The granularity that actually runs for a model with ``heads_per_group`` query heads
        per KV head: the plan's, except that one head per group (MHA) or an exact plan (every
        host token selected) is per head whatever the plan says."""
        if heads_per_group <= 1 or self.exact:
            return GroupSelect.PER_HEAD
        return self.selection


@dataclass(frozen=True, slots=True)
class StepPlan:
    """A whole decode step: the same layer plan for every layer unless ``per_layer`` is set."""

    policy: str
    batch: int
    layer: LayerPlan
    num_layers: int
    per_layer: tuple[LayerPlan, ...] | None = None
    offloaded_weight_bytes_per_layer: float = 0.0  # streamed host -> GPU every step
    weight_tier: str | None = None  # host tier holding offloaded weights
    # The socket whose cores run the host work and whose DRAM holds its staging buffers; None:
    # the GPU's socket. Another socket reads its own tiers locally and sends what the GPU needs
    # over UPI and then PCIe (``hgsim.sim.decode``).
    host_socket: str | None = None
    # The host work split over several sockets (policy option ``host_socket: all``): each
    # socket with the placement of its equal share of the KV heads. Each runs its own host
    # path for its share, on its own cores and staging buffer, concurrently with the others;
    # the layers' ``placement`` is then the whole store's (the mean of the shares'); a share's
    # placement is None where no KV is host-resident. None: one socket (``host_socket``) does
    # it all.
    host_split: tuple[tuple[str, KvPlacement | None], ...] | None = None
    notes: dict[str, float] = field(default_factory=dict)

    def layer_plan(self, index: int) -> LayerPlan:
        return self.per_layer[index] if self.per_layer is not None else self.layer

    def with_layer(self, layer: LayerPlan) -> StepPlan:
        return replace(self, layer=layer, per_layer=None)
