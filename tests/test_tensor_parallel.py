"""Tensor parallelism (hgsim.tensor_parallel): rank 0's shard of the model on its share of the
machine, ring all-reduces on its stream, results for the whole system."""

from __future__ import annotations

import math

import pytest
from conftest import make_profile
from test_cli_basic import run_cli

from hgsim.catalog import get_model
from hgsim.errors import UserError
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.simulate import Fidelity, simulate
from hgsim.tensor_parallel import (
    allreduce_bytes,
    logits_bytes,
    rank_profile,
    rank_view,
    ring_allgather_s,
    ring_allreduce,
    ring_allreduce_s,
    shard_model,
    sharers,
    socket_mirror,
    system_profile,
)
from hgsim.workload import Workload

HGX = "hgx-h100x8-2socket-cxl"
FAST = Fidelity(decode_samples=2, accuracy=False)


def _four_gpu_profile(**extra):
    """The conftest machine with gpu0, gpu1 on s0 and gpu2, gpu3 on s1 (own PCIe links)."""
    gpu = dict(make_profile().gpus["gpu0"].model_dump())
    gpus = {f"gpu{i}": {**gpu, "socket": "s0" if i < 2 else "s1", "link": f"pcie{i}"}
            for i in range(4)}
    base = make_profile()
    links = {name: link.model_dump() for name, link in base.links.items()}
    pcie = links["pcie0"]
    for i in range(1, 4):
        links[f"pcie{i}"] = {**pcie, "endpoints": ["s0" if i < 2 else "s1", f"gpu{i}"]}
    links.update(extra.pop("links", {}))
    return make_profile(gpus=gpus, links=links, **extra)


def _comparable(row: dict) -> dict:
    return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


# ---------------------------------------------------------------------- one GPU: unchanged
@pytest.mark.parametrize("policy", ["hybridgen", "flexgen"])
def test_tensor_parallel_one_is_the_run_without_it(policy):
    """A workload that says tensor_parallel 1 gives the numbers of one that does not, and the
    view is the profile and model themselves."""
    profile, model = load_profile("h100-80gb-spr-cxl"), get_model("llama-3.1-8b")
    view = rank_view(profile, model, 1)
    assert view.profile is profile and view.model is model and view.system is profile
    assert view.allreduce is None
    plain = simulate(profile, model, policy, Workload(context="64k", gen=4, batch=2),
                     fidelity=FAST)
    one = simulate(profile, model, policy, Workload(context="64k", gen=4, batch=2,
                                                    tensor_parallel=1), fidelity=FAST)
    assert _comparable(plain.to_row()) == _comparable(one.to_row())
    assert not any("all-reduce" in k for k in one.binding_s)


