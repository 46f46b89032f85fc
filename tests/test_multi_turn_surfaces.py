"""Multi-turn conversations and the prefix cache (``hgsim.serving``) on every surface a user
reaches serving by: ``hgsim serve``'s flags, ``api.serve``'s arguments and a study's
``serving:`` fields (and axes). Each surface runs the same tiny conversations and gets the
server's own numbers: a prefix cache holds a share of the later turns' prompts, none without
it. Every bad value is refused in one line naming the flag, argument or field, and a serving
point of one turn keeps the key it had before conversations existed (stored results resume)."""

from __future__ import annotations

import json
import math

import pytest
from test_study_common import refused_study, write_study

from hgsim import api
from hgsim.cli import main
from hgsim.errors import UserError
from hgsim.study.load import load_study
from hgsim.study.schema import ServingSpec

#: Four conversations of two turns, a second or two on the fastest policy.
TINY = {"prompt": "2k", "output": 8, "requests": 4, "turns": 2, "followup": 256,
        "think_s": 1, "rate": 0.5}
SERVE = ["serve", "--profile", "h100-80gb-spr-cxl", "--model", "llama-3.1-8b", "--policy",
         "gpu_only", "--prompt", "2k", "--output", "8", "--requests", "4", "--no-progress"]
CONVERSATIONS = ["--turns", "2", "--followup", "256", "--think", "1"]


