"""HybridGen: CPU-GPU attention logit parallelism over tiered memory.

The GPU keeps the most recent tokens and computes their logits; the CPU scans the keys of the
host-resident tokens, keeps a per-head top-k and ships only those logits and V rows; the GPU does
one softmax over the union. The CPU works one layer ahead. A feedback scheduler adapts the top-k
ratio and the GPU share; semantic-aware mapping puts keys in DRAM and values on CXL.

Under grouped-query attention the top-k is kept per query head (``selection: per_head``) or
per KV group (``group_union``: the union of the group's per-head sets, ``group_shared``: one
top-k by the group's max or summed logits, ``group_score``), so that a row the heads of a group
share is gathered and crosses PCIe once (``plan.GroupSelect``). The default, ``group_shared``
by the max, is the fastest at equal accuracy (docs/policies.md says by how much and what it
costs at equal r). With one query head per KV head every mode is per head.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from hgsim.capacity import PlacementStrategy
from hgsim.plan import CpuWork, GroupScore, GroupSelect, LayerPlan, Merge, Selector, Transfer
from hgsim.policies.base import Policy, PolicyOptions
from hgsim.scheduler import FeedbackScheduler, SchedulerConfig


class HybridGenOptions(PolicyOptions):
    topk_ratio: float = Field(default=0.05, gt=0, le=1)  # initial r
    min_ratio: float = Field(default=0.01, gt=0, le=1)
    max_ratio: float = Field(default=0.5, gt=0, le=1)
    interval: int = Field(default=4, ge=1)
    adaptive: bool = True
    gpu_share: float | None = Field(default=None, ge=0, le=1)  # None: as much as HBM holds
    sink_tokens: int = Field(default=0, ge=0)
    lookahead: bool = True
    placement: PlacementStrategy = "semantic"
    allow_cxl: bool = True
    important_fraction: float = Field(default=0.6, ge=0, le=1)  # importance mapping hit rate
    # GQA: top-k per query head or per KV group (``plan.GroupSelect``); the shared top-k ranks
    # tokens by the group's max or summed logits. The default is the fastest at equal accuracy
    # (benchmarks/gqa_selection.py; docs/policies.md, "GQA: selection per KV group")
    selection: GroupSelect = GroupSelect.GROUP_SHARED
    group_score: GroupScore = GroupScore.MAX

    @model_validator(mode="after")
    def _bounds_in_order(self) -> HybridGenOptions:
        # Only bounds both given: setup widens them to take in topk_ratio, which is how the
        # equal-accuracy search raises min_ratio (and topk_ratio) past the default max_ratio.
        given = {"min_ratio", "max_ratio"} <= self.model_fields_set
        if given and self.min_ratio > self.max_ratio:
            raise ValueError(f"min_ratio {self.min_ratio:g} is above max_ratio "
                             f"{self.max_ratio:g}: the scheduler's bounds are reversed")
        return self


class HybridGen(Policy):
    name = "hybridgen"
    description = "attention logit parallelism + feedback scheduler + semantic KV mapping"
    lossy = True
    selector_parameters = ()  # exact top-k (per head or per KV group)
    Options = HybridGenOptions

    @classmethod
    def lossy_with(cls, options: HybridGenOptions) -> bool:
        """Exact with every host token selected and a scheduler that cannot lower r
        (``hybridgen_exact``)."""
        return not (options.topk_ratio >= 1 and not options.adaptive)

    def setup(self) -> None:
        opts = self.options
        final = self.workload.final_context
        ceiling = self._ratio_ceiling(final)
        capacity = self._gpu_tokens_beside_landing_buffer(final, ceiling)
        max_share = capacity / final
        share = max_share if opts.gpu_share is None else min(opts.gpu_share, max_share)
        config = SchedulerConfig(
            initial_ratio=opts.topk_ratio,
            min_ratio=min(opts.min_ratio, opts.topk_ratio),
            max_ratio=ceiling,
            interval=opts.interval,
            adaptive=opts.adaptive,
        )
        self.scheduler = FeedbackScheduler(config, gpu_share=share, max_gpu_share=max_share)
        # HBM is reserved for the largest share the scheduler may grow to.
        self.account_gpu_kv(capacity)
        self.placement = self.place_host(
            final - round(share * final) - opts.sink_tokens,
            opts.placement,
            allow_cxl=opts.allow_cxl,
            important_fraction=opts.important_fraction,
        )

    def _ratio_ceiling(self, final: int) -> float:
        """The largest top-k ratio the landing zone is sized for.

        A static run never leaves its ratio, so its zone is sized for that ratio; an adaptive
        one for ``max_ratio``. When HBM cannot hold that zone even with every token on the
        host, the ceiling drops to the largest ratio whose zone fits (bisection: the zone grows
        with r), as a deployment would cap r rather than refuse to run. It never drops below
        the configured ``topk_ratio`` (the accuracy asked for): a zone that cannot hold that
        is left to fail on memory.
        """
        opts = self.options
        wanted = max(opts.max_ratio, opts.topk_ratio) if opts.adaptive else opts.topk_ratio
        floor = opts.topk_ratio
        free = self.gpu_token_capacity() * self.workload.batch * self.kv_token_bytes

        def fits(ratio: float) -> bool:
            return final * 2 * self.workload.batch * self._landing_bytes_per_pick(ratio) <= free

        if fits(wanted) or not fits(floor):
            return wanted
        lo, hi = floor, wanted
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def _gpu_tokens_beside_landing_buffer(self, final: int, ratio: float) -> int:
        """Most GPU-resident tokens such that their KV plus the double-buffered landing zone for
        one layer's selected logits and V rows (sized for the host tokens left over, at
        ``ratio``, the largest the scheduler may reach) fit in HBM; the buffer is accounted."""
        batch = self.workload.batch
        per_host_token = 2 * batch * self._landing_bytes_per_pick(ratio)
        per_gpu_token = batch * self.kv_token_bytes
        free = self.gpu_token_capacity() * per_gpu_token  # HBM left for KV and the buffer
        if per_gpu_token > per_host_token:
            tokens = (free - final * per_host_token) / (per_gpu_token - per_host_token)
            tokens = max(0, min(int(tokens), final))
        else:  # offloading a token costs more buffer than it frees: keep everything resident
            tokens = final
        self.footprint.add("hbm", (final - tokens) * per_host_token)
        return tokens

    @property
    def selection(self) -> GroupSelect:
        """The granularity that runs: the option, or per head for one head per KV group."""
        return GroupSelect.PER_HEAD if self.model.gqa_group == 1 else self.options.selection

    def _landing_bytes_per_pick(self, ratio: float) -> float:
        """Landing bytes per host token at top-k ratio ``ratio``, for one sequence: logits and V
        rows of every query head (per head), or the group's distinct rows once per KV head and
        every head's logits over them (per KV group: ``k`` rows shared, the expected union of
        the heads' top-k sets at ``ratio``)."""
        model = self.model
        row = model.head_dim * self.kv_elem_bytes
        if self.selection is GroupSelect.PER_HEAD:
            return model.num_heads * ratio * (row + 4)
        rows_per_pick = 1.0
        if self.selection is GroupSelect.GROUP_UNION and ratio < 1:
            from hgsim.accuracy.groups import union_curve

            curve = union_curve(model.gqa_group, self.attention)
            rows_per_pick = min(curve.fraction(ratio), 1 / ratio)
        return ratio * rows_per_pick * (model.num_kv_heads * row + model.num_heads * 4)

    def layer_plan(self, context: int) -> LayerPlan:
        sched = self.scheduler
        final = self.workload.final_context
        sinks = min(self.options.sink_tokens, context)
        recent = min(round(sched.gpu_share * final), context - sinks)
        host = context - recent - sinks
        if host <= 0:
            return LayerPlan(context, recent, sinks, 0, CpuWork.NONE, Transfer.NONE, Merge.NONE,
                             Selector.ALL, None)
        selected = min(host, max(1, round(sched.ratio * host)))
        return LayerPlan(
            context=context, gpu_recent_tokens=recent, sink_tokens=sinks, host_selected=selected,
            cpu_work=CpuWork.LOGITS_TOPK, transfer=Transfer.LOGITS_AND_V,
            merge=Merge.SOFTMAX_UNION,
            selector=Selector.ALL if selected == host else Selector.EXACT_TOPK,
            placement=self.placement, lookahead=self.options.lookahead,
            selection=self.selection, group_score=self.options.group_score,
        )
