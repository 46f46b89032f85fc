"""A decoder-only transformer with random weights at a catalog model's shapes.

The executor validates the simulator on the attention path; what a user runs is a whole model:
per layer a norm, the QKV projection, rotary position embedding, attention, the output
projection, a second norm and the FFN, each with its real shape and dtype, so that the device
does the work HybridGen hides its host path behind. Weights are random (seeded normal, scaled by
1/sqrt(fan-in)): decode speed depends on shapes and dtypes, not on trained values, and random
weights need no download.

The layer math here is plain torch on tensors the caller owns; it has no data-dependent shapes,
host synchronisation or ``.item()``, so the same functions run eagerly, inside the stand-in's
queues and inside a captured CUDA graph, and ``DenseDecoder`` runs them as a float64 reference.

What the families differ in: Llama and Qwen2.5 use RMSNorm, rotary embeddings and SwiGLU (Qwen
adds q/k/v biases); OPT uses LayerNorm, ReLU and biases everywhere. OPT's learned position
table is left out (contexts here exceed its 2048 positions), so OPT runs without positions;
Llama 3.1's rotary frequency scaling is left out too (it changes values, not cost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hgsim.specs.model import ModelSpec

#: Rotary base by name prefix, for a model file that gives no ``rope_theta`` (the catalog and
#: every config.json set it: ``ModelSpec.rope_theta``).
_ROPE_THETA = (("llama-3", 500_000.0), ("qwen", 1_000_000.0), ("llama", 10_000.0),
               ("tiny", 10_000.0))
#: Norm epsilon (config.json ``rms_norm_eps`` / OPT's LayerNorm default).
_NORM_EPS = {"llama": 1e-5, "qwen": 1e-6, "opt": 1e-5}


def rope_theta(spec: ModelSpec) -> float | None:
    """The rotary base of a model: its own ``rope_theta``, else one by name prefix; None for
    OPT (learned positions, left out here). The base changes values, not cost."""
    if spec.family == "opt":
        return None
    if spec.rope_theta is not None:
        return spec.rope_theta
    for prefix, theta in _ROPE_THETA:
        if spec.name.startswith(prefix):
            return theta
    return 10_000.0


# ---------------------------------------------------------------------------- weights
@dataclass
class LayerWeights:
    """One decoder layer; matrices are stored (in, out) so that a row vector multiplies them."""

    norm1: torch.Tensor
    norm1_bias: torch.Tensor | None
    w_qkv: torch.Tensor  # (hidden, q_dim + 2 kv_dim): q | k | v
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor  # (q_dim, hidden)
    b_o: torch.Tensor | None
    norm2: torch.Tensor
    norm2_bias: torch.Tensor | None
    w_up: torch.Tensor  # (hidden, 2 ffn) gate | up for SwiGLU, else (hidden, ffn)
    b_up: torch.Tensor | None
    w_down: torch.Tensor  # (ffn, hidden)
    b_down: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in vars(self).values() if isinstance(t, torch.Tensor)]

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> LayerWeights:
        return LayerWeights(**{k: None if v is None else v.to(device=device, dtype=dtype)
                               for k, v in vars(self).items()})


@dataclass
class ModelWeights:
    spec: ModelSpec
    layers: list[LayerWeights]
    embed: torch.Tensor  # (vocab, hidden)
    final_norm: torch.Tensor
    final_norm_bias: torch.Tensor | None
    lm_head: torch.Tensor  # (hidden, vocab); a transposed view of ``embed`` when tied

    @staticmethod
    def random(spec: ModelSpec, *, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0) -> ModelWeights:
        """Seeded normal weights scaled by 1/sqrt(fan-in), drawn on ``device`` (a GPU draws
        16 GB in well under a second; copying them from the host would take longer)."""
        device = torch.device(device)
        generator = torch.Generator(device=device).manual_seed(seed)

        def normal(*shape: int, scale: float) -> torch.Tensor:
            t = torch.empty(shape, device=device, dtype=dtype)
            return t.normal_(0.0, scale, generator=generator)

        def ones(n: int) -> torch.Tensor:
            return torch.ones(n, device=device, dtype=dtype)

        def zeros(n: int) -> torch.Tensor:
            return torch.zeros(n, device=device, dtype=dtype)

        hidden, ffn = spec.hidden_size, spec.ffn_size
        qkv = spec.q_dim + 2 * spec.kv_dim
        opt = spec.family == "opt"
        up = 2 * ffn if spec.ffn_kind == "swiglu" else ffn
        layers = []
        for _ in range(spec.num_layers):
            layers.append(LayerWeights(
                norm1=ones(hidden), norm1_bias=zeros(hidden) if opt else None,
                w_qkv=normal(hidden, qkv, scale=hidden**-0.5),
                b_qkv=normal(qkv, scale=0.02) if spec.qkv_bias else None,
                w_o=normal(spec.q_dim, hidden, scale=spec.q_dim**-0.5),
                b_o=zeros(hidden) if opt else None,
                norm2=ones(hidden), norm2_bias=zeros(hidden) if opt else None,
                w_up=normal(hidden, up, scale=hidden**-0.5),
                b_up=zeros(up) if opt else None,
                w_down=normal(ffn, hidden, scale=ffn**-0.5),
                b_down=zeros(hidden) if opt else None,
            ))
        embed = normal(spec.vocab_size, hidden, scale=1.0)
        lm_head = embed.t() if spec.tied_embeddings else normal(hidden, spec.vocab_size,
                                                                scale=hidden**-0.5)
        return ModelWeights(spec, layers, embed, ones(hidden), zeros(hidden) if opt else None,
                            lm_head)

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> ModelWeights:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        embed = move(self.embed)
        lm_head = embed.t() if self.spec.tied_embeddings else move(self.lm_head)
        bias = None if self.final_norm_bias is None else move(self.final_norm_bias)
        return ModelWeights(self.spec, [w.to(dtype, device) for w in self.layers], embed,
                            move(self.final_norm), bias, lm_head)

    @property
    def nbytes(self) -> int:
        tensors = [t for layer in self.layers for t in layer.tensors()]
        tensors += [self.embed, self.final_norm]
        if not self.spec.tied_embeddings:
            tensors.append(self.lm_head)
        return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------- layer math
def norm(spec: ModelSpec, x: torch.Tensor, weight: torch.Tensor,
         bias: torch.Tensor | None) -> torch.Tensor:
    """RMSNorm (Llama, Qwen) or LayerNorm (OPT), computed in at least float32."""
    eps = _NORM_EPS[spec.family]
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if spec.family == "opt":
        out = torch.nn.functional.layer_norm(wide, (wide.shape[-1],), weight.to(wide.dtype),
                                             None if bias is None else bias.to(wide.dtype), eps)
    else:
        out = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps) * weight.to(wide.dtype)
    return out.to(x.dtype)


def inverse_frequencies(spec: ModelSpec, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Rotary inverse frequencies (head_dim / 2,), float64; None without rotary."""
    theta = rope_theta(spec)
    if theta is None:
        return None
    half = spec.head_dim // 2
    exponents = torch.arange(half, dtype=torch.float64, device=device) * 2 / spec.head_dim
    return theta ** -exponents


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, 1, head_dim) for token ``positions`` (B,), from a device tensor so that
    a captured graph reads each step's position instead of baking one in."""
    angles = positions.to(inv_freq.dtype)[:, None] * inv_freq[None, :]  # (B, D/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding (the Hugging Face Llama/Qwen convention) of (B, heads, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def project_qkv(spec: ModelSpec, w: LayerWeights, x: torch.Tensor, positions: torch.Tensor,
                inv_freq: torch.Tensor | None):
    """Norm, QKV projection and rotary of the new token: q (B, H, D), k and v (B, KVH, D)."""
    batch = x.shape[0]
    a = norm(spec, x, w.norm1, w.norm1_bias)
    qkv = a @ w.w_qkv
    if w.b_qkv is not None:
        qkv = qkv + w.b_qkv
    q, k, v = qkv.split((spec.q_dim, spec.kv_dim, spec.kv_dim), dim=-1)
    q = q.reshape(batch, spec.num_heads, spec.head_dim)
    k = k.reshape(batch, spec.num_kv_heads, spec.head_dim)
    v = v.reshape(batch, spec.num_kv_heads, spec.head_dim)
    if inv_freq is not None:
        cos, sin = rotary_tables(positions, inv_freq, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return q, k, v


def project_query(spec: ModelSpec, w: LayerWeights, x: torch.Tensor, positions: torch.Tensor,
                  inv_freq: torch.Tensor | None) -> torch.Tensor:
    """Only the query of layer ``w`` from hidden state ``x`` (B, H, D): HybridGen's look-ahead
    query, layer i+1's projection of layer i's input (consecutive inputs are similar)."""
    a = norm(spec, x, w.norm1, w.norm1_bias)
    q = a @ w.w_qkv[:, : spec.q_dim]
    if w.b_qkv is not None:
        q = q + w.b_qkv[: spec.q_dim]
    q = q.reshape(x.shape[0], spec.num_heads, spec.head_dim)
    if inv_freq is not None:
        cos, sin = rotary_tables(positions, inv_freq, q.dtype)
        q = apply_rotary(q, cos, sin)
    return q


def feed_forward(spec: ModelSpec, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    up = x @ w.w_up
    if w.b_up is not None:
        up = up + w.b_up
    if spec.ffn_kind == "swiglu":
        gate, value = up.chunk(2, dim=-1)
        hidden = torch.nn.functional.silu(gate) * value
    elif spec.ffn_kind == "relu":
        hidden = torch.relu(up)
    else:
        hidden = torch.nn.functional.gelu(up)
    out = hidden @ w.w_down
    return out if w.b_down is None else out + w.b_down


def finish_layer(spec: ModelSpec, w: LayerWeights, x: torch.Tensor,
                 attention: torch.Tensor) -> None:
    """Output projection, residual, second norm, FFN and residual, in place on ``x``;
    ``attention`` is the layer's attention output (B, H, D)."""
    o = attention.reshape(x.shape[0], spec.q_dim).to(x.dtype) @ w.w_o
    if w.b_o is not None:
        o = o + w.b_o
    x.add_(o)
    x.add_(feed_forward(spec, w, norm(spec, x, w.norm2, w.norm2_bias)))


def logits(weights: ModelWeights, x: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, vocab), float32 (float64 for a float64 model)."""
    h = norm(weights.spec, x, weights.final_norm, weights.final_norm_bias)
    out = h @ weights.lm_head
    return out.to(torch.promote_types(out.dtype, torch.float32))


# ---------------------------------------------------------------------------- reference
def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Attention of q (B, H, D) over every row of K, V (B, KVH, T, D) (GQA groups)."""
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, 1)
    vv = v.repeat_interleave(group, 1)
    scores = torch.einsum("bhd,bhtd->bht", q, kk) * scale
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), vv)