def _cli(capsys, *extra: str) -> dict:
    capsys.readouterr()
    assert main([*SERVE, *extra, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _api(**kwargs):
    return api.serve("h100-80gb-spr-cxl", "llama-3.1-8b", "gpu_only", **{**TINY, **kwargs})


# --- hgsim serve -------------------------------------------------------------------------


def test_cli_conversations_hold_prefixes_with_the_cache_and_none_without(capsys):
    cached = _cli(capsys, *CONVERSATIONS, "--rate", "0.5")
    uncached = _cli(capsys, *CONVERSATIONS, "--rate", "0.5", "--no-prefix-cache")
    # both turns of all four conversations served, the labels say what ran
    for row, cache in ((cached, True), (uncached, False)):
        assert (row["requests"], row["completed"], row["rejected"]) == (8, 8, 0)
        assert (row["turns"], row["followup"], row["think_s"], row["prefix_cache"]) == (
            2, "256", 1.0, cache)
    assert 0 < cached["prefix_cached_fraction"] < 1
    assert uncached["prefix_cached_fraction"] == 0
    # the held tokens are not prefilled again: less prefill work with the cache
    assert cached["prefill_fraction"] * cached["busy_fraction"] < (
        uncached["prefill_fraction"] * uncached["busy_fraction"])
    # a single-request run has none of the conversation columns
    plain = _cli(capsys, "--rate", "0.5")
    assert not {"turns", "followup", "think_s", "prefix_cache",
                "prefix_cached_fraction"} & set(plain)


def test_cli_summary_names_the_conversations_and_the_cached_share(capsys):
    capsys.readouterr()
    assert main([*SERVE, *CONVERSATIONS, "--rate", "0.5"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "conversations of 2 turns (follow-up 256, think 1 s), prefix cache on" in out
    assert "cached" in out and "prefix cache held" in out
    assert main([*SERVE, "--rate", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "conversations" not in out and "cached" not in out


def test_cli_find_rate_counts_conversations(capsys):
    row = _cli(capsys, *CONVERSATIONS, "--find-rate", "--slo-ttft", "0.05")
    assert row["max_rate_per_s"] > 0 and row["turns"] == 2
    assert row["prefix_cached_fraction"] > 0


@pytest.mark.parametrize(("extra", "flag", "words"), [
    (["--turns", "0"], "--turns", "from 1 to 1000, got 0"),
    (["--turns", "1001"], "--turns", "from 1 to 1000"),
    (["--turns", "two"], "--turns", "expected a count"),
    (["--turns", "2", "--think", "-1"], "--think", "from 0 to 86400"),
    (["--turns", "2", "--think", "nan"], "--think", "got nan"),
    (["--turns", "2", "--think", "1e9"], "--think", "from 0 to 86400"),
    (["--turns", "2", "--followup", "0"], "--followup", "at least 1 token"),
    (["--turns", "2", "--followup", "lognormal:1k"], "--followup", "expected"),
    (["--followup", "256"], "--followup", "applies to conversations: give --turns 2 or more"),
    (["--think", "1"], "--think", "applies to conversations"),
    (["--no-prefix-cache"], "--no-prefix-cache", "applies to conversations"),
    (["--turns", "1", "--think", "1"], "--think", "applies to conversations"),
    (["--turns", "1000", "--requests", "2k"], "--turns", "more than 1,000,000 requests"),
])
def test_cli_bad_conversation_flags_are_one_line_exit_2(capsys, extra, flag, words):
    capsys.readouterr()
    assert main([*SERVE, "--rate", "0.5", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"error: {flag}: " in err and words in err, err


@pytest.mark.parametrize("extra", [["--turns", "2"], ["--turns", "1"], ["--think", "1"],
                                   ["--no-prefix-cache"], ["--followup", "1k"]])
def test_cli_a_trace_takes_no_conversations(tmp_path, capsys, extra):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0,100,4\n")
    capsys.readouterr()
    assert main([*SERVE, "--trace", str(trace), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {extra[0]}: a trace's rows are single" in err, err


# --- api.serve ---------------------------------------------------------------------------


def test_api_gives_the_command_lines_numbers_with_and_without_the_cache(capsys):
    for cache, flags in ((True, []), (False, ["--no-prefix-cache"])):
        row = _cli(capsys, *CONVERSATIONS, "--rate", "0.5", *flags)
        summary = _api(prefix_cache=cache).summary()
        assert summary["prefix_cached_fraction"] == row["prefix_cached_fraction"]
        for key in ("ttft_p99_s", "tpot_p50_s", "output_tokens_per_s", "completed"):
            assert summary[key] == pytest.approx(row[key], rel=1e-12)
        assert (summary["prefix_cached_fraction"] > 0) is cache


@pytest.mark.parametrize(("kwargs", "field", "words"), [
    ({"turns": 0}, "turns", "from 1 to 1000"),
    ({"turns": True}, "turns", "got True"),
    ({"turns": 2.0}, "turns", "got 2.0"),
    ({"think_s": -1}, "think_s", "from 0 to 86400"),
    ({"think_s": math.inf}, "think_s", "got inf"),
    ({"think_s": "1"}, "think_s", "got '1'"),
    ({"followup": "x"}, "followup", "expected a count"),
    ({"prefix_cache": 1}, "prefix_cache", "True or False"),
    ({"turns": 1}, "followup", "applies to conversations: give turns 2 or more"),
    ({"turns": 1, "followup": "1k"}, "think_s", "applies to conversations"),
    ({"turns": 1, "followup": "1k", "think_s": 30.0, "prefix_cache": False}, "prefix_cache",
     "applies to conversations"),
    ({"turns": 1000, "requests": 2000}, "turns", "more than 1,000,000 requests"),
])
def test_api_bad_conversation_arguments_name_the_argument(kwargs, field, words):
    with pytest.raises(UserError, match=words) as caught:
        _api(**kwargs)
    assert caught.value.field == field and "\n" not in str(caught.value)


def test_api_a_trace_takes_no_conversations(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0,100,4\n")
    with pytest.raises(UserError, match="a trace's rows are single requests") as caught:
        api.serve("h100-80gb-spr-cxl", "llama-3.1-8b", "gpu_only", trace=trace, turns=2)
    assert caught.value.field == "turns"


# --- studies -----------------------------------------------------------------------------

STUDY = """\
name: mt
base:
  profile: h100-80gb-spr-cxl
  model: llama-3.1-8b
  policy: gpu_only
serving:
  rate_per_s: 0.5
  requests: 4
  prompt: 2k
  output: 8
  turns: 2
  followup: 256
  think_s: 1
sweep:
  - grid:
      serving.prefix_cache: [true, false]
plots:
  cached: {kind: bar, x: serving.prefix_cache, y: prefix_cached_fraction}
"""
#: The same server with single requests (the fields of a conversation left out).
SINGLE = STUDY.replace("  turns: 2\n  followup: 256\n  think_s: 1\n", "").replace(
    "serving.prefix_cache: [true, false]", "serving.seed: [0, 1]").replace(
    "x: serving.prefix_cache, y: prefix_cached_fraction", "x: serving.seed, y: span_s")


def test_study_prefix_cache_axis_gives_the_servers_numbers(tmp_path):
    frame = api.run_study(str(write_study(tmp_path, STUDY)), out=tmp_path / "out", jobs=1,
                          figures=False)
    rows = {bool(r["serving.prefix_cache"]): r for r in frame.to_dict("records")}
    assert set(rows) == {True, False}
    for cache, row in rows.items():
        summary = _api(prefix_cache=cache).summary()
        assert row["prefix_cached_fraction"] == summary["prefix_cached_fraction"]
        assert row["output_tokens_per_s"] == pytest.approx(summary["output_tokens_per_s"],
                                                           rel=1e-12)
        assert (row["turns"], row["followup"], row["think_s"], bool(row["prefix_cache"])) == (
            2, "256", 1.0, cache)
    assert rows[True]["prefix_cached_fraction"] > 0 == rows[False]["prefix_cached_fraction"]


def _keys(tmp_path, text: str, name: str = "study.yaml") -> dict:
    return {tuple(sorted(p.coords.items())): p.spec.key
            for p in load_study(write_study(tmp_path, text, name)).expansion.points}


def test_a_point_of_one_turn_keeps_the_key_it_had_before_conversations(tmp_path):
    """The key holds exactly the fields it held before (``serving.turns`` and the rest left
    out at one turn): a study without them resumes from what it stored."""
    before = {"rate_per_s", "find_rate", "requests", "prompt", "output", "max_batch", "seed",
              "slo"}
    spec = ServingSpec(rate_per_s=0.5, prompt="2k", output=8)
    assert set(spec.key_config()) == before
    assert spec.key_config() == {k: v for k, v in spec.model_dump(mode="json").items()
                                 if k in before} | {"prompt": "2k", "output": "8"}
    plain = _keys(tmp_path, SINGLE)
    # the defaults written out, or turns swept over 1: the same points
    explicit = SINGLE.replace("  output: 8\n", "  output: 8\n  turns: 1\n  followup: 1k\n"
                                               "  think_s: 30\n  prefix_cache: true\n")
    assert _keys(tmp_path, explicit, "explicit.yaml") == plain
    spelled = explicit.replace("followup: 1k", "followup: 1024")  # the default, spelled out
    assert _keys(tmp_path, spelled, "spelled.yaml") == plain
    swept = STUDY.replace("serving.prefix_cache: [true, false]", "serving.turns: [1, 2]"
                          ).replace("x: serving.prefix_cache", "x: serving.turns")
    turns = {dict(c)["serving.turns"]: key for c, key in _keys(tmp_path, swept, "s.yaml").items()}
    assert turns[1] == plain[(("serving.seed", 0),)]
    assert turns[2] not in plain.values()
    # a conversation's fields are in its key
    keys = _keys(tmp_path, STUDY, "mt.yaml")
    assert len(set(keys.values())) == 2 and turns[2] in keys.values()


BAD = [
    ("turns: 2", "turns: 0", ":11: serving.turns: input should be greater than or equal to 1"),
    ("turns: 2", "turns: 1001", ":11: serving.turns: at most 1000 turns"),
    ("turns: 2", "turns: true", ":11: serving.turns: "),
    ("think_s: 1", "think_s: -1", ":13: serving.think_s: input should be greater than or"),
    ("think_s: 1", "think_s: 1e9", ":13: serving.think_s: at most 86400 seconds"),
    ("followup: 256", "followup: abc", ":12: serving.followup: expected a count"),
    ("requests: 4", "requests: 999999", ":11: serving.turns: 999,999 conversations of 2 turns"),
    ("turns: 2", "turns: 1", ":12: serving.followup: applies to conversations: set "
                             "serving.turns 2 or more"),
    ("  turns: 2\n  followup: 256\n  think_s: 1\n", "",
     ":13: sweep[0].grid.serving.prefix_cache[1]: applies to conversations"),
    ("serving.prefix_cache: [true, false]", "serving.think_s: [1, -1]",
     "serving.think_s[1]: input should be greater than or equal to 0"),
    ("serving.prefix_cache: [true, false]", "serving.prefix_cache: [true, 2]",
     "serving.prefix_cache[1]: "),
]


@pytest.mark.parametrize(("old", "new", "words"), BAD, ids=[b[2][:40] for b in BAD])
def test_study_bad_conversation_fields_are_one_line_exit_2(tmp_path, capsys, old, new, words):
    assert old in STUDY
    err = refused_study(tmp_path, capsys, STUDY.replace(old, new, 1))
    assert words in err, err
