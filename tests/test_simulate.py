"""End-to-end behaviour of the decode simulator under each policy (issue: policies)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from hgsim.catalog import get_model
from hgsim.costs import layer_work
from hgsim.policies import BASELINES, POLICIES, make_policy
from hgsim.profiles import load_profile, profile_with_overrides
from hgsim.simulate import Fidelity, sample_steps, simulate
from hgsim.workload import Workload

H100 = "h100-80gb-spr-cxl"
FAST = Fidelity(decode_samples=8, accuracy=False)


def run(policy, context=65536, gen=16, profile=H100, model="llama-2-13b", fidelity=FAST, **opts):
    return simulate(profile, model, policy, Workload(context=context, gen=gen),
                    policy_options=opts or None, fidelity=fidelity)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_policy_runs_and_reports_the_metrics(policy):
    result = run(policy, context=131072)
    if not result.feasible:
        assert policy == "gpu_only" and "hbm short by" in result.reason
        return
    row = result.to_row()
    for key in ("latency_mean_ms", "latency_p50_ms", "latency_p99_ms", "tokens_per_s",
                "gpu_compute_ms", "cpu_compute_ms", "pcie_ms", "stall_ms", "mem_hbm_gb"):
        assert math.isfinite(row[key]), key
    assert row["latency_p50_ms"] <= row["latency_p99_ms"] + 1e-9
    assert result.tokens_per_s == pytest.approx(16 / result.decode_s)
    assert 0 < row["util_gpu0.compute"] <= 1.0 + 1e-9


def test_infeasible_configuration_is_reported_with_tier_and_shortfall():
    result = run("gpu_only", context=524288)
    assert not result.feasible
    assert result.reason.startswith("hbm short by")
    assert result.steps == []  # never silently simulated
    host_short = run("hybridgen", context=8 * 1024 * 1024, model="llama-2-70b")
    assert not host_short.feasible
    assert "short by" in host_short.reason


def test_hybridgen_exact_mode_is_lossless_in_the_accuracy_proxy():
    result = run("hybridgen_exact", context=131072, fidelity=Fidelity(decode_samples=4))
    assert result.feasible
    assert result.steps[-1].topk_ratio == 1.0
    assert result.accuracy_mass_kept == pytest.approx(1.0, abs=1e-9)
    assert result.accuracy_rel_error < 1e-6
    lossy = run("hybridgen", context=131072, fidelity=Fidelity(decode_samples=4))
    assert lossy.accuracy_mass_kept < 1.0


def test_flexgen_approaches_gpu_only_when_pcie_and_host_memory_are_huge():
    fast = profile_with_overrides(load_profile(H100), {
        "links.pcie0.bandwidth_gbps": 1e6, "links.pcie0.latency_ns": 0,
        "tiers.*.bandwidth_gbps": 1e6, "tiers.*.latency_ns": 1e-3,
    })
    context = 16384  # fits in HBM, so GPU-only is feasible
    gpu_only = run("gpu_only", context=context, profile=fast)
    flexgen = run("flexgen", context=context, profile=fast, gpu_kv_fraction=0.0)
    slow_flexgen = run("flexgen", context=context, gpu_kv_fraction=0.0)
    assert gpu_only.feasible and flexgen.feasible
    assert flexgen.steps[0].gpu_tokens == 0  # all KV really was streamed
    ratio = flexgen.latency_stats_ms()["mean"] / gpu_only.latency_stats_ms()["mean"]
    assert 1.0 <= ratio < 1.05
    assert slow_flexgen.latency_stats_ms()["mean"] > 1.5 * gpu_only.latency_stats_ms()["mean"]


def test_scheduler_moves_work_to_the_gpu_when_cpu_is_starved():
    starved = profile_with_overrides(load_profile(H100), {
        "sockets.cpu0.cores": 1, "sockets.cpu0.attention_gflops_per_core": 0.5,
    })
    result = run("hybridgen", context=32768, gen=64, profile=starved, gpu_share=0.3,
                 fidelity=Fidelity(decode_samples=0, accuracy=False))
    first, last = result.steps[0], result.steps[-1]
    # The starved CPU is slow at its scan, which no top-k ratio shortens: tokens move to the
    # GPU (here all of them, since they fit) and the step gets faster.
    assert last.gpu_tokens > first.gpu_tokens
    assert last.latency_s < 0.5 * first.latency_s
    roomy = run("hybridgen", context=32768, gen=64, gpu_share=0.3,
                profile=profile_with_overrides(load_profile(H100), {
                    "sockets.cpu0.cores": 512, "tiers.*.bandwidth_gbps": 1e5}),
                fidelity=Fidelity(decode_samples=0, accuracy=False))
    assert roomy.steps[-1].gpu_tokens == roomy.steps[0].gpu_tokens  # a strong CPU keeps its share
    assert roomy.steps[-1].topk_ratio > 0.02  # settles where host and device balance


def test_cpu_share_and_ratio_adapt_to_context_length():
    short = run("hybridgen", context=32768, gen=64, fidelity=Fidelity(decode_samples=0, accuracy=False))
    long = run("hybridgen", context=524288, gen=64, fidelity=Fidelity(decode_samples=0, accuracy=False))
    host_share_short = 1 - short.steps[-1].gpu_tokens / short.steps[-1].context
    host_share_long = 1 - long.steps[-1].gpu_tokens / long.steps[-1].context
    assert host_share_long > host_share_short
    assert long.steps[-1].topk_ratio != short.steps[-1].topk_ratio
    static = run("hybridgen_static", context=524288, gen=64)
    assert static.steps[-1].topk_ratio == pytest.approx(static.steps[0].topk_ratio, rel=1e-4)


def test_results_are_deterministic_for_a_seed():
    a = run("hybridgen", context=131072, fidelity=Fidelity(decode_samples=4)).to_row()
    b = run("hybridgen", context=131072, fidelity=Fidelity(decode_samples=4)).to_row()
    assert a == b


def test_sampled_decode_is_within_one_percent_of_full_simulation():
    for policy in ("hybridgen", "flexgen", "hgca"):
        full = run(policy, context=131072, gen=128, fidelity=Fidelity(decode_samples=0, accuracy=False))
        sampled = run(policy, context=131072, gen=128,
                      fidelity=Fidelity(decode_samples=16, accuracy=False))
        error = abs(sampled.decode_s - full.decode_s) / full.decode_s
        assert error < 0.01, (policy, error)


def test_sample_steps_cover_first_and_last():
    assert sample_steps(256, 16)[0] == 0 and sample_steps(256, 16)[-1] == 255
    assert sample_steps(10, 0) == list(range(10))
    assert sample_steps(4, 16) == [0, 1, 2, 3]


def test_layer_work_closed_form_for_hybridgen_per_head():
    model = get_model("llama-2-70b")
    profile = load_profile(H100)
    pol = make_policy("hybridgen_per_head", model, profile, Workload(context=131072, gen=1))
    lp = pol.layer_plan(131072)
    w = layer_work(model, 1, lp, "fp16", "fp16")
    host, sel = lp.host_tokens, lp.host_selected
    assert w.cpu_k_bytes == host * 8 * 128 * 2  # keys of every host token, 8 KV heads
    # the CPU gathers a V row per query head per selection into the staging buffer ...
    assert w.gather_v_rows == 64 * sel and w.gather_k_rows == 0 and w.row_bytes == 128 * 2
    assert w.rows_staged
    # ... and the upload carries those rows plus fp32 logits, nothing straight from a tier
    assert w.staged_bytes == 64 * sel * 128 * 2 + 64 * sel * 4
    assert w.direct_k_bytes == w.direct_v_bytes == 0  # no keys cross PCIe
    assert w.host_calls == 2  # logits_topk, gather_rows
    assert w.cpu_topk_inserts == pytest.approx(64 * sel * (1 + math.log(host / sel)))
    assert w.evict_bytes == 2 * 8 * 128 * 2  # the token leaving the HBM window, K and V


def test_layer_work_closed_form_for_hybridgen_shared_by_default():
    """GQA (issue 21): by default one top-k per KV group, each distinct row gathered and sent
    once per KV head, its K row gathered to score the group's 8 heads (not staged)."""
    model = get_model("llama-2-70b")
    profile = load_profile(H100)
    pol = make_policy("hybridgen", model, profile, Workload(context=131072, gen=1))
    lp = pol.layer_plan(131072)
    assert lp.selection.value == "group_shared"
    w = layer_work(model, 1, lp, "fp16", "fp16")
    host, sel = lp.host_tokens, lp.host_selected
    assert w.cpu_k_bytes == host * 8 * 128 * 2
    assert w.gather_v_rows == 8 * sel and w.gather_k_rows == 8 * sel and w.unstaged_rows == 8 * sel
    assert w.staged_bytes == 8 * sel * 128 * 2 + 64 * sel * 4
    assert w.cpu_topk_inserts == pytest.approx(8 * sel * (1 + math.log(host / sel)))
    assert w.gather_flops == 2 * 64 * sel * 128 and w.host_calls == 2


