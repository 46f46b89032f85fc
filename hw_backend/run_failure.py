"""A run that raised, as one line for its row or case, with its traceback on stderr.

On a borrowed GPU one policy, plan kind or validation case running out of memory (or refusing a
capture) must not cost the ones after it, so the benchmarks and ``hgsim validate`` record it and
go on. Before going on the device is drained and torch's cache emptied, so that the next run
gets the memory back; a context broken for good makes that raise too, which is ignored here:
the next run will say so itself.
"""

from __future__ import annotations

import traceback


def failure_reason(exc: BaseException, cuda: bool) -> str:
    """``Type: first line of the message`` (at most 200 characters of it)."""
    traceback.print_exc()
    if cuda:
        try:
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - a broken context: the next run will say so
            pass
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first[:200]}"


__all__ = ["failure_reason"]
