"""How close attention over a subset of tokens comes to exact attention, computed numerically.

Every lossy policy in hgsim ends up computing ``softmax`` over an attended subset S of the
tokens (HybridGen's softmax-union over GPU logits and received top-k logits, HGCA's LSE merge of
partial outputs, H2O and InfiniGen attending only the tokens they kept), which equals the exact
softmax restricted to S and renormalised. Two numbers summarise the loss:

* ``mass_kept``: the exact softmax probability that falls on S (1 means lossless);
* ``rel_error``: ``||o_S - o|| / ||o||`` of the attention output against exact attention.

Both are per head and averaged over heads (and batch elements). Exact attention is computed in
float64 from whatever (q, K, V) is given (synthetic or captured from a real run), so the same
functions score ``hw_backend``'s real hybrid execution and the simulator's proxy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hgsim.accuracy._arrays import as_numpy, heads_and_keys, single_batch
from hgsim.accuracy.selection import SelectionModel, TokenWindow, selection_mask


@dataclass(frozen=True)
class Fidelity:
    """Accuracy of one attention computation against exact attention.

    ``mass_kept`` and ``rel_error`` are means over heads (and batch elements); the optional
    per-head arrays hold the values they average, batch-major ((B * H,)), read-only.
    """

    mass_kept: float
    rel_error: float
    per_head_mass: np.ndarray | None = field(default=None, compare=False, repr=False)
    per_head_error: np.ndarray | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def lossless(heads: int | None = None) -> Fidelity:
        if heads is None:
            return Fidelity(1.0, 0.0)
        return Fidelity(1.0, 0.0, _frozen(np.ones(heads)), _frozen(np.zeros(heads)))


def attention_logits(q: Any, k: Any) -> np.ndarray:
    """Exact ``q . k / sqrt(D)`` in float64, shape (H, T); GQA heads map to group h // G."""
    q, k = heads_and_keys(q, k)
    heads, head_dim = q.shape
    group = heads // k.shape[0]
    logits = np.empty((heads, k.shape[1]))
    query = q.astype(np.float64) / math.sqrt(head_dim)
    for g in range(k.shape[0]):
        rows = slice(g * group, (g + 1) * group)
        for chunk in _token_chunks(k.shape[1]):
            logits[rows, chunk] = np.einsum(
                "hd,td->ht", query[rows], k[g, chunk].astype(np.float64)
            )
    return logits


def _token_chunks(n_tokens: int, size: int = 4096) -> list[slice]:
    """Token slices for float64 upcasts: small reused temporaries instead of one huge copy.

    The float64 products use ``einsum`` rather than BLAS: they are memory-bound matrix-vector
    products where BLAS threads gain nothing and, on a busy machine, their spin-waiting made
    them several times slower.
    """
    return [slice(start, min(start + size, n_tokens)) for start in range(0, n_tokens, size)]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64; -inf entries get probability zero."""
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / np.sum(weights, axis=-1, keepdims=True)


def weighted_values(weights: np.ndarray, v: Any) -> np.ndarray:
    """``weights @ V`` per KV group in float64: weights (W, H, T) -> (W, H, D).

    Several weight sets share one pass over V, upcast chunk by chunk.
    """
    v = _values(v)
    sets, heads, n_tokens = weights.shape
    group = heads // v.shape[0]
    out = np.zeros((sets, heads, v.shape[2]))
    for g in range(v.shape[0]):
        rows = slice(g * group, (g + 1) * group)
        for chunk in _token_chunks(n_tokens):
            values = v[g, chunk].astype(np.float64)
            out[:, rows] += np.einsum("wht,td->whd", weights[:, rows, chunk], values)
    return out


def _values(v: Any) -> np.ndarray:
    v = as_numpy(v)
    return single_batch(v) if v.ndim == 4 else v


def exact_attention(q: Any, k: Any, v: Any) -> np.ndarray:
    """Exact decode attention output (H, D) in float64 for one batch element."""
    return weighted_values(softmax(attention_logits(q, k))[None], v)[0]


def relative_error(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per-head ``||approx - exact|| / ||exact||`` over the last axis."""
    diff = np.linalg.norm(np.asarray(approx, np.float64) - exact, axis=-1)
    return diff / np.maximum(np.linalg.norm(exact, axis=-1), np.finfo(np.float64).tiny)


