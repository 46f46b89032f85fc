"""User-defined models: a Hugging Face config.json or a YAML ModelSpec, by path or by name on
``HGSIM_MODEL_PATH``, in every verb; what hgsim does not model is refused in one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from bad_input import user_error

from hgsim import api, model_files
from hgsim.catalog import get_model
from hgsim.cli import main
from hgsim.errors import UserError
from hgsim.model_files import spec_from_hf_config
from hgsim.study.load import load_study

#: meta-llama/Llama-3.1-8B config.json: the fields hgsim reads (published values, the same as
#: the catalog entry's) and a few it ignores.
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 131072,
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
}
#: mistralai/Mistral-7B-v0.3 config.json (no sliding window, unlike v0.1).
MISTRAL_7B_V03 = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 14336, "vocab_size": 32768, "max_position_embeddings": 32768,
    "sliding_window": None, "hidden_act": "silu", "tie_word_embeddings": False,
}
MY_MODEL_YAML = """\
family: llama
num_layers: 4
hidden_size: 1024
num_heads: 16
num_kv_heads: 4
head_dim: 64
ffn_size: 4096
ffn_kind: swiglu
vocab_size: 32000
max_context: 65536
"""


#: each test without user model directories, on an empty model-file cache (conftest)
pytestmark = pytest.mark.usefixtures("isolated_models")


def write_json(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def test_llama_config_is_the_catalog_model_and_simulates_identically(tmp_path):
    path = write_json(tmp_path / "Llama-3.1-8B" / "config.json", LLAMA_31_8B)
    spec, catalog = get_model(str(path)), get_model("llama-3.1-8b")
    assert spec.name == "Llama-3.1-8B" and spec.source == str(path.resolve())
    assert spec.model_dump(exclude={"name", "source"}) == \
        catalog.model_dump(exclude={"name", "source"})
    runs = [api.simulate("h100-80gb-spr-cxl", model, context="32k", gen=4, samples=2,
                         accuracy=False) for model in (path, "llama-3.1-8b")]
    mine, theirs = (json.dumps(dataclasses.asdict(r) | {"model": "", "wall_s": 0.0},
                               sort_keys=True, default=repr) for r in runs)  # NaN == NaN
    assert mine == theirs and runs[0].feasible and runs[0].tokens_per_s > 0


def test_mistral_closed_form_params_and_kv(tmp_path):
    spec = get_model(str(write_json(tmp_path / "mistral.json", MISTRAL_7B_V03)))
    hidden, kv_dim, ffn, vocab = 4096, 8 * 128, 14336, 32768
    per_layer = hidden * (hidden + 2 * kv_dim) + hidden * hidden + 3 * hidden * ffn
    assert spec.num_params() == 32 * per_layer + 2 * vocab * hidden == 7_247_757_312
    assert round(spec.num_params() / 1e9, 2) == 7.25
    assert spec.kv_bytes_per_token("fp16") == 2 * 32 * kv_dim * 2 == 128 * 1024
    assert (spec.family, spec.qkv_bias, spec.max_context) == ("llama", False, 32768)


def test_qwen_configs_map_to_their_layer_program():
    qwen2 = {**MISTRAL_7B_V03, "model_type": "qwen2", "sliding_window": 131072,
             "use_sliding_window": False}  # a window that is off is no window
    assert spec_from_hf_config(qwen2, "q2.json", "q2").family == "qwen"
    assert spec_from_hf_config(qwen2, "q2.json", "q2").qkv_bias
    qwen3 = {**qwen2, "model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16,
             "head_dim": 128, "layer_types": ["full_attention"] * 32}
    spec = spec_from_hf_config(qwen3, "q3.json", "q3")
    assert (spec.family, spec.qkv_bias, spec.q_dim) == ("llama", False, 2048)
    assert "q/k RMSNorm not modelled" in spec.source


@pytest.mark.parametrize("change, field", [
    ({"num_local_experts": 8, "num_experts_per_tok": 2}, "num_local_experts"),
    ({"n_routed_experts": 64}, "n_routed_experts"),
    ({"kv_lora_rank": 512}, "kv_lora_rank"),
    ({"sliding_window": 4096}, "sliding_window"),  # Mistral-7B-v0.1
    ({"sliding_window": None, "layer_types": ["sliding_attention", "full_attention"]},
     "layer_types"),
    ({"num_key_value_heads": 6}, "num_key_value_heads"),
    ({"intermediate_size": None}, "intermediate_size"),
    ({"hidden_size": "4096"}, "hidden_size"),
    ({"model_type": "gemma"}, "model_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unmodelled_configs_are_refused_naming_file_and_field(change, field):
    with pytest.raises(UserError, match=rf"^cfg\.json: {field}: "):
        spec_from_hf_config({**MISTRAL_7B_V03, **change}, "cfg.json", "x")


def test_mistral_without_a_sliding_window_field_has_hf_default_window():
    config = {k: v for k, v in MISTRAL_7B_V03.items() if k != "sliding_window"}
    with pytest.raises(UserError, match="sliding_window: 4096"):
        spec_from_hf_config(config, "cfg.json", "x")


@pytest.mark.parametrize("change", [{"num_local_experts": 8}, {"sliding_window": 4096}])
def test_cli_refuses_with_exit_2_and_one_line(tmp_path, capsys, change):
    path = write_json(tmp_path / "config.json", {**MISTRAL_7B_V03, **change})
    code = main(["simulate", "--profile", "h100-80gb-spr-cxl", "--model", str(path),
                 "--context", "8k"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"hgsim simulate: error: {path}: {next(iter(change))}: ")


def test_yaml_models_by_name_on_the_path_before_the_catalog(tmp_path, monkeypatch, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "my-1b.yaml").write_text(MY_MODEL_YAML)
    (tmp_path / "a" / "llama-2-7b.yaml").write_text(MY_MODEL_YAML.replace("4\n", "2\n", 1))
    monkeypatch.setenv(model_files.MODEL_PATH_ENV, str(tmp_path / "a"))
    spec = get_model("my-1b")
    assert (spec.name, spec.num_layers, spec.source) == (
        "my-1b", 4, str((tmp_path / "a" / "my-1b.yaml").resolve()))
    assert get_model("llama-2-7b").num_layers == 2  # the user's file shadows the catalog
    assert api.list_models()[:2] == ["llama-2-7b", "my-1b"]
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "User models ($HGSIM_MODEL_PATH)" in out and str(tmp_path / "a" / "my-1b.yaml") in out
    assert main(["models", "show", "my-1b"]) == 0
    out = capsys.readouterr().out
    assert "4,096" in out and "4 KiB" in out  # KV per token: 2 x 4 layers x 4 x 64 x 2 B


def test_bad_yaml_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(MY_MODEL_YAML.replace("num_kv_heads: 4", "num_kv_heads: 5"))
    with pytest.raises(UserError, match=r"bad\.yaml.*num_heads must be a multiple"):
        get_model(str(path))


@pytest.mark.parametrize("name", ["''", "'  '"])
def test_a_yaml_model_with_an_empty_name_is_refused_at_its_line(tmp_path, capsys, name):
    # was accepted, and every result row, table and report then named the model ''
    path = tmp_path / "blank.yaml"
    path.write_text(f"name: {name}\n" + MY_MODEL_YAML)
    line = user_error(capsys, "simulate", "--profile", "dev-zen4-2core", "--model", str(path),
                      "--context", "1k", "--gen", "2", "--samples", "1")
    assert f"{path}:1: name: the model needs a name" in line, line
    path.write_text(MY_MODEL_YAML)  # without a name: the file's
    assert get_model(str(path)).name == "blank"


STUDY = """\
name: mine
base:
  profile: h100-80gb-spr-cxl
  model: llama-2-7b
  workload: {batch: 1, context: 8k, gen: 4}
  fidelity: {decode_samples: 2, accuracy: false}
