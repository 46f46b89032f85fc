"""Shape buckets: sizes rounded up so that a few captured graphs serve a whole decode.

Shared by both halves: ``hw_backend``'s graph path sizes its programs with ``token_bucket``
(``hw_backend.buckets`` re-exports it) and the simulator pads the device work of a graph-path
step with it (``hgsim.graph_path``), so the two cannot disagree on a padded size.

A graph's shapes are frozen at capture; decode counts (resident tokens, top-k, streamed tokens)
change every step. Rounding a count up to its bucket and masking the excess lets one graph
serve every count in the bucket. Buckets are eight per power of two (a count is padded by at
most 1/8, so padded attention reads at most 12.5% more KV than it needs) with a floor of
``MIN_BUCKET``; at decode's pace of one token per step a bucket of n tokens lasts n/8 steps.
"""

from __future__ import annotations

import math

#: Smallest bucket: below it, padding costs less than another graph.
MIN_BUCKET = 16
#: Buckets per doubling of the count.
BUCKETS_PER_OCTAVE = 8


def token_bucket(count: int, limit: int | None = None) -> int:
    """The bucket of ``count`` (>= count, at most 1/8 above it or ``MIN_BUCKET``), capped at
    ``limit`` (a buffer's capacity) when given."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count <= MIN_BUCKET:
        bucket = MIN_BUCKET
    else:
        step = 1 << max(0, int(math.log2(count)) - int(math.log2(BUCKETS_PER_OCTAVE)))
        bucket = -(-count // step) * step
    if limit is not None:
        if count > limit:
            raise ValueError(f"count {count} exceeds the capacity {limit}")
        bucket = min(bucket, limit)
    return bucket


def buckets_between(low: int, high: int) -> list[int]:
    """Every distinct bucket of the counts in [low, high] (what a decode over that range
    captures), in increasing order."""
    if high < low:
        return []
    out, count = [], low
    while count <= high:
        bucket = token_bucket(count)
        out.append(bucket)
        count = bucket + 1
    return out


__all__ = ["BUCKETS_PER_OCTAVE", "MIN_BUCKET", "buckets_between", "token_bucket"]
