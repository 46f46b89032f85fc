"""The feedback scheduler's decision rule, step by step (closed form)."""

import pytest

from hgsim.scheduler import FeedbackScheduler, SchedulerConfig, estimate_host_time_s


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


def test_scan_bound_host_keeps_its_ratio_and_moves_tokens_instead():
    s = make(interval=1)
    s.observe(host_s=3.0, device_s=1.0, transfer_s=0.5)  # scan alone (2.5) > device
    assert s.ratio == 0.05 and s.gpu_share == pytest.approx(0.25)
    s.observe(host_s=3.0, device_s=1.0, transfer_s=2.5)  # transfer-bound: shrink the ratio
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