sweep:
  grid:
    model: [models/my-1b.yaml, llama-2-7b]
"""


def test_study_model_path_is_relative_to_the_study_and_keyed_by_content(tmp_path, monkeypatch):
    study = tmp_path / "study" / "s.yaml"
    model = tmp_path / "study" / "models" / "my-1b.yaml"
    model.parent.mkdir(parents=True)
    model.write_text(MY_MODEL_YAML)
    study.write_text(STUDY)
    monkeypatch.chdir(tmp_path)  # not the study's folder

    def keys() -> list[str]:
        model_files.clear_cache()
        return [p.spec.key for p in load_study(study).expansion.points]

    plan = load_study(study)
    assert [p.coords["model"] for p in plan.expansion.points] == ["my-1b", "llama-2-7b"]
    assert plan.expansion.axis_values["model"] == ["my-1b", "llama-2-7b"]
    first = keys()
    model.write_text("# a comment changes nothing computed\nsource: my notes\n" + MY_MODEL_YAML)
    assert keys() == first
    model.write_text(MY_MODEL_YAML.replace("ffn_size: 4096", "ffn_size: 8192"))
    changed = keys()
    assert changed[0] != first[0] and changed[1] == first[1]
    frame = api.run_study(study, out=tmp_path / "out", jobs=1, figures=False)
    assert list(frame["model"]) == ["my-1b", "llama-2-7b"]
    resolved = (tmp_path / "out" / "study.resolved.yaml").read_text()  # absolute model paths
    assert f"# model models/my-1b.yaml: {model.resolve()} (sha256 " in resolved
    grid = yaml.safe_load(resolved)["sweep"][0]["grid"]
    assert grid["model"] == [str(model.resolve()), "llama-2-7b"]


def test_validation_study_model_file_is_relative_to_the_study(tmp_path, monkeypatch):
    from hgsim.validation import load_study as load_validation

    write_json(tmp_path / "v" / "m" / "config.json", MISTRAL_7B_V03)
    study = tmp_path / "v" / "val.yaml"
    study.write_text("name: val\nmodel: m\nconfigs:\n  - name: a\n    policy: cpu_offload\n"
                     "    contexts: [1k]\n")  # a folder holding config.json
    monkeypatch.chdir(tmp_path)
    assert load_validation(study).model_spec().name == "m"
    study.write_text(study.read_text().replace("model: m", "model: m/nothing.json"))
    with pytest.raises(UserError, match=r"val\.yaml:2: model: .*nothing\.json: file not found"):
        load_validation(study)


def test_a_tilde_of_no_known_user_is_an_unknown_name_not_a_crash():
    from hgsim.profiles import load_profile

    with pytest.raises(UserError, match="unknown model '~nosuchuser-7b'"):
        get_model("~nosuchuser-7b")
    with pytest.raises(UserError, match="~nosuchuser/m.json: file not found"):
        get_model("~nosuchuser/m.json")
    with pytest.raises(UserError, match="unknown hardware profile '~nosuchuser-box'"):
        load_profile("~nosuchuser-box")


def test_rope_theta_comes_from_the_config_not_the_name(tmp_path):
    """The rotary base was looked up by name prefix: a config.json's own rope_theta was
    ignored (a llama-3 fine-tune named 'my-model' got Llama 2's 1e4)."""
    spec = get_model(str(write_json(tmp_path / "my-model" / "config.json",
                                    {**LLAMA_31_8B, "rope_theta": 250000.0})))
    assert spec.rope_theta == 250000.0
    newer = {k: v for k, v in LLAMA_31_8B.items() if k != "rope_theta"}
    newer["rope_parameters"] = {"rope_theta": 750000.0, "rope_type": "llama3"}
    assert spec_from_hf_config(newer, "n.json", "n").rope_theta == 750000.0
    # a config without one loads in transformers with LlamaConfig's default, 1e4
    assert get_model(str(write_json(tmp_path / "m.json", MISTRAL_7B_V03))).rope_theta == 1e4
    assert get_model("llama-3.1-8b").rope_theta == 500000.0  # the catalog states its own
    assert get_model("qwen2.5-7b").rope_theta == 1e6
    assert get_model("opt-6.7b").rope_theta is None


def test_rope_theta_is_what_the_whole_model_decode_uses(tmp_path):
    torch = pytest.importorskip("torch")
    from hw_backend.transformer import inverse_frequencies, rope_theta

    spec = get_model(str(write_json(tmp_path / "my-model.json",
                                    {**LLAMA_31_8B, "rope_theta": 250000.0})))
    assert rope_theta(spec) == 250000.0
    inv = inverse_frequencies(spec)
    assert inv[0] == 1.0 and torch.isclose(inv[1], torch.tensor(250000.0 ** (-2 / 128),
                                                               dtype=torch.float64))
    yaml_file = tmp_path / "y.yaml"
    yaml_file.write_text(MY_MODEL_YAML + "rope_theta: 1e6\n")
    assert rope_theta(get_model(str(yaml_file))) == 1e6
    yaml_file.write_text(MY_MODEL_YAML)  # none given: by name, as before
    assert rope_theta(get_model(str(yaml_file))) == 10_000.0
    assert rope_theta(get_model("opt-6.7b")) is None


@pytest.mark.parametrize("value", [0, -1.0, "big", True])
def test_a_bad_rope_theta_is_refused_naming_the_field(tmp_path, value):
    path = write_json(tmp_path / "bad.json", {**LLAMA_31_8B, "rope_theta": value})
    with pytest.raises(UserError, match="rope_theta: must be a number > 0") as info:
        get_model(str(path))
    assert str(path) in str(info.value)


def test_a_yaml_opt_model_cannot_set_rope_theta(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text(MY_MODEL_YAML.replace("family: llama", "family: opt")
                    .replace("ffn_kind: swiglu", "ffn_kind: relu") + "rope_theta: 10000\n")
    with pytest.raises(UserError, match="no rotary"):
        get_model(str(path))