def test_exact_hybridgen_copies_the_v_block_per_kv_head_without_a_gather():
    """With every host token selected the executor skips top-k and gather: logits from the
    staging buffer, V as the range's contiguous block straight from its tier."""
    model = get_model("llama-2-70b")  # GQA: 64 query heads share 8 KV heads
    profile = load_profile(H100)
    pol = make_policy("hybridgen_exact", model, profile, Workload(context=131072, gen=1))
    lp = pol.layer_plan(131072)
    w = layer_work(model, 1, lp, "fp16", "fp16")
    host = lp.host_tokens
    assert w.gather_rows == 0 and w.cpu_topk_inserts == 0 and w.host_calls == 1
    assert w.direct_v_bytes == host * model.kv_dim * 2  # per KV head: GQA rows not repeated
    assert w.staged_bytes == model.num_heads * host * 4


def test_hgca_gathers_k_and_v_rows_and_attends_on_the_cpu():
    model = get_model("llama-2-13b")
    profile = load_profile(H100)
    lp = make_policy("hgca", model, profile, Workload(context=131072, gen=1)).layer_plan(131072)
    w = layer_work(model, 1, lp, "fp16", "fp16")
    picks = model.num_heads * lp.host_selected
    assert w.gather_k_rows == w.gather_v_rows == picks and not w.rows_staged
    assert w.gather_flops == pytest.approx(4 * picks * model.head_dim + 3 * picks)
    assert w.staged_bytes == model.num_heads * (model.head_dim + 1) * 4  # output + LSE