# ---------------------------------------------------------------------- the model's shard
@pytest.mark.parametrize("name", ["llama-3.1-70b", "qwen2.5-72b", "llama-3.1-8b"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_a_rank_holds_its_share_of_weights_and_kv(name, n):
    model = get_model(name)
    shard = shard_model(model, n)
    assert shard.hidden_size == model.hidden_size and shard.head_dim == model.head_dim
    assert shard.num_heads * n == model.num_heads
    # projections and FFN exactly 1/n; embeddings and LM head split by vocabulary (rounded up)
    assert shard.params_per_layer() * n == model.params_per_layer() or (
        model.num_kv_heads < n)
    vocab_share = math.ceil(model.vocab_size / n) * model.hidden_size * (
        1 if model.tied_embeddings else 2)
    if n <= model.num_kv_heads:
        assert shard.num_kv_heads * n == model.num_kv_heads
        assert shard.kv_bytes_per_token("fp16") * n == model.kv_bytes_per_token("fp16")
        assert shard.weight_bytes("fp16") == pytest.approx(model.weight_bytes("fp16") / n,
                                                           rel=1e-4)
        assert shard.num_params() == shard.num_layers * model.params_per_layer() // n \
            + vocab_share
    else:  # more ranks than KV heads: each rank holds one replicated KV head
        assert shard.num_kv_heads == 1
        assert shard.kv_bytes_per_token("fp16") == model.kv_bytes_per_token("fp16") \
            / model.num_kv_heads


def test_more_ranks_than_kv_heads_replicate_them():
    """qwen2.5-72b has 8 KV heads; 16 ranks would each hold one (vLLM replicates); 64 heads
    over 16 ranks is 4 query heads per rank, all on its one KV head."""
    model = get_model("qwen2.5-72b")
    shard = shard_model(model, 16)
    assert (shard.num_heads, shard.num_kv_heads, shard.gqa_group) == (4, 1, 4)
    assert shard.kv_bytes_per_token() * 16 == 2 * model.kv_bytes_per_token()


@pytest.mark.parametrize("n, words", [(3, "does not divide the 64 attention heads"),
                                      (0, "must be >= 1")])
def test_a_degree_the_heads_refuse_is_a_user_error(n, words):
    with pytest.raises(UserError, match=words) as info:
        shard_model(get_model("llama-3.1-70b"), n)
    assert str(info.value).startswith("workload.tensor_parallel: ")
    assert "\n" not in str(info.value)


def test_a_degree_neither_dividing_nor_a_multiple_of_the_kv_heads_is_refused():
    model = get_model("llama-3.1-70b").model_copy(update={"num_heads": 48, "num_kv_heads": 8})
    with pytest.raises(UserError, match="neither divides nor is a multiple of the 8 KV heads"):
        shard_model(model, 12)


# ---------------------------------------------------------------------- the machine's share
def test_a_rank_gets_its_share_of_what_it_shares():
    """Two ranks on s0 share its cores, DDR and CXL, the two on s1 share s1's; UPI is every
    rank's. s1's tiers are its own ranks': rank 0 does not see them."""
    profile = _four_gpu_profile()
    share = sharers(profile, 4)
    assert share["s0"] == share["ddr0"] == share["cxl0"] == share["cxl0link"] == 2
    assert share["s1"] == share["ddr1"] == 2
    rank = rank_profile(profile, 4)
    assert list(rank.gpus) == ["gpu0"] and rank.gpus["gpu0"] == profile.gpus["gpu0"]
    assert rank.links["pcie0"] == profile.links["pcie0"]  # its own PCIe link, whole
    assert "pcie1" not in rank.links
    ddr, cxl = profile.tiers["ddr0"], profile.tiers["cxl0"]
    assert rank.tiers["ddr0"].read_bandwidth_gbps == ddr.read_bandwidth_gbps / 2
    assert rank.tiers["ddr0"].write_bandwidth_gbps == ddr.write_bandwidth_gbps / 2
    assert rank.tiers["ddr0"].capacity_gb == ddr.capacity_gb / 2
    assert rank.tiers["cxl0"].capacity_gb == cxl.capacity_gb / 2
    assert rank.links["cxl0link"].bandwidth_gbps == profile.links["cxl0link"].bandwidth_gbps / 2
    upi = next(n for n, link in profile.links.items() if link.kind == "upi")
    assert rank.links[upi].bandwidth_gbps == profile.links[upi].bandwidth_gbps / 4
    assert rank.sockets["s0"].cores == 8 // 2
    assert set(rank.tiers) == {"ddr0", "cxl0"}  # s1's DDR is held by the ranks on s1


@pytest.mark.parametrize("options", [{}, {"host_socket": 0}, {"host_socket": 1},
                                     {"host_socket": "all"}], ids=str)
@pytest.mark.parametrize("n", [2, 4, 6, 8])
def test_the_ranks_together_never_hold_more_host_memory_than_the_host_has(n, options):
    """Invariant: n ranks, each with rank 0's view, hold at most the machine's host memory
    (equal where every rank reaches every tier alike). Seeing a remote socket's tiers beside
    the ranks that own them would double it at TP 8 once KV spills across sockets."""
    from hgsim.policies.base import host_shared

    profile = load_profile(HGX)
    rank = rank_profile(profile, n, host_shared(options))
    host = sum(t.capacity_gb for t in profile.tiers.values())
    assert n * sum(t.capacity_gb for t in rank.tiers.values()) <= host * (1 + 1e-12)
    if options or n <= 4:  # every rank reaches every tier alike: the whole host, split n ways
        assert n * sum(t.capacity_gb for t in rank.tiers.values()) == pytest.approx(host)


def test_with_every_rank_on_one_named_socket_all_ranks_share_it():
    """``host_socket: 1`` at TP 8: all eight ranks run their host work on cpu1, so its cores
    are an eighth each, not a quarter (only four GPUs hang off it)."""
    profile = load_profile(HGX)
    pol = make_policy("hybridgen", get_model("llama-3.1-70b"), profile,
                      Workload(context="128k", gen=1, tensor_parallel=8), {"host_socket": 1})
    assert pol.profile.sockets["cpu1"].cores == 64 // 8
    assert set(pol.profile.tiers) == set(profile.tiers)


def test_at_tp8_a_rank_cannot_spill_into_the_other_sockets_memory():
    """Llama-3.1-70B at TP 8, 8 x 1.5M tokens: 41 kB of KV per token per rank, 491 GB a rank,
    past its socket's share (a quarter of 1 TiB of DDR and of 512 GiB of CXL, ~400 GB). Before
    the fix rank 0 spilled into cpu1's memory, which cpu1's own four ranks fill first."""
    profile, model = load_profile(HGX), get_model("llama-3.1-70b")
    workload = Workload(context=1_500_000, batch=8, gen=1, tensor_parallel=8)
    pol = make_policy("hybridgen", model, profile, workload)
    assert not pol.feasible
    assert "ddr0 short by" in pol.infeasibility()  # values overflow onto local DRAM last
    assert set(pol.footprint.used_bytes) <= {"hbm", "ddr0", "cxl0"}


def test_cores_are_floored_and_never_below_one():
    profile = _four_gpu_profile(sockets={"s0": {"cores": 3}})
    assert rank_profile(profile, 2).sockets["s0"].cores == 1  # floor(3 / 2)
    single = _four_gpu_profile(sockets={"s0": {"cores": 1}})
    assert rank_profile(single, 2).sockets["s0"].cores == 1


def test_the_hgx_profile_puts_four_ranks_per_socket():
    profile = load_profile(HGX)
    share = sharers(profile, 8)
    assert share["cpu0"] == share["cpu1"] == share["ddr0"] == share["cxl1"] == 4
    assert share["upi0"] == 8
    rank = rank_profile(profile, 8)
    assert rank.sockets["cpu0"].cores == 64 // 4
    assert rank.tiers["ddr0"].capacity_gb == pytest.approx(2**40 / 1e9 / 4)
    assert rank.tiers["ddr0"].read_bandwidth_gbps == 280 / 4
    # TP 4: every rank on cpu0; cpu1's resources are reached alike by all four
    assert sharers(profile, 4)["cpu0"] == sharers(profile, 4)["ddr1"] == 4
    system = system_profile(profile, 4)
    assert list(system.gpus) == ["gpu0", "gpu1", "gpu2", "gpu3"]
    assert set(system.sockets) == {"cpu0", "cpu1"} and set(system.tiers) == set(profile.tiers)
    assert not any("gpu5" in link.endpoints for link in system.links.values())


def test_more_ranks_than_gpus_is_a_user_error_naming_profile_and_field():
    with pytest.raises(UserError) as info:
        rank_view(load_profile("h100-80gb-spr-cxl"), get_model("llama-3.1-70b"), 2)
    text = str(info.value)
    assert text.startswith("workload.tensor_parallel: ") and "h100-80gb-spr-cxl has 1" in text


# ---------------------------------------------------------------------- the all-reduce
def test_ring_allgather_closed_form_is_half_an_allreduce():
    assert ring_allgather_s(1, 1e6, 1e9, 1e-6) == 0.0
    assert ring_allgather_s(8, 8e6, 400e9, 0.7e-6) == pytest.approx(7 * 0.7e-6 + 7e6 / 400e9)
    assert 2 * ring_allgather_s(4, 1e6, 1e9, 1e-6) == pytest.approx(
        ring_allreduce_s(4, 1e6, 1e9, 1e-6))


def test_ring_allreduce_closed_form():
    assert ring_allreduce_s(1, 1e6, 1e9, 1e-6) == 0.0
    # 2(n-1) hops of latency and 2(n-1)/n of the bytes over the link
    assert ring_allreduce_s(4, 8e6, 100e9, 1e-6) == pytest.approx(6e-6 + 1.5 * 8e6 / 100e9)
    assert allreduce_bytes(8, 1, 8192, "bf16") == 8 * 8192 * 2
    profile = load_profile(HGX)
    ar = ring_allreduce(profile, 8)
    assert ar.via == "nvlink" and ar.label == "nvlink all-reduce"
    assert ar.bandwidth_Bps == 370e9 and ar.hop_latency_s == pytest.approx(700e-9)
    assert ar.time_s(131072) == pytest.approx(14 * 700e-9 + 14 / 8 * 131072 / 370e9)
    assert ring_allreduce(profile, 1) is None


def test_without_nvlink_the_all_reduce_goes_through_host_memory_over_pcie():
    profile = _four_gpu_profile()
    ar = ring_allreduce(profile, 2)  # gpu0 and gpu1, both on s0
    pcie, ddr = profile.links["pcie0"], profile.tiers["ddr0"]
    assert ar.via == "pcie"
    assert ar.bandwidth_Bps == min(pcie.bandwidth_gbps, ddr.write_bandwidth_gbps / 2) * 1e9
    assert ar.hop_latency_s == pytest.approx(
        (2 * pcie.latency_ns + ddr.latency_ns) * 1e-9)
    upi = next(link for link in profile.links.values() if link.kind == "upi")
    crossing = ring_allreduce(profile, 4)  # gpu1 -> gpu2 and gpu3 -> gpu0 cross UPI
    assert crossing.hop_latency_s == pytest.approx(
        (2 * pcie.latency_ns + ddr.latency_ns + upi.latency_ns) * 1e-9)


def test_no_all_reduce_is_issued_with_one_rank():
    result = simulate(load_profile(HGX), "llama-3.1-8b", "gpu_only",
                      Workload(context="16k", gen=2), fidelity=FAST, )
    assert not any("all-reduce" in k for k in result.binding_s)


# ---------------------------------------------------------------------- a 70B model, whole
def test_a_70b_model_fits_four_h100s_and_decodes_faster_with_the_all_reduce_on_its_path(
        tmp_path):
    profile, model = load_profile(HGX), get_model("llama-3.1-70b")
    one = Workload(context="128k", gen=4, tensor_parallel=1)
    four = one.model_copy(update={"tensor_parallel": 4})
    assert not make_policy("gpu_only", model, profile, one).feasible  # 141 GB of weights
    tp4 = make_policy("gpu_only", model, profile, four)
    assert tp4.feasible and tp4.offloaded_weight_bytes == 0  # its shard is in HBM
    assert tp4.model.weight_bytes("fp16") == pytest.approx(model.weight_bytes("fp16") / 4,
                                                           rel=1e-4)
    base = simulate(profile, model, "hybridgen", one, fidelity=FAST)
    trace = tmp_path / "tp4.json"
    fast = simulate(profile, model, "hybridgen", four, fidelity=FAST, trace_path=trace)
    assert fast.feasible and fast.tensor_parallel == 4
    assert fast.tokens_per_s > 10 * base.tokens_per_s  # PCIe-streamed weights vs HBM shards
    # on the critical path: two all-reduces per layer (80 x 2) and the embedding's, each the
    # ring's time, and the all-gather of the logits over the whole vocabulary
    ring = ring_allreduce(profile, 4)
    per_step = (2 * model.num_layers + 1) * ring.time_s(
        allreduce_bytes(1, 1, model.hidden_size, "fp16")) + ring.gather_time_s(
        logits_bytes(1, 4 * math.ceil(model.vocab_size / 4), "fp16"))
    assert fast.binding_s["nvlink all-reduce"] == pytest.approx(per_step, rel=1e-4)
    assert "all-gather logits" in trace.read_text() and "all-reduce embedding" in trace.read_text()
    assert "all-reduce ffn out" in trace.read_text()
    # energy and cost count four GPUs and the host once
    assert {k for k in fast.energy_j if k.startswith("gpu")} == {"gpu0", "gpu1", "gpu2", "gpu3"}
    assert fast.energy_j["gpu3"] == fast.energy_j["gpu0"]
    gpus = 4 * profile.gpus["gpu0"].price_usd
    assert fast.capex_usd - base.capex_usd == pytest.approx(3 * profile.gpus["gpu0"].price_usd)
    assert fast.capex_usd > gpus
    assert fast.to_row()["tensor_parallel"] == 4


def test_socket_mirror_swaps_a_sockets_resources_for_the_others():
    profile = load_profile(HGX)
    mirror = socket_mirror(profile, "cpu0", "cpu1")
    assert {k: mirror[k] for k in ("cpu0", "cpu1", "ddr0", "cxl1", "cxl0-link")} == {
        "cpu0": "cpu1", "cpu1": "cpu0", "ddr0": "ddr1", "cxl1": "cxl0",
        "cxl0-link": "cxl1-link"}
    assert "upi0" not in mirror and socket_mirror(profile, "cpu0", "cpu0") == {}


def test_ranks_on_both_sockets_charge_their_own_sockets_energy():
    """TP 8 puts four ranks on each socket: each socket's cores, DRAM and CXL do what four
    ranks do, not rank 0's socket eight ranks' worth (which would run cpu0 past its TDP and
    leave cpu1 idle)."""
    profile = load_profile(HGX)
    result = simulate(profile, "llama-3.1-70b", "hybridgen",
                      Workload(context="512k", batch=4, gen=2, tensor_parallel=8), fidelity=FAST)
    energy, window = result.energy_j, result.energy_window_s
    for a, b in (("cpu0", "cpu1"), ("ddr0", "ddr1"), ("cxl0", "cxl1")):
        assert energy[a] == pytest.approx(energy[b], rel=1e-9)
    socket = profile.sockets["cpu0"]
    assert energy["cpu0"] / window > socket.idle_power_w + 1.0  # the host attention ran there
    assert energy["cpu0"] / window <= socket.idle_power_w + socket.cores * (
        socket.active_core_power_w) + 1e-6


def test_a_capacity_search_sees_a_rank_share_of_memory():
    """Per rank, HBM holds a quarter of the weights and a quarter of the KV: a 70B model
    at TP 4 fits contexts one H100 never does."""
    profile, model = load_profile(HGX), get_model("llama-3.1-70b")
    for n, fits in ((1, False), (4, True), (8, True)):
        pol = make_policy("gpu_only", model, profile, Workload(context="64k", gen=1,
                                                                tensor_parallel=n))
        assert pol.feasible is fits


# ---------------------------------------------------------------------- the command line
def test_cli_bad_tensor_parallel_exits_2_with_one_line():
    result = run_cli("simulate", "--profile", HGX, "--model", "llama-3.1-70b", "--context",
                     "8k", "--gen", "2", "--tensor-parallel", "3")
    assert result.returncode == 2
    assert "workload.tensor_parallel" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_cli("simulate", "--profile", "h100-80gb-spr-cxl", "--model", "llama-3.1-70b",
                     "--context", "8k", "--gen", "2", "--tensor-parallel", "2")
    assert result.returncode == 2 and "h100-80gb-spr-cxl has 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_runs_tensor_parallel():
    result = run_cli("simulate", "--profile", HGX, "--model", "llama-3.1-70b", "--context",
                     "32k", "--gen", "2", "--samples", "2", "--tensor-parallel", "8", "--json")
    assert result.returncode == 0, result.stderr
    assert '"tensor_parallel": 8' in result.stdout


# ---------------------------------------------------------------------- studies
def _study(tmp_path, degrees: str, field: str = "tensor_parallel", name: str = "tp",
           model: str = "llama-3.1-70b"):
    """A study of ``model`` on the HGX host sweeping ``workload.<field>`` over ``degrees``,
    loaded from ``<name>.yaml`` (the sweep's values on its line 8)."""
    from hgsim.study.load import load_study

    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""name: {name}
base:
  profile: {HGX}
  model: {model}
  workload: {{context: 8k, gen: 2}}
sweep:
  - grid:
      workload.{field}: {degrees}
""")
    return load_study(path)


def test_a_study_sweeps_tensor_parallel_and_tp_one_keeps_its_point_key(tmp_path):
    from hgsim.study.load import load_study

    points = _study(tmp_path, "[1, 8]").expansion.points
    assert [p.spec.workload.tensor_parallel for p in points] == [1, 8]
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"name: tp\nbase:\n  profile: {HGX}\n  model: llama-3.1-70b\n"
                     "  workload: {context: 8k, gen: 2}\n")
    (before,) = load_study(plain).expansion.points
    assert points[0].spec.key == before.spec.key != points[1].spec.key


def test_a_study_degree_the_profile_cannot_hold_is_refused_at_its_line(tmp_path):
    from hgsim.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        _study(tmp_path, "[1, 16]")
    text = str(info.value)
    assert "tp.yaml:8" in text and "workload.tensor_parallel[1]" in text
    assert "16 ranks need 16 GPUs" in text and "\n" not in text
