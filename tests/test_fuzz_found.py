"""Inputs the fuzz tests (test_input_fuzz.py, test_config_read.py) found crashing, each kept
as a plain case: one line naming the file (and field, flag), never a traceback."""

from __future__ import annotations

import json
import os

import pytest
from bad_input import user_error, write
from test_model_files import LLAMA_31_8B, MY_MODEL_YAML

from hgsim import model_files
from hgsim.errors import ConfigError

#: each test without user model directories, on an empty model-file cache (conftest)
pytestmark = pytest.mark.usefixtures("isolated_models")


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


def test_config_json_rope_theta_too_large_for_a_float_names_file_and_field(tmp_path):
    """Was OverflowError from the rotary base's check (test_input_fuzz, 2026-12-07)."""
    path = config_json(tmp_path, rope_theta=10**400)
    with pytest.raises(ConfigError) as info:
        model_files.load_model_file(path)
    message = str(info.value)
    assert message == (f"{path}: rope_theta: must be a number > 0, got an integer of about "
                       "401 digits"), message


@pytest.mark.parametrize(("field", "shown"), [
    ("model_type", "model_type: '\\n' is not a supported architecture"),
    ("n_routed_experts", "n_routed_experts: \\n: a mixture-of-experts model"),
    ("hidden_act", "hidden_act: '\\n': the gated FFN"),
])
def test_config_json_value_with_a_line_break_is_quoted_on_one_line(tmp_path, field, shown):
    """A string holding a newline was quoted raw into the error (test_input_fuzz, 2026-12-07)."""
    path = config_json(tmp_path, **{field: "\n"})
    with pytest.raises(ConfigError) as info:
        model_files.load_model_file(path)
    message = str(info.value)
    assert "\n" not in message and f"{path}: {shown}" in message, message


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


# ------------------------------------------------------------------ scalars Python cannot build
def test_config_json_integer_with_more_digits_than_python_reads(tmp_path):
    """Was ValueError: Exceeds the limit (4300 digits) for integer string conversion."""
    path = write(tmp_path / "config.json",
                 json.dumps(LLAMA_31_8B).replace("4096", "4" * 5000, 1))
    with pytest.raises(ConfigError) as info:
        model_files.load_model_file(path)
    assert str(info.value) == f"{path}: a number has more than the 4,300 digits Python reads"


@pytest.mark.parametrize(("value", "reason"), [
    ("4" * 5000, f"{'4' * 20}...: not a valid integer (5,000 characters, over the "
                 "4,300 digits Python reads)"),
    ("2024-13-45", "2024-13-45: not a valid date (month must be in 1..12)"),
])
def test_yaml_scalar_python_cannot_build_names_its_line(tmp_path, capsys, value, reason):
    """Was ValueError (int's digit limit; datetime's month range) from building the document,
    in every YAML the CLI reads (model files here, profiles and studies the same way)."""
    path = write(tmp_path / "my.yaml", MY_MODEL_YAML.replace("vocab_size: 32000",
                                                            f"vocab_size: {value}"))
    line = user_error(capsys, "models", "show", str(path))
    assert line.endswith(f"{path}:9: vocab_size: {reason}"), line


# ------------------------------------------------------------------ names no file system takes
LONG = "9" * 400


@pytest.mark.parametrize(("argv", "shown"), [
    (("validate", "--profile", LONG), "...(400 characters): file name too long (a part of 400"),
    (("simulate", "--profile", LONG, "--model", "opt-6.7b", "--context", "1k"), "(400 char"),
    (("simulate", "--profile", "dev-zen4-2core", "--model", LONG, "--context", "1k"), "(400 c"),
    (("simulate", "--profile", "dev-zen4-2core", "--model", f"m/{LONG}.json", "--context",
      "1k"), f"m/{'9' * 38}...(407 characters): file name too long (a part of 405 bytes; at most 255)"),
    (("models", "show", LONG), "(400 characters): file name too long"),
    (("profiles", "show", LONG), "(400 characters): file name too long"),
])
def test_name_longer_than_a_file_name_is_one_line(capsys, argv, shown):
    """Was OSError: [Errno 36] File name too long, from pathlib's is_file/exists while
    deciding whether the value is a path or a name."""
    line = user_error(capsys, *argv)
    assert shown in line, line


