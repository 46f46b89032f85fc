"""InfiniGen: speculate the next layer's important tokens from the current layer's input and
prefetch only those K/V rows from host memory (lossy).

The speculation uses a partial key cache kept in HBM (a fraction of the key channels of every
token), read once per layer by a small GPU kernel.
"""

from __future__ import annotations

from pydantic import Field

from hgsim.capacity import PlacementStrategy
from hgsim.plan import CpuWork, LayerPlan, Merge, Selector, Transfer
from hgsim.policies.base import Policy, PolicyOptions


class InfiniGenOptions(PolicyOptions):
    topk_ratio: float = Field(default=0.1, gt=0, le=1)  # prefetched host tokens / host tokens
    partial_key_fraction: float = Field(default=0.3, gt=0, le=1)  # InfiniGen's partial weight ratio
    placement: PlacementStrategy = "first_touch"


class InfiniGen(Policy):
    name = "infinigen"
    description = "speculative top-k prefetch of KV rows over PCIe (InfiniGen)"
    lossy = True
    selector_parameters = ("speculation_similarity", "speculation_dim_fraction")
    Options = InfiniGenOptions

    def setup(self) -> None:
        final = self.workload.final_context
        batch = self.workload.batch
        elem = self.kv_elem_bytes
        partial_keys = (
            batch * final * self.model.num_layers * self.model.kv_dim * elem
            * self.options.partial_key_fraction
        )
        layer_bytes = self.model.kv_bytes_per_token_layer(self.workload.kv_dtype)
        prefetch_buffer = 2 * batch * final * self.options.topk_ratio * layer_bytes
        self.footprint.add("hbm", partial_keys + prefetch_buffer)
        self.keep_recent_on_gpu(self.options.placement)

    def layer_plan(self, context: int) -> LayerPlan:
        recent = min(self.recent, context)
        host = context - recent
        selected = min(host, max(1, round(self.options.topk_ratio * host))) if host else 0
        return LayerPlan(
            context=context, gpu_recent_tokens=recent, sink_tokens=0, host_selected=selected,
            cpu_work=CpuWork.NONE,
            transfer=Transfer.KV_SELECTED if host else Transfer.NONE,
            merge=Merge.NONE, selector=Selector.SPECULATIVE_TOPK if host else Selector.ALL,
            placement=self.placement, lookahead=True,
            speculate_key_fraction=self.options.partial_key_fraction if host else 0.0,
        )
