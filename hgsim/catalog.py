"""Catalog of the model architectures HybridGen evaluates: OPT, Llama 2 / 3.1 and Qwen2.5.

Numbers are copied from each checkpoint's published ``config.json`` (Hugging Face) or paper,
because every simulated cost (weight bytes, KV bytes per token, FLOPs) derives from them; a
wrong head count is a wrong answer, so tests pin parameter counts and KV sizes.

``max_context`` is the model's native limit. Long-context studies may go beyond it on purpose;
nothing in the simulator should enforce it.
"""

from __future__ import annotations

import difflib
import os
import re

from hgsim.errors import UserError
from hgsim.model_files import find_model_file, load_model_file, user_model_files
from hgsim.specs.model import ModelSpec


def _opt(name: str, layers: int, hidden: int, heads: int, source: str) -> ModelSpec:
    # OPT (Zhang et al. 2022, arXiv 2205.01068, Table 1; facebook/opt-* config.json): MHA,
    # head_dim 128, ReLU FFN of 4 x hidden, biases everywhere, vocab 50272, 2048 positions,
    # output projection tied to the input embedding.
    return ModelSpec(
        name=name, family="opt", num_layers=layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, ffn_size=4 * hidden, ffn_kind="relu",
        vocab_size=50272, max_context=2048, qkv_bias=True, tied_embeddings=True, source=source,
    )


def _llama(
    name: str, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int,
    context: int, rope_theta: float, source: str,
) -> ModelSpec:
    # Llama: SwiGLU FFN, no biases, untied output head, head_dim 128 for every size here.
    return ModelSpec(
        name=name, family="llama", num_layers=layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=hidden // heads, ffn_size=ffn, ffn_kind="swiglu",
        vocab_size=vocab, max_context=context, qkv_bias=False, tied_embeddings=False,
        rope_theta=rope_theta, source=source,
    )


def _qwen(
    name: str, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, source: str
) -> ModelSpec:
    # Qwen2.5 (arXiv 2412.15115; Qwen/Qwen2.5-*B config.json): SwiGLU, bias on q/k/v only,
    # vocab 152064 for 7B and larger (the <= 3B models use 151936 and tie embeddings), head_dim
    # 128, 131072-token context (model cards; the -Instruct configs ship 32768 + YaRN),
    # rope_theta 1e6.
    return ModelSpec(
        name=name, family="qwen", num_layers=layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=hidden // heads, ffn_size=ffn, ffn_kind="swiglu",
        vocab_size=152064, max_context=131072, qkv_bias=True, tied_embeddings=False,
        rope_theta=1_000_000.0, source=source,
    )


_HF = "https://huggingface.co/{}/blob/main/config.json"

_MODELS: list[ModelSpec] = [
    # OPT: layers / hidden / heads from arXiv 2205.01068 Table 1 and facebook/opt-*/config.json
    _opt("opt-6.7b", 32, 4096, 32, _HF.format("facebook/opt-6.7b")),
    _opt("opt-13b", 40, 5120, 40, _HF.format("facebook/opt-13b")),
    _opt("opt-30b", 48, 7168, 56, _HF.format("facebook/opt-30b")),
    _opt("opt-66b", 64, 9216, 72, _HF.format("facebook/opt-66b")),
    # Llama 2 (arXiv 2307.09288; meta-llama/Llama-2-*-hf config.json): vocab 32000, 4096 ctx,
    # GQA with 8 KV heads only for 70B, rope_theta 1e4.
    _llama("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, 4096, 10_000.0,
           _HF.format("meta-llama/Llama-2-7b-hf")),
    _llama("llama-2-13b", 40, 5120, 40, 40, 13824, 32000, 4096, 10_000.0,
           _HF.format("meta-llama/Llama-2-13b-hf")),
    _llama("llama-2-70b", 80, 8192, 64, 8, 28672, 32000, 4096, 10_000.0,
           _HF.format("meta-llama/Llama-2-70b-hf")),
    # Llama 3.1 (arXiv 2407.21783 Table 3; meta-llama/Llama-3.1-*B config.json): GQA 8 KV
    # heads, vocab 128256, 131072 ctx, rope_theta 5e5 (its rope_scaling is left out).
    _llama("llama-3.1-8b", 32, 4096, 32, 8, 14336, 128256, 131072, 500_000.0,
           _HF.format("meta-llama/Llama-3.1-8B")),
    _llama("llama-3.1-70b", 80, 8192, 64, 8, 28672, 128256, 131072, 500_000.0,
           _HF.format("meta-llama/Llama-3.1-70B")),
    # Qwen2.5 (Qwen/Qwen2.5-*B config.json): heads / KV heads 28/4, 40/8, 40/8, 64/8.
    _qwen("qwen2.5-7b", 28, 3584, 28, 4, 18944, _HF.format("Qwen/Qwen2.5-7B")),
    _qwen("qwen2.5-14b", 48, 5120, 40, 8, 13824, _HF.format("Qwen/Qwen2.5-14B")),
    _qwen("qwen2.5-32b", 64, 5120, 40, 8, 27648, _HF.format("Qwen/Qwen2.5-32B")),
    _qwen("qwen2.5-72b", 80, 8192, 64, 8, 29568, _HF.format("Qwen/Qwen2.5-72B")),
]

