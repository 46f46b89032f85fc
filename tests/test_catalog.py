"""Model catalog: architecture numbers decide every simulated byte and FLOP, so pin them."""

from __future__ import annotations

import pytest

from hgsim.catalog import MODELS, get_model, model_names
from hgsim.errors import UserError

# Published parameter counts (model cards / papers), in billions. The catalog's count leaves
# out norms, biases and OPT's learned positions, so it must land within 3% of these.
NOMINAL_PARAMS_B = {
    "opt-6.7b": 6.7,
    "opt-13b": 13.0,
    "opt-30b": 30.0,
    "opt-66b": 66.0,
    "llama-2-7b": 6.74,
    "llama-2-13b": 13.0,
    "llama-2-70b": 69.0,
    "llama-3.1-8b": 8.03,
    "llama-3.1-70b": 70.6,
    "qwen2.5-7b": 7.61,
    "qwen2.5-14b": 14.7,
    "qwen2.5-32b": 32.5,
    "qwen2.5-72b": 72.7,
}


def test_all_thirteen_models_present():
    assert set(MODELS) == set(NOMINAL_PARAMS_B)
    assert len(MODELS) == 13
    assert model_names() == list(MODELS)


@pytest.mark.parametrize(("name", "nominal"), sorted(NOMINAL_PARAMS_B.items()))
def test_params_within_3_percent_of_nominal(name, nominal):
    params = MODELS[name].num_params() / 1e9
    assert abs(params - nominal) / nominal < 0.03, f"{name}: {params:.2f}B vs {nominal}B"


def test_kv_bytes_per_token_fp16_exact():
    # 2 (K and V) * layers * kv_heads * head_dim * 2 bytes
    assert get_model("llama-2-70b").kv_bytes_per_token("fp16") == 2 * 80 * 8 * 128 * 2 == 327_680
    assert get_model("llama-2-7b").kv_bytes_per_token("fp16") == 524_288
    assert get_model("llama-3.1-8b").kv_bytes_per_token("fp16") == 2 * 32 * 8 * 128 * 2
    assert get_model("qwen2.5-7b").kv_bytes_per_token("fp16") == 2 * 28 * 4 * 128 * 2
    assert get_model("opt-30b").kv_bytes_per_token("fp16") == 2 * 48 * 56 * 128 * 2


@pytest.mark.parametrize(
    ("name", "heads", "kv_heads", "group"),
    [
        ("opt-66b", 72, 72, 1),
        ("llama-2-13b", 40, 40, 1),
        ("llama-2-70b", 64, 8, 8),
        ("llama-3.1-8b", 32, 8, 4),
        ("llama-3.1-70b", 64, 8, 8),
        ("qwen2.5-7b", 28, 4, 7),
        ("qwen2.5-14b", 40, 8, 5),
        ("qwen2.5-32b", 40, 8, 5),
        ("qwen2.5-72b", 64, 8, 8),
    ],
)
def test_gqa_layout(name, heads, kv_heads, group):
    spec = get_model(name)
    assert (spec.num_heads, spec.num_kv_heads, spec.gqa_group) == (heads, kv_heads, group)


@pytest.mark.parametrize("spec", list(MODELS.values()), ids=list(MODELS))
def test_family_invariants(spec):
    assert spec.num_heads * spec.head_dim == spec.hidden_size
    assert spec.head_dim == 128
    if spec.family == "opt":
        assert spec.ffn_kind == "relu" and spec.ffn_size == 4 * spec.hidden_size
        assert spec.num_kv_heads == spec.num_heads
        assert (spec.vocab_size, spec.max_context, spec.qkv_bias) == (50272, 2048, True)
    elif spec.family == "llama":
        assert spec.ffn_kind == "swiglu" and not spec.qkv_bias
    else:
        assert spec.ffn_kind == "swiglu" and spec.qkv_bias
        assert spec.vocab_size == 152064
    assert spec.source.startswith("https://huggingface.co/")


def test_published_shapes():
    l31 = get_model("llama-3.1-70b")
    assert (l31.vocab_size, l31.ffn_size, l31.max_context) == (128256, 28672, 131072)
    assert get_model("llama-3.1-8b").ffn_size == 14336
    assert get_model("llama-2-70b").max_context == 4096
    ffn = {n: get_model(n).ffn_size for n in ("qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b",
                                               "qwen2.5-72b")}
    assert list(ffn.values()) == [18944, 13824, 27648, 29568]
    assert [get_model(n).num_layers for n in ffn] == [28, 48, 64, 80]


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("llama-2-70b", "llama-2-70b"),
        ("Llama-2-70B", "llama-2-70b"),
        ("LLAMA2-70B", "llama-2-70b"),
        ("meta-llama/Llama-2-70b-hf", "llama-2-70b"),
        ("llama-2-7b-chat-hf", "llama-2-7b"),
        ("opt-30b", "opt-30b"),
        ("facebook/opt-6.7b", "opt-6.7b"),
        ("OPT-6.7B", "opt-6.7b"),
        ("Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b"),
        ("llama-3-1-70b", "llama-3.1-70b"),
        ("Qwen/Qwen2.5-72B-Instruct", "qwen2.5-72b"),
        ("qwen2.5_14b", "qwen2.5-14b"),
    ],
)
def test_aliases(alias, name):
    assert get_model(alias) is MODELS[name]


def test_unknown_model_lists_names_and_suggests():
    with pytest.raises(UserError) as info:
        get_model("llama-3-8b")
    message = str(info.value)
    assert "\n" not in message
    assert "did you mean 'llama-3.1-8b'" in message
    assert all(name in message for name in MODELS)


def test_llama3_is_not_silently_llama31():
    # Llama 3 (8k context) and 3.1 (128k) differ; an alias must not merge them.
    with pytest.raises(UserError):
        get_model("Meta-Llama-3-70B")
