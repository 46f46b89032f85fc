"""Whole-model decode with a policy in the loop: what ``hgsim run`` executes.

``ModelDecode`` puts a decoder with random weights at a catalog model's shapes
(``transformer.ModelWeights``) on an accelerator, fills its context with random K/V
(``random_kv``; a real prefill of 128k tokens would take longer than the decode), and decodes
greedily: every step asks the policy for ``step_plan(context + t)``, runs the embedding on the
caller's stream, the layers and the LM head through ``PlanExecutor.step`` (the model's
projections, rotary, FFN and norms as its ``DeviceWork``, attention split the way the plan says,
then the final norm and LM head), then feeds the measured ``host_s``, ``device_s`` and transfer time to ``policy.observe``, as
``decode_loop.run_decode`` does for attention alone, so HybridGen's scheduler adapts to what
the hardware did. ``fill_designed`` fills the context with the accuracy model's synthetic
attention instead (``designed_kv``) and has attention read its queries, so that the rows a KV
group's union selection moves are the ones the simulator sizes.

A step's ``StepTiming`` covers the layers and the LM head, which is what the simulator's step
models; each token's wall time (``token_s``) adds the embedding and reading the token back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hgsim.policies.base import Policy
from hgsim.specs.model import ModelSpec
from hw_backend.decode_loop import DecodeRun
from hw_backend.designed_kv import DesignedDecode, DesignedKv
from hw_backend.devices import Accelerator
from hw_backend.executor import PlanExecutor, StepRun
from hw_backend.kv_store import KvStore
from hw_backend.model_work import ModelDeviceWork
from hw_backend.random_kv import RandomKv
from hw_backend.transformer import ModelWeights

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                "fp64": torch.float64}


def default_dtype(accel: Accelerator) -> str:
    """bf16 on a GPU (what serving runs), fp32 on the CPU stand-in (its native path)."""
    return "fp32" if accel.standin else "bf16"


@dataclass
class ModelDecodeRun(DecodeRun):
    """A measured whole-model decode: ``DecodeRun``'s records plus tokens and token times."""

    tokens: list[list[int]] = field(default_factory=list)  # per step, one id per sequence
    token_s: list[float] = field(default_factory=list)  # per step: embed + step + token read
    logits: list[torch.Tensor] = field(default_factory=list)  # per step (kept on request)
    weight_bytes: int = 0


