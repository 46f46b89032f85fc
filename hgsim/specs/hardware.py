"""Hardware profile specification: GPUs, CPU sockets, memory tiers and the links between them.

A profile is a small graph. Nodes are GPUs, sockets and memory tiers; edges are links (PCIe
per direction, UPI between sockets, CXL between a socket and an expander). The simulator
turns it into contended resources; ``hw_backend.calibrate`` writes one from measurements.
Units are fixed by name suffix: ``_gb`` = 1e9 bytes, ``_gbps`` = 1e9 bytes/s, ``_ns``, ``_us``;
energy and cost fields say theirs in full (``_w``, ``_pj_per_bit``, ``_usd``, ``_usd_per_gb``).
Energy and cost fields are optional in the schema (a profile written by ``hgsim calibrate`` has
none) but every shipped profile sets all of them; see ``hgsim/energy.py`` and ``hgsim/cost.py``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from hgsim.errors import UserError
from hgsim.specs.base import SpecModel

Dtype = Literal["fp32", "tf32", "fp16", "bf16", "fp8", "int8"]
TierKind = Literal["hbm", "ddr", "cxl"]
LinkKind = Literal["pcie", "upi", "cxl", "nvlink"]

Positive = Field(gt=0)
Fraction = Field(gt=0, le=1)
# An energy or cost figure: absent (None: the result's energy/cost columns are NaN) or > 0.
Optional = Field(default=None, gt=0)


#: dtype -> the figures that give its rate when the GPU has none of its own
_STAND_INS = {"fp16": ("bf16",), "bf16": ("fp16",), "fp8": ("fp16", "bf16"),
              "int8": ("fp16", "bf16")}


class GpuSpec(SpecModel):
    model: str
    hbm_capacity_gb: float = Positive
    hbm_bandwidth_gbps: float = Positive
    peak_tflops: dict[Dtype, float]
    kernel_launch_overhead_us: float = Field(ge=0)
    compute_efficiency: float = Fraction  # achieved / peak FLOP/s on large GEMMs
    memory_efficiency: float = Fraction  # achieved / peak HBM bandwidth on streaming kernels
    attention_efficiency: float = Fraction  # achieved / peak HBM bandwidth in decode attention
    copy_engines: int = Field(default=2, ge=1)
    # Bytes one copy engine keeps in flight when it reads host memory (outstanding PCIe read
    # requests x their size). By Little's law a DMA read runs at most this / route latency,
    # which binds only when host memory is far (CXL, a remote socket, a long route).
    dma_inflight_bytes: float = Positive
    # CUDA launch costs as ``hgsim calibrate`` measures them (None: not measured). The simulator
    # charges ``kernel_launch_overhead_us`` per simulated kernel; these tell apart one eager
    # launch, one CUDA graph replay, and the device's gap between kernels inside a graph, for
    # a model of hw_backend's graph path (one replay per executor op).
    single_launch_overhead_us: float | None = Field(default=None, ge=0)
    graph_launch_overhead_us: float | None = Field(default=None, ge=0)
    graph_kernel_gap_us: float | None = Field(default=None, ge=0)
    socket: str  # the socket whose root complex the GPU hangs off
    link: str  # the PCIe link to that socket
    # The PCIe switch the GPU sits behind (a name in the profile's ``pcie_switches``; None:
    # its link runs to the root complex alone). GPUs behind one switch share its uplink.
    pcie_switch: str | None = None
    # Energy (hgsim/energy.py): idle power all the time, plus energy per FLOP and per bit of
    # device-memory traffic, the average capped at the board's power limit.
    idle_power_w: float | None = Optional
    tdp_w: float | None = Optional
    energy_pj_per_flop: float | None = Optional
    hbm_energy_pj_per_bit: float | None = Optional
    price_usd: float | None = Optional  # capital cost of one card (hgsim/cost.py)
    source: str | None = None

    @model_validator(mode="after")
    def _power_limits(self) -> GpuSpec:
        if self.idle_power_w is not None and self.tdp_w is not None and self.idle_power_w >= self.tdp_w:
            raise ValueError(f"idle_power_w ({self.idle_power_w:g}) must be below tdp_w ({self.tdp_w:g})")
        return self

    @model_validator(mode="after")
    def _peaks_positive(self) -> GpuSpec:
        for dtype, value in self.peak_tflops.items():
            if value <= 0:
                raise ValueError(f"peak_tflops.{dtype} must be > 0, got {value}")
        if "fp16" not in self.peak_tflops and "bf16" not in self.peak_tflops:
            raise ValueError("peak_tflops needs fp16 or bf16")
        return self

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype``. bf16 and fp16 stand in for each other, and a narrower
        type without its own figure (fp8 on an A100) runs at the 16-bit rate, as weights
        dequantised to 16 bits before the matmul do. Nothing stands in for fp32: a 16-bit
        tensor-core rate is 8-16x the fp32 one (A100: 312 against 19.5 TFLOP/s)."""
        table = self.peak_tflops
        for key in (dtype, *_STAND_INS.get(dtype, ())):
            if key in table:
                return table[key] * 1e12
        raise UserError(f"the GPU has no {dtype} figure, which {dtype} weights need (known: "
                        f"{', '.join(table)}; no other type's rate stands in for {dtype})",
                        field="peak_tflops")


