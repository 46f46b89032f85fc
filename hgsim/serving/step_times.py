"""How long one server iteration takes: the simulator's decode step and prefill, on a grid.

A server's batch changes every iteration (requests join and leave, every context grows by a
token), so simulating each iteration in full would cost the whole decode simulator per token.
Instead the simulator runs once per *cell* of a geometric grid (``GRID_PER_OCTAVE`` points
per doubling of the batch and of the context) and a step in between is interpolated linearly
between the cell's corners. Cells are simulated when first needed and kept.

Two approximations, both stated in docs/serving.md:

* A batch of sequences with contexts c_1..c_B costs what B sequences of the mean context cost.
  Every per-token cost of decoding is linear in the tokens read (the KV scans and gathers,
  HybridGen's top-k over each sequence's host tokens), so the sum is what counts.
* A cell's step time is the *settled* step: the last quarter of a ``SETTLE_STEPS``-step run,
  after HybridGen's feedback scheduler has adapted its top-k ratio and GPU share from their
  starting values (a serving engine's scheduler runs continuously; it does not restart at
  every iteration).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from hgsim.errors import UserError
from hgsim.specs.hardware import HardwareProfile
from hgsim.specs.model import ModelSpec

GRID_PER_OCTAVE = 4  # decode cells per doubling of batch and context (19% apart)
PREFILL_GRID_PER_OCTAVE = 8  # prefill cells per doubling of the prompt (9% apart)
SETTLE_STEPS = 256  # decode steps a cell runs for its scheduler to settle
# of them, simulated in full (the rest interpolated, as hgsim simulate): the settled step
# moves under 0.2% from 32 samples, at a quarter of the cost
SETTLE_SAMPLES = 8
# contexts between which a step in a cell that is not bilinear is interpolated, at its own
# batch (4.4% apart)
FINE_PER_OCTAVE = 16
LINEAR_TOLERANCE = 0.01  # a cell's midpoints within 1% of bilinear: the cell is interpolated


def grid_point(k: int, per_octave: int) -> int:
    return max(1, round(2 ** (k / per_octave)))


def bracket(x: float, per_octave: int) -> tuple[int, int]:
    """The grid points ``round(2**(k/per_octave))`` nearest ``x`` below and above (the same
    point twice when ``x`` is one); ``x >= 1``."""
    k = math.floor(math.log2(x) * per_octave)
    lo = k
    while grid_point(lo, per_octave) > x:
        lo -= 1
    hi = k
    while grid_point(hi, per_octave) < x:
        hi += 1
    return grid_point(lo, per_octave), grid_point(hi, per_octave)


def share(x: float, lo: int, hi: int) -> float:
    """Where ``x`` lies between ``lo`` and ``hi``: 0 at ``lo``, 1 at ``hi``."""
    return 0.0 if hi == lo else (x - lo) / (hi - lo)


def between(x: float, lo: int, hi: int, at_lo: float, at_hi: float) -> float:
    """Linear interpolation of the value at ``x`` from its values at ``lo`` and ``hi``."""
    w = share(x, lo, hi)
    return at_lo if w == 0 else (1 - w) * at_lo + w * at_hi


def grid_cell(batch: float, context: float) -> tuple[int, int, int, int]:
    """The decode grid cell around (batch, context): its batches and contexts below and
    above (``b_lo, b_hi, c_lo, c_hi``)."""
    return (*bracket(batch, GRID_PER_OCTAVE), *bracket(context, GRID_PER_OCTAVE))


def bilinear_weights(batch: float, context: float, b_lo: int, b_hi: int, c_lo: int,
                     c_hi: int) -> list[tuple[tuple[int, int], float]]:
    """The four corners of a grid cell with their bilinear weights at (batch, context)."""
    wb, wc = share(batch, b_lo, b_hi), share(context, c_lo, c_hi)
    return [((b_lo, c_lo), (1 - wb) * (1 - wc)), ((b_lo, c_hi), (1 - wb) * wc),
            ((b_hi, c_lo), wb * (1 - wc)), ((b_hi, c_hi), wb * wc)]


def _chunk_key(past: int, tokens: int, past_from: str | None,
               packed: tuple[tuple[int, int], ...]) -> tuple[Any, ...]:
    """The chunks of a mixed step as its cells' keys hold them: past and tokens, then where
    the past comes from and the packed chunks, each only where there is one (the keys cells
    without them had before)."""
    return (past, tokens, *((past_from,) if past_from else ()), *((packed,) if packed else ()))


@dataclass
class StepTimes:
    """Decode-step and prefill seconds of one copy of one configuration (profile, model,
    policy, its options, dtypes, tensor and data parallelism), and whether a batch fits in
    its memory."""

    profile: HardwareProfile
    model: ModelSpec
    policy: str
    policy_options: dict[str, Any] = field(default_factory=dict)
    kv_dtype: str = "fp16"
    weight_dtype: str = "fp16"
    tensor_parallel: int = 1
    # copies of the model behind the server's one queue (data parallelism), each on its own
    # GPUs, sharing the host evenly (hgsim.tensor_parallel.rank_view); every copy runs at the
    # step times of the first
    data_parallel: int = 1
    gpu_placement: str = "packed"
    # the server's prefills: chunked at most this many tokens an iteration (None: whole), of
    # prompts of at most ``longest_prompt`` tokens (0: no HBM set aside for them)
    prefill_chunk: int | None = None
    longest_prompt: int = 0
    decode_cells: dict[tuple[int, int], float] = field(default_factory=dict)
    prefill_cells: dict[int, float] = field(default_factory=dict)
    # the machine's power over a cell's settled steps (W) and a prefill cell's joules (NaN:
    # the profile lacks energy figures), for every copy together
    decode_power: dict[tuple[int, int], float] = field(default_factory=dict)
    prefill_energy: dict[int, float] = field(default_factory=dict)
    fit_cells: dict[tuple[int, int], bool] = field(default_factory=dict)
    linear_cells: dict[tuple[int, int, int, int], bool] = field(default_factory=dict)
    # (batch, context, chunk's past, chunk's tokens[, past_from][, packed chunks]) -> seconds
    # and joules of a decode cell's step with a prefill chunk riding on it (batch 0: the
    # chunk alone)
    mixed_cells: dict[tuple[Any, ...], tuple[float, float]] = field(default_factory=dict)
    mixed_linear_cells: dict[tuple[int, ...], bool] = field(default_factory=dict)
    # the policy as each decode cell's run left it (its scheduler settled), for mixed steps
    _settled: dict[tuple[int, int], Any] = field(default_factory=dict, repr=False, init=False)

    def __post_init__(self) -> None:
        from hgsim.tensor_parallel import check_data_parallel, check_tensor_parallel, rank_gpus

        self.profile = self.profile.for_kv_dtype(self.kv_dtype)
        # what ``hgsim simulate`` refuses up front, refused before the first request
        self.profile.gpus[self.profile.primary_gpu].peak_flops(self.weight_dtype)
        check_tensor_parallel(self.model, self.tensor_parallel)
        rank_gpus(self.profile, self.tensor_parallel)
        check_data_parallel(self.profile, self.tensor_parallel, self.data_parallel)
        if self.gpu_placement not in ("packed", "spread"):
            raise UserError(f"expected packed or spread, got {self.gpu_placement!r}",
                            field="gpu_placement")
        from hgsim.serving import check_prefill_chunk

        check_prefill_chunk(self.prefill_chunk)
        self.prefill_chunk = self.prefill_chunk or None  # 0: whole, as None

    # ------------------------------------------------------------------ HBM for the prefills
    @cached_property
    def prefill_reserve_bytes(self) -> float:
        """HBM each GPU sets aside for the server's prefills before any KV is placed
        (``reserve_bytes_for`` the ``reserved_prompt``)."""
        return self.reserve_bytes_for(self.reserved_prompt)

    def reserve_bytes_for(self, longest: int) -> float:
        """HBM each GPU sets aside for prefills of prompts of at most ``longest`` tokens
        (vLLM sizes its KV cache after profiling a forward pass of its token budget, for the
        same reason): one layer's activations over the most positions one forward prefills (a
        chunk, or the longest prompt whole), and with chunked prefill where the policy may
        keep KV in host memory, the double-buffered landing block of one layer's read-back of
        the longest prompt's earlier tokens. Of the model shard a GPU holds."""
        if not longest:
            return 0.0
        from hgsim.costs import prefill_activation_bytes
        from hgsim.policies.registry import lookup

        shard = self._view.model
        tokens = min(self.prefill_chunk or longest, longest)
        reserve = prefill_activation_bytes(shard, 1, tokens, self.weight_dtype)
        if tokens < longest and lookup(self.policy)[0].reads_kv_back:
            reserve += 2 * longest * shard.kv_bytes_per_token_layer(self.kv_dtype)
        return reserve

    @cached_property
    def reserved_prompt(self) -> int:
        """The longest prompt HBM is set aside for: ``longest_prompt``, or where a prompt that
        long does not fit alone beside its own prefill's reserve, the longest that does
        (within 0.1%). A prompt no one can serve would otherwise take from every prompt that
        can the HBM its own prefill would need (a conversation of many turns, its last turns
        beyond any memory); the server refuses a prompt longer than this."""
        longest = self.longest_prompt
        if not longest or self._fits_alone(longest):
            return longest
        lo, hi = 0, longest  # lo fits alone (nothing does trivially), hi does not
        while hi - lo > max(1, lo // 1000):
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self._fits_alone(mid) else (lo, mid)
        return lo

    def _fits_alone(self, prompt: int) -> bool:
        """Whether one sequence of ``prompt`` tokens fits the policy's memory beside the HBM
        set aside to prefill prompts that long."""
        from hgsim.policies import make_policy

        profile = self._less_hbm(self.reserve_bytes_for(prompt))
        return bool(make_policy(self.policy, self.model, profile,
                                self._workload(1, prompt, gen=1), self.policy_options).feasible)

    def _less_hbm(self, reserve_bytes: float) -> HardwareProfile:
        """The profile with every GPU's HBM less ``reserve_bytes``."""
        reserve_gb = reserve_bytes / 1e9
        if not reserve_gb:
            return self.profile
        from hgsim.profiles import profile_with_overrides

        return profile_with_overrides(self.profile, {
            f"gpus.{name}.hbm_capacity_gb": max(gpu.hbm_capacity_gb - reserve_gb, 1e-3)
            for name, gpu in self.profile.gpus.items()})

    @cached_property
    def serving_profile(self) -> HardwareProfile:
        """The profile the decode steps and admission see: every GPU's HBM less
        ``prefill_reserve_bytes`` (the prefill cells, a prompt alone, hold their own)."""
        return self._less_hbm(self.prefill_reserve_bytes)

    @cached_property
    def _view(self):
        """Rank 0's view of the machine (``hgsim.tensor_parallel.rank_view``): the model shard a
        GPU holds, and the system energy and cost count."""
        from hgsim.policies.base import host_shared
        from hgsim.tensor_parallel import rank_view

        return rank_view(self.profile, self.model, self.tensor_parallel,
                         host_shared(self.policy_options), self.data_parallel,
                         self.gpu_placement)

    # ------------------------------------------------------------------ what energy counts
    @property
    def system(self) -> HardwareProfile:
        """The hardware energy and cost count (``RankView.system``: the GPUs of every copy,
        the host), as ``hgsim simulate`` counts them."""
        return self._view.system

    @property
    def idle_power_w(self) -> float:
        """The machine's draw with nothing running (GPUs' and sockets' idle power, the tiers'
        background power; links draw only per bit): what an idle server still costs."""
        from hgsim import energy

        joules = energy.energy_by_component_j(self.system, energy.Activity(window_s=1.0))
        return sum(joules.values()) if joules else math.nan

    # ------------------------------------------------------------------ what the server asks
    def decode_weights(self, batch: int, mean_context: float
                       ) -> list[tuple[tuple[int, int], float]]:
        """The cells a decode step of ``batch`` sequences averaging ``mean_context`` tokens is
        read from, with their weights: the grid cell's corners (bilinear) where the cell is
        ``linear``, else its own batch between contexts ``FINE_PER_OCTAVE`` to a doubling
        apart, or where the context above does not fit (the batch is at the memory's edge)
        extrapolated from the two below; the point itself where neither holds."""
        c = max(1.0, mean_context)
        cell = grid_cell(batch, c)
        if self.linear(*cell):
            return bilinear_weights(batch, c, *cell)
        return self.fine_weights(batch, c)

    def fine_weights(self, batch: int, c: float) -> list[tuple[tuple[int, int], float]]:
        """``decode_weights`` where the grid cell is not bilinear: the batch's own cells."""
        lo, hi = bracket(c, FINE_PER_OCTAVE)
        if math.isfinite(self.decode_cell(batch, hi)):
            w = share(c, lo, hi)
            return [((batch, lo), 1 - w), ((batch, hi), w)]
        # the context above does not fit this batch (it is at the memory's edge): on from the
        # two below, at most one fine step (4.4%) beyond the last
        below = bracket(lo - 0.5, FINE_PER_OCTAVE)[0] if lo > 1 else lo
        if below < lo and math.isfinite(self.decode_cell(batch, below)):
            w = share(c, below, lo)
            return [((batch, below), 1 - w), ((batch, lo), w)]
        return [((batch, math.ceil(c)), 1.0)]

    def decode_step(self, batch: int, mean_context: float) -> tuple[float, float]:
        """One decode step of ``batch`` sequences whose contexts average ``mean_context``: its
        seconds, and the machine's joules over it (every copy's: the cells simulate all)."""
        seconds = joules = 0.0
        for cell, w in self.decode_weights(batch, mean_context):
            if w:
                t = self.decode_cell(*cell)
                seconds += w * t
                joules += w * t * self.decode_power[cell]
        return seconds, joules

    def decode_step_s(self, batch: int, mean_context: float) -> float:
        return self.decode_step(batch, mean_context)[0]

    def decode_step_j(self, batch: int, mean_context: float) -> float:
        return self.decode_step(batch, mean_context)[1]

    def mixed_step(self, batch: int, mean_context: float, past: int, tokens: int,
                   past_from: str | None = None,
                   packed: tuple[tuple[int, int], ...] = ()) -> tuple[float, float]:
        """One iteration that decodes ``batch`` sequences averaging ``mean_context`` tokens
        and prefills positions ``past`` to ``past + tokens`` of a prompt in the same forward
        (chunked prefill; ``batch`` 0: the chunk alone): its seconds and the machine's joules.
        Read from the cells ``decode_step`` reads, each cell's settled step simulated again
        with the chunk riding on it (``DecodeEngine.step``).

        A ``past`` off the chunk lattice (a prefix cache's hit starts a prompt there, a prompt
        packed behind another resumes there) is read between the lattice points around it
        (``past_bracket``; without chunks the prefill grid's): the chunk's attention and
        read-back grow linearly with its past, and such a past is any number (simulated at
        each, every conversation would cost its own steps).

        ``past_from``: the prompt's whole past is read back from the host, from the policy's
        host tiers (``PAST_ON_HOST``: a prefix its cache kept there) or from a host KV store
        on the tier named (``PrefillChunk.past_from``).

        ``packed``: more prompts' chunks in the same forward (past, tokens; their past in
        place), the rest of the iteration's token budget. Such a step is read from cells with
        every chunk riding on them at its own past: the prompts packed are each iteration's
        own, so there is no lattice to share."""
        if packed:
            return self._mixed_step(batch, mean_context, past, tokens, past_from, packed)
        on_lattice = past == 0 or (self.prefill_chunk and past % self.prefill_chunk == 0)
        if not on_lattice:
            lo, hi = self.past_bracket(past)
            at_hi = self._mixed_step(batch, mean_context, hi, tokens, past_from)
            if lo < hi and math.isfinite(at_hi[0]):
                at_lo = self._mixed_step(batch, mean_context, lo, tokens, past_from)
                if math.isfinite(at_lo[0]):
                    return (between(past, lo, hi, at_lo[0], at_hi[0]),
                            between(past, lo, hi, at_lo[1], at_hi[1]))
        return self._mixed_step(batch, mean_context, past, tokens, past_from)

    def past_bracket(self, past: int) -> tuple[int, int]:
        """The pasts a chunk's step at ``past`` is read between: the chunk lattice's points
        around it (multiples of ``prefill_chunk``, the pasts every prompt chunked from its
        start meets, so their cells are shared), or without chunks the prefill grid's."""
        if self.prefill_chunk:
            lo = past // self.prefill_chunk * self.prefill_chunk
            return lo, lo + self.prefill_chunk
        return bracket(past, PREFILL_GRID_PER_OCTAVE)

    def _mixed_step(self, batch: int, mean_context: float, past: int, tokens: int,
                    past_from: str | None = None, packed: tuple[tuple[int, int], ...] = ()
                    ) -> tuple[float, float]:
        """``mixed_step`` at ``past`` itself."""
        seconds = joules = 0.0
        for cell, w in self._cell_weights(batch, mean_context, past, tokens, past_from,
                                          packed):
            t, j = self.mixed_cell(*cell, past, tokens, past_from, packed)
            seconds += w * t
            joules += w * j
        return seconds, joules

    def _cell_weights(self, batch: int, mean_context: float, past: int, tokens: int,
                      past_from: str | None = None, packed: tuple[tuple[int, int], ...] = ()
                      ) -> list[tuple[tuple[int, int], float]]:
        """The cells a mixed step is read from, with their weights (none of them 0): the
        decode's grid cell's corners where the cell is bilinear with the chunks riding on it
        too, else the batch's own cells (``fine_weights``); batch 0: the chunks alone."""
        if batch == 0:
            return [((0, 0), 1.0)]
        c = max(1.0, mean_context)
        cell = grid_cell(batch, c)
        weights = (bilinear_weights(batch, c, *cell)
                   if self.linear(*cell)
                   and self.mixed_linear(cell, past, tokens, past_from, packed)
                   else self.fine_weights(batch, c))
        return [(cell, w) for cell, w in weights if w]

    def mixed_linear(self, cell: tuple[int, int, int, int], past: int, tokens: int,
                     past_from: str | None = None, packed: tuple[tuple[int, int], ...] = ()
                     ) -> bool:
        """Whether a bilinear ``cell`` (``grid_cell``) is bilinear with the chunk (and
        ``packed``) riding on its steps too: its middle point (a cell the decode's own check
        settled) within ``LINEAR_TOLERANCE`` of the corners' interpolation. A chunk hidden in
        the wait for the host at one corner and not at another bends the surface where the
        step alone is flat."""
        b_lo, b_hi, c_lo, c_hi = cell
        key = (*cell, *_chunk_key(past, tokens, past_from, packed))
        if key not in self.mixed_linear_cells:
            b_mid = (b_lo + b_hi) // 2 if b_hi - b_lo >= 2 else b_lo
            c_mid = (c_lo + c_hi) // 2 if c_hi - c_lo >= 2 else c_lo
            exact = self.mixed_cell(b_mid, c_mid, past, tokens, past_from, packed)[0]
            guess = sum(w * self.mixed_cell(*corner, past, tokens, past_from, packed)[0]
                        for corner, w
                        in bilinear_weights(b_mid, c_mid, b_lo, b_hi, c_lo, c_hi) if w)
            self.mixed_linear_cells[key] = abs(guess - exact) <= LINEAR_TOLERANCE * exact
        return self.mixed_linear_cells[key]

    def mixed_cell(self, batch: int, context: int, past: int, tokens: int,
                   past_from: str | None = None, packed: tuple[tuple[int, int], ...] = ()
                   ) -> tuple[float, float]:
        """A decode cell's settled step with a prefill chunk (``simulate.mixed_step``), under
        the policy as the cell's run left it; batch 0: the chunk alone, placed as the policy
        places one sequence of the chunk's end; ``past_from``: its past from a host KV
        store there; ``packed``: more prompts' chunks behind it."""
        key = (batch, context, *_chunk_key(past, tokens, past_from, packed))
        if key not in self.mixed_cells:
            from hgsim.simulate import mixed_step

            if batch == 0:
                from hgsim.policies import make_policy

                workload = self._workload(1, past + tokens, gen=1)
                pol = make_policy(self.policy, self.model, self.serving_profile, workload,
                                  self.policy_options)
                ok = pol.feasible
            else:
                ok = math.isfinite(self.decode_cell(batch, context))
                workload, pol = self._workload(batch, context, gen=1), self._settled.get(
                    (batch, context))
            # alone, the prompt is placed as the policy places one sequence of its length
            at = past + tokens if batch == 0 else context
            self.mixed_cells[key] = (mixed_step(
                self.serving_profile, self.model, pol, workload, at, past, tokens,
                alone=batch == 0, policy_options=self.policy_options, past_from=past_from,
                packed=packed)
                if ok and pol is not None else (math.inf, math.nan))
        return self.mixed_cells[key]

    def linear(self, b_lo: int, b_hi: int, c_lo: int, c_hi: int) -> bool:
        """Whether the cell's corners all fit and its midpoints are where bilinear
        interpolation puts them (within ``LINEAR_TOLERANCE``). A step whose costs are linear
        in the tokens read, ``a + b B + c C + d B C``, is bilinear exactly; what is not is a
        regime changing inside the cell (the KV cache spilling out of HBM, the scheduler
        settling elsewhere), where interpolating would cut the corner."""
        key = (b_lo, b_hi, c_lo, c_hi)
        if key not in self.linear_cells:
            corners = [self.decode_cell(b, c) for b in (b_lo, b_hi) for c in (c_lo, c_hi)]
            ok = all(math.isfinite(v) for v in corners)
            b_mid = (b_lo + b_hi) // 2 if b_hi - b_lo >= 2 else None
            c_mid = (c_lo + c_hi) // 2 if c_hi - c_lo >= 2 else None
            probes = {(b, c_mid) for b in (b_lo, b_hi, b_mid) if c_mid and b} | (
                {(b_mid, c_lo), (b_mid, c_hi)} if b_mid else set())
            for b, c in sorted(probes) if ok else ():
                exact = self.decode_cell(b, c)
                guess = sum(w * self.decode_cell(*corner) for corner, w
                            in bilinear_weights(b, c, b_lo, b_hi, c_lo, c_hi))
                if not abs(guess - exact) <= LINEAR_TOLERANCE * exact:
                    ok = False
                    break
            self.linear_cells[key] = ok
        return self.linear_cells[key]

    def prefill(self, prompt_tokens: int) -> tuple[float, float]:
        """The prefill of one prompt alone (its time to first token on an idle machine;
        infinite where it does not fit), and the machine's joules over it."""
        lo, hi = bracket(prompt_tokens, PREFILL_GRID_PER_OCTAVE)
        at_lo, at_hi = self.prefill_cell(lo), self.prefill_cell(hi)
        if not (math.isfinite(at_lo) and math.isfinite(at_hi)):
            return self.prefill_cell(prompt_tokens), self.prefill_energy[prompt_tokens]
        return (between(prompt_tokens, lo, hi, at_lo, at_hi),
                between(prompt_tokens, lo, hi, self.prefill_energy[lo], self.prefill_energy[hi]))

    def prefill_s(self, prompt_tokens: int) -> float:
        return self.prefill(prompt_tokens)[0]

    def prefill_j(self, prompt_tokens: int) -> float:
        return self.prefill(prompt_tokens)[1]

    def fits(self, batch: int, final_tokens: int) -> bool:
        """Whether ``batch`` sequences holding ``final_tokens`` tokens of KV in all (what they
        will hold when every one has finished) fit the policy's memory."""
        context = max(1, math.ceil(final_tokens / batch) - 1)  # plus gen=1: the final length
        key = (batch, context)
        if key not in self.fit_cells:
            from hgsim.policies import make_policy

            policy = make_policy(self.policy, self.model, self.serving_profile,
                                 self._workload(batch, context, gen=1), self.policy_options)
            self.fit_cells[key] = bool(policy.feasible)
        return self.fit_cells[key]

    # ------------------------------------------------------------------ cells
    def decode_cell(self, batch: int, context: int) -> float:
        """The settled step of ``batch`` sequences at ``context`` tokens: a run that ends
        there (its ``SETTLE_STEPS`` steps start below it), so it fits wherever the batch at
        ``context`` does."""
        key = (batch, context)
        if key not in self.decode_cells:
            steps = max(1, min(SETTLE_STEPS, context - 1))
            result = self._simulate(self._workload(batch, max(1, context - steps), gen=steps),
                                    samples=min(SETTLE_SAMPLES, steps), serving=True,
                                    settled=lambda pol: self._settled.__setitem__(key, pol))
            if not result.feasible or not result.steps:
                self.decode_cells[key] = math.inf
                self.decode_power[key] = math.nan
            else:
                simulated = [s.latency_s for s in result.steps if s.simulated]
                settled = simulated[-max(1, len(simulated) // 4):]
                self.decode_cells[key] = float(np.median(settled))
                # the run's average draw (its window: the simulated steps)
                self.decode_power[key] = (sum(result.energy_j.values()) / result.energy_window_s
                                          if result.energy_j and result.energy_window_s > 0
                                          else math.nan)
        return self.decode_cells[key]

    def prefill_cell(self, prompt_tokens: int) -> float:
        if prompt_tokens not in self.prefill_cells:
            result = self._simulate(self._workload(1, prompt_tokens, gen=1, prefill=True),
                                    samples=1)
            self.prefill_cells[prompt_tokens] = (float(result.ttft_s) if result.feasible
                                                 else math.inf)
            self.prefill_energy[prompt_tokens] = (
                sum(result.prefill_energy_j.values()) if result.feasible
                and result.prefill_energy_j else math.nan)
        return self.prefill_cells[prompt_tokens]

    @property
    def simulations(self) -> int:
        return len(self.decode_cells) + len(self.prefill_cells) + len(self.mixed_cells)

    def _workload(self, batch: int, context: int, *, gen: int, prefill: bool = False):
        from hgsim.workload import Workload

        return Workload(batch=batch, context=context, gen=gen, kv_dtype=self.kv_dtype,
                        weight_dtype=self.weight_dtype, include_prefill=prefill,
                        tensor_parallel=self.tensor_parallel, data_parallel=self.data_parallel,
                        gpu_placement=self.gpu_placement)

    def _simulate(self, workload, *, samples: int, serving: bool = False, settled=None):
        """``serving``: on ``serving_profile`` (a decode step beside the prefills' reserve);
        else on the profile (a prefill alone)."""
        from hgsim.simulate import Fidelity, simulate

        return simulate(self.serving_profile if serving else self.profile, self.model,
                        self.policy, workload,
                        policy_options=dict(self.policy_options),
                        fidelity=Fidelity(decode_samples=samples, accuracy=False),
                        settled=settled)
