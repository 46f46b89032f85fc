"""Device-side attention math: partial attention with LSE, and the two ways host results merge.

Every plan kind ends in one of these on the device:

* ``partial_attention``: softmax attention of q over some K/V rows, returned with its log-sum-exp
  so that it can be combined with other blocks exactly (flash-decoding style);
* ``softmax_union``: HybridGen's merge. The host sends its top-k logits and the matching V rows;
  the result is one softmax over the device's logits together with the received ones, weighted
  over both sets of V rows. It is evaluated blockwise (the device block is reduced to an
  (output, LSE) pair while the host is still working, then the received block is folded in), which
  is the same softmax flash attention computes over any split of its keys;
* ``lse_merge``: combines partial outputs (HGCA, CPU offload, streamed blocks) by their LSE.

Shapes: q (B, H, D); K, V (B, KVH, n, D) with query head h reading KV head h // (H // KVH);
outputs float32 (B, H, D) and LSE float32 (B, H). An empty block has LSE -inf and output 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Partial = tuple[torch.Tensor, torch.Tensor]  # (output (B, H, D) float32, lse (B, H) float32)


def empty_partial(q: torch.Tensor) -> Partial:
    """The contribution of no tokens: output 0, LSE -inf."""
    batch, heads, _ = q.shape
    lse = torch.full((batch, heads), float("-inf"), dtype=torch.float32, device=q.device)
    return torch.zeros(q.shape, dtype=torch.float32, device=q.device), lse


def grouped_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * q . k`` for every query head and row, float32 (B, H, n); GQA without copying K."""
    batch, heads, dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim).to(k.dtype)
    logits = torch.matmul(grouped, k.transpose(-1, -2)).float()
    return logits.reshape(batch, heads, k.shape[2]).mul_(scale)


def grouped_weighted_values(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``weights @ V`` per KV group: weights (B, H, n) float32, V (B, KVH, n, D) -> (B, H, D)."""
    batch, heads, rows = weights.shape
    kv_heads = v.shape[1]
    grouped = weights.reshape(batch, kv_heads, heads // kv_heads, rows).to(v.dtype)
    return torch.matmul(grouped, v).float().reshape(batch, heads, v.shape[-1])


def _normalise(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax weights and LSE of float32 logits (..., n); an empty row gives LSE -inf."""
    if logits.shape[-1] == 0:
        lse = torch.full(logits.shape[:-1], float("-inf"), device=logits.device)
        return logits, lse
    lse = torch.logsumexp(logits, dim=-1)
    return torch.exp(logits - lse.unsqueeze(-1)), lse


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Partial:
    """Attention of q over all rows of K/V (shared per KV group), with its LSE."""
    if k.shape[2] == 0:
        return empty_partial(q)
    weights, lse = _normalise(grouped_logits(q, k, scale))
    return grouped_weighted_values(weights, v), lse


def attend_logits(logits: torch.Tensor, values: torch.Tensor) -> Partial:
    """Attention given logits (B, H, k) and value rows: per head (B, H, k, D), or per KV group
    (B, KVH, k, D) when every head of a group scored the same rows (HybridGen's exact mode)."""
    if logits.shape[-1] == 0:
        return empty_partial(logits.new_empty((*logits.shape[:2], values.shape[-1])))
    weights, lse = _normalise(logits.float())
    return grouped_weighted_values(weights, values), lse


def attend_rows(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, scale: float) -> Partial:
    """Attention of each head over its own rows: K, V (B, H, k, D) (InfiniGen's fetched rows)."""
    logits = torch.matmul(k_rows, q.to(k_rows.dtype).unsqueeze(-1)).squeeze(-1).float() * scale
    return attend_logits(logits, v_rows)


def lse_merge(parts: Sequence[Partial]) -> Partial:
    """Exact combination of partial attentions over disjoint token sets by their LSE."""
    if not parts:
        raise ValueError("nothing to merge")
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts])  # (P, B, H)
    total = torch.logsumexp(lses, dim=0)
    safe_total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    weights = torch.exp(lses - safe_total)  # -inf parts weigh 0
    out = sum(w.unsqueeze(-1) * o for w, (o, _) in zip(weights, parts, strict=True))
    return out, total


def softmax_union(device: Partial, host_logits: torch.Tensor, host_values: torch.Tensor) -> Partial:
    """HybridGen's merge: one softmax over device logits and received host logits.

    ``device`` is the device block already reduced (``partial_attention`` over resident tokens);
    ``host_logits`` (B, H, k) are the host's top-k scaled logits, ``host_values`` (B, H, k, D)
    their V rows. Folding the host block in by LSE gives exactly softmax over the union of both
    logit sets applied to both sets of V rows.
    """
    return lse_merge([device, attend_logits(host_logits, host_values)])


__all__ = [
    "Partial", "attend_logits", "attend_rows", "empty_partial", "grouped_logits",
    "grouped_weighted_values", "lse_merge", "partial_attention", "softmax_union",
]
