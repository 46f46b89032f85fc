"""HybridGen: CPU-GPU attention logit parallelism over tiered memory.

The GPU keeps the most recent tokens and computes their logits; the CPU scans the keys of the
host-resident tokens, keeps a per-head top-k and ships only those logits and V rows; the GPU does
one softmax over the union. The CPU works one layer ahead. A feedback scheduler adapts the top-k
ratio and the GPU share; semantic-aware mapping puts keys in DRAM and values on CXL.
"""

from __future__ import annotations

from pydantic import Field

from hgsim.capacity import PlacementStrategy
from hgsim.plan import CpuWork, LayerPlan, Merge, Selector, Transfer
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


class HybridGen(Policy):
    name = "hybridgen"
    description = "attention logit parallelism + feedback scheduler + semantic KV mapping"
    lossy = True
    Options = HybridGenOptions

    def setup(self) -> None:
        opts = self.options
        final = self.workload.final_context
        capacity = self._gpu_tokens_beside_landing_buffer(final)
        max_share = capacity / final
        share = max_share if opts.gpu_share is None else min(opts.gpu_share, max_share)
        config = SchedulerConfig(
            initial_ratio=opts.topk_ratio,
            min_ratio=min(opts.min_ratio, opts.topk_ratio),
            max_ratio=max(opts.max_ratio, opts.topk_ratio),
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

    def _gpu_tokens_beside_landing_buffer(self, final: int) -> int:
        """Most GPU-resident tokens such that their KV plus the double-buffered landing zone for
        one layer's selected logits and V rows (sized for the host tokens left over, at the
        largest ratio the scheduler may reach) fit in HBM; the buffer is accounted too."""
        opts, batch = self.options, self.workload.batch
        row_bytes = self.model.head_dim * self.kv_elem_bytes + 4
        per_host_token = 2 * batch * self.model.num_heads * max(opts.max_ratio, opts.topk_ratio) * row_bytes
        per_gpu_token = batch * self.kv_token_bytes
        free = self.gpu_token_capacity() * per_gpu_token  # HBM left for KV and the buffer
        if per_gpu_token > per_host_token:
            tokens = (free - final * per_host_token) / (per_gpu_token - per_host_token)
            tokens = max(0, min(int(tokens), final))
        else:  # offloading a token costs more buffer than it frees: keep everything resident
            tokens = final
        self.footprint.add("hbm", (final - tokens) * per_host_token)
        return tokens

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
        )