def test_sliding_window_costs_one_launch_bound_kernel_per_layer():
    """A recent window in front of host tokens slides every step: one kv_update kernel per
    layer (one token's K+V in and one out); GPU-only and host-only plans move nothing."""
    model = get_model("llama-2-13b")
    profile = load_profile(H100)
    wl = Workload(context=65536, gen=1)
    lp = make_policy("hybridgen_static", model, profile, wl).layer_plan(65536)
    assert lp.gpu_recent_tokens > 0 and lp.host_tokens > 0
    w = layer_work(model, 1, lp, "fp16", "fp16")
    assert w.kv_update.bytes_ == 2 * 2 * model.kv_dim * 2 and w.kv_update.flops == 0
    for name in ("cpu_offload",):
        other = make_policy(name, model, profile, wl).layer_plan(65536)
        assert layer_work(model, 1, other, "fp16", "fp16").kv_update.bytes_ == 0
    short = Workload(context=4096, gen=1)
    resident = make_policy("gpu_only", model, profile, short).layer_plan(4096)
    assert layer_work(model, 1, resident, "fp16", "fp16").kv_update.bytes_ == 0


def test_attention_only_keeps_the_kv_append_as_its_qkv_kernel():
    """Without projections the executor still writes the new token's K and V into the cache
    each layer: a launch-bound kernel, not nothing."""
    model = get_model("llama-2-13b")
    profile = load_profile(H100)
    wl = Workload(context=65536, gen=1)
    lp = make_policy("cpu_offload", model, profile, wl).layer_plan(65536)
    full = layer_work(model, 1, lp, "fp16", "fp16")
    only = layer_work(model, 1, lp, "fp16", "fp16", attention_only=True)
    assert only.qkv.flops == 0 and only.qkv.bytes_ == 2 * model.kv_dim * 2  # K+V, fp16
    assert only.post.flops == 0 and only.post.bytes_ == 0
    assert full.qkv.flops > 0


