"""Fuzzing the input surfaces other than profiles and studies (those are in
test_config_read.py): model files (a Hugging Face config.json, a YAML ModelSpec) and
validation studies. Each either loads to something the simulator can use or raises one line
naming the file; nothing else escapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_model_files import LLAMA_31_8B, MY_MODEL_YAML

from hgsim import model_files
from hgsim.errors import UserError
from hgsim.specs.model import DTYPE_BYTES

REPO = Path(__file__).resolve().parent.parent

#: Values a field of a config.json should not have (and a few it may).
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 2), st.integers(min_value=2**31),
    st.sampled_from([10**12 + 1, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["4096", "4k", "", "silu", "full_attention", "1e999"]),
    st.lists(st.integers() | st.text(max_size=3) | st.just([]) | st.dictionaries(
        st.text(max_size=2), st.integers(), max_size=2), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers() | st.none(), max_size=3),
)
MISSING = object()
#: Fields hgsim reads from a config.json, and a few it refuses when set.
FIELDS = sorted({*LLAMA_31_8B, "head_dim", "sliding_window", "use_sliding_window",
                 "layer_types", "num_experts", "num_local_experts", "n_routed_experts",
                 "kv_lora_rank", "ffn_dim", "do_layer_norm_before", "enable_bias",
                 "word_embed_proj_dim", "activation_function"})


#: each test without user model directories, on an empty model-file cache (conftest)
pytestmark = pytest.mark.usefixtures("isolated_models")


def loads_usable_or_names_file(path: Path) -> None:
    """The contract of ``load_model_file``: a spec whose derived sizes are finite and > 0, or
    one line naming the file."""
    model_files.clear_cache()
    try:
        spec = model_files.load_model_file(path)
    except UserError as exc:
        message = str(exc)
        assert "\n" not in message and str(path) in message, message
        return
    for dtype in DTYPE_BYTES:
        for value in (spec.num_params(), spec.kv_bytes_per_token(dtype),
                      spec.weight_bytes(dtype)):
            assert math.isfinite(float(value)) and value > 0, (dtype, value)


def damage(data, text: bytes, extra: list[bytes]) -> bytes:
    at = data.draw(st.integers(0, len(text)))
    cut = data.draw(st.integers(0, 8))
    noise = data.draw(st.binary(max_size=10) | st.sampled_from(extra))
    return text[:at] + noise + text[at + cut:]


# ------------------------------------------------------------------ config.json
@settings(max_examples=400, deadline=None, database=None)
@given(st.data())
def test_config_json_with_any_field_value_loads_or_names_the_file(tmp_path_factory, data):
    config = dict(LLAMA_31_8B)
    model_type = data.draw(st.sampled_from(["llama", "mistral", "qwen2", "qwen3", "opt"]))
    config["model_type"] = model_type
    if model_type == "mistral":
        config["sliding_window"] = None
    for field in data.draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=2)):
        value = data.draw(st.just(MISSING) | JUNK)
        if value is MISSING:
            config.pop(field, None)
        else:
            config[field] = value
    path = tmp_path_factory.mktemp("hf") / "config.json"
    path.write_text(json.dumps(config))
    loads_usable_or_names_file(path)


@settings(max_examples=150, deadline=None, database=None)
@given(st.data())
def test_damaged_config_json_loads_or_names_the_file(tmp_path_factory, data):
    text = json.dumps(LLAMA_31_8B, indent=2).encode()
    damaged = damage(data, text, [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"[", b"{",
                                  b'"', b"\\u0000", b"\xef\xbb\xbf", b"\xc3", b"0", b"-",
                                  b"9" * 400, b"null", b"true"])
    path = tmp_path_factory.mktemp("hf") / "config.json"
    path.write_bytes(damaged)
    loads_usable_or_names_file(path)


# ------------------------------------------------------------------ YAML ModelSpec
@settings(max_examples=150, deadline=None, database=None)
@given(st.data())
def test_damaged_yaml_model_loads_or_names_the_file(tmp_path_factory, data):
    damaged = damage(data, MY_MODEL_YAML.encode(),
                     [b"*a", b"&a ", b"<<: ", b"? ", b"[", b"{", b": :", b"\t", b"1e999",
                      b".nan", b".inf", b"-1", b"0", b"true", b"~", b"9" * 400, b"0x10",
                      b"1_000", b"---\n"])
    path = tmp_path_factory.mktemp("m") / "my.yaml"
    path.write_bytes(damaged)
    loads_usable_or_names_file(path)


# ------------------------------------------------------------------ validation studies
@settings(max_examples=120, deadline=None, database=None)
@given(st.data(), st.sampled_from(["validation.yaml", "validation_model_standin.yaml"]))
def test_damaged_validation_study_loads_or_gives_a_user_error(tmp_path_factory, data, seed):
    from hgsim.validation import load_study

    text = (REPO / "studies" / seed).read_bytes()
    text = text[text.index(b"\nname:"):]  # the comments are a large target of little use
    damaged = damage(data, text, [b"*x", b"&x ", b"1e999", b".nan", b".inf", b"true", b"-1",
                                  b"0", b"[]", b"{}", b"~", b"9" * 400, b"\n  - 1k",
                                  b"\nmodel: llama-3.1-8b", b"\nmodel: nope.json",
                                  b"\nhbm_budget_gb: 1e-9", b"\nmicro: {}"])
    path = tmp_path_factory.mktemp("v") / "v.yaml"
    path.write_bytes(damaged)
    try:
        load_study(path)
    except UserError as exc:
        assert "\n" not in str(exc), str(exc)