# ------------------------------------------------------------------ values that hold line breaks
@pytest.mark.parametrize(("argv", "shown"), [
    (("models", "show", "a\x85b"), "unknown model 'a\\x85b'"),
    (("models", "show", "a\nb"), "unknown model 'a\\nb'"),
    (("profiles", "show", "x\u2028y"), "unknown hardware profile 'x\\u2028y'"),
    (("simulate", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--context", "1k",
      "--policy", "a\rb"), "a\\rb"),
    (("policies", "a\nb"), "unknown policy 'a\\nb'"),
    (("simulate", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--context", "1k",
      "a\nb"), "unrecognized arguments: a\\nb (see hgsim simulate --help)"),
])
def test_error_quoting_a_line_break_stays_one_line(capsys, argv, shown):
    """Was two lines on stderr: the message quoted the value as typed, and U+0085 (or \\n,
    \\r, U+2028) broke it."""
    line = user_error(capsys, *argv)
    assert shown in line, line



@pytest.mark.parametrize(("flag", "argv"), [
    ("--trace", ("simulate", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--context",
                 "1k", "--gen", "4", "--samples", "2", "--trace", LONG)),
    ("--out", ("validate", "--profile", "dev-zen4-2core", "--out", LONG)),
    ("--out", ("study", "STUDY", "--dry-run", "--out", LONG)),
    ("--scheduler-file", ("study", "STUDY", "--executor", "dask", "--scheduler-file", LONG)),
    ("--out", ("run", "--model", "opt-6.7b", "--context", "1k", "--out", LONG)),
])
def test_output_path_longer_than_a_file_name_names_its_flag(tmp_path, capsys, monkeypatch,
                                                            flag, argv):
    """Was OSError: [Errno 36] File name too long from the output checks' is_dir()/exists(),
    before anything was written."""
    from bad_input import STUDY

    monkeypatch.chdir(tmp_path)
    study = str(write(tmp_path / "s.yaml", STUDY))
    line = user_error(capsys, *(study if part == "STUDY" else part for part in argv))
    assert line.endswith(f"error: {flag}: {'9' * 40}...(400 characters): file name too long "
                         "(a part of 400 bytes; at most 255)"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_profiles_check_of_a_name_too_long_is_one_line(capsys):
    """Was OSError: [Errno 36] File name too long from Path.is_file()."""
    line = user_error(capsys, "profiles", "check", LONG)
    assert line.endswith("(400 characters): file name too long (a part of 400 bytes; at "
                         "most 255)"), line


# ------------------------------------------------------------------ empty names and paths
@pytest.mark.parametrize(("argv", "message"), [
    (("study", ""), "an empty file name; give the path of a study YAML file"),  # was '.: is a
    (("validate", "--profile", "dev-zen4-2core", "--study", " "),  # folder, not a file'
     "an empty file name; give the path of a YAML file"),
    (("profiles", "check", ""), "an empty name; give a name or the path of a file"),  # was
    # 'not a regular file', naming nothing
    (("models", "show", ""), "an empty model name; give a name (see `hgsim models`) or the "
                             "path of a config.json or model YAML file"),  # was 'folder has
    # no config.json'
    (("simulate", "--profile", "dev-zen4-2core", "--model", " ", "--context", "1k"),
     "an empty model name"),
    (("simulate", "--profile", "", "--model", "opt-6.7b", "--context", "1k"),
     "an empty hardware profile name; give a name (see `hgsim profiles`) or the path of a "
     "YAML file"),
])
def test_empty_name_or_path_says_it_is_empty(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    line = user_error(capsys, *argv)
    assert line.split(": error: ", 1)[1].startswith(message), line


# ------------------------------------------------------------------ a NUL byte in a file name
@pytest.mark.parametrize(("argv", "message"), [
    (("study", "a\x00b"), "a\\x00b: a NUL byte (\\x00) in the file name"),
    (("validate", "--profile", "dev-zen4-2core", "--study", "v\x00"),
     "v\\x00: a NUL byte (\\x00) in the file name"),
    (("profiles", "check", "p\x00"), "p\\x00: a NUL byte (\\x00) in a file name"),
    (("models", "show", "m\x00.json"), "m\\x00.json: a NUL byte (\\x00) in a file name"),
    (("simulate", "--profile", "p\x00", "--model", "opt-6.7b", "--context", "1k"),
     "p\\x00: a NUL byte (\\x00) in a file name"),
    (("simulate", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--context", "1k",
      "--gen", "4", "--samples", "2", "--trace", "t\x00"),
     "--trace: t\\x00: a NUL byte (\\x00) in a file name"),
    (("run", "--model", "opt-6.7b", "--context", "1k", "--out", "o\x00"),
     "--out: o\\x00: a NUL byte (\\x00) in a file name"),
])
def test_nul_byte_in_a_file_name_is_one_line(tmp_path, capsys, monkeypatch, argv, message):
    """Was ValueError: embedded null byte from open() (study, validate --study); elsewhere
    pathlib answered False and the NUL went raw into the message."""
    monkeypatch.chdir(tmp_path)
    line = user_error(capsys, *argv)
    assert line.split(": error: ", 1)[1] == message, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("verb", "text"), [
    ("study", "name: tiny\nbase:\n  profile: dev-zen4-2core\n  model: ''\n  policy: hybridgen\n"
              "  workload: {batch: 1, context: 1k, gen: 4}\n"),
    ("validate", "name: v\nmodel: ''\nconfigs: []\n"),
])
def test_empty_model_in_a_study_names_file_line_and_field(tmp_path, capsys, verb, text):
    """Was '<study>:4: base.model: <study's folder>: folder has no config.json' (the empty
    name joined to the study's folder is the folder)."""
    path = write(tmp_path / "s.yaml", text)
    argv = (("study", str(path), "--dry-run") if verb == "study" else
            ("validate", "--profile", "dev-zen4-2core", "--study", str(path)))
    line = user_error(capsys, *argv)
    field = "base.model" if verb == "study" else "model"
    assert line.endswith(f"{path}:{2 if verb == 'validate' else 4}: {field}: an empty model "
                         "name; give a name (see `hgsim models`) or the path of a config.json "
                         "or model YAML file"), line


# ------------------------------------------------------------------ a serve trace's hostile cells
TRACE_HEADER = "arrival_s,prompt_tokens,output_tokens\n"


@pytest.mark.parametrize(("row", "message"), [
    # was 'expected a whole number' (Python reads at most 4300 digits as an int)
    (f"0,{'9' * 5000},4", "prompt_tokens: a 5000-digit number is too large (at most "
                          "4294967296 a request)"),
    (f"0,100,{'9' * 5000}", "output_tokens: a 5000-digit number is too large (at most "
                            "1048576 a request)"),
    # was 'at most 4294967296 a request, got ' and all 400 digits
    (f"0,{'9' * 400},4", "prompt_tokens: a 400-digit number is too large (at most 4294967296 "
                         "a request)"),
    (f"0,-{'9' * 5000},4", "prompt_tokens: must be at least 1, got a negative 5000-digit "
                           "number"),
    # was 'must be a finite number of seconds, got inf' for digits that were no 'inf'
    (f"{'9' * 5000},100,4", "arrival_s: '999999999999999999999999'... is too large a number "
                            "of seconds (past a float's range)"),
    ("1e999,100,4", "arrival_s: '1e999' is too large a number of seconds (past a float's "
                    "range)"),
    ("nan,100,4", "arrival_s: must be a finite number of seconds, got nan"),
    ("inf,100,4", "arrival_s: must be a finite number of seconds, got inf"),
    ("0,nan,4", "prompt_tokens: expected a whole number, got 'nan'"),
    ("0,1e999,4", "prompt_tokens: expected a whole number, got '1e999'"),
    ("0,-0,4", "prompt_tokens: must be at least 1, got 0"),
])
def test_serve_trace_hostile_cell_is_one_line(tmp_path, capsys, row, message):
    trace = write(tmp_path / "t.csv", f"{TRACE_HEADER}{row}\n")
    line = user_error(capsys, "serve", "--profile", "dev-zen4-2core", "--model", "opt-6.7b",
                      "--policy", "gpu_only", "--no-progress", "--trace", str(trace))
    assert line == f"hgsim serve: error: {trace}:2: {message}", line


@pytest.mark.parametrize("text", [
    f"\ufeff{TRACE_HEADER}0,100,4\n",  # a spreadsheet's byte-order mark
    TRACE_HEADER.replace("\n", "\r\n") + "0,100,4\r\n",  # Windows line ends
    f"{TRACE_HEADER}-0,100,4\n",  # negative zero: the start
])
def test_serve_trace_bom_crlf_negative_zero_read_as_plain(tmp_path, text):
    from hgsim.serving.requests import Request, read_trace

    trace = write(tmp_path / "t.csv", text)
    requests = read_trace(trace)
    assert requests == [Request(0, 0.0, 100, 4)]
    assert str(requests[0].arrival_s) == "0.0"  # not -0.0 (its rows are written out)


# ------------------------------------------------------------------ an output the disk refuses
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
@pytest.mark.parametrize("argv", [
    ("simulate", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--context", "1k",
     "--gen", "4", "--samples", "2", "--trace", "/dev/full"),
    ("serve", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--policy", "gpu_only",
     "--no-progress", "--rate", "1", "--prompt", "1k", "--output", "4", "--requests", "3",
     "--requests-csv", "/dev/full"),
])
def test_output_the_disk_refuses_is_one_line(capsys, argv):
    """Was OSError: [Errno 28] No space left on device, a traceback after the whole run (found
    by hand: /dev/full fails every write as a full disk does)."""
    line = user_error(capsys, *argv)
    assert line == (f"hgsim {argv[0]}: error: /dev/full: cannot write it (No space left on "
                    "device)"), line


# ------------------------------------------------------------------ the flag of an unknown policy
@pytest.mark.parametrize("argv", [
    ("simulate", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--context", "1k"),
    ("serve", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--rate", "1"),
])
def test_unknown_policy_names_the_policy_flag(capsys, argv):
    """Was 'error: policy: unknown policy ...': the simulator's field, no flag of the CLI."""
    line = user_error(capsys, *argv, "--policy", "hybridgn")
    assert line.startswith(f"hgsim {argv[0]}: error: --policy: unknown policy 'hybridgn' (did "
                           "you mean 'hybridgen'?); known: hybridgen, gpu_only, "), line


# ------------------------------------------------------------------ KEY=VALUE flags of many digits
SIMULATE_SMALL = ("simulate", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--context",
                  "1k", "--gen", "4", "--samples", "2")


@pytest.mark.parametrize(("extra", "message"), [
    # was '--option interval: input should be a finite number' (int() refuses over 4300
    # digits, and the value was read as the float inf)
    (("--option", f"interval={'9' * 5000}"), "--option interval: a 5000-digit number is too "
                                             "large (at most 18 digits)"),
    (("--selection", f"history_queries={'9' * 5000}"), "--selection history_queries: a "
                                                       "5000-digit number is too large (at most "
                                                       "18 digits)"),
    # was '... got ' and all 400 digits
    (("--selection", f"history_queries={'9' * 400}"), "--selection history_queries: a 400-digit "
                                                      "number is too large (at most 18 digits)"),
    # was the whole pair quoted
    (("--selection", "9" * 5000), f"--selection: expects KEY=VALUE, got '{'9' * 40}'...(5,000 "
                                  "characters)"),
])
def test_key_value_flag_of_many_digits_is_too_large(capsys, extra, message):
    line = user_error(capsys, *SIMULATE_SMALL, *extra)
    assert line == f"hgsim simulate: error: {message}", line


MISSING_ALL = "missing arrival_s, prompt_tokens, output_tokens"


@pytest.mark.parametrize(("text", "message"), [
    # was 'missing arrival_s, ...' with no word of what the header holds instead
    ("arrival_s;prompt_tokens;output_tokens\n0;1;1\n",
     f"{MISSING_ALL} (the header: 'arrival_s;prompt_tokens;output_tokens')"),
    ("arrival_s\tprompt_tokens\toutput_tokens\n0\t1\t1\n",
     f"{MISSING_ALL} (the header: 'arrival_s\\tprompt_tokens\\toutput_tokens')"),
    ("\ufeff\ufeffarrival_s,prompt_tokens,output_tokens\n0,1,1\n",  # a BOM twice: one is read
     "missing arrival_s (the header: '\\ufeffarrival_s,prompt_tokens,output_tokens')"),
    ("", f"{MISSING_ALL} (the header: none, the first line is empty)"),
    (f"arrival_s,prompt_tokens,{'y' * 5000}\n0,1,1\n", "missing output_tokens (the header: "
     f"'arrival_s,prompt_tokens,{'y' * 56}'...(5,024 characters))"),
])
def test_serve_trace_header_missing_a_column_shows_the_header(tmp_path, capsys, text, message):
    trace = write(tmp_path / "t.csv", text)
    line = user_error(capsys, "serve", "--profile", "dev-zen4-2core", "--model", "opt-6.7b",
                      "--policy", "gpu_only", "--no-progress", "--trace", str(trace))
    assert line == (f"hgsim serve: error: {trace}:1: needs the columns arrival_s, prompt_tokens, "
                    f"output_tokens; {message}"), line


def test_serve_trace_header_names_are_stripped_as_its_cells(tmp_path):
    """'arrival_s, prompt_tokens, output_tokens' (a space after each comma) was 'missing
    prompt_tokens, output_tokens'; the cells were stripped, the names not."""
    from hgsim.serving.requests import Request, read_trace

    trace = write(tmp_path / "t.csv", "arrival_s, prompt_tokens, output_tokens\n0, 100, 4\n")
    assert read_trace(trace) == [Request(0, 0.0, 100, 4)]


# ------------------------------------------------------------------ config.json: depth, encoding
@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000,
                                  '{"a": ' * 100_000 + "1" + "}" * 100_000])
def test_config_json_nested_past_the_stack_names_the_file(tmp_path, capsys, text):
    """Was RecursionError: maximum recursion depth exceeded while decoding a JSON array."""
    path = write(tmp_path / "config.json", text)
    line = user_error(capsys, "models", "show", str(path))
    assert line == (f"hgsim models: error: {path}: arrays or objects nested too deep for "
                    "Python's JSON reader (a config.json nests a few levels)"), line


def test_config_json_not_utf8_says_json_not_yaml(tmp_path, capsys):
    """Was '... profiles and studies are UTF-8 YAML)' for a model's config.json."""
    path = write(tmp_path / "config.json", json.dumps(LLAMA_31_8B).encode("utf-16"))
    line = user_error(capsys, "models", "show", str(path))
    assert line == (f"hgsim models: error: {path}:1: not a text file (byte 0xff is not UTF-8; "
                    "a config.json is UTF-8 JSON)"), line


@pytest.mark.parametrize(("flag", "group"), [("--selection", "selection"),
                                             ("--attention", "attention")])
def test_unknown_accuracy_field_of_thousands_of_characters_is_cut(capsys, flag, group):
    """Was the whole key quoted twice: a line of 10,000 characters."""
    line = user_error(capsys, *SIMULATE_SMALL, flag, "x" * 5000 + "=1")
    cut = f"{'x' * 40}...(5,000 characters)"
    assert line.startswith(f"hgsim simulate: error: {flag} {cut}: unknown {group} field "
                           f"'{'x' * 40}'...(5,000 characters) (known: "), line
    assert len(line) < 400, line


@pytest.mark.parametrize(("value", "reason"), [
    ("inf", "input should be a finite number"),
    ("1.5", "input should be a valid integer, got a number with a fractional part"),
])
def test_option_of_a_union_type_names_the_option_alone(capsys, value, reason):
    """Was '--option host_socket.int: ...': pydantic's tag of the union's member (host_socket
    is an index or a name) read as part of the option's name."""
    line = user_error(capsys, *SIMULATE_SMALL, "--option", f"host_socket={value}")
    assert line == f"hgsim simulate: error: --option host_socket: {reason}", line


def test_config_json_key_given_twice_names_file_and_key(tmp_path):
    """json keeps the last of a key given twice; a hand-edited config.json would run on it."""
    body = json.dumps(LLAMA_31_8B)[:-1] + ', "hidden_size": 1024}'
    path = write(tmp_path / "config.json", body)
    with pytest.raises(ConfigError) as info:
        model_files.load_model_file(path)
    assert str(info.value) == f"{path}: 'hidden_size' is given twice (which one is meant?)"
