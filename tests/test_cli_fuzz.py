"""Fuzzing the command line: hypothesis-drawn values for each flag of simulate, study, models
show, profiles show, policies and validate. Whatever the value, the CLI exits 0, 1 or 2 (an
argparse mistake exits through SystemExit(2), as ``python -m hgsim`` does), never with a
traceback, and an exit 2 is one line on stderr. Runs are kept cheap: a 1k context, --gen 4,
--samples 2, study --dry-run, and validate stopped where the measuring would begin."""

from __future__ import annotations

import pytest
from bad_input import STUDY, write
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from hgsim import model_files
from hgsim.cli import main

#: Values written as a person might mistype them, and a few that are fine.
WORDS = ["", " ", "0", "-1", "-1k", "1", "2", "1k", "1.5k", "1kk", "1 k", "k", "1e3", "1e999",
         "-0", "nan", "inf", "-inf", "0x10", "1_000", "9" * 400, "9" * 5000, "１２", "½", "1k\n",
         "\x00", "é", "🙂", "..", "/", "/dev/null", "/dev/zero", "~nobody", "~", "=", "a=b",
         "topk_ratio=", "topk_ratio=nan", "topk_ratio=2", "=1", "history_decay=2",
         "decision_lag=0", "history_queries=true", "speculation_similarity=0.5", "fp16", "hybridgen",
         "opt-6.7b", "dev-zen4-2core", "ddr0", "gpu0", "tcp://", "0.5", "1e-300", "2147483648", "1g", "1GB"]
VALUE = st.one_of(st.sampled_from(WORDS), st.text(max_size=8),
                  st.integers(-2, 10**20).map(str), st.sampled_from(["DIR", "FILE"]))

#: capsys and monkeypatch are reset by hand (readouterr; the same attribute each example)
FIXTURES = [HealthCheck.function_scoped_fixture]
#: Each test's settings. Hypothesis's explain phase re-runs a failing example under a line
#: tracer, which turns a simulation of seconds into hours (a clean-clone run once sat in it
#: for over ten minutes); without it a failure is reported at once, with the blob that
#: reproduces it (``@reproduce_failure``).
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=FIXTURES,
                phases=[phase for phase in Phase if phase is not Phase.explain], print_blob=True)

SIMULATE = {"--profile": "dev-zen4-2core", "--model": "opt-6.7b", "--policy": "hybridgen",
            "--context": "1k", "--batch": "1", "--gen": "4", "--samples": "2"}
