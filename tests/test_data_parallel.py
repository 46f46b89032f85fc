"""Data parallelism (``workload.data_parallel``): copies of the model side by side, each on its
own GPUs decoding its own sequences, all sharing the host (hgsim.tensor_parallel.rank_view)."""

from __future__ import annotations

import math

import pytest
from test_cli_basic import run_cli

from hgsim.catalog import get_model
from hgsim.errors import UserError
from hgsim.profiles import load_profile
from hgsim.simulate import Fidelity, simulate
from hgsim.tensor_parallel import rank_view
from hgsim.workload import Workload

HGX = "hgx-h100x8-2socket-cxl"
FAST = Fidelity(decode_samples=2, accuracy=False)


def _run(policy: str, context: str, replicas: int, tp: int = 1, model: str = "llama-3.1-8b"):
    return simulate(HGX, model, policy, Workload(context=context, batch=4, gen=4,
                                                 tensor_parallel=tp, data_parallel=replicas),
                    fidelity=FAST)


def _comparable(row: dict) -> dict:
    return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def test_one_replica_is_the_run_without_the_field():
    plain = simulate(HGX, "llama-3.1-8b", "hybridgen", Workload(context="64k", gen=4, batch=2),
                     fidelity=FAST)
    one = simulate(HGX, "llama-3.1-8b", "hybridgen",
                   Workload(context="64k", gen=4, batch=2, data_parallel=1), fidelity=FAST)
    assert _comparable(plain.to_row()) == _comparable(one.to_row())


@pytest.mark.parametrize("replicas", [2, 4, 8])
def test_replicas_that_share_nothing_on_the_host_multiply_throughput_exactly(replicas):
    """Llama-3.1-8B at 32k with its KV in HBM uses no host resource while decoding: every copy
    runs as one alone, so the system decodes ``replicas`` times the tokens, at the same
    per-token latency, with the same memory per GPU."""
    one, many = _run("gpu_only", "32k", 1), _run("gpu_only", "32k", replicas)
    assert many.tokens_per_s == pytest.approx(replicas * one.tokens_per_s, rel=1e-12)
    assert many.latency_stats_ms() == pytest.approx(one.latency_stats_ms(), rel=1e-12)
    assert many.footprint_bytes["hbm"] == pytest.approx(one.footprint_bytes["hbm"])
    # energy counts every replica's GPU, each as busy as the first
    gpus = [f"gpu{i}" for i in range(replicas)]
    assert all(many.energy_j[g] == pytest.approx(one.energy_j["gpu0"], rel=1e-9) for g in gpus)


def test_replicas_sharing_the_host_slow_each_other_down():
    """HybridGen at 128k scans KV on the host: GPUs 0-3 hang off cpu0, so up to four replicas
    share its cores and DRAM (each slower as more join), and replicas 5-8 use cpu1 as 1-4 use
    cpu0 (eight are exactly twice four)."""
    per_replica = {d: _run("hybridgen", "128k", d).tokens_per_s / d for d in (1, 2, 4, 8)}
    assert per_replica[1] > per_replica[2] > per_replica[4]
    assert per_replica[8] == pytest.approx(per_replica[4], rel=1e-9)


def test_replicas_share_host_memory_among_every_rank():
    """Each of 4 replicas x TP 2 sees an eighth of the host at most (4 ranks per socket)."""
    profile, model = load_profile(HGX), get_model("llama-3.1-70b")
    view = rank_view(profile, model, 2, replicas=4)
    assert view.ranks == 8 and view.allreduce.ranks == 2  # the all-reduce stays in its replica
    assert view.profile.tiers["ddr0"].capacity_gb == pytest.approx(
        profile.tiers["ddr0"].capacity_gb / 4)
    assert "ddr1" not in view.profile.tiers  # the other socket's ranks hold it
    host = sum(t.capacity_gb for t in profile.tiers.values())
    assert view.ranks * sum(t.capacity_gb for t in view.profile.tiers.values()) == pytest.approx(host)
    assert list(view.system.gpus) == [f"gpu{i}" for i in range(8)]


def test_tensor_parallel_replicas_each_all_reduce_on_their_own_nvlinks():
    """Two replicas of TP 4: each ring's NVLinks carry its own all-reduces, none crosses."""
    result = _run("gpu_only", "8k", 2, tp=4, model="llama-3.1-70b")
    assert result.feasible
    one = _run("gpu_only", "8k", 1, tp=4, model="llama-3.1-70b")
    assert result.tokens_per_s == pytest.approx(2 * one.tokens_per_s, rel=1e-12)
    profile = load_profile(HGX)
    used = {name for name, joules in result.energy_j.items()
            if profile.links.get(name) is not None and profile.links[name].kind == "nvlink"
            and joules > 0}
    assert used, "the rings' NVLinks carry energy"
    for name in used:
        a, b = (int(g.removeprefix("gpu")) for g in profile.links[name].endpoints)
        assert a // 4 == b // 4, f"{name} joins two replicas"


