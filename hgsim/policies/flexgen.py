"""FlexGen: KV beyond HBM lives in host memory and is streamed over PCIe every layer.

The recent tokens that fit stay in HBM (generous to the baseline: FlexGen's policy search
would keep them too). The next layer's KV is prefetched while the current layer computes
(FlexGen's overlapped I/O), into a double buffer that costs HBM. ``flexgen_cpu`` is its
CPU-attention mode: the CPU attends over host KV and only the partial output crosses PCIe.
"""

from __future__ import annotations

from pydantic import Field

from hgsim.capacity import PlacementStrategy
from hgsim.plan import CpuWork, LayerPlan, Merge, Selector, Transfer
from hgsim.policies.base import Policy, PolicyOptions


class FlexGenOptions(PolicyOptions):
    placement: PlacementStrategy = "first_touch"
    allow_cxl: bool = True
    # FlexGen's KV percentage on the GPU; None keeps as many recent tokens as fit.
    gpu_kv_fraction: float | None = Field(default=None, ge=0, le=1)


class FlexGen(Policy):
    name = "flexgen"
    description = "host KV streamed to the GPU over PCIe each layer (FlexGen)"
    Options = FlexGenOptions
    cpu_attention = False

    def setup(self) -> None:
        final = self.workload.final_context
        batch = self.workload.batch
        layer_bytes = self.model.kv_bytes_per_token_layer(self.workload.kv_dtype)
        layers = self.model.num_layers
        free_tokens = self.gpu_token_capacity()  # ignoring stream buffers
        if self.cpu_attention or free_tokens >= final:
            self.recent = min(free_tokens, final)
        else:
            # HBM = R tokens * L layers + double buffer of 2 layers * (F - R) host tokens.
            free_bytes = free_tokens * batch * layers * layer_bytes
            stream_buffer = 2 * batch * final * layer_bytes
            if layers <= 2:  # the buffer alone holds every layer: R does not change the total
                self.recent = final if stream_buffer <= free_bytes else 0
            else:
                recent = (free_bytes - stream_buffer) / ((layers - 2) * batch * layer_bytes)
                self.recent = max(0, min(int(recent), final))
        if self.options.gpu_kv_fraction is not None:
            self.recent = min(self.recent, int(self.options.gpu_kv_fraction * final))
        host = final - self.recent
        self.account_gpu_kv(self.recent)
        if host and not self.cpu_attention:
            self.footprint.add("hbm", 2 * batch * host * layer_bytes)
        self.placement = self.place_host(
            host, self.options.placement, allow_cxl=self.options.allow_cxl
        )

    def layer_plan(self, context: int) -> LayerPlan:
        recent = min(self.recent, context)
        host = context - recent
        if self.cpu_attention:
            work, transfer = CpuWork.PARTIAL_ATTENTION, Transfer.PARTIAL_OUTPUT
            merge = Merge.LSE if recent else Merge.NONE
        else:
            work, transfer, merge = CpuWork.NONE, Transfer.KV_ALL, Merge.NONE
        if not host:
            work, transfer, merge = CpuWork.NONE, Transfer.NONE, Merge.NONE
        return LayerPlan(
            context=context, gpu_recent_tokens=recent, sink_tokens=0, host_selected=host,
            cpu_work=work, transfer=transfer, merge=merge, selector=Selector.ALL,
            placement=self.placement, lookahead=not self.cpu_attention,
        )


class FlexGenCpuAttention(FlexGen):
    name = "flexgen_cpu"
    description = "FlexGen with attention over host KV computed on the CPU"
    cpu_attention = True