class ModelDecode:
    """A model, its split KV cache and the plan executor on one accelerator.

    ``dtype`` is the weights' and activations' element type, ``kv_dtype`` the cache's
    (defaults: ``default_dtype``); ``capacity`` the tokens the host cache is sized for (the
    final context), so that it never grows during a timed step. ``weights`` and ``store`` may
    be shared with an earlier instance (benchmarks running several policies over one context,
    ``KvStore.truncate`` between them).
    """

    def __init__(
        self, spec: ModelSpec, accel: Accelerator, *, batch: int = 1, dtype: str | None = None,
        kv_dtype: str | None = None, seed: int = 0, capacity: int = 0,
        host_threads: int | None = None, weights: ModelWeights | None = None,
        graphs: bool | None = None, store: KvStore | None = None,
    ) -> None:
        self.spec, self.accel, self.batch = spec, accel, batch
        self.dtype = TORCH_DTYPES[dtype or default_dtype(accel)]
        self.kv_dtype = TORCH_DTYPES[kv_dtype or dtype or default_dtype(accel)]
        self.weights = weights or ModelWeights.random(spec, device=accel.device, dtype=self.dtype,
                                                      seed=seed)
        self.work = ModelDeviceWork(self.weights, accel, batch=batch, kv_dtype=self.kv_dtype)
        self.store = store or KvStore(accel, num_layers=spec.num_layers, batch=batch,
                                      kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                                      dtype=self.kv_dtype, capacity=capacity)
        self.executor = PlanExecutor(self.store, accel, host_threads=host_threads,
                                     device_work=self.work, graphs=graphs,
                                     step_buffers=self.work.buffers)
        generator = torch.Generator().manual_seed(seed + 1)
        first = torch.randint(spec.vocab_size, (batch,), generator=generator)
        self.work.tokens.copy_(first)
        self.designed: DesignedDecode | None = None

    # ------------------------------------------------------------------ context
    def fill_random(self, tokens: int, random_kv: RandomKv | None = None) -> None:
        """``tokens`` positions of random K/V in every layer (the context before decoding)."""
        (random_kv or RandomKv()).fill(self.store, tokens, self.kv_dtype)

    def fill_designed(self, tokens: int, designed_kv: DesignedKv | None = None,
                      seed: int = 0) -> None:
        """``tokens`` positions of the accuracy model's synthetic K/V in every layer, and from
        the next step on attention reads its queries (``DesignedDecode``: the designed query,
        then drifting per step) in place of the random weights' projections."""
        spec = self.spec
        self.designed = DesignedDecode(
            layers=spec.num_layers, batch=self.batch, heads=spec.num_heads,
            kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, context=tokens + 1, steps=0,
            dtype=self.kv_dtype, seed=seed, designed_kv=designed_kv)
        self.designed.load(self.store)
        self.work.use_designed_queries()

    def load_prefix(self, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Given K/V (B, KVH, T, D) per layer as the context (tests: the reference's cache)."""
        for layer, (k, v) in zip(self.store.layers, prefix, strict=True):
            layer.load(k.to(self.kv_dtype), v.to(self.kv_dtype))

    # ------------------------------------------------------------------ decoding
    def reserve_for(self, policy: Policy, final_context: int) -> None:
        """Device slots for the most tokens the policy keeps resident up to ``final_context``
        (its plan there), so that no decode step reallocates them."""
        self.store.reserve_device_slots(policy.step_plan(final_context).layer.gpu_tokens + 1)

    @torch.no_grad()
    def step(self, plan, *, step: int) -> tuple[StepRun, torch.Tensor, float, torch.Tensor]:
        """One token: (the executor's step, its logits (B, vocab), wall seconds, the greedy
        next tokens (B,) on the host)."""
        if self.designed is not None:  # before the clock: not part of the model's token
            for layer, buffer in enumerate(self.work.designed_queries or ()):
                buffer.copy_(self.designed.query(step, layer))
        t0 = time.perf_counter()
        self.work.start_token(self.store.length, plan)
        run = self.executor.step(plan, step=step, **self.work.step_inputs())
        out = self.work.finish_token()
        tokens = self.work.tokens.to("cpu")
        return run, out, time.perf_counter() - t0, tokens

    def decode(
        self, policy: Policy, steps: int, *, observe: bool = True, keep_logits: bool = False,
        label: str | None = None, on_step: Callable[[int], None] | None = None,
    ) -> ModelDecodeRun:
        """Decode ``steps`` tokens under ``policy``'s plans, feeding measured times back."""
        record = ModelDecodeRun(device=self.accel.label, policy=label or policy.name,
                                weight_bytes=self.weights.nbytes)
        for t in range(steps):
            plan = policy.step_plan(self.store.length + 1)
            run, out, seconds, tokens = self.step(plan, step=t)
            if observe and run.timing.host_s:
                policy.observe(run.timing.host_s, run.timing.device_s, run.timing.pcie_busy_s)
            record.steps.append(run.timing)
            record.layers.extend(run.layers)
            record.plans.append(plan)
            record.tokens.append(tokens.tolist())
            record.token_s.append(seconds)
            if keep_logits:
                record.logits.append(out.to("cpu"))
            if on_step is not None:
                on_step(t)
        if policy.scheduler is not None:
            record.scheduler = list(policy.scheduler.history)
        return record

    def close(self) -> None:
        self.executor.close()

    def __enter__(self) -> ModelDecode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["TORCH_DTYPES", "ModelDecode", "ModelDecodeRun", "default_dtype"]