class CpuSocketSpec(SpecModel):
    model: str
    cores: int = Field(gt=0)
    frequency_ghz: float = Positive
    simd: Literal["scalar", "avx2", "avx512", "amx", "neon", "sve"]
    attention_gflops_per_core: float = Positive  # sustained q.k FMA rate of the attention kernel
    # The kernel's rate with KV of another element type, as a factor of the rate above (which
    # holds for the type it was measured with, factor 1). Half-width KV halves the bytes per
    # FLOP and adds a widening convert per element, so the rate moves with the type: the C
    # kernel read bf16 KV at 1.7x the FLOP rate of fp32 on one Zen 4 core. A type not listed
    # keeps factor 1. ``HardwareProfile.for_kv_dtype`` applies it.
    attention_rate_by_kv_dtype: dict[Literal["fp32", "fp16", "bf16", "fp8"], float] = Field(
        default_factory=dict)
    # Memory-level parallelism: bytes one core keeps in flight. A core's rate from a tier is
    # at most this / the route's (loaded) latency (Little's law). Sequential streams (a K scan)
    # get the hardware prefetchers' depth; random row gathers only the L1 miss buffers.
    stream_inflight_bytes: float = Positive
    gather_inflight_bytes: float = Positive
    # By row size (bytes): how many times more a core keeps in flight gathering rows of that
    # size than one-line rows (the prefetchers fetch ahead within a row of several lines). A
    # row takes the gain of the largest listed size not above it (the smallest listed when all
    # are above); none listed: 1.
    gather_row_gain: dict[int, float] = Field(default_factory=dict)
    cache_line_bytes: int = Field(default=64, gt=0)  # a gathered row costs the lines it touches
    # Core time that a byte count misses: a bounded top-k heap costs per insertion (added to
    # the scan, as calibrated), a gathered row costs address and copy work per row (overlaps
    # its memory time: a cap, not an addition).
    topk_ns_per_insert: float = Field(default=0.0, ge=0)
    gather_ns_per_row: float = Field(default=0.0, ge=0)
    # Fixed cost of one host kernel call beyond bytes / rate (argument handling from cold
    # caches, thread fork and join, scratch buffers): what a one-block call takes.
    op_overhead_us: float = Field(default=0.0, ge=0)
    # Energy (hgsim/energy.py): the package's idle power, plus this per core for every second
    # a core is held by simulated work; and the capital cost of the processor (hgsim/cost.py).
    idle_power_w: float | None = Optional
    active_core_power_w: float | None = Optional
    price_usd: float | None = Optional
    source: str | None = None

    @field_validator("attention_rate_by_kv_dtype")
    @classmethod
    def _rate_factors(cls, factors: dict[str, float]) -> dict[str, float]:
        for dtype, factor in factors.items():
            if not factor > 0:
                raise ValueError(f"{dtype}: the factor must be > 0, got {factor}")
        return factors

    @field_validator("gather_row_gain")
    @classmethod
    def _gains(cls, gains: dict[int, float]) -> dict[int, float]:
        for row, gain in gains.items():
            if row <= 0 or not gain > 0:
                raise ValueError(f"row sizes and gains must be > 0, got {row}: {gain}")
        return dict(sorted(gains.items()))

    def gather_inflight(self, row_bytes: float) -> float:
        """Bytes one core keeps in flight gathering rows of ``row_bytes`` (see
        ``gather_row_gain``): the demand misses' figure, times the row's gain when a row
        spans several lines."""
        gains = self.gather_row_gain
        if not gains or row_bytes <= self.cache_line_bytes:
            return self.gather_inflight_bytes
        sizes = [r for r in gains if r > self.cache_line_bytes] or list(gains)
        below = [r for r in sizes if r <= row_bytes]
        return self.gather_inflight_bytes * gains[max(below) if below else min(sizes)]

    @model_validator(mode="before")
    @classmethod
    def _renamed_fields(cls, data):
        if isinstance(data, dict) and "core_bandwidth_gbps" in data:
            raise ValueError(
                "core_bandwidth_gbps was replaced by stream_inflight_bytes (bytes one core keeps "
                "in flight; = single-core stream GB/s x local latency ns, e.g. 15 GB/s x 110 ns "
                "= 1650) and gather_inflight_bytes (L1 miss buffers x 64 B)"
            )
        return data


