"""Inputs the fuzz tests (test_input_fuzz.py, test_config_read.py) found crashing, each kept
as a plain case: one line naming the file (and field, flag), never a traceback."""

from __future__ import annotations

import json

import pytest
from bad_input import user_error, write
from test_model_files import LLAMA_31_8B, MY_MODEL_YAML

from hgsim import model_files
from hgsim.errors import ConfigError


@pytest.fixture(autouse=True)
def isolated_models(monkeypatch):
    monkeypatch.delenv(model_files.MODEL_PATH_ENV, raising=False)
    model_files.clear_cache()
    yield
    model_files.clear_cache()


def config_json(tmp_path, **changes):
    return write(tmp_path / "config.json", json.dumps({**LLAMA_31_8B, **changes}))


# ------------------------------------------------------------------ integers past float's range
@pytest.mark.parametrize(("field", "value", "shown"), [
    ("hidden_size", 10**400, "an integer of about 401 digits"),
    ("max_position_embeddings", -(10**400), None),  # refused as not > 0 before any size check
    ("num_hidden_layers", 10**200, "1e+200"),
])
def test_config_json_integer_too_large_for_a_float_names_file_and_field(tmp_path, field, value,
                                                                         shown):
    """Was OverflowError (int too large to convert to float) from the plausibility check."""
    path = config_json(tmp_path, **{field: value})
    with pytest.raises(ConfigError) as info:
        model_files.load_model_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {field}: ") and "\n" not in message, message
    if shown:
        assert f"{shown} is not a plausible value" in message


def test_yaml_model_integer_too_large_for_a_float_is_one_line(tmp_path, capsys):
    path = write(tmp_path / "my.yaml",
                 MY_MODEL_YAML.replace("hidden_size: 1024", "hidden_size: 1" + "0" * 400))
    line = user_error(capsys, "models", "show", str(path))
    assert line.endswith(f"{path}:3: hidden_size: an integer of about 401 digits is not a "
                         "plausible value (non-zero magnitudes must lie between 1e-09 and 1e+12 "
                         "in the field's unit)"), line


# ------------------------------------------------------------------ layer_types of any shape
@pytest.mark.parametrize(("layer_types", "shown"), [
    ([{"a": 1}], '{"a": 1}'),  # was TypeError: unhashable type: 'dict'
    ([[1]], "[1]"),  # was TypeError: unhashable type: 'list'
    ([1, "sliding_attention"], "1, sliding_attention"),  # was TypeError: '<' between str, int
    ({"x": 1}, '{"x": 1}'),
])
def test_layer_types_of_any_shape_is_refused_in_one_line(tmp_path, layer_types, shown):
    path = config_json(tmp_path, layer_types=layer_types)
    with pytest.raises(ConfigError) as info:
        model_files.load_model_file(path)
    assert str(info.value) == (f"{path}: layer_types: {shown} layers: hybrid attention is not "
                               "modelled (full_attention only)")
