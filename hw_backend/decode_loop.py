"""Decode steps with a policy in the loop: plans in, measured host/device times back out.

This is ``hgsim.simulate``'s decode loop with the machine model replaced by the executor: step
``t`` asks the policy for ``step_plan(context + t)``, runs it on real tensors and feeds the
measured ``host_s``, ``device_s`` and transfer time (``pcie_busy_s``) to ``policy.observe``
(the same ``FeedbackScheduler`` code the simulator drives with the same three numbers), so the
top-k ratio and GPU share adapt to what the hardware actually did.

Attention inputs come from ``SyntheticDecode``: per layer and batch element, tensors from
``hgsim.accuracy.synthesize`` (sinks, recency, heavy hitters) so that top-k selection meets the
same attention structure as the simulator's accuracy proxy. Helpers build the ``ModelSpec`` and
a profile whose HBM holds a chosen number of tokens, so policies that size their GPU share from
capacity (FlexGen, HGCA, InfiniGen) split the cache as intended on a small test model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from hgsim.accuracy import AttentionModelSpec, next_query, synthesize
from hgsim.plan import StepPlan
from hgsim.policies.base import Policy
from hgsim.profiles import profile_with_overrides
from hgsim.results import StepTiming
from hgsim.scheduler import SchedulerRecord
from hgsim.specs.hardware import HardwareProfile
from hgsim.specs.model import ModelSpec
from hgsim.workload import Workload
from hw_backend.executor import PlanExecutor
from hw_backend.kv_store import KvStore
from hw_backend.timing import LayerTiming, layers_frame, steps_frame

#: Policy options under which a ``profile_for_gpu_tokens`` HBM holds exactly the weights plus the
#: given tokens: no reserve for activations (the 1 GB + 6% default would swamp the KV cache of
#: a small test model) and no weight offload (which would free HBM for more KV).
SIZED_HBM_OPTIONS = {"hbm_reserve_gb": 0.0, "hbm_reserve_fraction": 0.0, "weight_offload": "none"}


def attention_model_spec(
    *, layers: int, heads: int, kv_heads: int, head_dim: int, name: str = "executor-test",
    ffn: int | None = None, vocab: int = 1024,
) -> ModelSpec:
    """A Llama-shaped ``ModelSpec`` with the given attention layout (for building policies)."""
    hidden = heads * head_dim
    return ModelSpec(
        name=name, family="llama", num_layers=layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, ffn_size=ffn or 4 * hidden, ffn_kind="swiglu",
        vocab_size=vocab, max_context=1 << 20,
    )


def profile_for_gpu_tokens(
    profile: HardwareProfile, model: ModelSpec, workload: Workload, gpu_tokens: int
) -> HardwareProfile:
    """``profile`` with HBM for the weights plus ``gpu_tokens`` tokens of KV per sequence.

    Use with ``SIZED_HBM_OPTIONS`` policy options. Policies that also buffer host data in HBM
    (FlexGen's double buffer, HybridGen's landing zone) then keep fewer tokens than this. An
    attention-only workload's plan places no weights, so its HBM holds the KV alone (room
    for the weights would be KV room, and the plan would keep more tokens than asked).
    """
    weights = workload.weight_bytes(model)
    kv = gpu_tokens * workload.batch * model.kv_bytes_per_token(workload.kv_dtype)
    gpu = profile.primary_gpu
    return profile_with_overrides(profile, {f"gpus.{gpu}.hbm_capacity_gb": (weights + kv) / 1e9})


class SyntheticDecode:
    """Prompt K/V and per-step (q, k, v) for every layer, from ``hgsim.accuracy.synthesize``.

    Each (layer, batch element) gets its own synthetic sequence of ``context + steps`` tokens;
    the first ``context - 1`` are the prompt and step ``t`` appends token ``context - 1 + t``,
    so step ``t`` attends ``context + t`` tokens, as the simulator's step ``t`` does. Each
    step's query is the designed query rotated slightly (cosine ``query_similarity``), so
    steps differ while keeping the designed attention structure.
    """

    def __init__(
        self, *, layers: int, batch: int, heads: int, kv_heads: int, head_dim: int,
        context: int, steps: int, dtype: torch.dtype = torch.float32, seed: int = 0,
        spec: AttentionModelSpec | None = None, query_similarity: float = 0.98,
    ) -> None:
        if context < 2:
            raise ValueError("context must be at least 2 (a prompt token and the new one)")
        base = spec or AttentionModelSpec()
        tokens = context + steps
        self.layers, self.batch, self.context, self.steps = layers, batch, context, steps
        self.dtype = dtype
        self.q, self.k, self.v = [], [], []
        for layer in range(layers):
            parts = [
                synthesize(AttentionModelSpec(
                    **{**_spec_fields(base), "n_tokens": tokens, "heads": heads,
                       "kv_heads": kv_heads, "head_dim": head_dim,
                       "seed": seed * 1_000_003 + layer * 1009 + b}))
                for b in range(batch)
            ]
            self.q.append(np.concatenate([p[0] for p in parts]))
            self.k.append(torch.from_numpy(np.concatenate([p[1] for p in parts])).to(dtype))
            self.v.append(torch.from_numpy(np.concatenate([p[2] for p in parts])).to(dtype))
        self._rng_seed = seed
        self.query_similarity = query_similarity

    def load(self, store: KvStore) -> None:
        prompt = self.context - 1
        for layer in range(self.layers):
            store[layer].load(self.k[layer][:, :, :prompt], self.v[layer][:, :, :prompt])

    def query(self, step: int, layer: int) -> torch.Tensor:
        """Float32 (B, H, D) query of ``layer`` at decode ``step``."""
        seed = [self._rng_seed, layer, step]
        q = next_query(self.q[layer], self.query_similarity, seed)
        return torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))

    def new_kv(self, step: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        position = self.context - 1 + step
        return (self.k[layer][:, :, position : position + 1],
                self.v[layer][:, :, position : position + 1])

    def kv_through(self, step: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token attended at ``step`` (for exact references)."""
        end = self.context + step
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def _spec_fields(spec: AttentionModelSpec) -> dict:
    return {name: getattr(spec, name) for name in spec.__dataclass_fields__}


