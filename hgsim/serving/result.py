"""What a serving run measured: each request's latencies and the run's percentiles.

TTFT is arrival to first token (queueing plus prefill); TPOT, a request's mean time per output
token after the first, ``(finish - first token) / (output - 1)``; end-to-end, arrival to last
token. A request meets the SLO when its TTFT and its TPOT are both within their limits (a
request of one token has no TPOT and meets that half); a rejected request never does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hgsim.serving.server import Iteration, Served

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Slo:
    ttft_s: float = math.inf
    tpot_s: float = math.inf
    attainment: float = 0.9  # share of requests that must meet it (rate search)

    @property
    def set(self) -> bool:
        return math.isfinite(self.ttft_s) or math.isfinite(self.tpot_s)

    def met(self, ttft_s: float, tpot_s: float) -> bool:
        return ttft_s <= self.ttft_s and (math.isnan(tpot_s) or tpot_s <= self.tpot_s)

    def __str__(self) -> str:
        parts = [f"TTFT <= {self.ttft_s:g} s" if math.isfinite(self.ttft_s) else "",
                 f"TPOT <= {self.tpot_s * 1e3:g} ms" if math.isfinite(self.tpot_s) else ""]
        return " and ".join(p for p in parts if p) + f" for {self.attainment:.0%} of requests"


@dataclass
class ServeResult:
    """One run: the configuration's labels, every request, every iteration."""

    labels: dict[str, Any]
    rate_per_s: float  # offered (NaN for a trace's own arrival times)
    served: list[Served]
    iterations: list[Iteration]
    slo: Slo = field(default_factory=Slo)
    simulations: int = 0  # simulator runs the step times took (cells)
    copies: int = 1  # copies of the model behind the queue (data parallelism)
    # the machine's draw when idle, its capital per second and the price of a joule at the
    # wall (NaN where the profile lacks the figures; hgsim.energy, hgsim.tco)
    idle_power_w: float = math.nan
    capex_usd_per_s: float = math.nan
    electricity_usd_per_j: float = math.nan

    # ------------------------------------------------------------------ per request
    def requests_frame(self):
        """One row per request: lengths, times and its latencies (seconds)."""
        import pandas as pd

        rows = []
        for s in self.served:
            r = s.request
            ttft = s.first_token_s - r.arrival_s
            tpot = ((s.finish_s - s.first_token_s) / (r.output_tokens - 1)
                    if r.output_tokens > 1 else math.nan)
            rows.append({
                "id": r.id, "arrival_s": r.arrival_s, "prompt_tokens": r.prompt_tokens,
                "output_tokens": r.output_tokens, "queue_s": s.admitted_s - r.arrival_s,
                "ttft_s": ttft, "tpot_s": tpot, "e2e_s": s.finish_s - r.arrival_s,
                "rejected": s.rejected,
                "slo_met": (not s.rejected) and self.slo.met(ttft, tpot),
                "conversation": r.conversation, "turn": r.turn,
                "cached_tokens": s.cached_tokens, "loaded_tokens": s.loaded_tokens,
                "copy": s.copy, "preemptions": s.preemptions,
                "recomputed_tokens": s.recomputed_tokens,
            })
        return pd.DataFrame(rows)

    def iterations_frame(self):
        """One row per iteration of each copy: start, prefill and decode seconds, the batch
        decoded, requests admitted and still queued, the batch's mean context (a time series
        of the server's load)."""
        import pandas as pd

        return pd.DataFrame([vars(it) for it in self.iterations],
                            columns=list(Iteration.__dataclass_fields__))

    # ------------------------------------------------------------------ the run
    def summary(self) -> dict[str, Any]:
        frame = self.requests_frame()
        done = frame[frame.rejected == ""]
        arrivals = frame.arrival_s.to_numpy()
        finishes = done.arrival_s + done.e2e_s
        if len(done):
            span_s = float(finishes.max() - arrivals.min())
        else:  # nothing finished: the run spans the arrivals it refused, its rates of
            # completed work 0 over it (NaN where that span is no time: one arrival, or none)
            known = arrivals[np.isfinite(arrivals)]
            span_s = float(known.max() - known.min()) if known.size else math.nan
        decode_s = sum(it.decode_s for it in self.iterations)
        batch_s = sum(it.batch * it.decode_s for it in self.iterations)
        busy_s = sum(it.prefill_s + it.decode_s for it in self.iterations)
        prefill_s = sum(it.prefill_s for it in self.iterations)
        row: dict[str, Any] = {
            **self.labels,
            "rate_per_s": self.rate_per_s,
            "requests": len(frame), "completed": len(done), "rejected": len(frame) - len(done),
            "span_s": span_s,
            "requests_per_s": len(done) / span_s if span_s > 0 else math.nan,
            "output_tokens_per_s": (float(done.output_tokens.sum()) / span_s if span_s > 0
                                    else math.nan),
            "mean_batch": batch_s / decode_s if decode_s > 0 else math.nan,  # of one copy
            # of each copy's time, on average over the copies
            "busy_fraction": busy_s / (span_s * self.copies) if span_s > 0 else math.nan,
            "prefill_fraction": prefill_s / busy_s if busy_s > 0 else math.nan,
        }
        # conversations: what the prefix cache held
        if len(frame) and (frame.conversation >= 0).any():
            prompts = float(done.prompt_tokens.sum())
            row["prefix_cached_fraction"] = (float(done.cached_tokens.sum()) / prompts
                                             if prompts else math.nan)
            # of those, the share loaded from the host KV store
            row["prefix_loaded_fraction"] = (float(done.loaded_tokens.sum()) / prompts
                                             if prompts else math.nan)
        # paged admission: the KV freed to make room and computed again
        row["preemptions"] = int(frame.preemptions.sum()) if len(frame) else 0
        prefilled = sum(it.prefill_tokens for it in self.iterations)  # recomputed included
        row["recomputed_fraction"] = (float(frame.recomputed_tokens.sum()) / prefilled
                                      if len(frame) and prefilled else 0.0)
        columns = [(name[:-2], done[name]) for name in ("queue_s", "ttft_s", "tpot_s", "e2e_s")]
        if "prefix_cached_fraction" in row:  # conversations: a first turn's TTFT and a later's
            columns += [("ttft_first", done.ttft_s[done.turn == 0]),
                        ("ttft_later", done.ttft_s[done.turn > 0])]
        for stem, column in columns:
            values = column.dropna().to_numpy()
            row[f"{stem}_mean_s"] = float(values.mean()) if values.size else math.nan
            for q in PERCENTILES:
                row[f"{stem}_p{q}_s"] = (float(np.percentile(values, q)) if values.size
                                         else math.nan)
        if self.slo.set:
            met = int(frame.slo_met.sum())
            row["slo_ttft_s"], row["slo_tpot_s"] = self.slo.ttft_s, self.slo.tpot_s
            row["slo_attainment"] = met / len(frame) if len(frame) else math.nan
            row["goodput_requests_per_s"] = met / span_s if span_s > 0 else math.nan
        row.update(self.energy_and_cost(span_s, busy_s, float(done.output_tokens.sum())))
        row["simulations"] = self.simulations
        return row

    def energy_and_cost(self, span_s: float, busy_s: float, tokens: float) -> dict[str, float]:
        """Joules over the run (each iteration's, plus the idle draw of every copy's idle
        time), the average power, joules per output token, and dollars per million output
        tokens: the capital over the run's span plus its electricity."""
        idle_copy_s = max(0.0, self.copies * span_s - busy_s) if span_s > 0 else math.nan
        energy_j = (sum(it.energy_j for it in self.iterations)
                    + self.idle_power_w / self.copies * idle_copy_s)
        capex = self.capex_usd_per_s * span_s
        electricity = self.electricity_usd_per_j * energy_j
        per_mtok = 1e6 / tokens if tokens > 0 else math.nan
        return {
            "energy_j": energy_j, "power_w": energy_j / span_s if span_s > 0 else math.nan,
            "energy_j_per_output_token": energy_j / tokens if tokens > 0 else math.nan,
            "usd_per_mtok": (capex + electricity) * per_mtok,
            "usd_per_mtok_capex": capex * per_mtok,
            "usd_per_mtok_energy": electricity * per_mtok,
        }

    @property
    def attainment(self) -> float:
        frame = self.requests_frame()
        return float(frame.slo_met.mean()) if len(frame) else math.nan
