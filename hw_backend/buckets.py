"""Shape buckets of the graph path: the arithmetic lives in ``hgsim.shape_buckets`` (pure, no
torch) so that the simulator pads the graph path's device work with the very same function."""

from hgsim.shape_buckets import BUCKETS_PER_OCTAVE, MIN_BUCKET, buckets_between, token_bucket

__all__ = ["BUCKETS_PER_OCTAVE", "MIN_BUCKET", "buckets_between", "token_bucket"]
