"""The host thread's run-queue wait: parsed from schedstat, summed per step like cpu_s."""

from __future__ import annotations

import pytest

from hw_backend import run_queue
from hw_backend.timing import LayerTiming, step_timing


def test_parse_wait_is_the_second_field_in_seconds():
    assert run_queue.parse_wait_s("123456789 2500000000 17\n") == pytest.approx(2.5)
    assert run_queue.parse_wait_s("1 0 1") == 0.0


def test_parse_wait_rejects_a_short_line():
    with pytest.raises(ValueError, match="schedstat"):
        run_queue.parse_wait_s("42")


def test_waited_never_decreases():
    first = run_queue.waited_s()
    if first is None:
        pytest.skip("no /proc/thread-self/schedstat here")
    sum(range(100_000))
    assert run_queue.waited_s() >= first >= 0.0


def _layer(cpu_s: float, wait_s: float) -> LayerTiming:
    return LayerTiming(step=0, layer=0, context=10, cpu_s=cpu_s, gpu_s=0.0, transfer_s=0.0,
                       stall_s=0.0, host_s=cpu_s, device_s=0.0, host_tokens=5, host_selected=1,
                       gpu_tokens=5, upload_bytes=0, device="test", cpu_wait_s=wait_s)


def test_step_sums_the_layers_waits():
    step = step_timing(step=0, context=10, latency_s=1.0,
                       layers=[_layer(0.3, 0.1), _layer(0.5, 0.25)], topk_ratio=0.1,
                       gpu_tokens=5)
    assert step.cpu_wait_s == pytest.approx(0.35)
    assert step.cpu_busy_s == pytest.approx(0.8)
