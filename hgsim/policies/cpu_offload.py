"""CPU-attention offload (FastDecode / NEO-style): the whole KV cache in host memory, the CPU
computes attention, only queries and outputs cross PCIe. Exact."""

from __future__ import annotations

from hgsim.capacity import PlacementStrategy
from hgsim.plan import CpuWork, LayerPlan, Merge, Selector, Transfer
from hgsim.policies.base import Policy, PolicyOptions


class CpuOffloadOptions(PolicyOptions):
    placement: PlacementStrategy = "first_touch"


class CpuOffload(Policy):
    name = "cpu_offload"
    description = "all attention on the CPU over host KV (FastDecode/NEO-style)"
    Options = CpuOffloadOptions

    def setup(self) -> None:
        self.placement = self.place_host(self.workload.final_context, self.options.placement)

    def layer_plan(self, context: int) -> LayerPlan:
        return LayerPlan(
            context=context, gpu_recent_tokens=0, sink_tokens=0, host_selected=context,
            cpu_work=CpuWork.PARTIAL_ATTENTION, transfer=Transfer.PARTIAL_OUTPUT,
            merge=Merge.NONE, selector=Selector.ALL, placement=self.placement,
        )
