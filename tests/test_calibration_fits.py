"""The fits behind the memory model's figures, on synthetic curves with known answers."""

from __future__ import annotations

import pytest

from hgsim.memory import access_rate, loaded_latency_s
from hw_backend.calibration import fits


def test_lines_in_flight_is_the_chains_until_the_core_runs_out_of_miss_buffers():
    latency, buffers = 100e-9, 20
    curve = []
    for chains in (1, 2, 4, 8, 16, 20, 24, 32, 64):
        step = latency * max(1.0, chains / buffers)  # past 20 chains the extra ones queue
        curve.append(fits.lines_in_flight(chains, step, latency))
    assert curve[:5] == [1, 2, 4, 8, 16]
    assert curve[5:] == pytest.approx([20] * 4)
    assert fits.plateau(curve) == pytest.approx(20)
    # the figure: 20 lines x 64 B in flight at 100 ns -> 12.8 GB/s from one core
    assert fits.plateau(curve) * 64 == pytest.approx(1280)
    # noise never reports more lines than there are chains
    assert fits.lines_in_flight(4, 0.8 * latency, latency) == 4


def test_plateau_ignores_the_climb_and_a_lone_spike():
    assert fits.plateau([1, 2, 4, 8, 19, 20, 21, 20]) == pytest.approx(20)
    assert fits.plateau([5.0]) == 5.0
    with pytest.raises(ValueError):
        fits.plateau([])


def test_mm1_queueing_delay_is_fitted_back_from_its_curve():
    q = 15e-9
    us = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    added = [q * u / (1 - u) for u in us]
    fit = fits.fit_queue_delay(us, added)
    assert fit.half_load_s == pytest.approx(q)
    assert (fit.points, fit.u_min, fit.u_max) == (8, 0.05, 0.7)
    assert fit.rms_residual_s == pytest.approx(0, abs=1e-15)


def test_queue_fit_drops_saturated_points_and_never_goes_negative():
    fit = fits.fit_queue_delay([0.2, 0.5, 1.0, 1.2], [2e-9, 8e-9, 1.0, 1.0])
    assert fit.points == 2 and fit.u_max == 0.5
    assert fits.fit_queue_delay([0.3, 0.5], [-1e-9, -2e-9]).half_load_s == 0.0
    with pytest.raises(ValueError):
        fits.fit_queue_delay([1.0], [1e-9])


@pytest.mark.parametrize("rate_gbps", [2.0, 10.0, 30.0])
def test_inflight_bytes_is_what_access_rate_turns_back_into_the_rate(rate_gbps: float):
    idle, bandwidth, q = 120e-9, 40e9, 20e-9
    rate = rate_gbps * 1e9
    inflight = fits.inflight_bytes(rate, idle, bandwidth, q)
    assert inflight == pytest.approx(rate * loaded_latency_s(idle, rate / bandwidth, q))
    back = access_rate(inflight_bytes=inflight, idle_latency_s=idle, bandwidth_Bps=bandwidth,
                       half_load_s=q)
    assert back.rate_Bps == pytest.approx(rate, rel=1e-6)


def test_inflight_bytes_without_queueing_is_rate_times_idle_latency():
    assert fits.inflight_bytes(10e9, 100e-9, 50e9) == pytest.approx(1000)


def test_a_rate_at_the_bandwidth_does_not_identify_what_was_in_flight():
    assert fits.inflight_bytes(39e9, 100e-9, 40e9, 10e-9) is None
    with pytest.raises(ValueError):
        fits.inflight_bytes(0.0, 100e-9, 40e9)


def test_a_parallel_call_is_charged_its_wall_time_less_the_longest_wait_for_a_core(monkeypatch):
    from hw_backend.calibration import timing

    waits = iter([{"1": 100, "2": 5_000_000}, {"1": 100, "2": 9_000_000}])  # 4 ms waited
    monkeypatch.setattr(timing, "_waits_ns", lambda: next(waits))
    clock = iter([0.0, 0.010])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    t = timing.cpu_timing(lambda: None, 2)
    assert (t.cpu_s, t.wall_s, t.share) == pytest.approx((0.006, 0.010, 0.6))
    assert timing.on_cpu_seconds([t], 2) == ((0.010,), "wall")  # it never ran together
    together = timing.Timing(0.009, 0.010, 0.9)
    assert timing.on_cpu_seconds([t, together], 2) == ((0.009,), "cpu")
    assert timing.on_cpu_seconds([t], 1) == ((0.006,), "cpu")  # one thread needs no company


def test_retries_stop_at_the_first_repeat_whose_threads_ran_together(monkeypatch):
    from hw_backend.calibration import timing

    monkeypatch.setattr(timing, "RETRY_PAUSE_S", 0.0)
    shares = iter([0.3, 0.5, 0.95, 0.99])
    calls = []

    def measure():
        calls.append(1)
        return timing.Timing(1.0, 1.0, next(shares))

    assert timing.retry_until_together(measure, 2).share == 0.95 and len(calls) == 3
    assert timing.retry_until_together(lambda: timing.Timing(1, 2, 0.5), 1).share == 0.5
