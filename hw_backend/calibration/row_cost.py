"""Core work per gathered row, timed on rows that are already in the cache.

``gather_ns_per_row`` in a profile is what a gathered row costs the core besides waiting for
memory (index load, address arithmetic, the copy), which caps a gather's rate where the memory
would allow more (``hgsim.memory.gather_time_s``). Timed on cache-resident rows, so no memory
time is in it:

* ``gather_cached``: the C kernel's ``gather_rows`` (what the executor runs) over rows of the KV
  row size (head_dim x element size) from a V of ``_V_ROWS`` rows into an output that stays in
  L2, ``small`` and ``large`` rows per call; the slope between the two removes the call's own
  cost (argument parsing, the Python layer), which at a thousand rows is as large as the work.
  This is the profile's figure.
* ``gather_probe_cached``: the memory probe's row gather (``memprobe.gather``, one load per line)
  at every row size of the sweep from a 256 KiB buffer, which is what ``hgsim validate``'s gather
  micro-cases charge per row: the probe does less per row than a copy.
"""

from __future__ import annotations

import numpy as np

from hw_backend.calibration.pinned import run_on_cpus
from hw_backend.calibration.records import Measurement
from hw_backend.calibration.settings import HEAD_DIM, Job, Settings
from hw_backend.calibration.timing import representative, timed_round_robin
from hw_backend.calibration.topology import Machine

_V_ROWS = 256  # 128 KiB of fp32 rows: L2-resident, with the output, on any current core
_ROWS = (64, 1024)  # rows per call: small and large (512 KiB of fp32 output at the large one)
_STORAGE = {"fp32": (np.float32, "DT_FLOAT32"), "fp16": (np.float16, "DT_FLOAT16"),
            "bf16": (np.uint16, "DT_BFLOAT16")}


def _suite(socket: int, settings: Settings) -> list[Measurement]:
    import time

    from hw_backend import _cpu_attention as ext

    storage, code = _STORAGE[settings.kv_dtype]
    dtype_code = getattr(ext, code)
    V = np.ones((1, 1, _V_ROWS, HEAD_DIM), storage)
    rng = np.random.default_rng(0)
    calls = []
    for rows in _ROWS:
        idx = rng.integers(0, _V_ROWS, (1, 1, rows), dtype=np.int64)
        out = np.empty((1, 1, rows, HEAD_DIM), storage)
        calls.append(lambda i=idx, o=out: ext.gather_rows(V, dtype_code, i, 1, o))

    def cpu_seconds(fn) -> float:
        t0 = time.thread_time()
        fn()
        return time.thread_time() - t0

    repeats = max(10 * settings.repeats, 20)
    small, large = timed_round_robin(calls, repeats, warmup=3, run=cpu_seconds)
    row_bytes = HEAD_DIM * np.dtype(storage).itemsize
    per_row_s = (representative(large) - representative(small)) / (_ROWS[1] - _ROWS[0])
    return [Measurement("memory", "gather_cached", max(per_row_s, 0.0) * 1e9, "ns",
                        {"socket": socket, "node": socket, "remote": False, "threads": 1,
                         "row_bytes": row_bytes, "rows_small": _ROWS[0], "rows_large": _ROWS[1],
                         "v_bytes": int(V.nbytes), "small_s": list(small)}, large)]


_PROBE_BUFFER = 256 << 10  # L2-resident on any current core
_PROBE_ROWS = 200_000  # rows per call: a few ms, so the call's own cost is lost in it


def _probe_suite(socket: int, settings: Settings) -> list[Measurement]:
    from hw_backend import memprobe

    buf = memprobe.row_buffer(_PROBE_BUFFER, socket)
    rows = []
    for row_bytes in settings.gather_row_bytes:
        idx = memprobe.random_rows(buf.nbytes, row_bytes, _PROBE_ROWS, seed=row_bytes)
        seconds = timed_round_robin([lambda: None], settings.repeats,
                                    run=lambda _, i=idx, r=row_bytes: memprobe.gather(
                                        buf, i, r, 1).cpu_s)[0]
        rows.append(Measurement("memory", "gather_probe_cached",
                                representative(seconds) / len(idx) * 1e9, "ns",
                                {"socket": socket, "node": socket, "remote": False, "threads": 1,
                                 "row_bytes": row_bytes, "rows": len(idx),
                                 "bytes": int(buf.nbytes)}, seconds))
    return rows


def _both(socket: int, settings: Settings) -> list[Measurement]:
    return _suite(socket, settings) + _probe_suite(socket, settings)


def plan(machine: Machine, settings: Settings) -> list[Job]:
    """One job per socket, on one of its CPUs."""
    return [Job(f"row cost: gathers from cache-resident rows on socket {s.id}",
                lambda s=s: run_on_cpus(machine.cpus_of(s)[:1], _both, s.id, settings))
            for s in machine.cpu_nodes]
