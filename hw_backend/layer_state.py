"""What the executor knows about one layer of a step in flight, and which host path it takes.

Shared by the executor (``executor``), which schedules a layer's work on the queues, and the
two device sides that do the device half of that work (``device_side`` eagerly, ``graph_side``
as captured CUDA graphs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from hgsim.plan import CpuWork, LayerPlan, StepPlan, Transfer
from hw_backend.kv_store import LayerKv
from hw_backend.merge import Partial
from hw_backend.streams import HostMarker, Marker


class UnsupportedPlan(ValueError):
    """A plan this executor cannot run (e.g. H2O's heavy hitters, simulated only)."""


class HostPath(str, Enum):
    """What happens to a layer's host-resident tokens."""

    LOGITS = "logits"  # HybridGen: CPU logits (+ top-k) and V rows to the device
    PARTIAL = "partial"  # HGCA / CPU offload: CPU partial attention, output + LSE
    STREAM = "stream"  # FlexGen: host K/V streamed to the device
    SPECULATE = "speculate"  # InfiniGen: device-speculated rows gathered and copied


def host_path(lp: LayerPlan) -> HostPath | None:
    """The host path of a layer plan; None when no host token contributes."""
    if lp.host_tokens == 0:
        return None
    if lp.host_evicted:
        if lp.host_selected:
            raise UnsupportedPlan(
                "host-evicted plans with retained heavy hitters (H2O) are not executed; "
                "only their GPU-resident part would be"
            )
        return None
    if lp.transfer is Transfer.KV_ALL:
        return HostPath.STREAM
    if lp.host_selected == 0 and lp.cpu_work is not CpuWork.PARTIAL_ATTENTION:
        return None
    if lp.transfer is Transfer.KV_SELECTED:
        return HostPath.SPECULATE
    if lp.cpu_work is CpuWork.LOGITS_TOPK and lp.transfer is Transfer.LOGITS_AND_V:
        return HostPath.LOGITS
    if (lp.cpu_work in (CpuWork.PARTIAL_ATTENTION, CpuWork.SPARSE_PARTIAL)
            and lp.transfer is Transfer.PARTIAL_OUTPUT):
        return HostPath.PARTIAL
    raise UnsupportedPlan(f"no executor for cpu_work={lp.cpu_work.value}, "
                          f"transfer={lp.transfer.value}")


def check_host_socket(plan: StepPlan) -> None:
    """The executor runs the host work on the GPU's socket: a plan that moves it elsewhere
    (``StepPlan.host_socket``) is simulated only."""
    if plan.host_split is not None:
        sockets = ", ".join(socket for socket, _ in plan.host_split)
        raise UnsupportedPlan(f"host_socket=all (host work split over sockets {sockets}) is "
                              "simulated only; the executor runs it on the GPU's socket")
    if plan.host_socket is not None:
        raise UnsupportedPlan(f"host_socket={plan.host_socket} (host work on a socket other "
                              "than the GPU's) is simulated only; the executor runs it on the "
                              "GPU's socket")


@dataclass
class LayerState:
    """State of one layer while its step is in flight (kept until the step is synchronised,
    which also keeps every tensor a queue may still read alive)."""

    index: int
    lp: LayerPlan
    kv: LayerKv
    path: HostPath | None
    q: torch.Tensor | None = None
    speculative_q: torch.Tensor | None = None
    host_q: torch.Tensor | None = None  # the query the host uses, when not ``q`` (look-ahead)
    compute: list[Marker] = field(default_factory=list)
    q_ready: Marker | None = None
    trigger: Marker | None = None
    host_job: HostMarker | None = None
    upload: Marker | None = None
    attn: Marker | None = None
    merged: Marker | None = None
    device_part: Partial | None = None
    speculated: torch.Tensor | None = None  # InfiniGen's selected positions, device
    uploaded: dict[str, torch.Tensor] = field(default_factory=dict)  # what crossed, per name
    landing: dict[str, torch.Tensor] = field(default_factory=dict)  # graph path: padded buffers
    fetch_s: float = 0.0
    output: torch.Tensor | None = None



__all__ = ["HostPath", "LayerState", "UnsupportedPlan", "check_host_socket", "host_path"]
