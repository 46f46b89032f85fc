"""Command-line arguments that used to slip through: a repeated ``--option``, NaN and infinite
float flags, thousands of ``--jobs``, a misspelt base value that a sweep overrides, a model
name that silently matched another model."""

from __future__ import annotations

import pytest
from bad_input import STUDY, line_of, user_error, write

from hgsim.catalog import get_model
from hgsim.cli import main
from hgsim.errors import UserError

SIMULATE = ("simulate", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--context", "1k",
            "--gen", "4", "--samples", "2")


def test_repeated_option_is_an_error_not_last_wins(capsys):
    line = user_error(capsys, *SIMULATE, "--option", "topk_ratio=0.1",
                      "--option", "topk_ratio=0.2")
    assert line == ("hgsim simulate: error: --option: 'topk_ratio' is given twice "
                    "(topk_ratio=0.1 and topk_ratio=0.2); give each option once")


@pytest.mark.parametrize(("option", "message"), [
    ("topk_ratio=true", "--option topk_ratio: expected a number, got true"),
    ("topk_ratio=nan", "--option topk_ratio: input should be a finite number"),
    ("topk_ratio=inf", "--option topk_ratio: input should be a finite number"),
    ("hbm_reserve_gb=1e300", "--option hbm_reserve_gb: 1e+300 is not a plausible value"),
    ("topk_ratio=2", "--option topk_ratio: input should be less than or equal to 1"),
    ("topk=0.1", "--option topk: policy 'hybridgen' has no option 'topk' (its options: "),
    ("host_socket=-1", "--option host_socket: a socket index is >= 0, got -1"),
    # checked against the profile, a one-socket machine
    ("host_socket=1", "--option host_socket: profile dev-zen4-2core has no socket 1; its "
                      "sockets: 0 (cpu0)"),
])
def test_bad_option_value_names_the_option(capsys, option, message):
    line = user_error(capsys, *SIMULATE, "--option", option)
    assert line.startswith(f"hgsim simulate: error: {message}"), line


def test_reversed_scheduler_bounds_are_an_error(capsys):
    """min_ratio above max_ratio ran, with min_ratio silently replaced by topk_ratio; one bound
    alone may pass the other's default (setup widens the bounds to topk_ratio, which is how
    the equal-accuracy search raises min_ratio)."""
    line = user_error(capsys, *SIMULATE, "--option", "min_ratio=0.5", "--option",
                      "max_ratio=0.1")
    assert line == ("hgsim simulate: error: --option: min_ratio 0.5 is above max_ratio 0.1: "
                    "the scheduler's bounds are reversed")


def test_none_is_the_word_where_an_option_takes_it_and_no_value_elsewhere():
    """``weight_offload=none`` names the option's value 'none'; it read as no value (YAML-style
    null) and was refused. Where an option takes no value, none still means that."""
    from hgsim.commands.policy_options import policy_options

    assert policy_options(["weight_offload=none"], "hybridgen") == {"weight_offload": "none"}
    assert policy_options(["gpu_share=none"], "hybridgen") == {"gpu_share": None}
    with pytest.raises(UserError, match="'auto' or 'none'"):
        policy_options(["weight_offload=null"], "hybridgen")


def test_option_syntax_error_names_the_flag(capsys):
    line = user_error(capsys, *SIMULATE, "--option", "topk_ratio")
    assert line == "hgsim simulate: error: --option: expects KEY=VALUE, got 'topk_ratio'"


@pytest.mark.parametrize(("flag", "value"), [("--context", "0"), ("--batch", "true"),
                                             ("--context", "10000000000000")])
def test_workload_flags_name_the_flag_without_pydantic_prefixes(capsys, flag, value):
    line = user_error(capsys, *SIMULATE, flag, value)
    assert line.startswith(f"hgsim simulate: error: {flag}: ") and "Value error" not in line


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])  # 1e999: see the argparse mistakes
def test_validate_float_flags_must_be_finite(capsys, value):
    pytest.importorskip("torch")
    for flag in ("--threshold", "--quiet-wait"):
        line = user_error(capsys, "validate", "--profile", "dev-zen4-2core", f"{flag}={value}")
        assert line == f"hgsim validate: error: {flag}: must be a finite number, got {value}"


