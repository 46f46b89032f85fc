"""Run a Hugging Face transformers Llama model with plan-driven hybrid attention in decode.

``HybridAttentionHook(model, plan_for=policy)`` registers an attention implementation with
transformers' ``AttentionInterface`` and switches the model to it. Prefill (several query
tokens) runs unchanged (torch SDPA) and hands each layer's K/V to a ``KvStore``; every decode
step then asks the policy for a ``StepPlan``, appends the new token's K/V to the split cache
and computes each layer's attention with ``PlanExecutor.run_layer`` (device part on the
accelerator, host part with the C kernel, merged per the plan). The model's own weights and
layers are untouched, so in exact mode (e.g. ``hybridgen_exact``) greedy decoding yields
exactly the unmodified model's tokens; with top-k it shows what the approximation does to them.

Transformers still keeps its own full cache (its masks and positions read it); decode attention
reads only the split store. Layers run one at a time as the model calls them, so there is no
cross-layer look-ahead here; padding in a batch is not supported (decode masks are ignored).
Measured steps feed ``policy.observe`` like ``decode_loop.run_decode`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hgsim.plan import StepPlan
from hgsim.policies.base import Policy
from hgsim.results import StepTiming
from hw_backend.devices import Accelerator
from hw_backend.executor import PlanExecutor, StepRun
from hw_backend.kv_store import KvStore
from hw_backend.timing import LayerTiming

try:  # optional dependency
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
except ImportError:  # pragma: no cover - exercised only without transformers
    AttentionInterface = None

IMPLEMENTATION = "hybridgen_executor"
_HOOK_ATTRIBUTE = "_hybridgen_executor_hook"


def _register() -> None:
    if AttentionInterface is None:
        raise ImportError("hw_backend.hf_hook needs the transformers package")
    AttentionInterface.register(IMPLEMENTATION, _attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # older transformers build masks without this registry
        return
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: torch.Tensor | None, *args: Any,
               **kwargs: Any):
    """The registered attention function: prefill as SDPA, decode through the executor."""
    hook: HybridAttentionHook | None = getattr(module, _HOOK_ATTRIBUTE, None)
    if hook is None or query.shape[2] != 1:
        result = sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
        if hook is not None:
            hook.capture_prefill(module.layer_idx, key, value)
        return result
    out = hook.decode_layer(module.layer_idx, query, key, value)
    return out, None


class HybridAttentionHook:
    """Installs plan-driven hybrid decode attention into a transformers Llama-style model.

    ``plan_for`` is a policy (``step_plan`` + ``observe``) or a callable ``context -> StepPlan``.
    """

    def __init__(
        self, model: torch.nn.Module, *, plan_for: Policy | Callable[[int], StepPlan],
        accel: Accelerator, capacity: int = 0, host_threads: int | None = None,
    ) -> None:
        _register()
        config = model.config
        self.model = model
        self.policy = plan_for if hasattr(plan_for, "step_plan") else None
        self._plan_for = plan_for.step_plan if self.policy is not None else plan_for
        self.accel = accel
        self.layers = [m for m in model.modules() if hasattr(m, "layer_idx")
                       and hasattr(m, "q_proj")]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.store = KvStore(
            accel, num_layers=config.num_hidden_layers, batch=1,
            kv_heads=config.num_key_value_heads, head_dim=head_dim,
            dtype=model.dtype, capacity=capacity,
        )
        self.executor = PlanExecutor(self.store, accel, host_threads=host_threads,
                                     scale=self.layers[0].scaling)
        self.steps: list[StepTiming] = []
        self.layer_records: list[LayerTiming] = []
        self.runs: list[StepRun] = []
        self._previous = config._attn_implementation
        for layer in self.layers:
            setattr(layer, _HOOK_ATTRIBUTE, self)
        model.set_attn_implementation(IMPLEMENTATION)

    # ------------------------------------------------------------------ called by the model
    def capture_prefill(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """The prompt's K/V of a layer (B, KVH, T, D): the split cache starts host-resident."""
        if key.shape[0] != self.store.batch:
            self._rebuild_for_batch(key.shape[0])
        self.store[layer].load(key.detach(), value.detach())

    def decode_layer(self, layer: int, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor) -> torch.Tensor:
        """One layer of a decode step; ``key``/``value`` are transformers' full cache, of which
        only the new token (the last row) is used. Returns (B, 1, H, D) like SDPA."""
        if layer == 0:
            context = self.store.length + 1
            self.executor.begin_step(self._plan_for(context), appending=True)
        new_kv = (key[:, :, -1:].detach(), value[:, :, -1:].detach())
        q = query[:, :, 0].detach().float().contiguous()
        out = self.executor.run_layer(layer, q, new_kv)
        if layer == len(self.store) - 1:
            self._finish_step()
        return out.to(query.dtype).unsqueeze(1)

    # ------------------------------------------------------------------ bookkeeping
    def _finish_step(self) -> None:
        run = self.executor.end_step()
        self.runs.append(run)
        self.steps.append(run.timing)
        self.layer_records.extend(run.layers)
        if self.policy is not None and run.timing.host_s:
            self.policy.observe(run.timing.host_s, run.timing.device_s, run.timing.variable_s)

    def _rebuild_for_batch(self, batch: int) -> None:
        old = self.store
        self.store = KvStore(self.accel, num_layers=len(old), batch=batch,
                             kv_heads=old.kv_heads, head_dim=old.head_dim, dtype=old.dtype)
        self.executor.store = self.store

    def remove(self) -> None:
        """Restore the model's attention implementation and stop the host worker."""
        for layer in self.layers:
            if hasattr(layer, _HOOK_ATTRIBUTE):
                delattr(layer, _HOOK_ATTRIBUTE)
        self.model.set_attn_implementation(self._previous)
        self.executor.close()

    def __enter__(self) -> HybridAttentionHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@torch.no_grad()
def greedy_decode(
    model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int, *,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``new_tokens`` greedy tokens after ``input_ids`` (B, T): prefill, then one token a step.

    With ``return_logits`` also the next-token logits of every step, (B, new_tokens, vocab).
    """
    out = model(input_ids=input_ids, use_cache=True)
    cache = out.past_key_values
    logits = [out.logits[:, -1]]
    tokens = [logits[-1].argmax(dim=-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        out = model(input_ids=tokens[-1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
        tokens.append(logits[-1].argmax(dim=-1, keepdim=True))
    chosen = torch.cat(tokens, dim=1)
    return (chosen, torch.stack(logits, dim=1)) if return_logits else chosen


__all__ = ["IMPLEMENTATION", "HybridAttentionHook", "greedy_decode"]
