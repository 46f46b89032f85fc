"""Models from files: a Hugging Face ``config.json`` of a dense decoder, or a YAML ModelSpec.

The catalog (``hgsim.catalog``) holds the models HybridGen evaluates; a capacity planner's
own checkpoint comes as its published ``config.json`` (or a folder holding one), or as a YAML
file of ``ModelSpec`` fields. YAML files in a directory on ``HGSIM_MODEL_PATH`` are models by
name (``<name>.yaml``), searched before the catalog as profiles are (``hgsim.search_path``).

A config.json is read only where hgsim models its architecture exactly; what it cannot model
(mixture of experts, sliding-window or hybrid attention, latent attention, biases it has no
kernel for) is refused with one line naming the file and the field, rather than simulated as
something else. ``model_type`` picks the layer program (``ModelSpec.family``, which sets the
norm kind and the per-op kernel counts of ``hgsim.graph_path``):

* ``llama``, ``mistral`` -> llama (RMSNorm, rotary, SwiGLU, no biases);
* ``qwen2`` -> qwen (llama's layer plus q/k/v biases);
* ``qwen3`` -> llama, an approximation recorded in ``source``: Qwen3 adds an RMSNorm over each
  query and key head (``q_norm``, ``k_norm``). Their weights (2 x head_dim per layer) and
  FLOPs are under 2e-5 of the layer's (Qwen3-0.6B; 1.3e-6 for 8B); what the simulator leaves
  out is their kernels on the CUDA-graph path: the qkv replay's count (``GRAPH_KERNELS``) is
  llama's, 12 (fp32) or 18 (16-bit) kernels short per layer (hw_backend's RMSNorm issues 6
  or 9). The per-launch path of every shipped profile charges per simulated kernel and is
  unaffected;
* ``opt`` -> opt (pre-norm LayerNorm, ReLU, biases everywhere).

The rotary base is the config's ``rope_theta`` (or ``rope_parameters.rope_theta``, where newer
transformers write it), else transformers' default for these architectures, 1e4; it sets
``ModelSpec.rope_theta``, which hw_backend's whole-model decode uses (values, not cost).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hgsim.config_io import humane, load_yaml, validate
from hgsim.config_read import read_text
from hgsim.errors import ConfigError, quoted
from hgsim.search_path import (
    YAML_SUFFIXES,
    existing_file,
    load_cached,
    named_files,
    search_dirs,
    user_path,
)
from hgsim.specs.model import ModelSpec
from hgsim.specs.numbers import magnitude_text

#: Colon-separated directories of ``<name>.yaml`` model files, searched before the catalog.
MODEL_PATH_ENV = "HGSIM_MODEL_PATH"
#: What a model file's name ends in (a folder is read through its ``config.json``).
MODEL_SUFFIXES = (".json", *YAML_SUFFIXES)

#: model_type -> (family, q/k/v bias, note on what the mapping leaves out).
_HF_TYPES: dict[str, tuple[str, bool, str]] = {
    "llama": ("llama", False, ""),
    "mistral": ("llama", False, ""),
    "qwen2": ("qwen", True, ""),
    "qwen3": ("llama", False, "qwen3 as llama: per-head q/k RMSNorm not modelled"),
    "opt": ("opt", True, ""),
}
#: ``sliding_window`` when a config leaves it out (Hugging Face's MistralConfig: 4096).
_WINDOW_DEFAULT = {"mistral": 4096}
#: ``rope_theta`` when a config gives none (LlamaConfig, MistralConfig, Qwen2Config and
#: Qwen3Config all default to it).
_ROPE_THETA_DEFAULT = 10_000.0
#: Fields that make a config a mixture of experts when set.
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")

#: ModelSpec field -> the config.json field it comes from (where the names differ).
_HF_FIELDS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
              "num_kv_heads": "num_key_value_heads", "max_context": "max_position_embeddings",
              "tied_embeddings": "tie_word_embeddings"}

_cache: dict[tuple[str, int, int], ModelSpec] = {}


def model_dirs() -> list[Path]:
    """Directories searched for model names: those of $HGSIM_MODEL_PATH, in order."""
    return search_dirs(MODEL_PATH_ENV)


def user_model_files() -> dict[str, Path]:
    """Name -> YAML file of every model on $HGSIM_MODEL_PATH (the first directory wins)."""
    return named_files(model_dirs())


def is_model_path(text: str) -> bool:
    """Whether ``text`` means a file rather than a name: a model file suffix, or it exists.

    A slash alone does not decide: ``meta-llama/Llama-2-7b-hf`` is a catalog alias."""
    path = user_path(text)
    return path.suffix.lower() in MODEL_SUFFIXES or path.exists()


def beside(name: str, base_dir: Path) -> str:
    """What ``get_model`` should get for ``name`` written in a file in ``base_dir`` (a study):
    a model file path relative to that file's folder, anything else as it is."""
    if not name.strip():  # get_model says it is empty; base_dir / "" is the folder itself
        return name
    candidate = str(base_dir / user_path(name))
    return candidate if is_model_path(candidate) else name