SIMULATE_EXTRA = ["--kv-dtype", "--prefill-chunk", "--option", "--selection", "--trace",
                  "--trace-max-gb", "--tensor-parallel", "--data-parallel", "--gpu-placement"]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.delenv(model_files.MODEL_PATH_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # anything a drawn path writes lands here


def place(value: str, tmp_path) -> str:
    """DIR and FILE stand for an existing folder and an existing (non-config) file."""
    if value == "DIR":
        return str(tmp_path)
    if value == "FILE":
        return str(write(tmp_path / "notes.txt", "not a config\n"))
    return value


def exits_cleanly(capsys, argv: list[str]) -> int:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own mistakes (and --help)
        code = stop.code
    captured = capsys.readouterr()
    assert code in (0, 1, 2), (argv, code, captured.err[-2000:])
    assert "Traceback" not in captured.err, (argv, captured.err[-2000:])
    if code == 2:  # one error line; a warning about another flag (--jobs capped) may precede
        lines = [line for line in captured.err.strip().splitlines()
                 if not line.startswith(f"hgsim {argv[0]}: warning: ")]
        assert len(lines) == 1 and lines[0].startswith("hgsim"), (argv, captured.err[-2000:])
    return code


def drawn_flags(data, tmp_path, base: dict[str, str], extra: list[str],
                *alone: tuple[str, str]) -> dict[str, str]:
    """``base`` with one or two of its flags or of ``extra`` set to drawn values. Each pair
    ``alone`` is cheap one at a time and can cost minutes together (a valid request), so where
    both are drawn the second keeps its default (or is left out, where it has none)."""
    flags = dict(base)
    drawn = data.draw(st.lists(st.sampled_from([*base, *extra]), min_size=1, max_size=2,
                               unique=True))
    for flag in drawn:
        flags[flag] = place(data.draw(VALUE), tmp_path)
    for first, second in alone:
        if {first, second} <= set(drawn):
            if second in base:
                flags[second] = base[second]
            else:
                del flags[second]
    return flags


@FUZZ
@given(st.data())
def test_simulate_flags(tmp_path_factory, capsys, data):
    # --gen 77240 --samples 77240 simulates tens of thousands of steps in full
    flags = drawn_flags(data, tmp_path_factory.mktemp("cli"), SIMULATE, SIMULATE_EXTRA,
                        ("--gen", "--samples"))
    argv = ["simulate", *(part for flag, value in flags.items() for part in (flag, value))]
    if data.draw(st.booleans()):
        argv.append("--prefill")
    event(f"exit {exits_cleanly(capsys, argv)}")


@FUZZ
@given(st.data())
def test_study_flags(tmp_path_factory, capsys, data):
    tmp_path = tmp_path_factory.mktemp("cli")
    study = str(write(tmp_path / "s.yaml", STUDY))
    flags = {"--out": str(tmp_path / "out")}
    for flag in data.draw(st.lists(st.sampled_from(
            ["FILE", "--out", "--jobs", "--executor", "--scheduler", "--scheduler-file",
             "--chunk"]), min_size=1, max_size=2, unique=True)):
        flags[flag] = place(data.draw(VALUE), tmp_path)
    file = flags.pop("FILE", study)
    argv = ["study", file, "--dry-run", "--quiet",
            *(part for flag, value in flags.items() for part in (flag, value))]
    event(f"exit {exits_cleanly(capsys, argv)}")


SERVE = {"--profile": "dev-zen4-2core", "--model": "opt-6.7b", "--policy": "gpu_only",
         "--rate": "2", "--prompt": "1k", "--output": "4", "--requests": "3"}
SERVE_EXTRA = ["--find-rate", "--trace", "--seed", "--max-batch", "--kv-dtype",
               "--tensor-parallel", "--data-parallel", "--gpu-placement", "--slo-ttft",
               "--slo-tpot-ms", "--attainment", "--requests-csv", "--option",
               "--prefill-chunk", "--turns", "--followup", "--think", "--no-prefix-cache"]
#: The serve flags that take no value.
SWITCHES = ("--find-rate", "--no-prefix-cache")
#: Pairs of serve flags cheap one at a time, not together (``drawn_flags``): --output and
#: --requests each beside the other's small default, so a valid large value costs one of them,
#: not their product; --prefill-chunk beside a drawn --prompt or --requests (small chunks are as
#: many iterations); and --turns (up to 1000 a conversation) beside the defaults of the lengths,
#: the count and the chunk.
SERVE_ALONE = (("--output", "--requests"), ("--prompt", "--prefill-chunk"),
               ("--requests", "--prefill-chunk"), ("--turns", "--requests"),
               ("--turns", "--output"), ("--turns", "--prompt"), ("--turns", "--prefill-chunk"))


def serve_argv(flags: dict[str, str]) -> list[str]:
    if "--find-rate" in flags or "--trace" in flags:  # one load at a time, or argparse's error
        flags.pop("--rate")
    if "--trace" in flags:  # its rows are the requests: the drawn mix's flags are refused
        for flag in ("--prompt", "--output", "--requests", "--seed"):
            flags.pop(flag, None)
    argv = ["serve"]
    for flag, value in flags.items():
        argv += [flag] if flag in SWITCHES else [flag, value]
    return argv


@FUZZ
@given(st.data())
def test_serve_flags(tmp_path_factory, capsys, data):
    """Lengths and counts stay cheap (``SERVE_ALONE``). --followup, --think and
    --no-prefix-cache drawn without --turns are refused (they need conversations), with
    --trace too (its rows are single requests)."""
    flags = drawn_flags(data, tmp_path_factory.mktemp("cli"), SERVE, SERVE_EXTRA, *SERVE_ALONE)
    event(f"exit {exits_cleanly(capsys, serve_argv(flags))}")


#: Conversations: two of three turns, the flags of a conversation fuzzed with them.
CONVERSATION = {**SERVE, "--requests": "2", "--turns": "3", "--followup": "256",
                "--think": "1"}


@settings(FUZZ, max_examples=60)
@given(st.data())
def test_serve_conversation_flags(tmp_path_factory, capsys, data):
    """The same invariants with conversations in the base: each drawn value of --turns,
    --followup, --think, --kv-offload-gb and --kv-offload-tier (a host KV store: a tier of
    the profile, GB within it, a policy keeping KV in HBM, the prefix cache on) reaches the
    server or is refused in one line."""
    flags = drawn_flags(data, tmp_path_factory.mktemp("cli"), CONVERSATION,
                        ["--no-prefix-cache", "--find-rate", "--slo-ttft", "--max-batch",
                         "--trace", "--prefill-chunk", "--kv-offload-gb", "--kv-offload-tier",
                         "--policy"], *SERVE_ALONE)
    event(f"exit {exits_cleanly(capsys, serve_argv(flags))}")


#: Conversations with a host KV store of 1 GB (on dev-zen4-2core's ddr0, the default).
STORED = {**CONVERSATION, "--kv-offload-gb": "1"}


@settings(FUZZ, max_examples=40)
@given(st.data())
def test_serve_store_flags(tmp_path_factory, capsys, data):
    """A store in the base: each drawn tier, size, policy (hybridgen keeps KV in host memory
    and takes none), --no-prefix-cache (the store serves the cache) or --turns (1: no
    conversations) reaches the server or is refused in one line."""
    flags = drawn_flags(data, tmp_path_factory.mktemp("cli"), STORED,
                        ["--kv-offload-tier", "--no-prefix-cache"], *SERVE_ALONE)
    event(f"exit {exits_cleanly(capsys, serve_argv(flags))}")


@FUZZ
@given(st.data())
def test_models_profiles_policies_arguments(tmp_path_factory, capsys, data):
    tmp_path = tmp_path_factory.mktemp("cli")
    values = [place(v, tmp_path) for v in data.draw(st.lists(VALUE, min_size=1, max_size=2))]
    verb = data.draw(st.sampled_from([["models", "show"], ["profiles", "show"], ["policies"],
                                      ["models", "show", "--dtype"]]))
    event(f"exit {exits_cleanly(capsys, [*verb, *values])}")


@FUZZ
@given(st.data())
def test_validate_flags_up_to_measuring(tmp_path_factory, capsys, monkeypatch, data):
    """Up to where validate hands the arguments to the hardware backend (which loads the
    profile and study, then measures): that call is replaced by one that stops the run."""
    import hw_backend.validate

    class Reached(Exception):
        pass

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(hw_backend.validate, "run_validation", reached)
    tmp_path = tmp_path_factory.mktemp("cli")
    flags = {"--profile": "dev-zen4-2core"}
    for flag in data.draw(st.lists(st.sampled_from(
            ["--profile", "--study", "--threshold", "--out", "--max-context", "--steps",
             "--accelerator", "--statistic", "--cases", "--quiet-wait"]), min_size=1,
            max_size=2, unique=True)):
        flags[flag] = place(data.draw(VALUE), tmp_path)
    argv = ["validate", *(part for flag, value in flags.items() for part in (flag, value))]
    try:
        event(f"exit {exits_cleanly(capsys, argv)}")
    except Reached:
        event("reached the measuring")


@pytest.mark.parametrize("verb", [["simulate"], ["serve"], ["study"], ["models", "show"],
                                  ["profiles", "show"], ["policies"], ["validate"], ["run"]])
def test_help_exits_0(capsys, verb):
    assert exits_cleanly(capsys, [*verb, "--help"]) == 0
    assert capsys.readouterr().err == ""
