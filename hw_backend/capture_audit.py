"""What a captured CUDA graph would bake in, recorded on the CPU stand-in.

A graph replays the kernels it recorded, with the shapes, scalar arguments and buffer addresses
of the capture; nothing the host decides later reaches it. So a program is safe to capture
under a key only if every run under that key issues the *same* operators with the same shapes
and the same non-tensor arguments, and reads its inputs from the same buffers; and if it never
makes the host wait (capture fails on ``.item()``, ``nonzero`` and friends). A Python integer
that changes from step to step (a token count, a position) would be replayed stale, silently:
the worst kind of GPU bug, and one that needs no GPU to find.

``audit_graph_programs(side)`` wraps a ``GraphDeviceSide``'s cache so that every program run
eagerly on the stand-in is traced under a dispatch mode; the returned ``CaptureAudit`` lists
every key whose runs differ and every operator that would synchronise, naming the program.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: Operators that read a device value back or size their output by the data: each makes the
#: host wait for the device, which stream capture forbids.
SYNCHRONISING = {
    "_local_scalar_dense": "reads a value back (.item(), int(), float())",
    "is_nonzero": "reads a value back (bool(tensor))",
    "equal": "reads a value back (torch.equal)",
    "nonzero": "sizes its output by the data (nonzero)",
    "masked_select": "sizes its output by the data (masked_select)",
    "_unique": "sizes its output by the data (unique)",
    "_unique2": "sizes its output by the data (unique)",
    "unique_dim": "sizes its output by the data (unique)",
    "unique_consecutive": "sizes its output by the data (unique_consecutive)",
    "bincount": "sizes its output by the data (bincount)",
    "lift_fresh": "creates a tensor from host data (torch.tensor) during capture",
    "lift_fresh_copy": "creates a tensor from host data (torch.tensor) during capture",
}


def _name(func) -> str:
    return func._schema.name.split("::")[-1]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class OpTrace(TorchDispatchMode):
    """The operators run inside it, each with what a graph would bake in: tensor arguments as
    (shape, dtype, storage offset, the buffer's address if it came from outside), other
    arguments as they are, and the output shapes. Also the synchronising operators."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []
        self.synchronising: list[str] = []
        self._inside: set[int] = set()  # storages allocated by the traced code itself
        self._outside: set[int] = set()  # storages it was given (views of them stay outside)

    def _argument(self, value):
        if isinstance(value, torch.Tensor):
            ptr = _storage(value)
            if ptr not in self._inside:
                self._outside.add(ptr)
            origin = "inside" if ptr in self._inside else ptr
            return ("tensor", tuple(value.shape), value.dtype, value.storage_offset(), origin)
        if isinstance(value, (list, tuple)):
            return tuple(self._argument(v) for v in value)
        return value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if name in SYNCHRONISING:
            self.synchronising.append(f"{name}: {SYNCHRONISING[name]}")
        elif name.startswith("index") and _boolean_index(args):
            self.synchronising.append(f"{name}: boolean-mask indexing (a hidden nonzero)")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None:
            self.synchronising.append(f"{name}: sizes its output by the data (repeat_interleave "
                                      "with tensor repeats and no output_size)")
        baked = (name, self._argument(list(args)),
                 tuple(sorted((k, self._argument(v)) for k, v in kwargs.items())))
        out = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self._inside.update(_storage(t) for t in outputs if _storage(t) not in self._outside)
        self.ops.append((*baked, tuple((tuple(t.shape), t.dtype) for t in outputs)))
        return out


def _boolean_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in indices)


@dataclass
class CaptureAudit:
    """Per graph key, the first run's trace; the keys whose later runs differed and the
    programs that synchronise (``problems``: one line each, empty when all is capturable)."""

    traces: dict[Hashable, list[tuple]] = field(default_factory=dict)
    runs: dict[Hashable, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def record(self, key: Hashable, label: str, trace: OpTrace) -> None:
        self.runs[key] = self.runs.get(key, 0) + 1
        for reason in dict.fromkeys(trace.synchronising):
            self._problem(f"{label}: {reason}")
        first = self.traces.setdefault(key, trace.ops)
        if first is not trace.ops and first != trace.ops:
            self._problem(f"{label} {_short(key)}: {_difference(first, trace.ops)}")

    @property
    def replayed_keys(self) -> int:
        """Keys run more than once: the programs whose replays the audit compared."""
        return sum(1 for n in self.runs.values() if n > 1)

    def _problem(self, line: str) -> None:
        if line not in self.problems:
            self.problems.append(line)


def _short(key: Hashable) -> str:
    """The key without its buffer addresses (the last element of every graph key)."""
    return repr(key[:-1] if isinstance(key, tuple) and len(key) > 1 else key)


def _difference(first: list[tuple], later: list[tuple]) -> str:
    if len(first) != len(later):
        return f"a replay would run {len(first)} operators where this run ran {len(later)}"
    for i, (a, b) in enumerate(zip(first, later, strict=True)):
        if a != b:
            return (f"operator {i} ({a[0]}) differs from the captured one: "
                    f"captured {a[1:]!r}, now {b[1:]!r}")
    return "traces differ"


def audit_graph_programs(side) -> CaptureAudit:
    """Trace every program a ``GraphDeviceSide`` runs (eagerly, on the stand-in) from now on;
    returns the live ``CaptureAudit``."""
    audit = CaptureAudit()

    def traced(key: Hashable, label: str, fn) -> Callable[[], None]:
        def program() -> None:
            with OpTrace() as trace:
                fn()
            audit.record(key, label, trace)

        return program

    side.graphs.wrap_programs(traced)
    return audit


__all__ = ["SYNCHRONISING", "CaptureAudit", "OpTrace", "audit_graph_programs"]
