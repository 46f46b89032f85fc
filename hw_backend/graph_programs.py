"""The device side of every plan kind as fixed-shape programs that a CUDA graph can capture.

A captured graph replays the same kernels on the same addresses with the same shapes. Decode
changes two things every step: how many tokens are resident on the device (the window slides,
the context grows) and how many host results arrive (HybridGen's top-k grows with the context
and the scheduler's ratio). So, as serving systems do with their batch sizes and sequence
lengths, every program here works on a *bucket* (``buckets.token_bucket``: a size rounded up,
at most 1/8 above the true one) and reads the true count from a device tensor written before
the replay; positions past the count are masked:

* ``masked_partial_attention``: attention over the first ``bucket`` device slots, slots at or
  beyond ``valid`` masked out (log-sum-exp -inf when none is valid, like ``merge``).
* ``unflatten_padded``: host results arrive as the C kernel writes them, contiguous
  ``(groups, count, width)`` in a flat landing buffer; this views them as
  ``(groups, bucket, width)`` by a clamped gather, with the mask of the real columns.
* ``softmax_union_padded``, ``stream_merge``, ``rows_merge`` and ``lse_merge_pair``: HybridGen's
  merge (V rows per query head, per KV group, or exact mode's block), FlexGen's streamed KV,
  InfiniGen's fetched rows and the LSE merge of partial outputs.
* ``speculate_topk``: InfiniGen's approximate scores over a bucket of the partial key cache,
  positions outside the host range masked, top ``bucket`` sorted, so the first ``k`` are the
  top-k the plan asks for.

No program allocates outside the graph's pool, synchronises with the host or reads a value
back (no ``.item()``), so each runs the same eagerly (CPU stand-in, tests) and captured. The
``merge`` module's functions stay the eager path's; these agree with them exactly where the
counts fill the buckets, and tests check both against float64 references.
"""

from __future__ import annotations

import torch

from hw_backend.merge import grouped_logits, grouped_weighted_values

Partial = tuple[torch.Tensor, torch.Tensor]


def _column_mask(valid: torch.Tensor, columns: int, device: torch.device) -> torch.Tensor:
    """(columns,) bool: column < valid (``valid`` a 1-element int64 device tensor)."""
    return torch.arange(columns, device=device) < valid.reshape(())


