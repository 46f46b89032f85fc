"""Flow network: closed-form completion times under processor sharing and max-min fairness."""

from __future__ import annotations

import math

import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from hgsim.sim.flows import FLOPS_PER_S, Channel, FlowNetwork
from hgsim.sim.recorder import Recorder

REL = 1e-9


def approx(x):
    return pytest.approx(x, rel=REL, abs=1e-15)


def run(network: FlowNetwork, jobs):
    """Start ``(at_s, path, amount, kwargs)`` jobs; return each job's completion time."""
    env = network.env
    ends: list[float] = [math.nan] * len(jobs)

    def job(i, at_s, path, amount, kwargs):
        yield env.timeout(at_s)
        yield network.transfer(path, amount, **kwargs)
        ends[i] = env.now

    for i, (at_s, path, amount, kwargs) in enumerate(jobs):
        env.process(job(i, at_s, path, amount, kwargs))
    env.run()
    return ends


@pytest.fixture
def net():
    return FlowNetwork(simpy.Environment(), Recorder())


def test_single_transfer_is_latency_plus_bytes_over_bandwidth(net):
    link = net.add_channel("link", 10.0)
    assert run(net, [(0.0, [link], 100.0, {"latency_s": 0.5})]) == [approx(0.5 + 10.0)]


def test_two_equal_concurrent_flows_finish_at_twice_the_time(net):
    link = net.add_channel("link", 10.0)
    ends = run(net, [(0.0, [link], 100.0, {}), (0.0, [link], 100.0, {})])
    assert ends == [approx(20.0), approx(20.0)]


def test_a_later_flow_slows_the_first(net):
    # A: 100 B alone at 10 B/s from t=0 -> 50 B left at t=5. B: 30 B from t=5.
    # Both at 5 B/s: B done at 5 + 30/5 = 11; A has 50 - 30 = 20 B left, alone: 11 + 2 = 13.
    link = net.add_channel("link", 10.0)
    ends = run(net, [(0.0, [link], 100.0, {}), (5.0, [link], 30.0, {})])
    assert ends == [approx(13.0), approx(11.0)]


def test_latency_does_not_hold_bandwidth(net):
    # B is issued at t=0 but only starts draining at t=4: A runs alone until then.
    link = net.add_channel("link", 10.0)
    ends = run(net, [(0.0, [link], 60.0, {}), (0.0, [link], 20.0, {"latency_s": 4.0})])
    # t=4: A has 20 left; both at 5 B/s -> both done at t=8.
    assert ends == [approx(8.0), approx(8.0)]


def test_path_is_bounded_by_its_slowest_hop(net):
    cxl, socket, pcie = net.add_channel("cxl", 8.0), net.add_channel("upi", 40.0), net.add_channel(
        "pcie", 25.0
    )
    assert run(net, [(0.0, [cxl, socket, pcie], 80.0, {"latency_s": 1.0})]) == [approx(11.0)]


def test_max_min_fairness_gives_leftover_to_unconstrained_flows(net):
    # f1 crosses A (12) and B (3): B caps it at 3. f2, f3 on A split the leftover 9: 4.5 each.
    a, b = net.add_channel("A", 12.0), net.add_channel("B", 3.0)
    ends = run(net, [(0.0, [a, b], 30.0, {}), (0.0, [a], 45.0, {}), (0.0, [a], 45.0, {})])
    assert ends == [approx(10.0), approx(10.0), approx(10.0)]
    # And rates re-solve when f1 finishes early.
    net2 = FlowNetwork(simpy.Environment())
    a, b = net2.add_channel("A", 12.0), net2.add_channel("B", 3.0)
    ends = run(net2, [(0.0, [a, b], 15.0, {}), (0.0, [a], 45.0, {}), (0.0, [a], 45.0, {})])
    # t=5: f1 done (15/3); f2, f3 have 45 - 22.5 = 22.5 left at 6 B/s -> 5 + 3.75.
    assert ends == [approx(5.0), approx(8.75), approx(8.75)]


def test_max_rate_caps_a_flow_and_frees_bandwidth(net):
    link = net.add_channel("link", 10.0)
    ends = run(net, [(0.0, [link], 20.0, {"max_rate": 2.0}), (0.0, [link], 40.0, {})])
    assert ends == [approx(10.0), approx(5.0)]


def test_zero_amount_completes_after_latency_only(net):
    link = net.add_channel("link", 10.0)
    assert run(net, [(1.0, [link], 0.0, {"latency_s": 0.25})]) == [approx(1.25)]


