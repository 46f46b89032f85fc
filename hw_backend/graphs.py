"""Captured CUDA graphs by key, replayed on the device queue; eager calls where there is no CUDA.

Launching a dozen small torch ops from Python costs the device tens of microseconds of idle
per op (the lent H200 queued 0.7-3.2 ms of device time per layer for microseconds of kernels);
a graph replay launches them all for about the cost of one. ``GraphCache.run(key, fn)``
captures ``fn`` the first time a key is seen and replays it after; the key must name
everything the graph bakes in: the program, the layer, the shape bucket and the addresses of
the buffers it reads and writes (``buffer_key``), so that a reallocated buffer gets a new graph
instead of a stale one.

How a capture is made, and why:

* ``fn`` runs twice eagerly first, on the capture stream, which lazily creates what cannot be
  created during capture (cuBLAS handles and workspaces are per stream);
* every program writes its results into buffers allocated outside the graph, so running it
  again (warm-up, replay) is harmless and nothing the caller keeps lives in the graph's pool;
* all graphs share one memory pool and one capture stream; they replay one after another on
  the compute queue, so their temporaries never overlap in time;
* capture is ``thread_local``: the host worker thread keeps fetching queries on its own
  stream meanwhile, which the default (global) mode would reject.

Without CUDA (the stand-in, tests) ``run`` calls ``fn`` directly: the same programs over the
same static buffers, so everything but the capture itself is exercised on a CPU. A capture that
fails on a GPU (a program doing something capture forbids) is reported once as a warning and
that program runs eagerly from then on (``GraphStats.failures``), so a run still finishes and
says which programs were not graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

WARMUP_RUNS = 2


def buffer_key(*tensors: torch.Tensor | None) -> tuple[int, ...]:
    """The addresses a graph bakes in (0 for an absent buffer)."""
    return tuple(0 if t is None else t.data_ptr() for t in tensors)


@dataclass
class GraphStats:
    """Counts of the cache's work. ``keys`` counts distinct programs seen, i.e. the graphs a
    CUDA run captures (also counted eagerly, so CPU tests see how many a GPU would capture)."""

    keys: int = 0
    captures: int = 0
    replays: int = 0
    eager_runs: int = 0
    capture_s: float = 0.0
    per_label: dict[str, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # label -> first capture error


class GraphCache:
    """Graphs by key; ``capture`` False runs every program eagerly (see the module doc)."""

    def __init__(self, *, capture: bool, device: torch.device | None = None) -> None:
        self.capture = capture and torch.cuda.is_available()
        self.stats = GraphStats()
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph | None] = {}
        if self.capture:
            self._stream = torch.cuda.Stream(device)
            self._pool = torch.cuda.graph_pool_handle()

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: Hashable, fn: Callable[[], object], label: str = "") -> None:
        """Replay the graph of ``key`` on the current stream, capturing ``fn`` first if new."""
        if key not in self._graphs:
            self._graphs[key] = self._capture_or_none(fn, label) if self.capture else None
            self.stats.keys += 1
            self.stats.per_label[label] = self.stats.per_label.get(label, 0) + 1
        graph = self._graphs[key]
        if graph is None:
            fn()
            self.stats.eager_runs += 1
            return
        graph.replay()
        self.stats.replays += 1

    def wrap_programs(self, wrap: Callable[[Hashable, str, Callable[[], object]],
                                           Callable[[], object]]) -> None:
        """From now on run every program ``fn`` of ``run(key, fn, label)`` as
        ``wrap(key, label, fn)``: how the stand-in's checks (kernel counts, capture audit) see
        each program without the graph side knowing."""
        run = self.run

        def wrapped(key: Hashable, fn: Callable[[], object], label: str = "") -> None:
            run(key, wrap(key, label, fn), label)

        self.run = wrapped  # type: ignore[method-assign]

    def _capture_or_none(self, fn: Callable[[], object], label: str):
        try:
            return self._capture(fn)
        except RuntimeError as exc:
            if label not in self.stats.failures:
                import warnings

                warnings.warn(f"CUDA graph capture of '{label}' failed, running it eagerly: "
                              f"{exc}", RuntimeWarning, stacklevel=3)
                self.stats.failures[label] = str(exc)
            torch.cuda.synchronize()
            return None

    def graph(self, key: Hashable, fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
        """The captured graph of ``key`` (captured now if new; CUDA only), to replay directly
        (calibration times replays back to back)."""
        if not self.capture:
            raise RuntimeError("graphs are captured only on CUDA")
        if key not in self._graphs:
            self._graphs[key] = self._capture(fn)
            self.stats.keys += 1
        return self._graphs[key]

    def _capture(self, fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
        import time

        t0 = time.perf_counter()
        current = torch.cuda.current_stream()
        stream = self._stream
        stream.wait_stream(current)  # the inputs the caller's queue produced
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                fn()
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                fn()
            finally:
                graph.capture_end()
        current.wait_stream(stream)  # the warm-up's writes, before the replay reads them
        self.stats.captures += 1
        self.stats.capture_s += time.perf_counter() - t0
        return graph

    def clear(self) -> None:
        self._graphs.clear()


__all__ = ["GraphCache", "GraphStats", "buffer_key"]