def test_calibrate_quiet_wait_must_be_finite(capsys, tmp_path):
    pytest.importorskip("torch")
    line = user_error(capsys, "calibrate", "--out", str(tmp_path / "p.yaml"),
                      "--quiet-wait", "inf")
    assert line == "hgsim calibrate: error: --quiet-wait: must be a finite number, got inf"
    assert user_error(capsys, "calibrate", "--out", str(tmp_path / "p.yaml"),
                      "--quiet-wait", "-1") == "hgsim calibrate: error: --quiet-wait: must be >= 0, got -1"


def test_jobs_beyond_the_machine_are_capped_with_a_warning(tmp_path, capsys, monkeypatch):
    import os

    import hgsim.study.run

    seen = {}

    def execute(todo, store, options):
        seen["jobs"] = options.jobs
        raise KeyboardInterrupt  # enough: the pool would have been started here

    monkeypatch.setattr(hgsim.study.run, "execute", execute)
    study = write(tmp_path / "s.yaml", STUDY)
    assert main(["study", str(study), "--out", str(tmp_path / "out"), "-j", "100000",
                 "-q"]) == 130
    cpus = os.cpu_count()
    assert seen["jobs"] == cpus
    assert (f"hgsim study: warning: --jobs 100000 is more than the {cpus} CPUs of this "
            f"machine; using {cpus}") in capsys.readouterr().err


@pytest.mark.parametrize(("key", "typo", "axis", "message"), [
    ("policy", "hybridgn", "policy: [flexgen, hybridgen]",
     "unknown policy 'hybridgn' (did you mean 'hybridgen'?)"),
    ("model", "opt-6.7c", "model: [opt-6.7b, llama-2-7b]", "unknown model 'opt-6.7c'"),
    ("profile", "dev-zen4-2cor", "profile: [dev-zen4-2core]",
     "unknown hardware profile 'dev-zen4-2cor'; did you mean 'dev-zen4-2core'?"),
])
def test_base_value_overridden_by_a_sweep_is_still_checked(tmp_path, capsys, key, typo, axis,
                                                           message):
    text = STUDY.replace(f"  {key}: ", f"  {key}: {typo}  # was: ", 1)
    text = text.replace("    policy: [flexgen, hybridgen]", f"    {axis}")
    path = write(tmp_path / "s.yaml", text)
    line = user_error(capsys, "study", str(path), "--dry-run")
    assert line.startswith(f"hgsim study: error: {path}:{line_of(text, typo)}: base.{key}: "
                           f"{message}"), line


def test_model_names_keep_digits_apart():
    """"opt-1.3b" is a real model (OPT-1.3B), not another spelling of OPT-13B."""
    with pytest.raises(UserError, match="unknown model 'opt-1.3b'; did you mean 'opt-13b'"):
        get_model("opt-1.3b")
    assert get_model("llama-3-1-8b").name == "llama-3.1-8b"
    assert get_model("Qwen2.5_7B").name == "qwen2.5-7b"


def test_a_max_context_below_every_case_is_an_error_before_any_work(capsys, tmp_path,
                                                                     monkeypatch):
    """Not a run of the micro-cases alone that exits 0 (it used to write them beside)."""
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    line = user_error(capsys, "validate", "--profile", "dev-zen4-2core", "--max-context", "1k")
    assert line == ("hgsim validate: error: --max-context 1024 leaves none of the study's 20 "
                    "cases (the smallest context is 4096)")
    assert list(tmp_path.iterdir()) == []


def test_a_validation_error_no_command_checked_is_still_one_line(capsys, monkeypatch):
    """The last line of defence in ``cli.main``: a model's validation error, named by model
    and field, exit 2, no traceback."""
    from pydantic import BaseModel, Field

    from hgsim.commands import simulate

    class Sized(BaseModel):
        size: int = Field(gt=0)

    def broken(args):
        Sized(size=0)

    monkeypatch.setattr(simulate, "run", broken)
    line = user_error(capsys, *SIMULATE)
    assert line == "hgsim simulate: error: Sized.size: input should be greater than 0"


