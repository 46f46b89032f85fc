"""H2O: keep a fixed budget of heavy-hitter and recent tokens in HBM, evict the rest (lossy)."""

from __future__ import annotations

from pydantic import Field

from hgsim.plan import CpuWork, LayerPlan, Merge, Selector, Transfer
from hgsim.policies.base import Policy, PolicyOptions


class H2OOptions(PolicyOptions):
    budget: float = Field(default=0.2, gt=0, le=1)  # kept tokens / context (H2O's 20% setting)
    recent_share: float = Field(default=0.5, ge=0, le=1)  # of the budget: recent vs heavy


class H2O(Policy):
    name = "h2o"
    description = "heavy-hitter + recent budget in HBM, rest evicted (H2O)"
    lossy = True
    selector_parameters = ("history_queries", "decision_lag", "history_similarity_floor",
                           "history_decay")
    Options = H2OOptions
    reads_kv_back = False  # what leaves the budget is dropped, never read back

    def setup(self) -> None:
        self.account_gpu_kv(self._budget(self.workload.final_context))

    def _budget(self, context: int) -> int:
        return max(1, min(context, round(self.options.budget * context)))

    def layer_plan(self, context: int) -> LayerPlan:
        budget = self._budget(context)
        recent = min(budget, max(1, round(budget * self.options.recent_share)))
        heavy = min(budget - recent, context - recent)
        return LayerPlan(
            context=context, gpu_recent_tokens=recent, sink_tokens=0, host_selected=heavy,
            cpu_work=CpuWork.NONE, transfer=Transfer.NONE, merge=Merge.NONE,
            selector=Selector.HEAVY_HITTER, placement=None,
        )
