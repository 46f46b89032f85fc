"""Discrete-event machine model: shared-bandwidth flows, compute engines, recording, traces.

``Machine`` builds the resources of a ``HardwareProfile``; policies drive it from simpy
processes (``machine.copy``, ``machine.gpu_kernel``, ``machine.cpu_attention`` or the raw
``network.transfer`` / ``stream.launch``) and read the ``Recorder`` or write a trace.
"""

from hgsim.sim.compute import (
    ComputeStream,
    CpuCorePool,
    CpuTask,
    Kernel,
    cpu_compute_time_s,
    cpu_stream_rate_Bps,
    kernel_time_s,
    transfer_time_s,
)
from hgsim.sim.flows import BYTES_PER_S, FLOPS_PER_S, Channel, Flow, FlowNetwork
from hgsim.sim.machine import Machine, Route
from hgsim.sim.recorder import Activity, Recorder, ResourceSummary
from hgsim.sim.trace import chrome_trace, write_chrome_trace

__all__ = [
    "BYTES_PER_S",
    "FLOPS_PER_S",
    "Activity",
    "Channel",
    "ComputeStream",
    "CpuCorePool",
    "CpuTask",
    "Flow",
    "FlowNetwork",
    "Kernel",
    "Machine",
    "Recorder",
    "ResourceSummary",
    "Route",
    "chrome_trace",
    "cpu_compute_time_s",
    "cpu_stream_rate_Bps",
    "kernel_time_s",
    "transfer_time_s",
    "write_chrome_trace",
]