def output_error(q: Any, k: Any, v: Any, output: Any) -> np.ndarray:
    """Per-head relative error of an output some kernel computed, against exact attention.

    For scoring a real (hybrid) execution whose attended set is not known to the caller.
    """
    out = as_numpy(output).astype(np.float64).reshape(-1, as_numpy(q).shape[-1])
    return relative_error(out, exact_attention(q, k, v))


def fidelity_from_logits(
    logits: np.ndarray, v: Any, mask: np.ndarray, *, per_head: bool = False
) -> Fidelity:
    """Fidelity of attending ``mask`` (H, T) given exact ``logits`` (H, T) and V (KVH, T, D)."""
    probs = softmax(logits)
    exact = weighted_values(probs[None], v)[0]
    return fidelity_from_probs(probs, exact, v, mask, per_head=per_head)


def fidelity_from_probs(
    probs: np.ndarray, exact: np.ndarray, v: Any, mask: np.ndarray, *, per_head: bool = False
) -> Fidelity:
    """As ``fidelity_from_logits`` with exact probabilities and output (H, D) precomputed."""
    renormalised, mass = _restrict(probs, mask)
    # the output difference from the weight difference: precise even for tiny errors, and
    # exactly zero for a lossless mask
    difference = weighted_values((renormalised - probs)[None], v)[0]
    error = np.linalg.norm(difference, axis=-1)
    norm = np.maximum(np.linalg.norm(exact, axis=-1), np.finfo(np.float64).tiny)
    return _summarise(mass, error / norm, per_head)


def _restrict(probs: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax restricted to the mask (an empty row stays all zero) and the mass it keeps."""
    kept = np.where(mask, probs, 0.0)
    mass = kept.sum(axis=-1)
    return kept / np.where(mass > 0, mass, 1.0)[:, None], mass


def fidelity(
    q: Any,
    k: Any,
    v: Any,
    selection: np.ndarray | TokenWindow,
    *,
    model: SelectionModel | None = None,
    seed: int | np.random.Generator | None = 0,
    per_head: bool = False,
) -> Fidelity:
    """Fidelity of attending a subset of tokens, for arbitrary real tensors.

    q: (B, H, D) or (H, D); K, V: (B, KVH, T, D) or (KVH, T, D); numpy arrays or torch tensors.
    ``selection`` is either a boolean mask of attended tokens, (B, H, T) or (H, T), or a
    plan-like window (``LayerPlan``) from which the mask is derived with ``selection_mask``
    (``model`` and ``seed`` drive the approximate selectors). Batch elements are scored
    independently and averaged.
    """
    q, k, v = as_numpy(q), as_numpy(k), as_numpy(v)
    if q.ndim == 2:
        q, k, v = q[None], k[None], v[None]
    masks = None if isinstance(selection, TokenWindow) else np.asarray(selection, dtype=bool)
    if masks is not None and masks.ndim == 2:
        masks = np.broadcast_to(masks, (q.shape[0], *masks.shape))
    results = []
    for b in range(q.shape[0]):
        logits = attention_logits(q[b], k[b])
        if masks is None:
            mask = selection_mask(q[b], k[b], selection, model, seed=seed, logits=logits)
        else:
            mask = masks[b]
        results.append(fidelity_from_logits(logits, v[b], mask, per_head=True))
    mass = np.concatenate([r.per_head_mass for r in results])
    errors = np.concatenate([r.per_head_error for r in results])
    return _summarise(mass, errors, per_head)


def _summarise(mass: np.ndarray, errors: np.ndarray, per_head: bool) -> Fidelity:
    if not per_head:
        return Fidelity(float(np.mean(mass)), float(np.mean(errors)))
    return Fidelity(float(np.mean(mass)), float(np.mean(errors)), _frozen(mass), _frozen(errors))


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.array(array, dtype=np.float64)
    array.flags.writeable = False
    return array
