"""Chrome Trace Event JSON export (opens in ui.perfetto.dev and chrome://tracing).

Layout: one *process* per device (each GPU, socket, memory tier and link), ordered GPUs,
sockets, tiers, links; one *thread* (track) per resource of that device. Activities are
complete ("X") events with bytes, FLOPs and the label in ``args``.

Flows that share a link overlap in time without nesting, which the trace format cannot draw
on one track (Perfetto would drop the misnested slices). Such activities spill onto extra
lanes of the same resource, named ``"<resource> [2]"``, ``[3]``...; a resource whose work never
overlaps keeps exactly one track. Times are rounded to whole nanoseconds *before* lanes are
assigned, so slices that touch in the simulation also touch, and never overlap, in the file.
Counter samples (active flows per channel, cores in use) become "C" events.

``simulate`` adds a first process, ``decode``, whose one track holds the prefill and each
*simulated* decode step as a span (args: step, context, latency, and ``stands_for_steps``:
with ``decode_samples`` the interpolated steps it stands for), so a sampled run's timeline
reads as what it is: only the simulated steps, back to back.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

from hgsim.outputs import finite_for_json, written_whole
from hgsim.sim.recorder import DEVICE_KINDS, Recorder


def _ns(t_s: float) -> int:
    return round(t_s * 1e9)


def chrome_trace(recorder: Recorder, *, metadata: dict[str, Any] | None = None,
                 markers: list[tuple[float, str, dict[str, Any]]] = (),
                 spans: list[tuple[float, float, str, dict[str, Any]]] = ()) -> dict[str, Any]:
    """The trace as a JSON-ready dict (see module docstring for the layout); ``markers``
    (time s, name, args) become global instant events, e.g. the scheduler's decisions;
    ``spans`` (start s, end s, name, args), e.g. the decode steps, one track of their own
    above the devices (they must not overlap)."""
    if not recorder.keep_activities:
        raise ValueError("the recorder kept no activities (record=False); nothing to trace")
    by_resource: dict[str, list] = defaultdict(list)
    for a in recorder.activities:
        by_resource[a.resource].append(a)
    names = list(dict.fromkeys([*recorder.resources, *by_resource]))
    names += [n for n, _, _ in recorder.counters if n not in recorder.resources]
    names = list(dict.fromkeys(names))

    # processes (devices) and their pids, GPUs first
    infos = {n: recorder.info(n) for n in names}
    devices = list(dict.fromkeys(infos[n].device for n in names))
    order = {kind: i for i, kind in enumerate(DEVICE_KINDS)}
    kind_of = {}
    for n in names:
        kind_of.setdefault(infos[n].device, infos[n].device_kind)
    devices.sort(key=lambda d: order.get(kind_of[d], len(order)))
    first = 2 if spans else 1  # the spans' process comes first
    pid_of = {d: i + first for i, d in enumerate(devices)}

    meta: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    next_tid = 1
    if spans:
        meta.append(_meta("process_name", 1, 0, {"name": "decode"}))
        meta.append(_meta("process_sort_index", 1, 0, {"sort_index": 1}))
        meta.append(_meta("thread_name", 1, next_tid, {"name": "steps"}))
        meta.append(_meta("thread_sort_index", 1, next_tid, {"sort_index": next_tid}))
        for start_s, end_s, name, args in spans:
            start_ns = _ns(start_s)
            events.append({"name": name, "cat": "step", "ph": "X", "ts": start_ns / 1000,
                           "dur": (_ns(end_s) - start_ns) / 1000, "pid": 1, "tid": next_tid,
                           "args": finite_for_json(args)})
        next_tid += 1
    for d in devices:
        pid = pid_of[d]
        meta.append(_meta("process_name", pid, 0, {"name": f"{d} ({kind_of[d]})"}))
        meta.append(_meta("process_sort_index", pid, 0, {"sort_index": pid}))

    for n in names:
        pid = pid_of[infos[n].device]
        lanes = _assign_lanes(by_resource.get(n, []))
        lane_tids = []
        for lane in range(max(1, len(lanes))):
            tid = next_tid
            next_tid += 1
            lane_tids.append(tid)
            thread = n if lane == 0 else f"{n} [{lane + 1}]"
            meta.append(_meta("thread_name", pid, tid, {"name": thread}))
            meta.append(_meta("thread_sort_index", pid, tid, {"sort_index": tid}))
        for lane, slices in enumerate(lanes):
            tid = lane_tids[lane]
            for start_ns, end_ns, a in slices:
                events.append({
                    "name": a.label or a.category or n,
                    "cat": a.category or "activity",
                    "ph": "X",
                    "ts": start_ns / 1000,
                    "dur": (end_ns - start_ns) / 1000,
                    "pid": pid,
                    "tid": tid,
                    "args": {"resource": n, "bytes": a.bytes_, "flops": a.flops, "label": a.label},
                })
    for name, t_s, value in recorder.counters:
        events.append({
            "name": f"{name} load",
            "ph": "C",
            "ts": _ns(t_s) / 1000,
            "pid": pid_of[infos[name].device],
            "tid": 0,
            "args": {"active": value},
        })
    for t_s, name, args in markers:
        events.append({"name": name, "ph": "i", "s": "g", "ts": _ns(t_s) / 1000, "pid": 0,
                       "tid": 0, "cat": "scheduler", "args": finite_for_json(args)})
    events.sort(key=lambda e: e["ts"])
    trace: dict[str, Any] = {"traceEvents": meta + events, "displayTimeUnit": "ns"}
    if metadata:
        trace["otherData"] = finite_for_json(metadata)  # a result row has NaN where not computed
    return trace


#: How a trace is written (compact, strict JSON); ``trace_bytes`` sizes it the same way.
_JSON_ARGS: dict[str, Any] = {"separators": (",", ":"), "default": str, "allow_nan": False}
#: Characters written at a time (the whole text is held once; its encoding, a slice at a time).
_WRITE_SLICE = 1 << 24


def trace_bytes(recorder: Recorder, *, markers: list[tuple[float, str, dict[str, Any]]] = (),
                spans: list[tuple[float, float, str, dict[str, Any]]] = ()) -> int:
    """The size the trace of what ``recorder`` holds so far would have as a file, in bytes
    (``simulate`` sizes its first simulated step with it to refuse an oversized trace)."""
    trace = chrome_trace(recorder, markers=markers, spans=spans)
    return len(json.dumps(trace, **_JSON_ARGS).encode("utf-8"))


def write_chrome_trace(
    recorder: Recorder, path: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None,
    markers: list[tuple[float, str, dict[str, Any]]] = (),
    spans: list[tuple[float, float, str, dict[str, Any]]] = (),
) -> str:
    """Write the recorder's activities as Chrome/Perfetto trace JSON; returns the path."""
    trace = chrome_trace(recorder, metadata=metadata, markers=markers, spans=spans)
    path = os.fspath(path)
    # json.dumps, not json.dump: dump streams through the pure-Python encoder, dumps takes the
    # C one, with the same bytes, several times faster on a large trace; the text is then
    # written in slices so that only one slice is encoded at a time.
    # Strict JSON: a NaN left in an activity would be a bug, not a value to write.
    text = json.dumps(trace, **_JSON_ARGS)
    del trace
    with written_whole(path, encoding="utf-8") as fh:  # Ctrl-C while writing: no torn JSON
        for start in range(0, len(text), _WRITE_SLICE):
            fh.write(text[start:start + _WRITE_SLICE])
    return path


def _meta(name: str, pid: int, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": args}


def _assign_lanes(activities: list) -> list[list[tuple[int, int, Any]]]:
    """Greedy interval partitioning: each slice goes to the first lane that is free at its
    start, so lane 0 holds everything when nothing overlaps."""
    spans = sorted(((_ns(a.start), _ns(a.end), a) for a in activities), key=lambda s: s[:2])
    lanes: list[list[tuple[int, int, Any]]] = []
    lane_end: list[int] = []
    for span in spans:
        start = span[0]
        for i, end in enumerate(lane_end):
            if end <= start:
                lanes[i].append(span)
                lane_end[i] = span[1]
                break
        else:
            lanes.append([span])
            lane_end.append(span[1])
    return lanes