@dataclass
class DecodeRun:
    """A measured decode run: step and layer records plus the scheduler's trace."""

    device: str
    policy: str
    steps: list[StepTiming] = field(default_factory=list)
    layers: list[LayerTiming] = field(default_factory=list)
    plans: list[StepPlan] = field(default_factory=list)
    scheduler: list[SchedulerRecord] = field(default_factory=list)

    def steps_frame(self) -> pd.DataFrame:
        return steps_frame(self.steps, source=self.device, policy=self.policy)

    def layers_frame(self) -> pd.DataFrame:
        frame = layers_frame(self.layers)
        frame["policy"] = self.policy
        return frame


def run_decode(
    policy: Policy, executor: PlanExecutor, source: SyntheticDecode, steps: int | None = None,
    *, observe: bool = True, label: str | None = None,
    on_step: Callable[[int], None] | None = None,
) -> DecodeRun:
    """Decode ``steps`` tokens: plan from the policy, execute, feed measured times back.

    ``label`` names the run in records (default: the policy's name); ``on_step(t)`` is called
    after each step (progress bars). ``source`` may be any object with SyntheticDecode's
    ``context``, ``steps``, ``query`` and ``new_kv`` (``random_kv.RandomDecode``).
    """
    steps = source.steps if steps is None else steps
    if steps > source.steps:
        raise ValueError(f"the source holds {source.steps} steps, {steps} requested")
    accel = executor.accel
    record = DecodeRun(device=accel.label, policy=label or policy.name)
    for t in range(steps):
        plan = policy.step_plan(source.context + t)
        queries = [source.query(t, i).to(accel.device) for i in range(plan.num_layers)]
        new_kv = [tuple(x.to(accel.device) for x in source.new_kv(t, i))
                  for i in range(plan.num_layers)]
        buffers = getattr(executor.side, "buffers", None)
        if executor.graphs and buffers is not None:  # into the graph path's fixed buffers
            queries, new_kv = buffers.load(queries, new_kv)
        run = executor.step(plan, queries, new_kv=new_kv, step=t)
        if observe and run.timing.host_s:  # as hgsim.simulate feeds its simulated step
            policy.observe(run.timing.host_s, run.timing.device_s, run.timing.variable_s)
        record.steps.append(run.timing)
        record.layers.extend(run.layers)
        record.plans.append(plan)
        if on_step is not None:
            on_step(t)
    if policy.scheduler is not None:
        record.scheduler = list(policy.scheduler.history)
    return record


__all__ = [
    "SIZED_HBM_OPTIONS", "DecodeRun", "SyntheticDecode", "attention_model_spec",
    "profile_for_gpu_tokens", "run_decode",
]
