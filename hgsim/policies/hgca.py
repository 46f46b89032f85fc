"""HGCA (arXiv 2507.03153): dense GPU attention over recent tokens plus sparse CPU attention
over the salient host tokens; partial outputs merge on the GPU by log-sum-exp.

Unlike HybridGen it ships partial outputs rather than logits, uses a static selection ratio, has
no cross-layer lookahead and no semantic-aware placement.
"""

from __future__ import annotations

from pydantic import Field

from hgsim.capacity import PlacementStrategy
from hgsim.plan import CpuWork, LayerPlan, Merge, Selector, Transfer
from hgsim.policies.base import Policy, PolicyOptions


class HgcaOptions(PolicyOptions):
    topk_ratio: float = Field(default=0.1, gt=0, le=1)
    placement: PlacementStrategy = "first_touch"


class Hgca(Policy):
    name = "hgca"
    description = "GPU dense recent + CPU sparse salient attention, LSE merge (HGCA)"
    lossy = True
    selector_parameters = ()  # exact top-k
    Options = HgcaOptions

    def setup(self) -> None:
        self.keep_recent_on_gpu(self.options.placement)

    def layer_plan(self, context: int) -> LayerPlan:
        recent = min(self.recent, context)
        host = context - recent
        if not host:
            return LayerPlan(context, recent, 0, 0, CpuWork.NONE, Transfer.NONE, Merge.NONE,
                             Selector.ALL, None)
        selected = min(host, max(1, round(self.options.topk_ratio * host)))
        return LayerPlan(
            context=context, gpu_recent_tokens=recent, sink_tokens=0, host_selected=selected,
            cpu_work=CpuWork.SPARSE_PARTIAL, transfer=Transfer.PARTIAL_OUTPUT,
            merge=Merge.LSE if recent else Merge.NONE, selector=Selector.EXACT_TOPK,
            placement=self.placement,
        )
