"""A whole model's layers as the executor's device work, around its plan-driven attention.

``PlanExecutor`` runs a layer as ``qkv | attention | merge | post`` on the device queue and
calls a ``DeviceWork`` before attention and after it. ``ModelDeviceWork`` is that work for a
real decoder (``hw_backend.transformer``): before layer i's attention it normalises the hidden
state, projects q, k and v, applies rotary embedding at the token's position and writes them
into its own buffers, which are the very tensors the executor was given as the step's queries
and new K/V; after attention it runs the output projection, the residual, the FFN and the
second residual on the hidden state; after the last layer the final norm, the LM head and the
greedy token (``after_layers``). So the executor's device queue carries the model's real work,
and the host path hides behind it as it would in a serving system.

The buffers are allocated once and written in place (``StepBuffers``, shared with the
executor's graph path), so a step allocates nothing large and a captured CUDA graph may read
them; the token's position lives in a device tensor for the same reason. Each layer reads its
own input hidden state and writes the next layer's (``hidden[i]`` -> ``hidden[i + 1]``), so
running a layer's work twice (a graph capture's warm-up) changes nothing. For HybridGen's
look-ahead, layer i also projects layer i+1's query from its own input (``lookahead_queries``):
the host starts layer i+1's scan with it while the device is still in layer i, which is the
paper's approximation (consecutive layers' inputs are similar).

With ``designed_queries`` set (``ModelDecode.fill_designed``) attention reads those buffers
instead of the projections: random weights' queries over the accuracy model's designed cache
would pick each head's rows independently, not as the model's GQA heads do. The projections
still run and their results are dropped, so the device does the same work.
"""

from __future__ import annotations

import torch

from hgsim.plan import StepPlan
from hw_backend.devices import Accelerator
from hw_backend.layer_state import HostPath, host_path
from hw_backend.step_buffers import StepBuffers
from hw_backend.transformer import (
    ModelWeights,
    finish_layer,
    inverse_frequencies,
    logits,
    project_qkv,
    project_query,
)


def needs_lookahead_queries(plan: StepPlan) -> bool:
    """Whether any layer's host work may start a layer early and so needs a look-ahead query
    (HybridGen's logits, a look-ahead partial, InfiniGen's speculation)."""
    for i in range(plan.num_layers):
        lp = plan.layer_plan(i)
        path = host_path(lp)
        if path is HostPath.SPECULATE or (lp.lookahead and path in (HostPath.LOGITS,
                                                                      HostPath.PARTIAL)):
            return True
    return False


class ModelDeviceWork:
    """A decoder's layers on the executor's device queue; see the module docstring."""

    def __init__(self, weights: ModelWeights, accel: Accelerator, *, batch: int,
                 kv_dtype: torch.dtype, buffers: StepBuffers | None = None) -> None:
        spec = weights.spec
        device = accel.device
        self.spec, self.weights, self.accel, self.batch = spec, weights, accel, batch
        dtype = weights.embed.dtype
        layers = spec.num_layers
        self.inv_freq = inverse_frequencies(spec, device)
        #: hidden[i] is layer i's input; hidden[layers] the final hidden state
        self.hidden = [torch.zeros(batch, spec.hidden_size, dtype=dtype, device=device)
                       for _ in range(layers + 1)]
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=device)
        #: the step's logits (B, vocab), written by ``after_layers`` inside the step
        self.logits = torch.zeros(batch, spec.vocab_size,
                                  dtype=torch.promote_types(dtype, torch.float32), device=device)
        self.positions = torch.zeros(batch, dtype=torch.int64, device=device)
        self._positions_host = accel.host_empty((batch,), torch.int64)
        self.buffers = buffers or StepBuffers.allocate(
            device, layers=layers, batch=batch, heads=spec.num_heads,
            kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, kv_dtype=kv_dtype)
        self.q, self.ahead_q = self.buffers.q, self.buffers.ahead_q
        self.new_kv = [self.buffers.new_kv(i) for i in range(layers)]
        self.look_ahead = False
        #: per layer, the query attention reads instead of the projection (module doc)
        self.designed_queries: list[torch.Tensor] | None = None

    def use_designed_queries(self) -> list[torch.Tensor]:
        """Fixed device buffers (B, H, D), one per layer, that attention reads as its query
        (and a look-ahead as the next layer's) from now on; the caller fills them each step."""
        if self.designed_queries is None:
            self.designed_queries = [torch.zeros_like(q) for q in self.q]
        return self.designed_queries

    # ------------------------------------------------------------------ per token (caller)
    def start_token(self, position: int, plan: StepPlan) -> None:
        """Embed the current token (``tokens``) at ``position``, on the caller's stream."""
        self.look_ahead = needs_lookahead_queries(plan)
        self._positions_host.fill_(position)
        self.positions.copy_(self._positions_host, non_blocking=True)
        torch.index_select(self.weights.embed, 0, self.tokens, out=self.hidden[0])

    def finish_token(self) -> torch.Tensor:
        """A copy of the step's logits (B, vocab), float32 (the buffer is rewritten next step);
        ``after_layers`` computed them and the greedy next token in ``tokens``."""
        return self.logits.clone()

    def step_inputs(self) -> dict:
        """Keyword arguments for ``PlanExecutor.step``: the buffers this work fills."""
        return {"queries": self.q, "new_kv": self.new_kv, "speculative_queries": self.ahead_q,
                "lookahead_queries": self.ahead_q}

    # ------------------------------------------------------------------ DeviceWork
    def graph_key(self, layer: int) -> tuple:
        """What a captured graph of this work bakes in besides its buffers."""
        return (self.look_ahead,)

    def before_attention(self, layer: int) -> None:
        spec, layers, x = self.spec, self.weights.layers, self.hidden[layer]
        designed = self.designed_queries
        q, k, v = project_qkv(spec, layers[layer], x, self.positions, self.inv_freq)
        self.q[layer].copy_(q if designed is None else designed[layer])
        k_new, v_new = self.new_kv[layer]
        k_new.copy_(k.unsqueeze(2))
        v_new.copy_(v.unsqueeze(2))
        if self.look_ahead and layer + 1 < spec.num_layers:
            ahead = project_query(spec, layers[layer + 1], x, self.positions, self.inv_freq)
            self.ahead_q[layer + 1].copy_(ahead if designed is None else designed[layer + 1])

    def after_attention(self, layer: int, output: torch.Tensor) -> None:
        x = self.hidden[layer + 1]
        x.copy_(self.hidden[layer])
        finish_layer(self.spec, self.weights.layers[layer], x, output)

    def after_layers(self) -> None:
        """The final norm and LM head (the executor runs it after the last layer, inside the
        step, as the simulator's step ends with it), and the greedy next token."""
        self.logits.copy_(logits(self.weights, self.hidden[-1]))
        self.tokens.copy_(self.logits.argmax(dim=-1))


__all__ = ["ModelDeviceWork", "needs_lookahead_queries"]