def _normalise_masked(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax weights and LSE of float32 logits (..., n) with masked columns excluded; a row
    with no column left has weights 0 and LSE -inf (no NaN)."""
    masked = logits.masked_fill(~mask, float("-inf"))
    peak = masked.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = torch.exp(masked - peak)
    total = weights.sum(dim=-1, keepdim=True)
    lse = (peak + torch.log(total)).squeeze(-1)  # log(0) = -inf for an empty row
    return weights / torch.where(total > 0, total, torch.ones_like(total)), lse


def masked_partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             valid: torch.Tensor, scale: float) -> Partial:
    """Attention of q (B, H, D) over slots [0, valid) of K, V (B, KVH, bucket, D)."""
    logits = grouped_logits(q, k, scale)
    weights, lse = _normalise_masked(logits, _column_mask(valid, k.shape[2], q.device))
    return grouped_weighted_values(weights, v), lse


def unflatten_padded(flat: torch.Tensor, groups: int, count: torch.Tensor, columns: int,
                     width: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(groups, columns, width) view-by-gather of a contiguous (groups, count, width) prefix of
    ``flat`` and the (columns,) mask of real columns. Indices past the data are clamped into it
    (finite values, masked by the caller)."""
    device = flat.device
    cols = torch.arange(columns, device=device)
    n = count.reshape(())
    rows = torch.arange(groups, device=device)[:, None] * n + torch.minimum(cols, n - 1)[None, :]
    rows = rows.clamp(min=0)
    table = flat.reshape(-1, width)
    out = table.index_select(0, rows.reshape(-1)).reshape(groups, columns, width)
    return out, cols < n


def lse_merge_pair(a: Partial, b: Partial) -> Partial:
    """``merge.lse_merge`` of two partials, with no NaN when both are empty."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    total = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    wa = torch.exp(lse_a - safe).unsqueeze(-1)
    wb = torch.exp(lse_b - safe).unsqueeze(-1)
    return wa * out_a + wb * out_b, total


def softmax_union_padded(device_part: Partial, logits_flat: torch.Tensor, values: torch.Tensor,
                         count: torch.Tensor, *, per_head: bool,
                         kv_heads: int | None = None) -> Partial:
    """HybridGen's merge from landing buffers: ``logits_flat`` holds the host's (B, H, k)
    scaled logits contiguously; ``values`` is the flat (B, H, k, D) V rows of a per-head top-k
    (``per_head``), the flat (B, KVH, k, D) distinct rows of a per-KV-group top-k (``per_head``
    with ``kv_heads``: each head weighs its group's rows, padding rows carry logit -inf), or
    the padded (B, KVH, bucket, D) V block of exact mode."""
    out_dev, _ = device_part
    batch, heads, dim = out_dev.shape
    row_sets = batch * (kv_heads or heads)
    if per_head:
        columns = values.numel() // (row_sets * dim)
    else:
        columns = values.shape[2]
    logits, mask = unflatten_padded(logits_flat, batch * heads, count, columns)
    logits = logits.reshape(batch, heads, columns)
    weights, lse = _normalise_masked(logits.float(), mask)
    if per_head:
        rows, _ = unflatten_padded(values, row_sets, count, columns, dim)
        rows = rows.reshape(batch, row_sets // batch, columns, dim)
        if kv_heads:
            host_out = grouped_weighted_values(weights, rows)
        else:
            host_out = torch.matmul(weights.unsqueeze(-2).to(rows.dtype), rows).squeeze(-2).float()
    else:
        host_out = grouped_weighted_values(weights, values)
    return lse_merge_pair(device_part, (host_out, lse))


def stream_merge(device_part: Partial, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 count: torch.Tensor, scale: float) -> Partial:
    """FlexGen: attention over the streamed (B, KVH, bucket, D) blocks, first ``count`` real."""
    return lse_merge_pair(device_part, masked_partial_attention(q, k, v, count, scale))


def rows_merge(device_part: Partial, q: torch.Tensor, k_flat: torch.Tensor,
               v_flat: torch.Tensor, count: torch.Tensor, columns: int, scale: float) -> Partial:
    """InfiniGen: attention of each head over its fetched rows, (B, H, count, D) contiguous in
    ``k_flat`` / ``v_flat``, with exact logits."""
    batch, heads, dim = q.shape
    k_rows, mask = unflatten_padded(k_flat, batch * heads, count, columns, dim)
    v_rows, _ = unflatten_padded(v_flat, batch * heads, count, columns, dim)
    k_rows = k_rows.reshape(batch, heads, columns, dim)
    v_rows = v_rows.reshape(batch, heads, columns, dim)
    logits = torch.matmul(k_rows, q.to(k_rows.dtype).unsqueeze(-1)).squeeze(-1).float() * scale
    weights, lse = _normalise_masked(logits, mask)
    out = torch.matmul(weights.unsqueeze(-2).to(v_rows.dtype), v_rows).squeeze(-2).float()
    return lse_merge_pair(device_part, (out, lse))


def speculate_topk(query: torch.Tensor, partial_k: torch.Tensor, start: torch.Tensor,
                   end: torch.Tensor, columns: int) -> torch.Tensor:
    """InfiniGen's speculation: positions (B, H, columns) of the best approximate scores of
    ``query`` (B, KVH, G, c) over positions [start, end) of ``partial_k`` (B, KVH, span, c),
    best first; the first ``k`` are the plan's top-k (``columns`` >= k)."""
    scores = torch.matmul(query, partial_k.transpose(-1, -2)).float()
    batch = query.shape[0]
    positions = torch.arange(partial_k.shape[2], device=query.device)
    inside = (positions >= start.reshape(())) & (positions < end.reshape(()))
    scores = scores.reshape(batch, -1, partial_k.shape[2]).masked_fill(~inside, float("-inf"))
    return torch.topk(scores, columns, dim=-1, sorted=True).indices


__all__ = [
    "lse_merge_pair", "masked_partial_attention", "rows_merge", "softmax_union_padded",
    "speculate_topk", "stream_merge", "unflatten_padded",
]