#: Canonical (lower-case) name -> spec, in presentation order.
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _MODELS}

#: Tiny models of the same families for smoke runs and CPU tests of ``hw_backend``'s
#: whole-model decode (``hgsim run --model tiny-llama`` without a GPU). Not real checkpoints,
#: so they stay out of ``MODELS`` and ``hgsim models``; ``get_model`` still finds them by name.
TINY_MODELS: dict[str, ModelSpec] = {
    spec.name: spec for spec in (
        ModelSpec(name="tiny-llama", family="llama", num_layers=2, hidden_size=64, num_heads=4,
                  num_kv_heads=2, head_dim=16, ffn_size=128, ffn_kind="swiglu", vocab_size=256,
                  max_context=1 << 20, rope_theta=10_000.0,
                  source="synthetic: Llama layout (GQA 2, SwiGLU), tiny"),
        ModelSpec(name="tiny-qwen", family="qwen", num_layers=2, hidden_size=64, num_heads=4,
                  num_kv_heads=1, head_dim=16, ffn_size=96, ffn_kind="swiglu", vocab_size=256,
                  max_context=1 << 20, qkv_bias=True, rope_theta=10_000.0,
                  source="synthetic: Qwen2.5 layout (GQA 4, q/k/v bias), tiny"),
    )
}

# Spellings people use: Hugging Face ids ("meta-llama/Llama-2-70b-hf"), no dash after the
# family ("llama2-70b"), "meta-" prefixes, chat / instruct variants (same architecture).
_PREFIXES = ("meta-",)
_SUFFIXES = ("-hf", "-chat", "-instruct", "-base")
# Punctuation is dropped when matching, so "llama-3-1-8b" and "Qwen2.5_7B" need no entry here;
# between two digits it still separates them, so "opt-1.3b" is not "opt-13b".
_EXTRA_ALIASES = {
    "opt-6b7": "opt-6.7b",
}


def _key(name: str) -> str:
    """Normalise a spelling: lower case, no org prefix or variant suffix, no punctuation."""
    text = name.strip().lower()
    text = text.rsplit("/", 1)[-1]
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if text.startswith(prefix):
                text, changed = text[len(prefix):], True
        for suffix in _SUFFIXES:
            if text.endswith(suffix):
                text, changed = text[: -len(suffix)], True
    return re.sub(r"[^a-z0-9]+", lambda m: _separator(text, m.start(), m.end()), text)


def _separator(text: str, start: int, end: int) -> str:
    """Punctuation between two digits ("3.1", "3-1", "3_1") keeps them apart as "."."""
    between_digits = 0 < start and end < len(text) and text[start - 1].isdigit() \
        and text[end].isdigit()
    return "." if between_digits else ""


def _build_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for alias, name in [*((n, n) for n in (*MODELS, *TINY_MODELS)), *_EXTRA_ALIASES.items()]:
        key = _key(alias)
        if index.get(key, name) != name:
            raise RuntimeError(f"catalog alias collision: {alias!r} -> {key!r}")
        index[key] = name
    return index


_INDEX = _build_index()


def model_names() -> list[str]:
    return list(MODELS)


def get_model(name: str | os.PathLike[str]) -> ModelSpec:
    """A model by path, user name or catalog name, in that order.

    A path to a model file (``config.json`` or YAML, see ``hgsim.model_files``) is read; a
    name of a YAML file on $HGSIM_MODEL_PATH comes next, so a user's copy shadows a catalog
    entry; then catalog names and aliases (case-insensitive, HF ids accepted). Unknown names
    are a UserError that lists the known models and suggests the closest name.
    """
    text = os.fspath(name)
    if not text.strip():
        raise UserError("an empty model name; give a name (see `hgsim models`) or the path of "
                        "a config.json or model YAML file")
    file = find_model_file(text)
    if file is not None:
        return load_model_file(file)
    canonical = _INDEX.get(_key(text))
    if canonical is not None:
        return MODELS.get(canonical) or TINY_MODELS[canonical]
    known = [*user_model_files(), *MODELS]
    close = difflib.get_close_matches(text.strip().lower(), known, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(f"unknown model '{text}'{hint} (known: {', '.join(known)}; or a path to "
                    f"a config.json or model YAML file)")