def test_more_replicas_than_gpus_is_a_user_error_naming_the_field():
    with pytest.raises(UserError) as info:
        _run("gpu_only", "8k", 3, tp=4, model="llama-3.1-70b")
    assert str(info.value).startswith("workload.data_parallel: 3 replicas x tensor_parallel 4 "
                                      "need 12 GPUs")
    with pytest.raises(UserError, match="workload.data_parallel"):
        simulate("h100-80gb-spr-cxl", "llama-3.1-8b", "hybridgen",
                 Workload(context="8k", gen=2, data_parallel=2), fidelity=FAST)


def test_cli_runs_replicas_and_refuses_too_many_in_one_line():
    ok = run_cli("simulate", "--profile", HGX, "--model", "llama-3.1-8b", "--context", "32k",
                 "--gen", "2", "--samples", "2", "--data-parallel", "8", "--json")
    assert ok.returncode == 0, ok.stderr
    assert '"data_parallel": 8' in ok.stdout
    bad = run_cli("simulate", "--profile", HGX, "--model", "llama-3.1-8b", "--context", "32k",
                  "--gen", "2", "--data-parallel", "16")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "workload.data_parallel" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    zero = run_cli("simulate", "--profile", HGX, "--model", "llama-3.1-8b", "--context", "32k",
                   "--gen", "2", "--data-parallel", "0")
    assert zero.returncode == 2 and "--data-parallel" in zero.stderr


def test_a_study_sweeps_replicas_and_one_keeps_its_point_key(tmp_path):
    from test_tensor_parallel import _study

    from hgsim.errors import ConfigError
    from hgsim.study.load import load_study

    def study(values: str):
        return _study(tmp_path, values, field="data_parallel", name="dp", model="llama-3.1-8b")

    points = study("[1, 8]").expansion.points
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"name: dp\nbase:\n  profile: {HGX}\n  model: llama-3.1-8b\n"
                     "  workload: {context: 8k, gen: 2}\n")
    (before,) = load_study(plain).expansion.points
    assert points[0].spec.key == before.spec.key != points[1].spec.key
    with pytest.raises(ConfigError) as info:
        study("[1, 9]")
    text = str(info.value)
    assert "dp.yaml:8" in text and "workload.data_parallel[1]" in text and "\n" not in text


def test_spread_puts_each_copy_on_the_next_socket():
    from hgsim.tensor_parallel import placed_profile

    profile = load_profile(HGX)
    order = {(n, d): list(placed_profile(profile, n, d, "spread").gpus)[:n * d]
             for n, d in ((1, 2), (1, 8), (2, 2), (4, 2), (3, 2))}
    assert order[1, 2] == ["gpu0", "gpu4"]
    assert order[1, 8] == ["gpu0", "gpu4", "gpu1", "gpu5", "gpu2", "gpu6", "gpu3", "gpu7"]
    assert order[2, 2] == ["gpu0", "gpu1", "gpu4", "gpu5"]
    assert order[4, 2] == [f"gpu{i}" for i in range(8)]
    assert order[3, 2] == ["gpu0", "gpu1", "gpu2", "gpu4", "gpu5", "gpu6"]
    assert placed_profile(profile, 1, 2, "packed") is profile
    assert placed_profile(profile, 4, 2, "spread") is profile  # the listed order already


def test_two_spread_copies_run_as_one_copy_on_each_socket():
    """Spread, two copies of HybridGen at 128k each have a socket to themselves: each runs as
    one copy alone does, twice the tokens; packed they share cpu0 and run slower."""
    one = _run("hybridgen", "128k", 1)
    workload = Workload(context="128k", batch=4, gen=4, data_parallel=2, gpu_placement="spread")
    spread = simulate(HGX, "llama-3.1-8b", "hybridgen", workload, fidelity=FAST)
    packed = _run("hybridgen", "128k", 2)
    assert spread.tokens_per_s == pytest.approx(2 * one.tokens_per_s, rel=1e-9)
    assert packed.tokens_per_s < 0.97 * spread.tokens_per_s
    assert spread.to_row()["gpu_placement"] == "spread"
    # energy: one copy's host work on each socket
    assert spread.energy_j["cpu0"] == pytest.approx(spread.energy_j["cpu1"], rel=1e-9)
    assert spread.energy_j["gpu4"] == pytest.approx(spread.energy_j["gpu0"], rel=1e-9)
    assert "gpu1" not in spread.energy_j  # the GPUs the copies took, not the first two


def test_cli_spreads_copies():
    out = run_cli("simulate", "--profile", HGX, "--model", "llama-3.1-8b", "--context", "128k",
                  "--gen", "2", "--samples", "2", "--data-parallel", "2", "--gpu-placement",
                  "spread")
    assert out.returncode == 0, out.stderr
    assert "replicas 2, spread" in out.stdout
    assert "(2 copies x " in out.stdout  # the system's throughput and one copy's


def test_cli_spread_without_copies_is_a_one_line_error():
    out = run_cli("simulate", "--profile", HGX, "--model", "llama-3.1-8b", "--context", "8k",
                  "--gen", "2", "--gpu-placement", "spread")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--gpu-placement" in out.stderr and "--data-parallel 2" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
