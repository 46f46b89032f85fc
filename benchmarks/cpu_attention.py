"""CPU decode attention: our kernels vs torch SDPA vs this machine's read bandwidth.

Decode attention reads every K and V byte once for ~1 FMA per byte, so the right yardstick
is memory bandwidth: GB/s of KV scanned. For B=1, H=32, KVH=8, D=128 (a Llama-3-8B-like
layer) at 8k/32k/128k tokens, float32 and bfloat16 KV, this prints side by side

  ours      hw_backend.cpu_attention.partial_attention, (K+V bytes) / time
  torch     torch SDPA on CPU, same dtype, enable_gqa
  read      streaming read of the same K and V bytes (hw_backend.membench), alternated
            with ours: the ceiling for this data (ours/read uses it)
  membench  the same probe over a fresh 512 MiB buffer, for reference (on a VM two
            allocations can sit on host memory of quite different speed)
  topk      logits_topk (the HybridGen selection scan), K bytes / time

with the ratios ours/read and ours/torch, each time the median of --repeats runs after
warm-up, and checks the targets: float32 >= 75% of read bandwidth, bfloat16 >= 8x torch.
Where the bfloat16 target fails it also prints whether 8x torch lies within this KV's read
bandwidth at all: the target was set where torch reads bf16 KV at ~1 GB/s, while with AMX
torch reads it several times faster, so that 8x can exceed what the memory delivers.
Measured results per machine: docs/calibration.md.
KV lives in huge-page buffers from hw_backend.numa, like the read-bandwidth buffer.

Every pass (read probe, ours, torch's, topk) starts from DRAM, right after the attention of
a "previous layer" (512 MiB of other KV) has gone through the caches, as in a decode step.

    python benchmarks/cpu_attention.py [--tokens 8192 32768 131072] [--repeats 7]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hw_backend import cpu_attention as ca
from hw_backend import membench, numa
from hw_backend.calibration.timing import wall_seconds

B, H, KVH, D = 1, 32, 8, 128
TOPK = 2048
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FP32_TARGET_OF_READ = 0.75
BF16_TARGET_OVER_TORCH = 8.0


@dataclass
class Row:
    dtype: str
    tokens: int
    ours: float
    torch: float
    read: float
    fresh: float
    topk: float


def interleaved_gbps(
    nbytes: int, fn: Callable[[], object], kv_read: Callable[[], float],
    membench_read: Callable[[], float], previous_layer: Callable[[], object], repeats: int,
) -> tuple[float, float, float]:
    """Median GB/s of ``fn``, of the read probe over its KV and of the fresh-buffer probe.

    They alternate, so all see the same machine, and the read probe and ``fn`` each start right
    after ``previous_layer`` has streamed 512 MiB of other KV through the caches: straight after
    the kernel, the KV's last-touched lines still sit in the last-level cache and make the read
    probe faster than from DRAM.

    The eviction is an attention pass, not a plain read, because that is what precedes the
    kernel in decode, and because what runs before changes how the kernel starts: after a plain
    streaming read its first work items ran markedly slower than its others (figures:
    docs/calibration.md, history).
    """
    fn()
    ours: list[float] = []
    read: list[float] = []
    fresh: list[float] = []
    for _ in range(repeats):
        fresh.append(membench_read())
        previous_layer()
        read.append(kv_read())
        previous_layer()
        ours.append(nbytes / wall_seconds(fn) / 1e9)
    return statistics.median(ours), statistics.median(read), statistics.median(fresh)


def kv_buffer(tokens: int, dtype: str, g: torch.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """Random KV in a huge-page buffer from hw_backend.numa, as a real KV cache would be.

    torch's own allocator gives 4 KiB pages where transparent huge pages are opt-in, which
    costs every streaming kernel (torch's too) bandwidth. Both contenders scan this tensor;
    the NumPy storage is returned too, for the read probe over the same bytes.
    """
    with warnings.catch_warnings():  # one-node machines warn that placement is implicit
        warnings.simplefilter("ignore", RuntimeWarning)
        storage = numa.alloc_on_node((B, KVH, tokens, D), dtype, node=0)
    kv = numa.to_torch(storage, "bfloat16" if dtype == "bfloat16" else None)
    return kv.copy_(torch.randn(kv.shape, generator=g)), storage


def previous_layer_attention() -> Callable[[], object]:
    """Attention over 512 MiB of other float32 KV: what a decode step runs before each call."""
    tokens = 65536
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, D, generator=g)
    K, _ = kv_buffer(tokens, "float32", g)
    V, _ = kv_buffer(tokens, "float32", g)
    return lambda: ca.partial_attention(q, K, V)


def measure(
    dtype: str, tokens: int, repeats: int, membench_read: Callable[[], float],
    previous_layer: Callable[[], object],
) -> Row:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, D, generator=g)
    K, k_storage = kv_buffer(tokens, dtype, g)
    V, v_storage = kv_buffer(tokens, dtype, g)
    kv_bytes = K.nbytes + V.nbytes
    q_sdpa = q[:, :, None].to(DTYPES[dtype])
    kv_read = membench.read_pass(buffers=[k_storage, v_storage])

    def sdpa():
        return F.scaled_dot_product_attention(q_sdpa, K, V, enable_gqa=True)

    ours, read, fresh = interleaved_gbps(
        kv_bytes, lambda: ca.partial_attention(q, K, V), kv_read, membench_read, previous_layer,
        repeats,
    )
    topk = cold_gbps(K.nbytes, lambda: ca.logits_topk(q, K, TOPK), previous_layer, repeats)
    with torch.inference_mode():
        ref = cold_gbps(kv_bytes, sdpa, previous_layer, max(3, repeats // 2))
    return Row(dtype, tokens, ours, ref, read, fresh, topk)


def cold_gbps(nbytes: int, fn: Callable[[], object], previous_layer: Callable[[], object],
              repeats: int) -> float:
    """Median GB/s of ``fn`` started, like ours, right after another layer's attention.

    Timed back to back instead, a contender re-reads KV its last call left in a large
    last-level cache and looks faster than it is in decode (docs/calibration.md, history)."""
    fn()
    rates = []
    for _ in range(repeats):
        previous_layer()
        rates.append(nbytes / wall_seconds(fn) / 1e9)
    return statistics.median(rates)


def print_table(rows: list[Row]) -> None:
    print(
        f"{'dtype':9s}{'tokens':>8s}{'ours GB/s':>11s}{'torch GB/s':>12s}{'read GB/s':>11s}"
        f"{'ours/read':>11s}{'ours/torch':>12s}{'topk GB/s':>11s}{'membench GB/s':>15s}"
    )
    for r in rows:
        print(
            f"{r.dtype:9s}{r.tokens:>8d}{r.ours:>11.1f}{r.torch:>12.2f}{r.read:>11.1f}"
            f"{r.ours / r.read:>11.2f}{r.ours / r.torch:>11.1f}x{r.topk:>11.1f}{r.fresh:>15.1f}"
        )


def check_targets(rows: list[Row]) -> bool:
    """Prints the two acceptance targets; True when both hold on every row measured."""
    ok = True
    fp32 = [r.ours / r.read for r in rows if r.dtype == "float32"]
    bf16 = [r.ours / r.torch for r in rows if r.dtype == "bfloat16"]
    if fp32:
        passed = min(fp32) >= FP32_TARGET_OF_READ
        ok &= passed
        print(
            f"float32 KV: ours >= {FP32_TARGET_OF_READ:.0%} of read bandwidth: worst "
            f"{min(fp32):.0%} -> {'PASS' if passed else 'FAIL'}"
        )
    if bf16:
        passed = min(bf16) >= BF16_TARGET_OVER_TORCH
        ok &= passed
        print(
            f"bfloat16 KV: ours >= {BF16_TARGET_OVER_TORCH:.0f}x torch SDPA: worst "
            f"{min(bf16):.1f}x -> {'PASS' if passed else 'FAIL'}"
        )
        if not passed:
            print(bf16_ceiling_note(rows))
    return ok


def bf16_ceiling_note(rows: list[Row]) -> str:
    """Whether the bfloat16 target is attainable here at all: the target was set where torch
    reads bf16 KV at ~1 GB/s (no AMX/bf16 path); where torch is fast, 8x torch can exceed what
    the memory delivers, and no kernel can meet it."""
    lines = []
    for r in (r for r in rows if r.dtype == "bfloat16"):
        needed = BF16_TARGET_OVER_TORCH * r.torch
        verdict = "above" if needed > r.read else "within"
        lines.append(f"  {r.tokens:>7d} tokens: 8x torch = {needed:.1f} GB/s, {verdict} this KV's "
                     f"read bandwidth {r.read:.1f} GB/s; ours reaches {r.ours / r.read:.0%} of it")
    return "bfloat16 target against the memory ceiling:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prefetch-bytes", type=int, default=None,
                        help="software-prefetch distance of the kernels (default: built-in)")
    args = parser.parse_args(argv)
    if args.prefetch_bytes is not None:
        ca.set_prefetch_bytes(args.prefetch_bytes)
    prefetch = ca.set_prefetch_bytes(0)
    ca.set_prefetch_bytes(prefetch)

    print(
        f"CPU decode attention, B={B} H={H} KVH={KVH} D={D}; backend={ca.BACKEND} "
        f"simd={ca.simd_level()} threads={ca.max_threads()} torch threads="
        f"{torch.get_num_threads()}; logits_topk k={TOPK}; prefetch {prefetch} B ahead"
    )
    membench_read = membench.read_pass(512 << 20)
    previous_layer = previous_layer_attention()
    rows = []
    for dtype in args.dtypes:
        for tokens in args.tokens:
            rows.append(measure(dtype, tokens, args.repeats, membench_read, previous_layer))
            gc.collect()
    print_table(rows)
    return 0 if check_targets(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
