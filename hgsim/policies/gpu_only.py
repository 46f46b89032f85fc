"""GPU-only (vLLM-like): the whole KV cache in HBM; beyond capacity it is infeasible."""

from __future__ import annotations

from typing import Literal

from hgsim.plan import CpuWork, LayerPlan, Merge, Selector, Transfer
from hgsim.policies.base import Policy, PolicyOptions


class GpuOnlyOptions(PolicyOptions):
    weight_offload: Literal["auto", "none"] = "none"  # vLLM keeps weights in HBM


class GpuOnly(Policy):
    name = "gpu_only"
    description = "all KV in HBM (vLLM-like); infeasible beyond HBM capacity"
    Options = GpuOnlyOptions
    reads_kv_back = False

    def setup(self) -> None:
        self.account_gpu_kv(self.workload.final_context)

    def layer_plan(self, context: int) -> LayerPlan:
        return LayerPlan(
            context=context, gpu_recent_tokens=context, sink_tokens=0, host_selected=0,
            cpu_work=CpuWork.NONE, transfer=Transfer.NONE, merge=Merge.NONE,
            selector=Selector.ALL, placement=None,
        )
