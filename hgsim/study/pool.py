"""Local process pools shared by study execution (``execute``) and figure drawing (``plots``).

Both start a ``ProcessPoolExecutor`` whose workers must start the same way, leave Ctrl-C to
the parent, and be ended at once when the parent is interrupted; one module keeps the two
pools in step instead of one reaching into the other's private helpers.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor


def ignore_sigint() -> None:
    """A pool initializer: workers leave Ctrl-C to the parent, which stops them; a worker that
    caught it would only abandon its current task and carry on with the next."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def terminate_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel queued tasks and end running ones now (on Ctrl-C, or when the consumer stops);
    ``shutdown`` alone would wait for every running task to finish."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=5)


def process_context():
    """How worker processes start.

    fork on Linux while this process has a single thread: instant, workers inherit the loaded
    simulator and caches, and nothing re-imports the caller's main script (so ``run_study``
    works from a plain script or notebook). Otherwise forkserver (fork is unsafe once threads
    exist), whose server imports the simulator once, or the platform default.
    """
    methods = multiprocessing.get_all_start_methods()
    if sys.platform.startswith("linux") and "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["hgsim.study.worker", "hgsim.simulate"])
        return ctx
    return multiprocessing.get_context()