def _argparse_error(capsys, *argv: str) -> str:
    """A mistake argparse itself catches: exit 2 and one line, no usage block."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(list(argv))
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and not err.startswith("usage"), err
    return lines[0]


@pytest.mark.parametrize(("argv", "line"), [
    ((*SIMULATE, "--samples", "nan"),
     "hgsim simulate: error: argument --samples: invalid int value: 'nan' "
     "(see hgsim simulate --help)"),
    (("simulate", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--context", "1k",
      "--kv-dtype", "fp4"), "hgsim simulate: error: argument --kv-dtype: invalid choice: 'fp4'"),
    (("validate", "--profile", "dev-zen4-2core", "--threshold", ""),
     "hgsim validate: error: argument --threshold: invalid float value: ''"),
    (("study", "s.yaml", "--jobs", "nan"), "hgsim study: error: argument --jobs/-j: invalid int"),
    (("run", "--model", "tiny-llama", "--seed", "1.5"),
     "hgsim run: error: argument --seed: invalid int value: '1.5'"),
    (("models", "--dtype", "fp5"), "hgsim models: error: argument --dtype: invalid choice"),
    (("profiles", "shw"), "hgsim profiles: error: argument ACTION: invalid choice: 'shw'"),
    (("profiles", "show"), "hgsim profiles show: error: the following arguments are required"),
    # was 'invalid int value:' and all 5000 digits (Python reads at most 4300 as an int)
    ((*SIMULATE, "--samples", "9" * 5000), "hgsim simulate: error: argument --samples: a "
     "5000-digit number is too large (at most 18 digits) (see hgsim simulate --help)"),
    (("run", "--model", "tiny-llama", "--seed", "9" * 5000), "hgsim run: error: argument "
     "--seed: a 5000-digit number is too large (at most 4300 digits) (see hgsim run --help)"),
    # a float flag past a float's range was read as inf: 'must be a finite number, got inf',
    # '--rate: must be a positive number ..., got inf' for a positive number typed
    (("validate", "--profile", "dev-zen4-2core", "--threshold=1e999"), "hgsim validate: error: "
     "argument --threshold: '1e999' is too large a number (a float holds at most 1.8e+308) "
     "(see hgsim validate --help)"),
    (("serve", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--rate", "9" * 5000),
     f"hgsim serve: error: argument --rate: '{'9' * 40}'...(5,000 characters) is too large a "
     "number (a float holds at most 1.8e+308) (see hgsim serve --help)"),
    (("serve", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--rate", "x" * 5000),
     f"hgsim serve: error: argument --rate: invalid float value: '{'x' * 40}'...(5,000 "
     "characters) (see hgsim serve --help)"),
    ((*SIMULATE, "--samples", "x" * 5000), "hgsim simulate: error: argument --samples: invalid "
     f"int value: '{'x' * 40}'...(5,000 characters) (see hgsim simulate --help)"),
    # a long value argparse quotes is cut (was quoted whole: a line of 5000 characters)
    ((*SIMULATE, "--kv-dtype", "x" * 5000), "hgsim simulate: error: argument --kv-dtype: "
     f"invalid choice: '{'x' * 40}'...(5,000 characters) (choose from 'fp32', 'fp16', 'bf16', "
     "'fp8') (see hgsim simulate --help)"),
    (("x" * 5000,), f"hgsim: error: argument COMMAND: invalid choice: '{'x' * 40}'...(5,000 "
     "characters) (choose from 'simulate', "),
])
def test_argparse_mistakes_are_one_line_without_the_usage_block(capsys, argv, line):
    assert _argparse_error(capsys, *argv).startswith(line)


def test_long_unrecognized_argument_is_cut(capsys):
    line = user_error(capsys, *SIMULATE, "x" * 5000)
    assert line == (f"hgsim simulate: error: unrecognized arguments: {'x' * 40}...(5,000 "
                    "characters) (see hgsim simulate --help)"), line


def test_unknown_flag_is_named_by_its_command(capsys):
    line = user_error(capsys, *SIMULATE, "--trials", "2")
    assert line == ("hgsim simulate: error: unrecognized arguments: --trials 2 "
                    "(see hgsim simulate --help)")


def _no_measurement(*args, **kwargs):
    raise AssertionError("measured before the input was checked")


@pytest.mark.parametrize(("args", "line"), [
    (["--max-context", ""], "--max-context: expected a count such as 4096 or 32k, got ''"),
    (["--quiet-wait", "1e15"], "--quiet-wait: must be in [0, 3600] seconds, got 1e+15"),
    (["--out", ""], "--out: is empty; give an output prefix or a folder"),
    (["--steps", "1000000000"],
     "--steps: must be in [1, 100,000] (compared steps per case), got 1,000,000,000"),
    (["--accelerator", "cuda"], "--accelerator cuda, but torch.cuda.is_available() is False"),
])
def test_validate_mistakes_before_any_measurement(capsys, tmp_path, monkeypatch, args, line):
    """'' used to mean "no limit" / "the default output", a typo'd wait or step count ran for
    ever, and --accelerator cuda without CUDA was a traceback after the micro-cases ran."""
    torch = pytest.importorskip("torch")
    if args[0] == "--accelerator" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    import hw_backend.validate

    monkeypatch.setattr(hw_backend.validate, "run_micro", _no_measurement)
    monkeypatch.setattr(hw_backend.validate, "measure", _no_measurement)
    monkeypatch.chdir(tmp_path)
    got = user_error(capsys, "validate", "--profile", "dev-zen4-2core", *args)
    assert got == f"hgsim validate: error: {line}"
    assert list(tmp_path.iterdir()) == []


def test_calibrate_quiet_wait_has_an_upper_bound(capsys, tmp_path):
    pytest.importorskip("torch")
    line = user_error(capsys, "calibrate", "--quick", "--out", str(tmp_path / "p.yaml"),
                      "--quiet-wait", "1e15")
    assert line == "hgsim calibrate: error: --quiet-wait: must be in [0, 3600] seconds, got 1e+15"
    assert list(tmp_path.iterdir()) == []


def test_an_infeasible_validation_case_is_reported_before_the_micro_cases():
    """A case that cannot run (here: 10**9 steps of KV) used to surface only after the
    micro-cases had been measured."""
    pytest.importorskip("torch")
    from hgsim.profiles import load_profile
    from hgsim.validation import DEFAULT_STUDY, cases, load_study
    from hw_backend.validate import check_feasible

    study = load_study(DEFAULT_STUDY)
    profile = load_profile("dev-zen4-2core")
    todo = cases(study, device_threads=1, host_threads=1)
    check_feasible(profile, study, todo)  # the shipped study runs
    huge = study.model_copy(update={"steps": 10**9})
    with pytest.raises(UserError, match=r"@ 4k: infeasible on dev-zen4-2core: .* short by"):
        check_feasible(profile, huge, todo)


def test_validate_partial_results_go_where_the_outputs_go(tmp_path):
    """With --out FOLDER the partial CSV went beside the folder (FOLDER.partial.csv), and
    --out / was a traceback."""
    pytest.importorskip("torch")
    from hgsim.commands.validate import _partial_writer

    _, path = _partial_writer(tmp_path, "dev-zen4-2core")
    assert path == tmp_path / "dev-zen4-2core.validation.partial.csv"


@pytest.mark.parametrize(("args", "line"), [
    (["--out", ""], "--out: . is a folder; give the name of a file to write"),
    (["--out", "{tmp}/p.yaml", "--name", ""],
     "--name: is empty; give the profile a name (or leave --name out to use the file's stem)"),
])
def test_calibrate_argument_mistakes_before_any_measurement(capsys, tmp_path, monkeypatch,
                                                            args, line):
    """--out '' was a ValueError traceback; --name '' wrote a profile with an empty name."""
    pytest.importorskip("torch")
    import hw_backend.calibrate

    monkeypatch.setattr(hw_backend.calibrate, "_run", _no_measurement)
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert user_error(capsys, "calibrate", "--quick", *argv) == f"hgsim calibrate: error: {line}"
    assert list(tmp_path.iterdir()) == []


def test_simulate_empty_trace_is_an_error_not_no_trace(capsys, tmp_path, monkeypatch):
    """--trace '' used to run and exit 0 without writing any trace."""
    monkeypatch.chdir(tmp_path)
    line = user_error(capsys, *SIMULATE, "--trace", "")
    assert line == "hgsim simulate: error: --trace: is empty; give the name of a file to write"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "line"), [
    (["--out", ""], "--out: is empty; give a folder (or leave --out out for results/<name>)"),
    (["--executor", "dask"],
     "--executor dask needs --scheduler ADDRESS or --scheduler-file PATH"),
    (["--executor", "dask", "--scheduler", ""],
     "--scheduler: is empty; give the scheduler's address, e.g. tcp://10.0.0.5:8786"),
    (["--executor", "dask", "--scheduler-file", "{tmp}"],
     "--scheduler-file: '{tmp}' is a folder or empty; give the scheduler's JSON file"),
    (["--executor", "dask", "--scheduler-file", "{tmp}/sched.json"],
     "--scheduler-file: {tmp}/sched.json did not appear within 0.2 s (the Dask scheduler "
     "writes it when it starts: start it first)"),
])
def test_study_flag_mistakes_write_nothing(capsys, tmp_path, monkeypatch, args, line):
    """--out '' meant results/<name>; --executor dask without a scheduler wrote
    study.resolved.yaml before saying so; a missing --scheduler-file waited for ever."""
    import hgsim.commands.study

    monkeypatch.setattr(hgsim.commands.study, "SCHEDULER_FILE_WAIT_S", 0.2)
    study = write(tmp_path / "s.yaml", STUDY)
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    got = user_error(capsys, "study", str(study), "-q", *argv)
    assert got == "hgsim study: error: " + line.replace("{tmp}", str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["s.yaml"]


def test_an_unreachable_scheduler_leaves_no_study_folder(capsys, tmp_path, monkeypatch):
    """The executor's error (here: no scheduler at the address) came after
    results/<name>/study.resolved.yaml was written; a folder the run created is removed."""
    import hgsim.study.run

    def execute(todo, store, options):
        raise UserError("cannot connect to Dask scheduler tcp://127.0.0.1:1 (timed out)")

    monkeypatch.setattr(hgsim.study.run, "execute", execute)
    study = write(tmp_path / "s.yaml", STUDY)
    monkeypatch.chdir(tmp_path)
    line = user_error(capsys, "study", str(study), "-q", "--executor", "dask", "--scheduler",
                      "tcp://127.0.0.1:1")
    assert line == ("hgsim study: error: cannot connect to Dask scheduler tcp://127.0.0.1:1 "
                    "(timed out)")
    assert [p.name for p in tmp_path.iterdir()] == ["s.yaml"]
    kept = tmp_path / "kept"
    (kept / "points").mkdir(parents=True)  # a folder that was there before is left alone
    assert main(["study", str(study), "-q", "--out", str(kept), "--executor", "dask",
                 "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert kept.is_dir()


@pytest.mark.parametrize("chunk", ["8k", "auto"])
def test_prefill_chunk_without_prefill_is_an_error_not_ignored(capsys, chunk):
    """--prefill-chunk alone used to run and exit 0 with no prefill at all (no TTFT row)."""
    line = user_error(capsys, *SIMULATE, "--prefill-chunk", chunk)
    assert line == ("hgsim simulate: error: --prefill-chunk: chunks the prompt's prefill, "
                    "which runs only with --prefill: add it")


def test_api_prefill_chunk_without_prefill_is_an_error_not_ignored():
    from hgsim import api

    with pytest.raises(UserError, match="^prefill_chunk_tokens: .*only with prefill=True"):
        api.simulate("dev-zen4-2core", "opt-6.7b", context="1k", gen=4, samples=2,
                     prefill_chunk_tokens=512)
    assert api.simulate("dev-zen4-2core", "opt-6.7b", context="1k", gen=4, samples=2,
                        prefill=True, prefill_chunk_tokens=512).prefill_chunk_tokens == 512


@pytest.mark.parametrize(("verb", "flag", "value"), [
    (SIMULATE, "--context", "-1k"), (SIMULATE, "--batch", "-2"), (SIMULATE, "--gen", "-1"),
    (SIMULATE, "--prefill-chunk", "-8k"),
    (("run", "--model", "opt-6.7b", "--context", "1k"), "--context", "-64k"),
    (("run", "--model", "opt-6.7b", "--context", "1k"), "--warmup", "-1k"),
])
def test_a_negative_count_names_its_flag(capsys, verb, flag, value):
    """argparse took "-1k" for an unknown option ("argument --context: expected one argument")
    where a plain "-2" reached the flag's own check; both now say what the value must be."""
    line = user_error(capsys, *verb, flag, value)
    must = ("expected a token count such as 8k, or auto" if flag == "--prefill-chunk"
            else "must be a positive count such as 4096 or 32k")
    assert line == f"hgsim {verb[0]}: error: {flag}: {must}, got '{value}'"


