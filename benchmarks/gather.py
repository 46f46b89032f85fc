"""The executor's row gather against the memory probe's, side by side in one run.

HybridGen's CPU copies each selected V row into the staging buffer (``gather_rows`` of the C
kernel); the simulator charges that gather at what one core keeps in flight on random rows,
which calibration measures with the memory probe (``hw_backend.memprobe.gather``, a loop that
does nothing but the loads). This prints both, one thread, rows of the KV sizes a decode
gathers (256 B: fp16/bf16 x 128 dims; 512 B: fp32), from a 1 GiB buffer, taken in turns so
the VM's memory drift hits both alike, as CPU time per row. Target: the kernel within 1.25x of
the probe, which only loads: the kernel also stores every row into the staging buffer (write
allocate), which the simulator charges on the staging tier's write channel.

Usage: python benchmarks/gather.py [--rows 100000] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hw_backend import memprobe  # noqa: E402

TARGET = 1.25
BUFFER = 1 << 30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    import torch

    from hw_backend import cpu_attention

    ops = cpu_attention.backend()
    buf = memprobe.row_buffer(BUFFER)
    rng = np.random.default_rng(0)
    ok = True
    print(f"{'row B':>6} {'gather_rows ns/row':>19} {'probe ns/row':>13} {'ratio':>6}")
    for row in (256, 512):
        dim = row // 4  # fp32 elements per row
        tokens = BUFFER // row
        V = torch.from_numpy(buf.view(np.float32).reshape(1, 1, tokens, dim))
        out = torch.empty(1, 1, args.rows, dim, dtype=torch.float32)
        kernel, probe = [], []
        for _ in range(args.repeats):
            idx = rng.integers(0, tokens, size=(1, 1, args.rows), dtype=np.int64)
            t = time.thread_time()
            ops.gather_rows(V, torch.from_numpy(idx), num_threads=1, out=out)
            kernel.append((time.thread_time() - t) / args.rows)
            rows = memprobe.random_rows(BUFFER, row, args.rows, seed=int(rng.integers(1 << 30)))
            probe.append(memprobe.gather(buf, rows, row, 1).cpu_s / args.rows)
        k, p = statistics.median(kernel), statistics.median(probe)
        ratio = k / p
        ok &= ratio <= TARGET
        print(f"{row:>6} {k * 1e9:>19.1f} {p * 1e9:>13.1f} {ratio:>6.2f}")
    print(f"target: gather_rows within {TARGET:.2f}x of the probe: {'ok' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