class MemoryTierSpec(SpecModel):
    kind: TierKind
    capacity_gb: float = Positive
    read_bandwidth_gbps: float = Positive
    write_bandwidth_gbps: float = Positive
    latency_ns: float = Positive  # idle load-to-use latency from its own socket
    # Queueing delay added at 50% utilisation of the read bandwidth; the delay at utilisation
    # u is this x u / (1 - u) (M/M/1 shape), so a saturated tier is slower for every reader.
    queue_delay_at_half_load_ns: float = Field(ge=0)
    socket: str  # the socket it hangs off (for CXL: through ``link``)
    link: str | None = None  # CXL link between socket and expander
    # Energy (hgsim/energy.py): background power (refresh, standby; a CXL expander's
    # controller) per GB installed, plus energy per bit read and written at the device; and
    # the capital cost per GB installed (hgsim/cost.py).
    background_power_w_per_gb: float | None = Optional
    read_energy_pj_per_bit: float | None = Optional
    write_energy_pj_per_bit: float | None = Optional
    price_usd_per_gb: float | None = Optional
    source: str | None = None


class LinkSpec(SpecModel):
    """An edge of the profile's graph. ``nvlink`` joins two GPUs and carries only the
    collectives of tensor parallelism (``hgsim.tensor_parallel``: its bandwidth and latency are
    a ring step's); an NVSwitch fabric is one such link per GPU pair, each at a GPU's own
    NVLink bandwidth (a ring uses one peer per direction, so the pairs never contend)."""

    kind: LinkKind
    endpoints: tuple[str, str]
    bandwidth_gbps: float = Positive  # per direction, achievable (not signalling rate)
    latency_ns: float = Field(ge=0)
    energy_pj_per_bit: float | None = Optional  # PHY + controller, per bit crossing it (hgsim/energy.py)
    source: str | None = None


class PcieSwitchSpec(SpecModel):
    """A PCIe switch between GPUs and their socket's root complex: every GPU behind it reaches
    the host through its one uplink, so GPUs copying at once share the uplink's bandwidth (a
    GPU's own link is then its port on the switch), and each copy crosses the switch."""

    socket: str  # the socket whose root complex the uplink runs to
    uplink_bandwidth_gbps: float = Positive  # per direction, achievable
    latency_ns: float = Field(ge=0)  # one traversal of the switch, added to a GPU link's
    source: str | None = None


class CostSpec(SpecModel):
    """What the machine costs beyond its components (hgsim/cost.py): the server it sits in,
    how long it is paid off over, and what its electricity costs at the wall."""

    server_base_usd: float = Positive  # chassis, board, power supplies, NIC, boot drive
    amortisation_years: float = Positive
    electricity_usd_per_kwh: float = Positive
    pue: float = Field(default=1.0, ge=1)  # facility power / IT power (cooling, distribution)
    source: str | None = None


