"""The feedback scheduler's decision rule, step by step (closed form)."""

import pytest

from hgsim.scheduler import Decision, FeedbackScheduler, SchedulerConfig, estimate_host_time_s


def make(**kw):
    share = kw.pop("gpu_share", 0.2)
    max_share = kw.pop("max_gpu_share", 0.5)
    return FeedbackScheduler(SchedulerConfig(**kw), gpu_share=share, max_gpu_share=max_share)


def test_ratio_grows_by_1_2_while_host_hides_behind_device_and_caps_at_max():
    s = make(interval=1)
    ratios = []
    for _ in range(20):
        s.observe(host_s=1.0, device_s=2.0)
        ratios.append(s.ratio)
    assert ratios[0] == pytest.approx(0.05 * 1.2)
    assert ratios[1] == pytest.approx(0.05 * 1.2**2)
    assert ratios[-1] == 0.5


def test_ratio_shrinks_by_0_8_when_host_is_bottleneck_then_share_moves_to_gpu():
    s = make(interval=1)
    for _ in range(15):
        s.observe(host_s=3.0, device_s=1.0)
    assert s.ratio == 0.01  # floor reached after log(0.2)/log(0.8) ~ 7.2 decisions
    assert s.gpu_share > 0.2  # then tokens move to the GPU
    for _ in range(20):
        s.observe(host_s=3.0, device_s=1.0)
    assert s.gpu_share == 0.5  # bounded by HBM


def test_decisions_happen_every_interval_steps_on_summed_times():
    s = make(interval=4)
    for step in range(1, 9):
        decided = s.observe(host_s=1.0 if step <= 4 else 3.0, device_s=2.0)
        assert decided == (step % 4 == 0)
    assert s.ratio == pytest.approx(0.05 * 1.2 * 0.8)
    assert [r.ratio for r in s.history][:4] == pytest.approx([0.05, 0.05, 0.05, 0.06])


def test_a_reason_gives_per_step_times_though_it_decides_on_the_interval_sums():
    s = make(interval=4)
    for _ in range(4):
        s.observe(host_s=0.003, device_s=0.002, variable_s=0.001)
    assert s.history[-1].reason.endswith(
        "scan and fixed costs 2 ms + top-k/gather/transfer 1 ms vs device 2 ms per step, summed "
        "over layers, which overlap")


def test_scan_bound_host_moves_tokens_while_hbm_allows():
    s = make(interval=1)
    # scan and fixed costs 2.5 > device 1: shrinking r cannot hide the host
    s.observe(host_s=3.0, device_s=1.0, variable_s=0.5)
    assert s.ratio == 0.05 and s.gpu_share == pytest.approx(0.25)
    assert s.history[-1].decision is Decision.MORE_GPU
    assert "scan alone outlasts the device" in s.history[-1].reason


def test_selection_bound_host_shrinks_the_ratio():
    s = make(interval=1)
    # without its r-dependent part (2.5) the host (0.5) would hide behind the device (1.0)
    s.observe(host_s=3.0, device_s=1.0, variable_s=2.5)
    assert s.ratio == pytest.approx(0.04) and s.gpu_share == 0.2
    assert s.history[-1].decision is Decision.SHRINK


def test_scan_bound_with_hbm_full_shrinks_only_while_r_costs_a_material_share():
    s = make(interval=1, gpu_share=0.5, max_gpu_share=0.5)
    s.observe(host_s=3.0, device_s=1.0, variable_s=0.6)  # 20% of the host path >= 10%
    assert s.ratio == pytest.approx(0.04)
    assert s.history[-1].decision is Decision.SHRINK_HBM_FULL
    s.observe(host_s=3.0, device_s=1.0, variable_s=0.15)  # 5% < 10%: hold r (accuracy)
    assert s.ratio == pytest.approx(0.04)
    assert s.history[-1].decision is Decision.HOLD
    assert "only 5%" in s.history[-1].reason


def test_scan_bound_with_hbm_full_and_r_at_its_floor_holds():
    s = make(interval=1, gpu_share=0.5, max_gpu_share=0.5, initial_ratio=0.01)
    s.observe(host_s=3.0, device_s=1.0, variable_s=2.0)
    assert s.ratio == 0.01 and s.gpu_share == 0.5
    assert s.history[-1].decision is Decision.HOLD and "floor" in s.history[-1].reason


def test_selection_bound_at_the_floor_moves_tokens():
    s = make(interval=1, initial_ratio=0.01)
    s.observe(host_s=3.0, device_s=1.0, variable_s=2.5)
    assert s.ratio == 0.01 and s.gpu_share == pytest.approx(0.25)
    assert s.history[-1].decision is Decision.MORE_GPU


def test_every_decision_is_recorded_with_its_reason_and_counted():
    s = make(interval=2)
    for host in (1.0, 1.0, 3.0, 3.0):
        s.observe(host_s=host, device_s=2.0, variable_s=host / 2)
    decided = [r for r in s.history if r.decision is not None]
    assert [r.step for r in decided] == [2, 4]
    assert [r.decision for r in decided] == [Decision.GROW, Decision.SHRINK]
    assert all(r.reason for r in decided)
    assert s.decisions() == {"grow": 1, "shrink": 1}


def test_without_the_split_the_published_rule_applies():
    s = make(interval=1, scan_aware=True)
    s.observe(host_s=3.0, device_s=1.0)  # no variable_s: shrink while slower
    assert s.ratio == pytest.approx(0.04)
    s = make(interval=1, scan_aware=False)
    s.observe(host_s=3.0, device_s=1.0, variable_s=0.1)  # split ignored
    assert s.ratio == pytest.approx(0.04)


def test_static_scheduler_never_changes():
    s = make(interval=1, adaptive=False)
    for _ in range(10):
        s.observe(host_s=5.0, device_s=1.0)
    assert s.ratio == 0.05 and s.gpu_share == 0.2


def test_bad_config_is_rejected():
    with pytest.raises(ValueError):
        SchedulerConfig(initial_ratio=0.9, max_ratio=0.5)
    with pytest.raises(ValueError):
        SchedulerConfig(interval=0)


def test_host_estimate_matches_reference_formula():
    # B*(r*n*D*b + r*n*H*b)/BW + 2*B*D*n/P
    t = estimate_host_time_s(batch=2, host_tokens=1000, ratio=0.1, hidden=4096, heads=32,
                             kv_bytes=2, pcie_Bps=25e9, cpu_flops=1e12)
    expected = 2 * (0.1 * 1000 * 4096 * 2 + 0.1 * 1000 * 32 * 2) / 25e9 + 2 * 2 * 4096 * 1000 / 1e12
    assert t == pytest.approx(expected)