class DenseDecoder:
    """The same model decoded with plain attention over a full KV cache: the reference the
    executor's exact plans must reproduce (run it in float64)."""

    def __init__(self, weights: ModelWeights, prefix: list[tuple[torch.Tensor, torch.Tensor]]):
        self.weights = weights
        self.spec = weights.spec
        dtype = weights.embed.dtype
        self.cache = [(k.to(dtype), v.to(dtype)) for k, v in prefix]
        self.inv_freq = inverse_frequencies(self.spec)
        self.scale = 1.0 / math.sqrt(self.spec.head_dim)

    @property
    def length(self) -> int:
        return self.cache[0][0].shape[2]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` (B,) at the next position; return their logits (B, vocab)."""
        spec = self.spec
        x = self.weights.embed[tokens].clone()
        positions = torch.full((x.shape[0],), self.length, dtype=torch.int64)
        for i, w in enumerate(self.weights.layers):
            q, k, v = project_qkv(spec, w, x, positions, self.inv_freq)
            ck, cv = self.cache[i]
            ck = torch.cat((ck, k.unsqueeze(2)), dim=2)
            cv = torch.cat((cv, v.unsqueeze(2)), dim=2)
            self.cache[i] = (ck, cv)
            finish_layer(spec, w, x, dense_attention(q, ck, cv, self.scale))
        return logits(self.weights, x)


__all__ = [
    "DenseDecoder", "LayerWeights", "ModelWeights", "apply_rotary", "dense_attention",
    "feed_forward", "finish_layer", "inverse_frequencies", "logits", "norm", "project_qkv",
    "project_query", "rope_theta", "rotary_tables",
]
