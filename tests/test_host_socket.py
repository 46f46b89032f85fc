"""Host work on another socket (policy option ``host_socket``): the cores of that socket scan
and gather, the host KV store is placed near it, and everything the GPU receives from it or
sends to it crosses UPI as well as PCIe."""

from __future__ import annotations

import pytest
import simpy

from hgsim.catalog import get_model
from hgsim.costs import layer_work
from hgsim.errors import OptionError
from hgsim.policies import checked_options, make_policy
from hgsim.profiles import load_profile
from hgsim.sim.decode import DecodeEngine
from hgsim.sim.machine import Machine
from hgsim.simulate import Fidelity, simulate
from hgsim.specs.hardware import HardwareProfile
from hgsim.workload import Workload

MODEL = get_model("llama-3.1-8b")
TWO_SOCKET = "h100-2socket-cxl"
WORKLOAD = Workload(context=32768, batch=4, gen=1)
MIRROR = {"cpu0": "cpu1", "cpu1": "cpu0", "ddr0": "ddr1", "ddr1": "ddr0"}


def symmetric_profile() -> HardwareProfile:
    """h100-2socket-cxl without its expander (two identical sockets, each with its DDR, one
    UPI), and 24 GB of HBM so that most of 32k tokens x 4 sequences sit in host memory."""
    data = load_profile(TWO_SOCKET).model_dump()
    del data["tiers"]["cxl0"], data["links"]["cxl0-link"]
    data["gpus"]["gpu0"]["hbm_capacity_gb"] = 24
    return HardwareProfile.model_validate(data)


def plan_for(profile, **options):
    pol = make_policy("hybridgen", MODEL, profile, WORKLOAD, {"adaptive": False, **options})
    assert pol.feasible, pol.infeasibility()
    return pol.step_plan(WORKLOAD.context)


def run_step(profile, plan):
    machine = Machine(simpy.Environment(), profile, record=False)
    measure = DecodeEngine(machine, MODEL, "fp16", "fp16").step(plan)
    return measure, machine.recorder.bytes_by_resource()


def mirrored(name: str) -> str:
    """A resource of socket 0's side named as socket 1's (and back)."""
    head, dot, tail = name.partition(".")
    return MIRROR.get(head, head) + dot + tail


def test_the_default_and_the_gpu_s_own_socket_plan_as_before():
    profile = load_profile(TWO_SOCKET)
    default = plan_for(profile)
    assert default.host_socket is None
    assert plan_for(profile, host_socket=0) == default
    assert plan_for(profile, host_socket="cpu0") == default


@pytest.mark.parametrize("value", [2, "cpu7"])
def test_a_socket_the_profile_lacks_is_an_option_error(value):
    with pytest.raises(OptionError, match=r"host_socket.*no socket.*0 \(cpu0\), 1 \(cpu1\)"):
        plan_for(load_profile(TWO_SOCKET), host_socket=value)
    with pytest.raises(OptionError, match="host_socket"):
        plan_for(load_profile("h100-80gb-spr-cxl"), host_socket=1)


def test_a_negative_index_fails_without_a_profile():
    with pytest.raises(OptionError, match="host_socket.*>= 0"):
        checked_options("hybridgen", {"host_socket": -1})


def test_on_mirrored_sockets_the_far_socket_pays_exactly_the_upi_crossings():
    """KV in the host socket's own DRAM (first touch), no lookahead (every layer's host path on
    the critical path): socket 1 does socket 0's work byte for byte on the mirrored resources,
    and UPI carries exactly what crosses between the GPU and socket 1 (query and evicted token
    out, staged logits and V rows back), each crossing adding UPI's latency once per layer."""
    profile = symmetric_profile()
    options = {"placement": "first_touch", "lookahead": False}
    near, far = plan_for(profile, **options), plan_for(profile, host_socket=1, **options)
    assert near.layer.placement.k_fractions == {"ddr0": 1.0}
    assert far.host_socket == "cpu1" and far.layer.placement.k_fractions == {"ddr1": 1.0}
    (m_near, moved_near), (m_far, moved_far) = run_step(profile, near), run_step(profile, far)

    w = layer_work(MODEL, WORKLOAD.batch, far.layer, "fp16", "fp16")
    layers = far.num_layers
    upi = {"upi0:cpu0->cpu1": layers * (w.q_d2h_bytes + w.evict_bytes),
           "upi0:cpu1->cpu0": layers * w.to_gpu_bytes}
    assert w.to_gpu_bytes > 0 and not any(moved_near.get(k) for k in upi)
    for name, bytes_ in moved_far.items():
        assert bytes_ == pytest.approx(upi.get(name, moved_near.get(mirrored(name), 0.0)),
                                       rel=1e-12), name
    upi_s = profile.links["upi0"].latency_ns * 1e-9
    assert m_far.latency_s - m_near.latency_s == pytest.approx(layers * 2 * upi_s, rel=1e-6)
    assert m_far.cpu_busy_s == pytest.approx(m_near.cpu_busy_s, rel=1e-12)


def test_socket_1_reads_the_expander_behind_it_without_upi():
    """h100-2socket-cxl, semantic mapping (values on CXL): run from socket 1, keys land in
    socket 1's DRAM and the gathers read CXL over its link alone; UPI carries only what goes to
    and comes from the GPU. Run from socket 0, the gathers cross UPI."""
    profile = load_profile(TWO_SOCKET)
    near, far = plan_for(profile, gpu_share=0.1), plan_for(profile, gpu_share=0.1, host_socket=1)
    assert near.layer.placement.k_fractions == {"ddr0": 1.0}
    assert far.layer.placement.k_fractions == {"ddr1": 1.0}
    assert far.layer.placement.v_fractions == near.layer.placement.v_fractions == {"cxl0": 1.0}
    (_, moved_near), (_, moved_far) = run_step(profile, near), run_step(profile, far)
    w = layer_work(MODEL, WORKLOAD.batch, far.layer, "fp16", "fp16")
    layers = far.num_layers
    assert moved_far["upi0:cpu1->cpu0"] == pytest.approx(layers * w.to_gpu_bytes, rel=1e-12)
    assert moved_far["upi0:cpu0->cpu1"] == pytest.approx(
        layers * (w.q_d2h_bytes + w.evict_bytes), rel=1e-12)
    gathered = moved_far["cxl0.read"]
    assert gathered > 0 and moved_far["cxl0-link:cxl0->cpu1"] == pytest.approx(gathered)
    assert moved_near["upi0:cpu1->cpu0"] == pytest.approx(moved_near["cxl0.read"])
    assert moved_far["cpu1.inflight.gather"] > 0 and not moved_far.get("cpu0.inflight.gather")


def test_core_time_and_power_go_to_the_socket_that_works():
    profile = load_profile(TWO_SOCKET)
    rows = {}
    for socket in (0, 1):
        result = simulate(profile, MODEL, "hybridgen", WORKLOAD,
                          policy_options={"adaptive": False, "gpu_share": 0.1,
                                          "host_socket": socket},
                          fidelity=Fidelity(decode_samples=1, accuracy=False))
        rows[socket] = result.to_row()
    idle = profile.sockets["cpu0"].idle_power_w
    for busy, idle_socket in ((0, "cpu1"), (1, "cpu0")):
        assert rows[busy][f"power_w_{idle_socket}"] == pytest.approx(idle, rel=1e-12)
        assert rows[busy][f"power_w_cpu{busy}"] > idle
    assert rows[1]["util_cpu0.cores"] == 0 < rows[1]["util_cpu1.cores"]