def test_negative_values_join_the_option_before_them_and_nothing_else():
    from hgsim.cli import attach_negative_values

    assert attach_negative_values(["simulate", "--context", "-1k", "-j", "-2k", "--gen", "4"]) \
        == ["simulate", "--context=-1k", "-j=-2k", "--gen", "4"]
    assert attach_negative_values(["--context=-1k", "-2k"]) == ["--context=-1k", "-2k"]
    assert attach_negative_values(["study", "--", "--x", "-1"]) == ["study", "--", "--x", "-1"]
    assert attach_negative_values(["--option", "-x"]) == ["--option", "-x"]  # an option, not -N


def test_a_bad_study_is_the_one_line_printed_even_with_too_many_jobs(tmp_path, capsys):
    """--jobs above the CPUs warned first, so a mistake in the study came out as the second of
    two lines; the study is read before the workers are counted."""
    study = tmp_path / "s.yaml"
    study.write_text("name: x\nbase: {profle: h100}\n")
    assert main(["study", str(study), "--jobs", "100000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"hgsim study: error: {study}:2: base.profle: unknown key (did you mean "
                   "'profile'?)"]


@pytest.mark.parametrize("value", ["1\nk", "1k\n", "\n1k", "1\tk", "1\rk"])
def test_a_count_with_a_control_character_is_refused_naming_its_flag(capsys, value):
    """"1\\nk" read as 1024 tokens: the count pattern's ``\\s`` took the newline and ``$``
    matched before a trailing one."""
    line = user_error(capsys, *SIMULATE, "--context", value)
    assert line == (f"hgsim simulate: error: --context: expected a count such as 4096 or 32k, "
                    f"got {value!r}")


@pytest.mark.parametrize("command", ["simulate", "run"])
def test_negative_samples_name_the_flag_in_the_usual_form(capsys, command):
    args = ([*SIMULATE, "--samples", "-1"] if command == "simulate" else
            ["run", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--context", "1k",
             "--samples", "-1"])
    assert main(args) == 2
    assert capsys.readouterr().err.strip().endswith("--samples: must be >= 0, got -1")


def test_int_flags_read_what_int_reads_up_to_their_digits():
    """``argument_int`` (every type=int flag) and ``argument_seed`` read what int() reads;
    only past their digits is a number refused (a seed may be any NumPy takes)."""
    import argparse

    from hgsim.commands.checks import argument_int, argument_seed

    assert [argument_int(t) for t in (" 7", "+7", "-7", "1_000", "0" * 30 + "5")] == [
        7, 7, -7, 1000, 5]
    assert argument_int("9" * 18) == 10**18 - 1
    assert argument_seed("9" * 23) == 10**23 - 1
    for reader, text in ((argument_int, "9" * 19), (argument_seed, "9" * 4301)):
        with pytest.raises(argparse.ArgumentTypeError, match="-digit number is too large"):
            reader(text)


def test_float_flags_read_negative_zero_as_zero():
    """'--slo-ttft -0' printed 'SLO TTFT <= -0 s' and --think -0 wrote think_s -0.0."""
    from hgsim.cli import build_parser

    args = build_parser().parse_args(["serve", "--profile", "p", "--model", "m", "--rate=-0",
                                      "--slo-ttft=-0", "--think=-0"])
    assert [str(v) for v in (args.rate, args.slo_ttft, args.think)] == ["0.0"] * 3