def test_baselines_listed_are_registered():
    assert set(BASELINES) <= set(POLICIES)
    assert len(BASELINES) >= 6


def test_simulate_cli_prints_tables_and_exits_2_on_bad_input(tmp_path):
    trace = tmp_path / "t.json"
    ok = subprocess.run(
        [sys.executable, "-m", "hgsim", "simulate", "--profile", H100, "--model", "llama-2-13b",
         "--policy", "hybridgen", "--context", "64k", "--gen", "8", "--samples", "4",
         "--trace", str(trace)],
        capture_output=True, text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "per-token latency" in ok.stdout and "tokens/s" in ok.stdout
    assert trace.exists() and trace.stat().st_size > 0
    bad = subprocess.run(
        [sys.executable, "-m", "hgsim", "simulate", "--profile", H100, "--model", "llama-2-13b",
         "--policy", "hybrdgen", "--context", "64k"],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2
    assert "hybridgen" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_topk_inserts_lengthen_the_cpu_phase_by_their_closed_form():
    base = profile_with_overrides(load_profile(H100), {"sockets.cpu0.topk_ns_per_insert": 0})
    costly = profile_with_overrides(base, {"sockets.cpu0.topk_ns_per_insert": 100.0})
    plain = run("hybridgen_static", context=131072, gen=4, profile=base)
    slow = run("hybridgen_static", context=131072, gen=4, profile=costly)
    model = get_model("llama-2-13b")
    lp = make_policy("hybridgen_static", model, base, Workload(context=131072, gen=4)).layer_plan(131072)
    inserts = model.num_heads * lp.host_selected * (1 + math.log(lp.host_tokens / lp.host_selected))
    cores = base.sockets["cpu0"].cores
    added = slow.steps[0].cpu_busy_s - plain.steps[0].cpu_busy_s
    assert added == pytest.approx(model.num_layers * inserts * 100e-9 / cores, rel=1e-6)


def test_gather_core_time_per_row_caps_the_gather_instead_of_adding_to_it():
    """A core's work per gathered row overlaps its misses: a row cost below the memory time
    changes nothing, one above it sets the gather's rate (cores / ns per row)."""
    base = load_profile(H100)
    model = get_model("llama-2-13b")
    lp = make_policy("hybridgen_static", model, base, Workload(context=131072, gen=4)).layer_plan(131072)
    cores = base.sockets["cpu0"].cores
    rows = model.num_heads * lp.host_selected
    times = {}
    for ns in (0.0, 1.0, 1000.0, 2000.0):
        profile = profile_with_overrides(base, {"sockets.cpu0.gather_ns_per_row": ns})
        times[ns] = run("hybridgen_static", context=131072, gen=4, profile=profile).steps[0]
    assert times[1.0].cpu_busy_s == pytest.approx(times[0.0].cpu_busy_s, rel=1e-9)
    # 1 and 2 us per row: both above the memory time (rows of 256 B from a 24 GB/s expander
    # take ~11 ns each over 64 cores' worth of rows), so the gather takes rows x ns / cores
    added = times[2000.0].cpu_busy_s - times[1000.0].cpu_busy_s
    assert added == pytest.approx(model.num_layers * rows * 1000e-9 / cores, rel=1e-6)
    assert times[1000.0].cpu_busy_s > times[0.0].cpu_busy_s


@pytest.mark.parametrize("policy, calls", [("hybridgen_static", 2), ("cpu_offload", 1)])
def test_a_host_call_overhead_adds_once_per_kernel_call_to_the_cpu_phase(policy, calls):
    base = profile_with_overrides(load_profile(H100), {"sockets.cpu0.op_overhead_us": 0})
    costly = profile_with_overrides(base, {"sockets.cpu0.op_overhead_us": 250.0})
    plain = run(policy, context=131072, gen=4, profile=base)
    slow = run(policy, context=131072, gen=4, profile=costly)
    layers = get_model("llama-2-13b").num_layers
    added = slow.steps[0].cpu_busy_s - plain.steps[0].cpu_busy_s
    assert added == pytest.approx(layers * calls * 250e-6, rel=1e-6)


def test_look_ahead_host_work_costs_the_next_layer_s_query_projection():
    """The host starts layer i+1 on a query projected from layer i's input (as the executor's
    whole-model decode does): one q projection more per layer, for HybridGen and InfiniGen."""
    model = get_model("llama-2-13b")
    profile = load_profile(H100)
    wl = Workload(context=131072, gen=1)
    extra = model.hidden_size * model.q_dim
    base = layer_work(model, 1, make_policy("hybridgen_nolookahead", model, profile,
                                            wl).layer_plan(131072), "fp16", "fp16")
    for name in ("hybridgen", "infinigen"):
        lp = make_policy(name, model, profile, wl).layer_plan(131072)
        w = layer_work(model, 1, lp, "fp16", "fp16")
        assert w.qkv.bytes_ == base.qkv.bytes_ + extra * 2
        assert w.qkv.flops == base.qkv.flops + 2 * extra
        only = layer_work(model, 1, lp, "fp16", "fp16", attention_only=True)
        assert only.qkv.bytes_ == 2 * model.kv_dim * 2  # attention only: just the append
    flex = make_policy("flexgen", model, profile, wl).layer_plan(131072)  # prefetches KV only
    assert layer_work(model, 1, flex, "fp16", "fp16").qkv == base.qkv


def test_simulate_cli_counts_every_scheduler_decision_in_its_step_table():
    """The step table shows every Nth step and the scheduler decides every `interval` steps, so
    the rows must count the decisions from their step to the next row's (the shown steps alone
    held none: an empty column beside 'scheduler decisions: hold x56, shrink-hbm-full x8')."""
    out = subprocess.run(
        [sys.executable, "-m", "hgsim", "simulate", "--profile", H100, "--model", "llama-2-13b",
         "--context", "128k", "--batch", "2", "--gen", "64", "--samples", "8"],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    table = out.stdout[out.stdout.index("scheduler (top-k ratio"):]
    rows = [line.split("│")[1:-1] for line in table.splitlines() if line.startswith("│")]
    assert len(rows) == 8  # 64 steps, every 8th
    shown: dict[str, int] = {}
    for cell in (r[-1].strip() for r in rows):
        for item in filter(None, cell.split(", ")):
            name, _, n = item.partition(" x")
            shown[name] = shown.get(name, 0) + int(n or 1)
    summary = next(line for line in table.splitlines() if line.startswith("scheduler decisions:"))
    totals = dict(item.split(" x") for item in summary.split(": ", 1)[1].split(", "))
    assert shown == {k: int(v) for k, v in totals.items()} and sum(shown.values()) == 64 // 4
    assert "the 7 after it" in table


def test_on_step_counts_every_simulated_step_up_to_the_total():
    """``on_step(done, total)`` follows the simulated steps (the sampled ones), once each."""
    from hgsim.simulate import sample_steps

    calls: list[tuple[int, int]] = []
    workload = Workload(context=8192, gen=40)
    simulate("h100-80gb-spr-cxl", "llama-3.1-8b", "hybridgen", workload,
             fidelity=Fidelity(decode_samples=8, accuracy=False),
             on_step=lambda done, total: calls.append((done, total)))
    total = len(sample_steps(40, 8))
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_the_step_bar_draws_on_a_terminal_only_for_long_runs(monkeypatch):
    import io

    from hgsim.commands.simulate import STEPS_FOR_A_BAR, StepBar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    short = StepBar(True)
    short(1, STEPS_FOR_A_BAR - 1)
    assert short.bar is None
    long = StepBar(True)
    for done in range(1, STEPS_FOR_A_BAR + 1):
        long(done, STEPS_FOR_A_BAR)
    assert long.bar.n == STEPS_FOR_A_BAR and "decode steps" in screen.getvalue()
    long.close()
    off = StepBar(False)
    off(1, STEPS_FOR_A_BAR)
    assert off.bar is None
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal: no bar
    piped = StepBar(True)
    piped(1, STEPS_FOR_A_BAR)
    assert piped.bar is None