def find_model_file(text: str) -> Path | None:
    """The file a ``--model`` value names: a path (a folder stands for its ``config.json``),
    else a name on $HGSIM_MODEL_PATH; None for anything else (a catalog name)."""
    if not is_model_path(text):
        return user_model_files().get(text)
    path = user_path(text)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError("folder has no config.json", source=text)
        return path / "config.json"
    return existing_file(text)


def load_model_file(path: str | os.PathLike[str]) -> ModelSpec:
    """The model a file (or a folder holding ``config.json``) describes; cached by path,
    mtime and size, so an edited file is read again."""
    text = os.fspath(path)
    file = find_model_file(text) if is_model_path(text) else existing_file(text)
    return load_cached(file, _cache, _load)


def clear_cache() -> None:
    _cache.clear()


def _load(path: Path) -> ModelSpec:
    if path.suffix.lower() == ".json":
        return spec_from_hf_config(_read_json(path), str(path), _default_name(path))
    doc = load_yaml(path)
    if isinstance(doc.data, dict):
        doc.data.setdefault("name", path.stem)
        doc.data.setdefault("source", str(path))
    return validate(ModelSpec, doc)


def _default_name(path: Path) -> str:
    """``models/Mistral-7B-v0.3/config.json`` -> Mistral-7B-v0.3; ``my-7b.json`` -> my-7b."""
    return path.parent.name if path.stem == "config" and path.parent.name else path.stem


class _KeyTwice(Exception):
    """A JSON object names one key twice."""


