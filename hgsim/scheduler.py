"""HybridGen's feedback-driven scheduler, shared by the simulator and the real backend.

Every ``interval`` decode steps it compares how long the host path took (CPU logits, top-k,
gather, PCIe) with how long the device had other work to hide it behind. While the host hides
behind the device it grows the top-k ratio (more host tokens contribute, better fidelity, free
latency); when the host is the bottleneck it shrinks the ratio, and once the ratio is at its
floor it moves tokens to the GPU (raises the GPU share, bounded by HBM capacity). The simulator
feeds it simulated times and ``hw_backend`` measured times: one implementation for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SchedulerConfig:
    initial_ratio: float = 0.05  # HybridGen's starting top-k ratio r
    interval: int = 4  # decode steps between decisions
    grow: float = 1.2
    shrink: float = 0.8
    min_ratio: float = 0.01
    max_ratio: float = 0.5
    share_step: float = 0.05  # GPU share added per decision when the host is the bottleneck
    adaptive: bool = True  # False: static ratio and share (ablation)
    # When the executor reports the host path's transfer time separately, a host that is slow
    # because of its *scan* (independent of the ratio) keeps its ratio: shrinking it would cost
    # accuracy and buy nothing; tokens move to the GPU instead.
    scan_aware: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.min_ratio <= self.initial_ratio <= self.max_ratio <= 1:
            raise ValueError("need 0 < min_ratio <= initial_ratio <= max_ratio <= 1")
        if self.interval < 1:
            raise ValueError("interval must be >= 1")
        if not (self.grow > 1 and 0 < self.shrink < 1):
            raise ValueError("need grow > 1 and 0 < shrink < 1")


@dataclass(frozen=True, slots=True)
class SchedulerRecord:
    step: int
    ratio: float
    gpu_share: float
    host_s: float
    device_s: float


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
    _transfer_sum: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.ratio = self.config.initial_ratio
        self.gpu_share = min(self.gpu_share, self.max_gpu_share)

    def observe(self, host_s: float, device_s: float, transfer_s: float | None = None) -> bool:
        """Record one step's host and device latency (and, if known, the part of the host time
        spent moving selected data over PCIe); returns True when a decision was made."""
        self._step += 1
        self._host_sum += host_s
        self._device_sum += device_s
        if transfer_s is not None:
            self._transfer_sum = (self._transfer_sum or 0.0) + transfer_s
        decided = False
        if self.config.adaptive and self._step % self.config.interval == 0:
            self._decide(self._host_sum, self._device_sum, self._transfer_sum)
            self._host_sum = self._device_sum = 0.0
            self._transfer_sum = None
            decided = True
        self.history.append(
            SchedulerRecord(self._step, self.ratio, self.gpu_share, host_s, device_s)
        )
        return decided

    def _decide(self, host_s: float, device_s: float, transfer_s: float | None) -> None:
        cfg = self.config
        scan_bound = cfg.scan_aware and transfer_s is not None and host_s - transfer_s > device_s
        if host_s <= device_s:
            self.ratio = min(self.ratio * cfg.grow, cfg.max_ratio)
        elif scan_bound:
            self.gpu_share = min(self.gpu_share + cfg.share_step, self.max_gpu_share)
        elif self.ratio > cfg.min_ratio:
            self.ratio = max(self.ratio * cfg.shrink, cfg.min_ratio)
        else:
            self.gpu_share = min(self.gpu_share + cfg.share_step, self.max_gpu_share)

    @property
    def steps(self) -> int:
        return self._step


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
    """HybridGen's analytic host-side estimate for one layer (REFERENCE.md).

    T_host = B*(r*n_C*D*b + r*n_C*H*b)/BW_pcie + 2*B*D*n_C/P_cpu: selected V rows and logits
    over PCIe, plus the q.k scan over every host token on the CPU.
    """
    selected = ratio * host_tokens
    pcie_bytes = batch * (selected * hidden * kv_bytes + selected * heads * kv_bytes)
    return pcie_bytes / pcie_Bps + 2.0 * batch * hidden * host_tokens / cpu_flops
