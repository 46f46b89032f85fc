"""Computing points: what runs in a pool process or on a Dask worker.

Functions here take resolved ``PointSpec`` objects (no file access, so a remote worker needs
only hgsim installed) and return plain-dict records. A point that raises is returned as an
error record instead of killing its whole chunk; errors are reported, never stored, so a
re-run tries them again.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Any

from hgsim import __version__

RECORD_VERSION = 1


def run_point(spec) -> dict[str, Any]:
    """The stored record of one point: its key, its metrics row and where/when it ran."""
    t0 = time.perf_counter()
    try:
        if spec.search is not None:
            from hgsim.study.capacity_search import search_point

            row = search_point(spec)
            events = 0
        elif getattr(spec, "serving", None) is not None:
            from hgsim.study.serving import serving_point

            row = serving_point(spec)
            events = 0
        elif getattr(spec, "equal_accuracy", None) is not None:
            from hgsim.study.equal_accuracy import equal_accuracy_point

            row, events = equal_accuracy_point(spec)
        else:
            result = simulate_spec(spec)
            row = result.to_row()
            events = int(result.events)
    except Exception as exc:  # noqa: BLE001 - reported per point, the study goes on
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return {"key": spec.key, "error": last, "traceback": traceback.format_exc()}
    wall = time.perf_counter() - t0
    row = {k: _plain(v) for k, v in row.items()}
    return {
        "key": spec.key, "format": RECORD_VERSION, "hgsim": __version__,
        "kind": ("search" if spec.search is not None else "serving"
                 if getattr(spec, "serving", None) is not None else "simulate"),
        "row": row, "wall_s": wall, "events": events,
        "host": socket.gethostname(), "pid": os.getpid(), "finished": time.time(),
    }


def simulate_spec(spec, workload=None):
    """The simulation of a point (at ``workload`` instead of its own, when given): a simulate
    point's result, and each probe of a capacity search with a latency SLO."""
    from hgsim.simulate import simulate

    return simulate(spec.profile, spec.model, spec.policy,
                    spec.workload if workload is None else workload,
                    policy_options=spec.policy_options, fidelity=spec.fidelity)


def run_chunk(specs: list, points_dir: str | None = None) -> list[dict[str, Any]]:
    """Compute a chunk of points in order; with ``points_dir`` store each as it finishes.

    Storing in the worker (local pool) means a kill loses at most the point in progress;
    remote workers return records and the client stores them.
    """
    store = None
    if points_dir is not None:
        from hgsim.study.store import PointStore

        store = PointStore(points_dir)
    out = []
    for spec in specs:
        record = run_point(spec)
        if store is not None and "error" not in record:
            store.write(record)
        out.append(record)
    return out


def _plain(value: Any) -> Any:
    """JSON-ready scalars (numpy floats/ints/bools become Python ones)."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
