"""Measured timing in the simulator's schema, so measured and simulated runs compare row by row.

Steps are ``hgsim.results.StepTiming`` (the simulator's own record) with the same meanings:

* ``host_s``: per layer, host contribution on the device (after the upload) minus the host
  path's trigger, summed over layers with host work; ``device_s``: per layer, device ready to
  merge (its attention over resident tokens done) minus the same trigger. These feed
  ``FeedbackScheduler.observe`` exactly as in the simulator, with ``variable_s``: the share
  of ``host_s`` spent on what grows with the top-k ratio (the row gather and the upload).
* ``stall_s``: the step's device idle time, ``latency - gpu_busy`` (as ``hgsim.simulate``).

``LayerTiming`` adds the per-layer view (cpu_s, gpu_s, transfer_s, stall_s, where the layer's
stall is the device waiting at the merge for the host). Every record names the device it was
measured on, so a stand-in run can never pass for a GPU measurement. ``StepTiming.simulated``
keeps its simulator meaning (True: this step was computed, not interpolated); the frames'
``source`` column says whether a row was measured (the device label) or simulated.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import pandas as pd

from hgsim.results import StepTiming


@dataclass(frozen=True, slots=True)
class LayerTiming:
    """One layer of one measured decode step."""

    step: int
    layer: int
    context: int
    cpu_s: float  # C kernel time of the host work
    gpu_s: float  # device compute queue busy for this layer (KV moves, attention, merge, ...)
    transfer_s: float  # device->host fetch of the query/indices + host->device upload
    stall_s: float  # device waiting at the merge for the host contribution
    host_s: float  # host contribution ready - host trigger (0 without host work)
    device_s: float  # device ready to merge - host trigger
    host_tokens: int
    host_selected: int
    gpu_tokens: int
    upload_bytes: int
    device: str
    variable_s: float = 0.0  # share of host_s that grows with r (gather + upload), as simulated
    cpu_wait_s: float = 0.0  # of cpu_s, the host thread waiting for a core (run queue)


def step_timing(
    *, step: int, context: int, latency_s: float, layers: Sequence[LayerTiming],
    topk_ratio: float, gpu_tokens: int,
) -> StepTiming:
    """Aggregate a step's layers the way the simulator aggregates its layers."""
    gpu_busy = sum(t.gpu_s for t in layers)
    return StepTiming(
        step=step,
        context=context,
        latency_s=latency_s,
        gpu_busy_s=gpu_busy,
        cpu_busy_s=sum(t.cpu_s for t in layers),
        pcie_busy_s=sum(t.transfer_s for t in layers),
        stall_s=max(latency_s - gpu_busy, 0.0),
        host_s=sum(t.host_s for t in layers),
        device_s=sum(t.device_s for t in layers),
        topk_ratio=topk_ratio,
        gpu_tokens=gpu_tokens,
        variable_s=sum(t.variable_s for t in layers),
        cpu_wait_s=sum(t.cpu_wait_s for t in layers),
    )


def steps_frame(steps: Iterable[StepTiming], *, source: str, **labels: object) -> pd.DataFrame:
    """Steps as a table; ``source`` says where they came from (simulator or a device label)."""
    frame = pd.DataFrame([asdict(s) for s in steps])
    frame.insert(0, "source", source)
    for column, value in labels.items():
        frame[column] = value
    return frame


def layers_frame(layers: Iterable[LayerTiming]) -> pd.DataFrame:
    return pd.DataFrame([asdict(t) for t in layers])


def compare_steps(
    measured: Sequence[StepTiming], simulated: Sequence[StepTiming], *, device: str
) -> pd.DataFrame:
    """Measured and simulated steps side by side, one row per (source, step), same columns.

    ``device`` labels the measured rows (e.g. ``cpu-standin (no CUDA)``); simulated rows are
    labelled ``simulated``. Pivot on ``step`` to read a measured step next to its simulation.
    """
    return pd.concat(
        [steps_frame(measured, source=device), steps_frame(simulated, source="simulated")],
        ignore_index=True,
    )


__all__ = ["LayerTiming", "compare_steps", "layers_frame", "step_timing", "steps_frame"]
