"""HybridGen's feedback-driven scheduler, shared by the simulator and the real backend.

Every ``interval`` decode steps it compares how long the host path took (CPU scan, top-k,
gather, PCIe) with how long the device had other work to hide it behind, and decides from what
binds:

* the host hides behind the device: grow the top-k ratio r (more host tokens contribute,
  better fidelity, free latency);
* the part of the host path that grows with r (top-k inserts, the gather, the transfer of the
  selected rows) is what keeps it from hiding (without it the host would hide): shrink r;
* the part that does not (the scan of every host key, the calls' fixed costs) outlasts the
  device by itself: shrinking r cannot hide it, so move tokens to the GPU while HBM allows;
  once HBM is full, shrink r only if the r-dependent part is still a material share of the
  host path (``shrink_share``), else hold r (accuracy for nothing).

Each decision is recorded with its reason. The simulator feeds it simulated times and
``hw_backend`` measured times: one implementation for both. Without the r-dependent share
(``variable_s`` None) it falls back to HybridGen's published rule: shrink r while the host is
slower, then move tokens once r is at its floor.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum


class Decision(str, Enum):
    GROW = "grow"  # r up: the host hides behind the device
    SHRINK = "shrink"  # r down: the r-dependent part keeps the host from hiding
    MORE_GPU = "more-gpu"  # tokens to the GPU: the scan alone outlasts the device
    SHRINK_HBM_FULL = "shrink-hbm-full"  # r down: scan-bound, HBM full, r still costs much
    HOLD = "hold"  # nothing to gain (at a limit, or r costs too little to trade accuracy)


@dataclass(frozen=True)
class SchedulerConfig:
    initial_ratio: float = 0.05  # HybridGen's starting top-k ratio r
    interval: int = 4  # decode steps between decisions
    grow: float = 1.2
    shrink: float = 0.8
    min_ratio: float = 0.01
    max_ratio: float = 0.5
    share_step: float = 0.05  # GPU share added per decision when the scan binds
    adaptive: bool = True  # False: static ratio and share (ablation)
    # Decide from what binds (scan vs r-dependent part) when the executor reports the split;
    # False: HybridGen's published rule (shrink while the host is slower, then move tokens).
    scan_aware: bool = True
    # Scan-bound with HBM full: shrink r only if the r-dependent part is at least this share
    # of the host path (below it, the latency bought is not worth the accuracy).
    shrink_share: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.min_ratio <= self.initial_ratio <= self.max_ratio <= 1:
            raise ValueError("need 0 < min_ratio <= initial_ratio <= max_ratio <= 1")
        if self.interval < 1:
            raise ValueError("interval must be >= 1")
        if not (self.grow > 1 and 0 < self.shrink < 1):
            raise ValueError("need grow > 1 and 0 < shrink < 1")
        if not 0 <= self.shrink_share <= 1:
            raise ValueError("shrink_share must lie in [0, 1]")


@dataclass(frozen=True, slots=True)
class SchedulerRecord:
    step: int
    ratio: float
    gpu_share: float
    host_s: float
    device_s: float
    variable_s: float | None = None
    decision: Decision | None = None  # set on the steps where a decision was made
    reason: str = ""


@dataclass
class FeedbackScheduler:
    """Adapts the top-k ratio and the GPU share of tokens from host vs device latency."""

    config: SchedulerConfig = field(default_factory=SchedulerConfig)
    gpu_share: float = 0.0  # fraction of the context resident on the GPU
    max_gpu_share: float = 0.0  # what HBM capacity allows
    ratio: float = field(init=False)
    history: list[SchedulerRecord] = field(default_factory=list, init=False)
    _step: int = field(default=0, init=False)
    _host_sum: float = field(default=0.0, init=False)
    _device_sum: float = field(default=0.0, init=False)
    _variable_sum: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.ratio = self.config.initial_ratio
        self.gpu_share = min(self.gpu_share, self.max_gpu_share)

    def observe(self, host_s: float, device_s: float, variable_s: float | None = None) -> bool:
        """Record one step's host and device latency (and, if known, the part of the host time
        that grows with r: top-k inserts, gather, transfer); returns True when a decision was
        made."""
        self._step += 1
        self._host_sum += host_s
        self._device_sum += device_s
        if variable_s is not None:
            self._variable_sum = (self._variable_sum or 0.0) + variable_s
        decision, reason = None, ""
        if self.config.adaptive and self._step % self.config.interval == 0:
            decision, reason = self._decide(self._host_sum, self._device_sum, self._variable_sum)
            self._host_sum = self._device_sum = 0.0
            self._variable_sum = None
        self.history.append(SchedulerRecord(self._step, self.ratio, self.gpu_share, host_s,
                                            device_s, variable_s, decision, reason))
        return decision is not None

    def _decide(self, host_s: float, device_s: float,
                variable_s: float | None) -> tuple[Decision, str]:
        cfg = self.config
        per_step = 1e3 / cfg.interval  # the sums cover the interval; the reason reads per step
        times = (f"host {host_s * per_step:.3g} ms vs device {device_s * per_step:.3g} ms per "
                 "step, summed over layers, which overlap")
        if host_s <= device_s:
            if self.ratio < cfg.max_ratio:
                self.ratio = min(self.ratio * cfg.grow, cfg.max_ratio)
                return Decision.GROW, f"the host hides behind the device ({times})"
            return Decision.HOLD, f"the host hides, r at its maximum ({times})"
        if not cfg.scan_aware or variable_s is None:  # HybridGen's published rule
            if self.ratio > cfg.min_ratio:
                return self._shrink(Decision.SHRINK, f"the host is slower ({times})")
            return self._more_gpu(f"the host is slower with r at its floor ({times})")
        variable = min(max(variable_s, 0.0), host_s)
        fixed = host_s - variable
        split = (f"scan and fixed costs {fixed * per_step:.3g} ms + top-k/gather/transfer "
                 f"{variable * per_step:.3g} ms vs device {device_s * per_step:.3g} ms per step, "
                 "summed over layers, which overlap")
        if fixed <= device_s:  # the r-dependent part is what breaks the overlap
            if self.ratio > cfg.min_ratio:
                return self._shrink(Decision.SHRINK, f"top-k/gather/transfer bind: {split}")
            return self._more_gpu(f"r at its floor and the host still slower: {split}")
        if self.gpu_share < self.max_gpu_share:
            return self._more_gpu(f"the scan alone outlasts the device: {split}")
        share = variable / host_s
        if self.ratio <= cfg.min_ratio:
            return Decision.HOLD, f"scan-bound with HBM full and r at its floor: {split}"
        if share >= cfg.shrink_share:
            return self._shrink(Decision.SHRINK_HBM_FULL,
                                f"scan-bound with HBM full, r costs {share:.0%} of the host "
                                f"path: {split}")
        return Decision.HOLD, (f"scan-bound with HBM full, r costs only {share:.0%} of the host "
                               f"path (< {cfg.shrink_share:.0%}): {split}")

    def _shrink(self, decision: Decision, reason: str) -> tuple[Decision, str]:
        self.ratio = max(self.ratio * self.config.shrink, self.config.min_ratio)
        return decision, reason

    def _more_gpu(self, reason: str) -> tuple[Decision, str]:
        if self.gpu_share >= self.max_gpu_share:
            return Decision.HOLD, reason + "; HBM is full"
        self.gpu_share = min(self.gpu_share + self.config.share_step, self.max_gpu_share)
        return Decision.MORE_GPU, reason

    @property
    def steps(self) -> int:
        return self._step

    def decisions(self) -> Counter:
        """How many times each decision was taken."""
        return Counter(r.decision.value for r in self.history if r.decision is not None)


def estimate_host_time_s(
    *,
    batch: int,
    host_tokens: int,
    ratio: float,
    hidden: int,
    heads: int,
    kv_bytes: float,
    pcie_Bps: float,
    cpu_flops: float,
) -> float:
    """HybridGen's analytic host-side estimate for one layer (arXiv 2604.18529, feedback scheduler).

    T_host = B*(r*n_C*D*b + r*n_C*H*b)/BW_pcie + 2*B*D*n_C/P_cpu: selected V rows and logits
    over PCIe, plus the q.k scan over every host token on the CPU.
    """
    selected = ratio * host_tokens
    pcie_bytes = batch * (selected * hidden * kv_bytes + selected * heads * kv_bytes)
    return pcie_bytes / pcie_Bps + 2.0 * batch * hidden * host_tokens / cpu_flops