class HardwareProfile(SpecModel):
    name: str
    description: str = ""
    gpus: dict[str, GpuSpec]
    sockets: dict[str, CpuSocketSpec]
    tiers: dict[str, MemoryTierSpec]
    links: dict[str, LinkSpec]
    pcie_switches: dict[str, PcieSwitchSpec] = Field(default_factory=dict)
    cost: CostSpec | None = None

    @field_validator("name")
    @classmethod
    def _named(cls, name: str) -> str:
        if not name.strip():  # every result row, report and table names the machine by it
            raise ValueError("the profile needs a name")
        return name

    @model_validator(mode="after")
    def _check_references(self) -> HardwareProfile:
        if not self.gpus:
            raise ValueError("gpus: at least one GPU is required")
        if not self.sockets:
            raise ValueError("sockets: at least one CPU socket is required")
        if not self.tiers:  # the host's DRAM: where the KV cache spills and PCIe copies stage
            raise ValueError("tiers: at least one host memory tier (the host's DRAM) is required")
        nodes = set(self.gpus) | set(self.sockets) | set(self.tiers)
        overlap = (set(self.gpus) & set(self.sockets)) | (set(self.tiers) & (set(self.gpus) | set(self.sockets)))
        if overlap:
            raise ValueError(f"names must be unique across gpus, sockets and tiers: {sorted(overlap)}")
        for name, link in self.links.items():
            for end in link.endpoints:
                if end not in nodes:
                    raise _ref_error(f"links.{name}.endpoints", end, "node", nodes)
        for name, gpu in self.gpus.items():
            if gpu.socket not in self.sockets:
                raise _ref_error(f"gpus.{name}.socket", gpu.socket, "socket", self.sockets)
            link = self.links.get(gpu.link)
            if link is None:
                raise _ref_error(f"gpus.{name}.link", gpu.link, "link", self.links)
            if link.kind != "pcie" or set(link.endpoints) != {name, gpu.socket}:
                raise ValueError(
                    f"gpus.{name}.link: '{gpu.link}' must be a pcie link between {gpu.socket} and {name}"
                )
            if gpu.pcie_switch is not None:
                switch = self.pcie_switches.get(gpu.pcie_switch)
                if switch is None:
                    raise _ref_error(f"gpus.{name}.pcie_switch", gpu.pcie_switch, "PCIe switch",
                                     self.pcie_switches)
                if switch.socket != gpu.socket:
                    raise ValueError(f"gpus.{name}.pcie_switch: '{gpu.pcie_switch}' runs to "
                                     f"{switch.socket}, the GPU hangs off {gpu.socket}")
        for name, switch in self.pcie_switches.items():
            if switch.socket not in self.sockets:
                raise _ref_error(f"pcie_switches.{name}.socket", switch.socket, "socket",
                                 self.sockets)
        for name, tier in self.tiers.items():
            if tier.socket not in self.sockets:
                raise _ref_error(f"tiers.{name}.socket", tier.socket, "socket", self.sockets)
            if tier.kind == "hbm":
                raise ValueError(f"tiers.{name}.kind: HBM is described by the GPU (hbm_capacity_gb)")
            if tier.kind == "cxl":
                if tier.link is None:
                    raise ValueError(f"tiers.{name}.link: a cxl tier needs the cxl link it sits behind")
                link = self.links.get(tier.link)
                if link is None:
                    raise _ref_error(f"tiers.{name}.link", tier.link, "link", self.links)
                if link.kind != "cxl" or set(link.endpoints) != {name, tier.socket}:
                    raise ValueError(
                        f"tiers.{name}.link: '{tier.link}' must be a cxl link between {tier.socket} and {name}"
                    )
            elif tier.link is not None:
                raise ValueError(f"tiers.{name}.link: only cxl tiers sit behind a link")
        for name, link in self.links.items():
            if link.kind == "upi" and not set(link.endpoints) <= set(self.sockets):
                raise ValueError(f"links.{name}.endpoints: upi links connect two sockets")
            if link.kind == "nvlink" and (not set(link.endpoints) <= set(self.gpus)
                                          or link.endpoints[0] == link.endpoints[1]):
                raise ValueError(f"links.{name}.endpoints: nvlink links connect two GPUs")
        return self

    # Convenience views used by the simulator and policies ------------------------------
    @property
    def primary_gpu(self) -> str:
        return next(iter(self.gpus))

    def tiers_of_kind(self, kind: str) -> list[str]:
        return [name for name, tier in self.tiers.items() if tier.kind == kind]

    def host_capacity_bytes(self) -> float:
        return sum(t.capacity_gb for t in self.tiers.values()) * 1e9

    def for_kv_dtype(self, kv_dtype: str) -> HardwareProfile:
        """The profile as it runs KV of ``kv_dtype``: each socket's attention rate times its
        factor for that type (``attention_rate_by_kv_dtype``), the factors then dropped, so a
        second call changes nothing. Unchanged (the same object) where no socket lists one."""
        if not any(s.attention_rate_by_kv_dtype for s in self.sockets.values()):
            return self
        sockets = {
            name: sock.model_copy(update={
                "attention_gflops_per_core": sock.attention_gflops_per_core
                * sock.attention_rate_by_kv_dtype.get(kv_dtype, 1.0),
                "attention_rate_by_kv_dtype": {}})
            for name, sock in self.sockets.items()}
        return self.model_copy(update={"sockets": sockets})


def _ref_error(field: str, value: str, what: str, known) -> ValueError:
    return ValueError(f"{field}: unknown {what} '{value}' (known: {', '.join(sorted(known)) or 'none'})")
