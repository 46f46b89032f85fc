"""What one simulation returns, and its flat row form for tables and Parquet."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class StepTiming:
    """One decode step as the executor saw it (simulated here, measured in hw_backend)."""

    step: int
    context: int
    latency_s: float
    gpu_busy_s: float  # GPU compute stream busy
    cpu_busy_s: float  # CPU attention work in flight
    pcie_busy_s: float  # either PCIe direction busy
    stall_s: float  # GPU idle inside the step waiting for host data
    host_s: float  # host path time summed over layers (scheduler input)
    device_s: float  # device work available to hide it, summed over layers
    topk_ratio: float
    gpu_tokens: int
    simulated: bool = True  # False: interpolated between sampled steps
    variable_s: float = 0.0  # part of host_s that grows with the top-k ratio (scheduler input)
    decision: str = ""  # the scheduler's decision after this step, if it made one
    # of cpu_busy_s, measured only: the host kernels' thread runnable but waiting for a core
    # (other processes on it); the simulator models the work, never the machine's other load
    cpu_wait_s: float = 0.0


@dataclass
class SimResult:
    profile: str
    model: str
    policy: str
    batch: int
    context: int
    gen: int
    feasible: bool
    reason: str | None = None
    steps: list[StepTiming] = field(default_factory=list)
    ttft_s: float = float("nan")  # time to first token; NaN: no prefill was simulated
    footprint_bytes: dict[str, float] = field(default_factory=dict)
    capacity_bytes: dict[str, float] = field(default_factory=dict)
    utilisation: dict[str, float] = field(default_factory=dict)
    bytes_by_resource: dict[str, float] = field(default_factory=dict)
    accuracy_mass_kept: float = 1.0
    accuracy_rel_error: float = 0.0
    events: int = 0
    wall_s: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    # Mean per decode step: seconds of the critical path spent on each resource (what binds)
    binding_s: dict[str, float] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=dict)  # scheduler decisions, counted
    last_reason: str = ""  # the scheduler's last decision and why
    # Energy and cost (hgsim/energy.py, hgsim/tco.py): joules per component over the
    # simulated decode steps (``energy_window_s`` seconds; every step when decode_samples=0),
    # the machine's capital cost, its amortised capital per second and the price of a joule
    # at the wall. Empty / NaN where the profile lacks the figures.
    energy_j: dict[str, float] = field(default_factory=dict)
    energy_window_s: float = 0.0
    capex_usd: float = float("nan")
    capex_usd_per_s: float = float("nan")
    electricity_usd_per_j: float = float("nan")
    selection: str = ""  # HybridGen's GQA top-k granularity that ran (plan.GroupSelect)
    # Joules per component over the prefill (its ``ttft_s`` seconds, the same energy model);
    # empty without a prefill or where the profile lacks the figures
    prefill_energy_j: dict[str, float] = field(default_factory=dict)
    # Prompt tokens per sequence per prefill chunk as run (the prompt: one chunk); None without
    # a prefill. ``prefill_chunk_auto``: chosen by ``prefill_chunk_tokens: auto``
    prefill_chunk_tokens: int | None = None
    prefill_chunk_auto: bool = False
    # GPUs the model is sharded over (hgsim.tensor_parallel); tokens_per_s is the system's
    # (every rank decodes the same sequences), footprints are one rank's, energy and cost the
    # n GPUs' and the host's
    tensor_parallel: int = 1
    # copies of the model decoding their own sequences side by side on the host (data
    # parallelism): tokens_per_s counts every replica's; latencies are one replica's
    data_parallel: int = 1
    gpu_placement: str = "packed"  # which GPUs the copies took (Workload.gpu_placement)

    # ------------------------------------------------------------------ derived metrics
    @property
    def latencies_s(self) -> np.ndarray:
        return np.array([s.latency_s for s in self.steps])

    @property
    def decode_s(self) -> float:
        return float(self.latencies_s.sum()) if self.steps else float("nan")

    @property
    def request_s(self) -> float:
        """The request's time: time to first token plus the decode (NaN without a prefill);
        what ``prefill_chunk_tokens: auto`` minimises."""
        return self.ttft_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        """The system's: every replica's ``batch`` sequences, each token of each step."""
        if not self.steps:
            return 0.0
        return self.data_parallel * self.batch * len(self.steps) / self.decode_s

    def latency_stats_ms(self) -> dict[str, float]:
        lat = self.latencies_s * 1e3
        if not lat.size:
            return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
        return {
            "mean": float(lat.mean()),
            "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)),
        }

    def breakdown_ms(self) -> dict[str, float]:
        """Mean per-token time in each activity; overlapping activities each count in full."""
        if not self.steps:
            return {}
        n = len(self.steps)
        return {
            "gpu_compute": 1e3 * sum(s.gpu_busy_s for s in self.steps) / n,
            "cpu_compute": 1e3 * sum(s.cpu_busy_s for s in self.steps) / n,
            "pcie": 1e3 * sum(s.pcie_busy_s for s in self.steps) / n,
            "stall": 1e3 * sum(s.stall_s for s in self.steps) / n,
        }

    # ------------------------------------------------------------------ energy and cost
    @property
    def power_w(self) -> dict[str, float]:
        """Average power of each component over the simulated decode."""
        if not self.energy_j or self.energy_window_s <= 0:
            return {}
        return {k: j / self.energy_window_s for k, j in self.energy_j.items()}

    @property
    def power_total_w(self) -> float:
        power = self.power_w
        return sum(power.values()) if power else float("nan")

    @property
    def energy_j_per_token(self) -> float:
        """Joules per generated token: average power over tokens per second."""
        tps = self.tokens_per_s
        return self.power_total_w / tps if tps > 0 else float("nan")

    @property
    def usd_per_mtok_capex(self) -> float:
        """Amortised capital per million tokens (scales exactly as 1 / tokens_per_s)."""
        tps = self.tokens_per_s
        return self.capex_usd_per_s * 1e6 / tps if tps > 0 else float("nan")

    @property
    def usd_per_mtok_energy(self) -> float:
        """Electricity per million tokens, facility overhead included."""
        return self.energy_j_per_token * self.electricity_usd_per_j * 1e6

    @property
    def usd_per_mtok(self) -> float:
        """Dollars per million tokens: amortised capital plus electricity."""
        return self.usd_per_mtok_capex + self.usd_per_mtok_energy

    @property
    def prefill_energy_total_j(self) -> float:
        """Joules of the whole machine over the prefill (NaN: none simulated, or no figures)."""
        return sum(self.prefill_energy_j.values()) if self.prefill_energy_j else math.nan

    @property
    def prefill_usd(self) -> float:
        """The prefill's cost: the machine's amortised capital over TTFT plus its electricity
        (NaN, one object, where either is missing: rows of equal runs compare equal)."""
        usd = self.capex_usd_per_s * self.ttft_s + (self.prefill_energy_total_j
                                                     * self.electricity_usd_per_j)
        return usd if usd == usd else math.nan

    def energy_row(self) -> dict[str, float]:
        """The energy and cost columns of ``to_row`` for a feasible run."""
        tps = self.tokens_per_s
        power = self.power_w
        row = {
            "energy_j_per_token": self.energy_j_per_token,
            "tokens_per_j": 1.0 / self.energy_j_per_token if power else float("nan"),
            "power_w_total": self.power_total_w,
            "usd_per_mtok": self.usd_per_mtok,
            "usd_per_mtok_capex": self.usd_per_mtok_capex,
            "usd_per_mtok_energy": self.usd_per_mtok_energy,
            "tokens_per_s_per_kusd": tps / (self.capex_usd / 1e3),
        }
        row.update({f"power_w_{k}": v for k, v in power.items()})
        row["prefill_energy_j"] = self.prefill_energy_total_j
        row.update({f"prefill_energy_j_{k}": v for k, v in self.prefill_energy_j.items()})
        row["prefill_usd"] = self.prefill_usd
        return row

    def scheduler_trace(self) -> list[tuple[int, float, int]]:
        return [(s.step, s.topk_ratio, s.gpu_tokens) for s in self.steps]

    @property
    def binding(self) -> str:
        """The resource that holds the critical path longest (what to make faster first)."""
        return max(self.binding_s, key=self.binding_s.__getitem__) if self.binding_s else ""

    def binding_shares(self) -> dict[str, float]:
        """Each resource's share of the step latency on the critical path, largest first."""
        total = sum(self.binding_s.values())
        if not total:
            return {}
        return {k: v / total for k, v in sorted(self.binding_s.items(), key=lambda kv: -kv[1])}

    def to_row(self) -> dict[str, Any]:
        """Flat metrics for a results table (one row per configuration)."""
        row: dict[str, Any] = {
            "profile": self.profile, "model": self.model, "policy": self.policy,
            "batch": self.batch, "context": self.context, "gen": self.gen,
            "tensor_parallel": self.tensor_parallel, "data_parallel": self.data_parallel,
            "gpu_placement": self.gpu_placement,
            "feasible": self.feasible, "reason": self.reason or "",
        }
        if self.feasible and self.steps:
            stats = self.latency_stats_ms()
            row.update({
                "latency_mean_ms": stats["mean"], "latency_p50_ms": stats["p50"],
                "latency_p99_ms": stats["p99"], "tokens_per_s": self.tokens_per_s,
                "decode_s": self.decode_s, "ttft_s": self.ttft_s,
                "final_topk_ratio": self.steps[-1].topk_ratio,
                "mean_topk_ratio": float(np.mean([s.topk_ratio for s in self.steps])),
                "final_gpu_tokens": self.steps[-1].gpu_tokens,
                "accuracy_mass_kept": self.accuracy_mass_kept,
                "accuracy_rel_error": self.accuracy_rel_error,
                "selection": self.selection,
            })
            shares = self.binding_shares()
            row["binding"] = self.binding
            row["binding_share"] = shares.get(self.binding, float("nan"))
            row["scheduler_decisions"] = ", ".join(f"{k} x{v}" for k, v in
                                                   sorted(self.decisions.items()))
            row["scheduler_last_reason"] = self.last_reason
            row.update({f"{k}_ms": v for k, v in self.breakdown_ms().items()})
            row.update({f"util_{k}": v for k, v in self.utilisation.items()})
            row.update(self.energy_row())
        if self.prefill_chunk_tokens is not None:
            row["prefill_chunk_tokens"] = self.prefill_chunk_tokens
            row["prefill_chunk_auto"] = self.prefill_chunk_auto
            if self.feasible and self.steps:
                row["request_s"] = self.request_s
        row["capex_usd"] = self.capex_usd
        row.update({f"mem_{k}_gb": v / 1e9 for k, v in self.footprint_bytes.items()})
        return row

    def steps_table(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.steps]

    # ------------------------------------------------------------------ pandas views
    # pandas is imported on demand: the simulator itself never needs it.
    def to_frame(self):
        """One-row ``pandas.DataFrame`` of ``to_row()``: concatenate several to compare them."""
        import pandas as pd

        return pd.DataFrame([self.to_row()])

    def table(self):
        """``to_row()`` as a metric-per-row ``pandas.DataFrame`` (column ``value``)."""
        import pandas as pd

        row = self.to_row()
        return pd.DataFrame({"value": list(row.values())}, index=pd.Index(list(row), name="metric"))

    def steps_frame(self):
        """One row per decode step (``StepTiming`` fields); ``simulated`` marks sampled steps."""
        import pandas as pd

        return pd.DataFrame(self.steps_table(), columns=list(StepTiming.__dataclass_fields__))

    def _repr_html_(self) -> str:  # notebooks show the metrics, not hundreds of steps
        import pandas as pd

        with pd.option_context("display.max_rows", None):  # every metric, none elided
            return self.table()._repr_html_()