def test_flop_channel_limits_by_flops_per_byte(net):
    # 100 B of KV needing 400 FLOP through a 200 FLOP/s channel: 50 B/s < 80 B/s memory.
    mem, cpu = net.add_channel("mem", 80.0), net.add_channel("cpu", 200.0, unit=FLOPS_PER_S)
    assert run(net, [(0.0, [mem, cpu], 100.0, {"flops": 400.0})]) == [approx(2.0)]


def test_flows_record_per_channel_and_on_their_track(net):
    a, b = net.add_channel("A", 10.0), net.add_channel("B", 5.0)
    run(net, [(0.0, [a, b], 50.0, {"latency_s": 1.0, "label": "x", "track": "op"})])
    rec = net.recorder
    assert rec.busy_time("A") == approx(10.0) and rec.busy_time("B") == approx(10.0)
    assert rec.busy_time("op") == approx(11.0)  # the track spans issue to completion
    assert rec.bytes_moved("A") == 50.0
    assert {act.label for act in rec.activities} == {"x"}


def test_many_staggered_flows_stay_exact(net):
    # n flows of equal size started together: all end at n * size / capacity.
    link = net.add_channel("link", 3.0)
    ends = run(net, [(0.0, [link], 7.0, {}) for _ in range(50)])
    assert all(e == approx(50 * 7.0 / 3.0) for e in ends)


def test_rejects_bad_arguments(net):
    link = net.add_channel("link", 1.0)
    with pytest.raises(ValueError):
        net.transfer([link], -1.0)
    with pytest.raises(ValueError):
        net.transfer([link], 1.0, max_rate=0.0)
    with pytest.raises(ValueError):
        Channel("bad", 0.0)


flows_strategy = st.lists(
    st.tuples(
        st.floats(0.0, 10.0),  # start
        st.floats(0.0, 2.0),  # latency
        st.floats(0.0, 100.0),  # amount
        st.one_of(st.none(), st.floats(0.5, 20.0)),  # max_rate
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(flows_strategy, st.floats(1.0, 50.0))
def test_property_capacity_and_work_conservation(specs, capacity):
    net = FlowNetwork(simpy.Environment(), Recorder())
    link = net.add_channel("link", capacity)
    jobs = [(s, [link], amt, {"latency_s": lat, "max_rate": cap}) for s, lat, amt, cap in specs]
    ends = run(net, jobs)
    assert all(not math.isnan(e) for e in ends)
    total = sum(amt for _, _, amt, _ in specs)
    # Capacity: bytes moved while draining never exceed capacity x busy time.
    busy = net.recorder.busy_time("link")
    assert total <= capacity * busy * (1 + 1e-9) + 1e-9
    # Work conservation: between draining starts and ends the link runs at full speed
    # unless every draining flow is at its own cap. Check it on uncapped flows: if none is
    # capped, the link drains `total` in exactly its busy time.
    if all(cap is None for *_, cap in specs):
        assert total == pytest.approx(capacity * busy, rel=1e-9, abs=1e-9)
    # No flow beats its lone, uncontended time.
    for (start, lat, amt, cap), end in zip(specs, ends, strict=True):
        rate = capacity if cap is None else min(cap, capacity)
        assert end >= start + lat + amt / rate - 1e-9 * max(1.0, end)


@st.composite
def networks(draw):
    capacities = draw(st.lists(st.floats(1.0, 100.0), min_size=1, max_size=5))
    n = len(capacities)
    flows = draw(st.lists(
        st.tuples(
            st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True),
            st.one_of(st.none(), st.floats(0.5, 50.0)),
        ),
        min_size=1,
        max_size=8,
    ))
    return capacities, flows


@settings(max_examples=300, deadline=None)
@given(networks())
def test_property_rates_are_max_min_fair(spec):
    """Every flow is at its cap or has a saturated bottleneck where no flow is faster."""
    capacities, flow_specs = spec
    net = FlowNetwork(simpy.Environment())
    chans = [net.add_channel(f"c{i}", cap) for i, cap in enumerate(capacities)]
    for path, cap in flow_specs:
        net.transfer([chans[i] for i in path], 1e6, max_rate=cap)
    net.env.run(until=1e-9)  # all started, none finished
    flows = {f for c in chans for f in c.flows}
    assert len(flows) == len(flow_specs)
    tol = 1e-9
    for c in chans:
        assert c.load <= c.capacity * (1 + tol)
    for f in flows:
        if f.rate >= f.max_rate * (1 - tol):
            continue
        assert any(
            c.load >= c.capacity * (1 - tol) and all(g.rate <= f.rate * (1 + tol) for g in c.flows)
            for c in f.path
        ), f"flow {f} has no bottleneck"