def _no_key_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json``'s object hook: a key given twice is an error (json keeps the last silently,
    so a hand-edited config.json would run on whichever value came second)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _KeyTwice(key)
        data[key] = value
    return data


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_text(path), object_pairs_hook=_no_key_twice)
    except _KeyTwice as exc:
        raise ConfigError(f"{quoted(str(exc.args[0]))} is given twice (which one is meant?)",
                          source=str(path)) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc.msg} (line {exc.lineno})",
                          source=str(path)) from None
    except ValueError:  # int() refuses the digits of a number json matched (no line known)
        raise ConfigError(f"a number has more than the {sys.get_int_max_str_digits():,} digits "
                          "Python reads", source=str(path)) from None
    except RecursionError:  # [[[[... nested past the interpreter's stack
        raise ConfigError("arrays or objects nested too deep for Python's JSON reader (a "
                          "config.json nests a few levels)", source=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("a config.json holds one JSON object", source=str(path))
    return data


# ---------------------------------------------------------------------------- config.json
def spec_from_hf_config(config: dict[str, Any], source: str, name: str) -> ModelSpec:
    """The ModelSpec of a Hugging Face ``config.json`` (see the module doc for what maps to
    what); anything hgsim does not model is a ConfigError naming ``source`` and the field."""

    def refuse(field: str, message: str) -> ConfigError:
        return ConfigError(message, source=source, field=field)

    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise refuse("model_type", "required: the architecture (llama, mistral, qwen2, ...)")
    for field in _MOE_FIELDS:
        if config.get(field) not in (None, 0):
            raise refuse(field, f"{config[field]}: a mixture-of-experts model; hgsim models "
                                "dense decoders only")
    if config.get("kv_lora_rank") is not None:
        raise refuse("kv_lora_rank", "multi-head latent attention (MLA) is not modelled; "
                                     "hgsim models dense decoders with plain or grouped KV")
    if model_type not in _HF_TYPES:
        raise refuse("model_type", f"'{model_type}' is not a supported architecture "
                                   f"(supported: {', '.join(sorted(_HF_TYPES))})")
    _refuse_windowed_attention(config, _WINDOW_DEFAULT.get(model_type), refuse)
    family, qkv_bias, note = _HF_TYPES[model_type]

    def whole(field: str, default: int | None = None) -> int:
        value = config.get(field)
        value = default if value is None else value
        if value is None:
            raise refuse(field, f"required for a {model_type} model")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise refuse(field, f"must be a whole number > 0, got {value!r}")
        return value

    def flag(field: str, default: bool) -> bool:
        value = config.get(field, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise refuse(field, f"must be true or false, got {value!r}")
        return value

    layers, hidden = whole("num_hidden_layers"), whole("hidden_size")
    heads = whole("num_attention_heads")
    kv_heads = whole("num_key_value_heads", heads)
    if heads % kv_heads:
        raise refuse("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads "
                                            f"{heads} (each KV head serves whole query heads)")
    if config.get("head_dim") is None and hidden % heads:
        raise refuse("num_attention_heads", f"{heads} does not divide hidden_size {hidden} "
                                            "and there is no head_dim")
    head_dim = whole("head_dim", hidden // heads)
    if family == "opt":
        ffn_kind = _opt_layout(config, hidden, refuse)
        ffn = whole("ffn_dim")
    else:
        ffn_kind = "swiglu"
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise refuse("hidden_act", f"'{act}': the gated FFN hgsim models is SwiGLU (silu)")
        for field in ("attention_bias", "mlp_bias"):
            if flag(field, False):
                raise refuse(field, f"true: {model_type} then adds biases to every projection "
                                    "(o and FFN too), which hgsim does not model")
        ffn = whole("intermediate_size")
    rope_theta = None if family == "opt" else _rope_theta(config, refuse)
    try:
        return ModelSpec(
            name=name, family=family, num_layers=layers, hidden_size=hidden, num_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim, ffn_size=ffn, ffn_kind=ffn_kind,
            vocab_size=whole("vocab_size"), max_context=whole("max_position_embeddings"),
            qkv_bias=qkv_bias, tied_embeddings=flag("tie_word_embeddings", family == "opt"),
            rope_theta=rope_theta, source=f"{source} ({note})" if note else source,
        )
    except ValidationError as exc:  # ModelSpec's own checks (plausible sizes): name the
        first = exc.errors(include_url=False)[0]  # file and the config.json field
        spec_field = str(first["loc"][0]) if first["loc"] else ""
        field = _HF_FIELDS.get(spec_field, spec_field)
        if field == "ffn_size":
            field = "ffn_dim" if family == "opt" else "intermediate_size"
        if field == "head_dim" and config.get("head_dim") is None:
            field = "head_dim (hidden_size / num_attention_heads)"
        raise ConfigError(humane(first), source=source, field=field or None) from None


def _rope_theta(config: dict[str, Any], refuse) -> float:
    """The rotary base a config gives (top level, or in ``rope_parameters``), else the
    default transformers loads it with."""
    field, value = "rope_theta", config.get("rope_theta")
    parameters = config.get("rope_parameters")
    if value is None and isinstance(parameters, dict):
        field, value = "rope_parameters.rope_theta", parameters.get("rope_theta")
    if value is None:
        return _ROPE_THETA_DEFAULT
    try:  # an int too large for a float overflows here rather than in math.isfinite
        theta = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else None
    except OverflowError:
        theta = None
    if theta is None or not math.isfinite(theta) or theta <= 0:
        shown = magnitude_text(value) if isinstance(value, int) and theta is None \
            and not isinstance(value, bool) else repr(value)
        raise refuse(field, f"must be a number > 0, got {shown}")
    return theta


def _refuse_windowed_attention(config: dict[str, Any], default_window: int | None,
                               refuse) -> None:
    """Decode cost here is full attention over the whole context; a window that is in force
    on some or all layers changes what is read, so such configs are refused."""
    window = config.get("sliding_window", default_window)
    if window is not None and config.get("use_sliding_window", True) is not False:
        raise refuse("sliding_window", f"{window}: sliding-window attention is in force "
                                       "(use_sliding_window is not false); hgsim models full "
                                       "attention only")
    layer_types = config.get("layer_types")
    if layer_types is not None:
        # each as written (a list may hold anything: ints, lists), once, in order
        windowed = list(dict.fromkeys(t if isinstance(t, str) else json.dumps(t)
                                      for t in layer_types if t != "full_attention")) \
            if isinstance(layer_types, list) else [json.dumps(layer_types)]
        if windowed:
            raise refuse("layer_types", f"{', '.join(map(str, windowed))} layers: hybrid "
                                        "attention is not modelled (full_attention only)")


def _opt_layout(config: dict[str, Any], hidden: int, refuse) -> str:
    """OPT as the catalog models it: pre-norm, biases, embeddings as wide as the model."""
    if config.get("do_layer_norm_before", True) is not True:
        raise refuse("do_layer_norm_before", "post-norm OPT (opt-350m) is not modelled")
    if config.get("enable_bias", True) is not True:
        raise refuse("enable_bias", "OPT without biases is not modelled")
    projection = config.get("word_embed_proj_dim", hidden)
    if projection != hidden:
        raise refuse("word_embed_proj_dim", f"{projection} differs from hidden_size {hidden}: "
                                            "the embedding projections are not modelled")
    act = config.get("activation_function", "relu")
    if act not in ("relu", "gelu"):
        raise refuse("activation_function", f"'{act}': OPT's FFN is relu or gelu here")
    return act
