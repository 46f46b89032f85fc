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


def test_cli_summary_of_conversations_keeps_every_number_whole(capsys, monkeypatch):
    """Ten columns with a store are wider than a pipe's 80: the table is printed as wide as
    its numbers need (rich cut them to "0.25…" and headers to "reje…"), the rate's header
    counting conversations."""
    monkeypatch.setenv("COLUMNS", "80")
    argv = [*SERVE, *CONVERSATIONS, "--rate", "0.25", *STORE]
    row = _cli(capsys, *argv[len(SERVE):])
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "…" not in out and "conversations/s" in out and "rejected" in out
    cells = [f"{row['output_tokens_per_s']:.4g}", f"{row['requests_per_s']:.4g}",
             f"{row['prefix_cached_fraction']:.0%}", f"{row['prefix_loaded_fraction']:.0%}",
             f"{row['ttft_later_p99_s']:.4g}"]
    assert all(f" {cell} " in out for cell in cells), (cells, out)


def test_cli_find_rate_counts_conversations(capsys):
    row = _cli(capsys, *CONVERSATIONS, "--find-rate", "--slo-ttft", "0.05")
    assert row["max_rate_per_s"] > 0 and row["turns"] == 2
    assert row["prefix_cached_fraction"] > 0


@pytest.mark.parametrize(("extra", "flag", "words"), [
    (["--turns", "0"], "--turns", "from 1 to 1000, got 0"),
    (["--turns", "1001"], "--turns", "from 1 to 1000"),
    (["--turns", "two"], "--turns", "expected a whole number of turns, got 'two'"),
    # turns are counted, not tokens: no k/M suffix, no fraction, and a negative one its range
    (["--turns", "2k"], "--turns", "expected a whole number of turns, got '2k'"),
    (["--turns", "1.5"], "--turns", "expected a whole number of turns, got '1.5'"),
    (["--turns", "-1"], "--turns", "from 1 to 1000, got -1"),
    (["--turns", "2", "--think", "-1"], "--think", "from 0 to 86400"),
    (["--turns", "2", "--think", "nan"], "--think", "got nan"),
    (["--turns", "2", "--think", "1e9"], "--think", "from 0 to 86400"),
    (["--turns", "2", "--followup", "0"], "--followup", "at least 1 token"),
    (["--turns", "2", "--followup", "lognormal:1k"], "--followup", "expected"),
    (["--followup", "256"], "--followup", "applies to conversations: give --turns 2 or more"),
    (["--think", "1"], "--think", "applies to conversations"),
    (["--think", "0"], "--think", "applies to conversations"),  # 0 is given too
    (["--no-prefix-cache"], "--no-prefix-cache", "applies to conversations"),
    (["--turns", "1", "--think", "1"], "--think", "applies to conversations"),
    (["--turns", "1000", "--requests", "2048"], "--turns", "more than 1,000,000 requests"),
])
def test_cli_bad_conversation_flags_are_one_line_exit_2(capsys, extra, flag, words):
    capsys.readouterr()
    assert main([*SERVE, "--rate", "0.5", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"error: {flag}: " in err and words in err, err


@pytest.mark.parametrize("extra", [["--turns", "2"], ["--turns", "1"], ["--think", "1"],
                                   ["--no-prefix-cache"], ["--followup", "1k"],
                                   ["--kv-offload-gb", "64"], ["--kv-offload-tier", "ddr0"]])
def test_cli_a_trace_takes_no_conversations(tmp_path, capsys, extra):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0,100,4\n")
    capsys.readouterr()
    traced = [*SERVE[:SERVE.index("--prompt")], "--no-progress"]  # its rows are the requests
    assert main([*traced, "--trace", str(trace), *extra]) == 2
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


# --- a host KV store for the prefix cache (kv_offload) -------------------------------------

STORE = ["--kv-offload-gb", "64"]
#: HBM shrunk to 20 GB (a profile override): the weights leave room for few conversations'
#: KV, so six conversations of 4k prompts lose most of their prefixes from HBM between turns.
SMALL_HBM = {"gpus.gpu0.hbm_capacity_gb": 20}
TIGHT = {**TINY, "prompt": "4k", "requests": 6}
#: The share of prompt tokens a turn's prefix holds when every prefix is kept: each second
#: turn resends its first turn's 4096 + 8 tokens (plus 256 new), so (4096 + 8) of
#: 4096 + (4096 + 8 + 256).
ALL_KEPT = (4096 + 8) / (4096 + 4096 + 8 + 256)


def test_cli_store_is_reported_and_changes_nothing_where_hbm_keeps_everything(capsys):
    plain = _cli(capsys, *CONVERSATIONS, "--rate", "0.5")
    stored = _cli(capsys, *CONVERSATIONS, "--rate", "0.5", *STORE)
    cxl = _cli(capsys, *CONVERSATIONS, "--rate", "0.5", *STORE, "--kv-offload-tier", "cxl0")
    assert (plain["kv_offload_gb"], plain["kv_offload_tier"]) == (0.0, "")
    assert (stored["kv_offload_gb"], stored["kv_offload_tier"]) == (64.0, "ddr0")
    assert (cxl["kv_offload_gb"], cxl["kv_offload_tier"]) == (64.0, "cxl0")
    # four conversations fit in HBM: nothing is loaded from the store, the run is the same
    for row in (plain, stored, cxl):
        assert row["prefix_loaded_fraction"] == 0
        for key in ("prefix_cached_fraction", "ttft_p99_s", "tpot_p50_s", "completed"):
            assert row[key] == plain[key]
    single = _cli(capsys, "--rate", "0.5")
    assert not {"kv_offload_gb", "kv_offload_tier", "prefix_loaded_fraction"} & set(single)


def test_cli_summary_names_the_store_and_the_loaded_share(capsys):
    capsys.readouterr()
    assert main([*SERVE, *CONVERSATIONS, "--rate", "0.5", *STORE]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "prefix cache on, host KV store 64 GB on ddr0" in out
    assert "loaded" in out and "host KV store held" in out
    assert main([*SERVE, *CONVERSATIONS, "--rate", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "host KV store" not in out and "loaded" not in out


def test_cli_find_rate_takes_the_store(capsys):
    row = _cli(capsys, *CONVERSATIONS, "--find-rate", "--slo-ttft", "0.05", *STORE)
    assert row["max_rate_per_s"] > 0 and row["kv_offload_tier"] == "ddr0"


@pytest.mark.parametrize(("extra", "flag", "words"), [
    (["--kv-offload-gb", "-1"], "--kv-offload-gb", "must be a number of GB >= 0, got -1"),
    (["--kv-offload-gb", "nan"], "--kv-offload-gb", "got nan"),
    (["--kv-offload-gb", "inf"], "--kv-offload-gb", "got inf"),
    (["--kv-offload-gb", "1e4"], "--kv-offload-gb", "10000 GB is more than ddr0's 824.634 GB"),
    (["--kv-offload-gb", "600", "--kv-offload-tier", "cxl0"], "--kv-offload-gb",
     "more than cxl0's"),
    ([*STORE, "--kv-offload-tier", "ddr9"], "--kv-offload-tier",
     "expected a host memory tier of h100-80gb-spr-cxl (ddr0, cxl0), got 'ddr9'"),
    ([*STORE, "--kv-offload-tier", "gpu0"], "--kv-offload-tier", "got 'gpu0'"),
    (["--kv-offload-tier", "ddr0"], "--kv-offload-tier", "--kv-offload-gb asks for none"),
    ([*STORE, "--no-prefix-cache"], "--kv-offload-gb",
     "a store serves the prefix cache: drop --no-prefix-cache"),
    ([*STORE, "--policy", "hybridgen"], "--kv-offload-gb", "hybridgen keeps KV in host memory"),
])
def test_cli_bad_store_flags_are_one_line_exit_2(capsys, extra, flag, words):
    capsys.readouterr()
    assert main([*SERVE, "--rate", "0.5", *CONVERSATIONS, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"error: {flag}: " in err and words in err, err


@pytest.mark.parametrize(("extra", "flag"), [
    (STORE, "--kv-offload-gb"), (["--kv-offload-tier", "ddr0"], "--kv-offload-tier"),
    (["--turns", "1", *STORE], "--kv-offload-gb"), (["--kv-offload-gb", "0"], "--kv-offload-gb"),
])
def test_cli_store_applies_to_conversations(capsys, extra, flag):
    capsys.readouterr()
    assert main([*SERVE, "--rate", "0.5", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {flag}: applies to conversations" in err, err


def test_cli_store_gb_not_a_number_is_argparses_one_line(capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([*SERVE, "--rate", "0.5", *CONVERSATIONS, "--kv-offload-gb", "abc"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert "--kv-offload-gb: invalid float value: 'abc'" in err, err


def test_api_store_loads_what_hbm_dropped():
    """With HBM shrunk, the prefix cache alone keeps a few prefixes; a store big enough for
    every conversation keeps them all (the share of a cache that kept everything, in closed
    form), loads the ones HBM dropped, and the turns' first tokens come sooner (a load instead
    of a prefill). Over CXL (24 GB/s, below the 50 GB/s PCIe link) the loads take longer."""
    bare = _api(**TIGHT, hardware=SMALL_HBM).summary()
    full = _api(**TIGHT).summary()
    stored = _api(**TIGHT, hardware=SMALL_HBM, kv_offload_gb=64).summary()
    cxl = _api(**TIGHT, hardware=SMALL_HBM, kv_offload_gb=64, kv_offload_tier="cxl0").summary()
    assert full["prefix_cached_fraction"] == pytest.approx(ALL_KEPT, rel=1e-12)
    assert 0 < bare["prefix_cached_fraction"] < ALL_KEPT and bare["prefix_loaded_fraction"] == 0
    for row, tier in ((stored, "ddr0"), (cxl, "cxl0")):
        assert (row["kv_offload_gb"], row["kv_offload_tier"]) == (64.0, tier)
        assert row["prefix_cached_fraction"] == pytest.approx(ALL_KEPT, rel=1e-12)
        # what HBM kept is not loaded: the store supplies the rest
        assert row["prefix_loaded_fraction"] == pytest.approx(
            ALL_KEPT - bare["prefix_cached_fraction"], rel=1e-12)
        assert row["completed"] == bare["completed"] == 12
    assert stored["ttft_mean_s"] < cxl["ttft_mean_s"] < bare["ttft_mean_s"]


def test_api_gives_the_command_lines_numbers_with_the_store(capsys):
    row = _cli(capsys, *CONVERSATIONS, "--rate", "0.5", *STORE, "--kv-offload-tier", "cxl0")
    summary = _api(kv_offload_gb=64, kv_offload_tier="cxl0").summary()
    for key in ("kv_offload_gb", "kv_offload_tier", "prefix_loaded_fraction",
                "prefix_cached_fraction", "completed"):
        assert summary[key] == row[key]
    for key in ("ttft_p99_s", "tpot_p50_s", "output_tokens_per_s"):
        assert summary[key] == pytest.approx(row[key], rel=1e-12)


@pytest.mark.parametrize(("kwargs", "field", "words"), [
    ({"kv_offload_gb": -1}, "kv_offload_gb", "must be a number of GB >= 0, got -1"),
    ({"kv_offload_gb": math.nan}, "kv_offload_gb", "got nan"),
    ({"kv_offload_gb": "abc"}, "kv_offload_gb", "got 'abc'"),
    ({"kv_offload_gb": True}, "kv_offload_gb", "got True"),
    ({"kv_offload_gb": 1e4}, "kv_offload_gb", "more than ddr0's"),
    ({"kv_offload_gb": 64, "kv_offload_tier": "ddr9"}, "kv_offload_tier", "got 'ddr9'"),
    ({"kv_offload_gb": 64, "kv_offload_tier": "gpu0"}, "kv_offload_tier", "got 'gpu0'"),
    ({"kv_offload_tier": "ddr0"}, "kv_offload_tier", "kv_offload_gb asks for none"),
    ({"kv_offload_gb": 64, "prefix_cache": False}, "kv_offload_gb",
     "a store serves the prefix cache"),
    ({"kv_offload_gb": 64, "hardware": SMALL_HBM, "kv_offload_tier": "cxl0",
      "policy": "hybridgen"}, "kv_offload_gb", "hybridgen keeps KV in host memory"),
    ({"turns": 1, "followup": "1k", "think_s": 30.0, "kv_offload_gb": 64}, "kv_offload_gb",
     "applies to conversations: give turns 2 or more"),
    ({"turns": 1, "followup": "1k", "think_s": 30.0, "kv_offload_tier": "ddr0"},
     "kv_offload_tier", "applies to conversations"),
])
def test_api_bad_store_arguments_name_the_argument(kwargs, field, words):
    kwargs = dict(kwargs)
    policy = kwargs.pop("policy", "gpu_only")
    with pytest.raises(UserError, match=words) as caught:
        api.serve("h100-80gb-spr-cxl", "llama-3.1-8b", policy, **{**TINY, **kwargs})
    assert caught.value.field == field and "\n" not in str(caught.value)


STORE_STUDY = STUDY.replace("  policy: gpu_only\n", "  policy: gpu_only\n  hardware: "
                            "{gpus.gpu0.hbm_capacity_gb: 20}\n").replace(
    "requests: 4\n  prompt: 2k", "requests: 6\n  prompt: 4k").replace(
    "  think_s: 1\n", "  think_s: 1\n  kv_offload_gb: 64\n").replace(
    "serving.prefix_cache: [true, false]", "serving.kv_offload_tier: [null, cxl0]").replace(
    "x: serving.prefix_cache, y: prefix_cached_fraction",
    "x: serving.kv_offload_tier, y: prefix_loaded_fraction")


def test_study_store_gives_the_servers_numbers_on_the_points_profile(tmp_path):
    """The point runner builds the store on the point's profile (HBM overridden to 20 GB):
    the same loads as api.serve with that override."""
    frame = api.run_study(str(write_study(tmp_path, STORE_STUDY)), out=tmp_path / "out",
                          jobs=1, figures=False)
    rows = {r["kv_offload_tier"]: r for r in frame.to_dict("records")}
    assert set(rows) == {"ddr0", "cxl0"}
    for tier, row in rows.items():
        summary = _api(**TIGHT, hardware=SMALL_HBM, kv_offload_gb=64,
                       kv_offload_tier=tier).summary()
        assert row["kv_offload_gb"] == 64.0 and row["prefix_loaded_fraction"] > 0
        for key in ("prefix_cached_fraction", "prefix_loaded_fraction"):
            assert row[key] == summary[key]
        assert row["ttft_mean_s"] == pytest.approx(summary["ttft_mean_s"], rel=1e-12)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "serving.kv_offload_gb" in report and "serving.kv_offload_tier" in report


def test_a_point_without_a_store_keeps_its_key(tmp_path):
    """No store (the defaults, written out or not) leaves the key of a conversation point as
    it was before the store existed; a store is in it."""
    spec = ServingSpec(rate_per_s=0.5, turns=2, followup=256, think_s=1)
    assert not {"kv_offload_gb", "kv_offload_tier"} & set(spec.key_config())
    assert ServingSpec(rate_per_s=0.5, turns=2, kv_offload_gb=64).key_config()[
        "kv_offload_gb"] == 64.0
    keys = _keys(tmp_path, STUDY, "mt.yaml")
    defaults = STUDY.replace("  think_s: 1\n", "  think_s: 1\n  kv_offload_gb: 0\n"
                                               "  kv_offload_tier: null\n")
    assert _keys(tmp_path, defaults, "defaults.yaml") == keys
    swept = STUDY.replace("serving.prefix_cache: [true, false]",
                          "serving.kv_offload_gb: [0, 64]").replace(
        "x: serving.prefix_cache", "x: serving.kv_offload_gb")
    by_gb = {dict(c)["serving.kv_offload_gb"]: k for c, k in _keys(tmp_path, swept,
                                                                    "s.yaml").items()}
    assert by_gb[0] == keys[(("serving.prefix_cache", True),)]
    assert by_gb[64] not in keys.values()
    # one turn: the store's fields at their defaults keep the key of single requests
    plain = _keys(tmp_path, SINGLE, "single.yaml")
    explicit = SINGLE.replace("  output: 8\n", "  output: 8\n  kv_offload_gb: 0.0\n"
                                               "  kv_offload_tier: null\n")
    assert _keys(tmp_path, explicit, "explicit.yaml") == plain


WITH_STORE = STUDY.replace("  think_s: 1\n", "  think_s: 1\n  kv_offload_gb: 64\n")
BAD_STORE = [
    (WITH_STORE, "kv_offload_gb: 64", "kv_offload_gb: -1",
     ":14: serving.kv_offload_gb: input should be greater than or equal to 0"),
    (WITH_STORE, "kv_offload_gb: 64", "kv_offload_gb: .nan",
     ":14: serving.kv_offload_gb: input should be a finite number"),
    (WITH_STORE, "kv_offload_gb: 64", "kv_offload_gb: abc",
     ":14: serving.kv_offload_gb: input should be a valid number"),
    (WITH_STORE, "kv_offload_gb: 64", "kv_offload_gb: 1e4",
     ":14: serving.kv_offload_gb: 10000 GB is more than ddr0's"),
    (WITH_STORE, "kv_offload_gb: 64", "kv_offload_gb: 64\n  kv_offload_tier: ddr9",
     ":15: serving.kv_offload_tier: expected a host memory tier of h100-80gb-spr-cxl"),
    (WITH_STORE, "kv_offload_gb: 64", "kv_offload_gb: 64\n  kv_offload_tier: gpu0",
     ":15: serving.kv_offload_tier: expected a host memory tier"),
    (WITH_STORE, "kv_offload_gb: 64", "kv_offload_tier: ddr0",
     ":14: serving.kv_offload_tier: names the store's tier, and serving.kv_offload_gb asks"),
    (WITH_STORE, "policy: gpu_only", "policy: hybridgen",
     ":14: serving.kv_offload_gb: hybridgen keeps KV in host memory"),
    (WITH_STORE, "serving.prefix_cache: [true, false]", "serving.prefix_cache: [false]",
     ":14: serving.kv_offload_gb: a store serves the prefix cache: set serving.prefix_cache"),
    (STUDY, "serving.prefix_cache: [true, false]", "serving.kv_offload_gb: [64, -1]",
     "serving.kv_offload_gb[1]: input should be greater than or equal to 0"),
    (STUDY, "serving.prefix_cache: [true, false]", "serving.kv_offload_tier: [ddr0]",
     "serving.kv_offload_tier[0]: names the store's tier"),
    (SINGLE, "  output: 8\n", "  output: 8\n  kv_offload_gb: 64\n",
     ":11: serving.kv_offload_gb: applies to conversations: set serving.turns 2 or more"),
]


@pytest.mark.parametrize(("text", "old", "new", "words"), BAD_STORE,
                         ids=[b[3][:48] for b in BAD_STORE])
def test_study_bad_store_fields_are_one_line_exit_2(tmp_path, capsys, text, old, new, words):
    assert old in text
    err = refused_study(tmp_path, capsys, text.replace(old, new, 1))
    assert words in err, err


# --- the affinity wait (several copies) ---------------------------------------------------
COPIES = {"profile": "hgx-h100x8-2socket-cxl", "data_parallel": 2}
COPIES_CLI = ["--data-parallel", "2"]


def _copies_cli(capsys, *extra: str) -> dict:
    args = [*SERVE, *CONVERSATIONS, "--rate", "2", *COPIES_CLI, *extra, "--json"]
    args[args.index("h100-80gb-spr-cxl")] = "hgx-h100x8-2socket-cxl"
    capsys.readouterr()
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_and_api_give_the_servers_numbers_with_an_affinity_wait(capsys):
    """The flag and the argument reach the server: the same run on each surface, labelled
    with the wait (strict affinity, the default, as JSON's null for inf)."""
    row = _copies_cli(capsys, "--affinity-wait", "0")
    summary = api.serve(COPIES["profile"], "llama-3.1-8b", "gpu_only", **{**TINY, "rate": 2},
                        data_parallel=2, affinity_wait_s=0.0).summary()
    assert row["affinity_wait_s"] == summary["affinity_wait_s"] == 0.0
    for key in ("prefix_cached_fraction", "completed", "ttft_mean_s"):
        assert summary[key] == pytest.approx(row[key], rel=1e-12)
    assert _copies_cli(capsys)["affinity_wait_s"] is None  # inf: waits however long


@pytest.mark.parametrize(("extra", "words"), [
    (["--affinity-wait", "-1"], "must be a number of seconds >= 0"),
    (["--affinity-wait", "nan"], "got nan"),
    (["--affinity-wait", "1", "--no-prefix-cache"], "drop --no-prefix-cache"),
])
def test_cli_bad_affinity_wait_is_one_line_exit_2(capsys, extra, words):
    args = [*SERVE, *CONVERSATIONS, "--rate", "1", *COPIES_CLI, *extra]
    args[args.index("h100-80gb-spr-cxl")] = "hgx-h100x8-2socket-cxl"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--affinity-wait" in err and words in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("extra", "words"), [
    ([], "give --data-parallel 2 or more"),
    (["--turns", "1"], "applies to conversations"),
])
def test_cli_affinity_wait_needs_copies_and_conversations(capsys, extra, words):
    args = [*SERVE, "--rate", "1", *([] if extra else CONVERSATIONS), *extra,
            "--affinity-wait", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--affinity-wait" in err and words in err


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"affinity_wait_s": -1, **COPIES}, "must be a number of seconds >= 0"),
    ({"affinity_wait_s": True, **COPIES}, "got True"),
    ({"affinity_wait_s": 1.0}, "give data_parallel 2 or more"),
    ({"affinity_wait_s": 1.0, "prefix_cache": False, **COPIES}, "drop prefix_cache=False"),
    ({"affinity_wait_s": 1.0, "turns": 1, "followup": "1k", "think_s": 30.0, **COPIES},
     "applies to conversations"),
])
def test_api_bad_affinity_wait_names_the_argument(kwargs, words):
    kwargs = {**TINY, **kwargs}
    profile = kwargs.pop("profile", "h100-80gb-spr-cxl")
    with pytest.raises(UserError, match=words) as caught:
        api.serve(profile, "llama-3.1-8b", "gpu_only", **kwargs)
    assert caught.value.field == "affinity_wait_s" and "\n" not in str(caught.value)


def test_study_affinity_wait_axis_and_the_key_at_its_default(tmp_path):
    """An axis of waits runs each (the rows carry it); strict affinity, written out or not,
    keeps the key a conversation point had before the wait existed."""
    spec = ServingSpec(rate_per_s=0.5, turns=2, followup=256, think_s=1)
    assert "affinity_wait_s" not in spec.key_config()
    assert ServingSpec(rate_per_s=0.5, turns=2, affinity_wait_s=0).key_config()[
        "affinity_wait_s"] == 0.0
    keys = _keys(tmp_path, STUDY, "mt.yaml")
    strict = STUDY.replace("  think_s: 1\n", "  think_s: 1\n  affinity_wait_s: null\n")
    assert _keys(tmp_path, strict, "strict.yaml") == keys
    swept = STUDY.replace("  policy: gpu_only\n", "  policy: gpu_only\n  workload: "
                          "{data_parallel: 2}\n").replace(
        "h100-80gb-spr-cxl", "hgx-h100x8-2socket-cxl").replace(
        "serving.prefix_cache: [true, false]", "serving.affinity_wait_s: [0, null]").replace(
        "x: serving.prefix_cache", "x: serving.affinity_wait_s")
    frame = api.run_study(str(write_study(tmp_path, swept, "aw.yaml")), out=tmp_path / "out",
                          jobs=1, figures=False)
    # (a stored row holds however long as JSON does: null, NaN in the frame)
    assert frame["affinity_wait_s"].isna().sum() == 1 and (frame["completed"] == 8).all()
    strict_row = frame[frame["affinity_wait_s"].isna()].iloc[0]
    free_row = frame[frame["affinity_wait_s"] == 0].iloc[0]
    assert strict_row["prefix_cached_fraction"] >= free_row["prefix_cached_fraction"]


def test_study_affinity_wait_without_the_cache_is_refused(tmp_path, capsys):
    text = STUDY.replace("  think_s: 1\n", "  think_s: 1\n  affinity_wait_s: 1\n").replace(
        "serving.prefix_cache: [true, false]", "serving.prefix_cache: [false]")
    err = refused_study(tmp_path, capsys, text)
    assert "serving.affinity_wait_s: a later turn waits for the copy" in err, err
