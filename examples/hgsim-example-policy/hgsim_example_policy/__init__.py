"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
ICLR 2024, arXiv 2309.17453) as an hgsim policy.

StreamingLLM keeps the KV of the first few tokens (attention sinks, which draw a large share of
attention whatever the query) and of a sliding window of the most recent tokens in GPU memory,
and evicts everything in between for good. Its KV footprint is fixed, so any context fits; the
price is accuracy, which hgsim's proxy scores as the attention mass the evicted tokens held.

What a policy provides is a memory footprint (``setup``) and a partition plan per decode step
(``layer_plan``); the simulator, the accuracy proxy and ``hgsim validate`` execute the plan.
"""

from __future__ import annotations

from pydantic import Field

from hgsim.plan import CpuWork, LayerPlan, Merge, Selector, Transfer
from hgsim.policies.base import Policy, PolicyOptions

__version__ = "0.1.0"


class StreamingLLMOptions(PolicyOptions):
    """Knobs a study can set under ``policy_options`` (unknown keys are rejected)."""

    sink_tokens: int = Field(default=4, ge=0)  # the paper's 4 initial tokens
    window_tokens: int = Field(default=4092, ge=1)  # recent tokens kept (4096-token cache)


class StreamingLLM(Policy):
    name = "streaming_llm"  # must equal the entry point's name
    description = "attention sinks + sliding window in HBM, the rest evicted (StreamingLLM)"
    lossy = True  # the simulator then computes the accuracy proxy
    Options = StreamingLLMOptions

    def _kept(self, context: int) -> tuple[int, int]:
        """(sink tokens, recent tokens) resident at ``context``."""
        sinks = min(self.options.sink_tokens, context)
        return sinks, min(self.options.window_tokens, context - sinks)

    def setup(self) -> None:
        # Reserve HBM for the largest cache the run reaches; the footprint reports shortfalls.
        sinks, recent = self._kept(self.workload.final_context)
        self.account_gpu_kv(sinks + recent)

    def layer_plan(self, context: int) -> LayerPlan:
        sinks, recent = self._kept(context)
        evicted = context - sinks - recent
        return LayerPlan(
            context=context, gpu_recent_tokens=recent, sink_tokens=sinks, host_selected=0,
            # No CPU work and no transfer: the tokens outside the GPU set are gone, not in host
            # memory, so no placement is needed.
            cpu_work=CpuWork.NONE, transfer=Transfer.NONE, merge=Merge.NONE,
            selector=Selector.DROPPED if evicted else Selector.ALL, placement=None,
        )
