"""Host work split over every socket (policy option ``host_socket: all``): each socket takes an
equal share of the KV heads, places it as seen from itself and runs its own host path for it
on its own cores and staging buffer, concurrently with the other; the GPU's merge waits for
both."""

from __future__ import annotations

import subprocess
import sys

import pytest
import simpy

from hgsim.catalog import get_model
from hgsim.costs import layer_work
from hgsim.errors import OptionError
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.sim.decode import DecodeEngine
from hgsim.sim.machine import Machine
from hgsim.simulate import Fidelity, simulate
from hgsim.specs.hardware import HardwareProfile
from hgsim.workload import Workload
from hw_backend.layer_state import UnsupportedPlan, check_host_socket

MODEL = get_model("llama-3.1-8b")
TWO_SOCKET = "h100-2socket-cxl"
WORKLOAD = Workload(context=32768, batch=4, gen=1)
GB = 1e9


def symmetric_profile() -> HardwareProfile:
    """h100-2socket-cxl without its expander: two identical sockets, each with its DDR, and 24
    GB of HBM so that most of 32k tokens x 4 sequences sit in host memory."""
    data = load_profile(TWO_SOCKET).model_dump()
    del data["tiers"]["cxl0"], data["links"]["cxl0-link"]
    data["gpus"]["gpu0"]["hbm_capacity_gb"] = 24
    return HardwareProfile.model_validate(data)


def policy_for(profile, workload=WORKLOAD, **options):
    pol = make_policy("hybridgen", MODEL, profile, workload, {"adaptive": False, **options})
    assert pol.feasible, pol.infeasibility()
    return pol


def run_step(profile, plan):
    machine = Machine(simpy.Environment(), profile, record=False)
    measure = DecodeEngine(machine, MODEL, "fp16", "fp16").step(plan)
    return measure, machine.recorder.bytes_by_resource()


def host_kv_gb(pol, tiers) -> float:
    """Host KV in ``tiers``: what the footprint holds there less the host reserve."""
    reserve = pol.options.host_reserve.bytes_(pol.profile)
    return sum(pol.footprint.used_bytes.get(t, 0.0) - reserve[t] for t in tiers) / GB


def test_on_one_socket_the_split_is_the_default():
    profile = load_profile("h100-80gb-spr-cxl")
    default = policy_for(profile).step_plan(WORKLOAD.context)
    split = policy_for(profile, host_socket="all").step_plan(WORKLOAD.context)
    assert split.host_split is None and split == default


def test_each_socket_places_half_the_host_kv_near_itself():
    """Semantic mapping on two identical sockets: each socket's keys in its own DRAM, its values
    in the far DRAM (values go far); the whole store's placement is the mean of the two."""
    profile = symmetric_profile()
    pol = policy_for(profile, host_socket="all")
    plan = pol.step_plan(WORKLOAD.context)
    assert plan.host_socket is None
    (s0, p0), (s1, p1) = plan.host_split
    assert (s0, s1) == ("cpu0", "cpu1")
    assert p0.k_fractions == {"ddr0": 1.0} and p1.k_fractions == {"ddr1": 1.0}
    assert p0.v_fractions == {"ddr1": 1.0} and p1.v_fractions == {"ddr0": 1.0}
    assert plan.layer.placement.k_fractions == pytest.approx({"ddr0": 0.5, "ddr1": 0.5})
    assert host_kv_gb(pol, ["ddr0"]) == pytest.approx(host_kv_gb(pol, ["ddr1"]), rel=1e-12)
    default = policy_for(profile)
    assert host_kv_gb(pol, ["ddr0", "ddr1"]) == pytest.approx(
        host_kv_gb(default, ["ddr0", "ddr1"]), rel=1e-12)


def test_first_touch_on_the_cxl_host_puts_half_on_each_socket():
    """h100-2socket-cxl, first touch at 512k x 4 sequences (as much host KV as in the
    cxl profile's DRAM): each socket's tiers (socket 0: ddr0; socket 1: ddr1 and the expander
    behind it) hold half of it, where by default socket 0's DRAM holds it all."""
    profile = load_profile(TWO_SOCKET)
    workload = Workload(context=524288, batch=4, gen=1)
    split = policy_for(profile, workload, host_socket="all", placement="first_touch")
    default = policy_for(profile, workload, placement="first_touch")
    near, far = host_kv_gb(split, ["ddr0"]), host_kv_gb(split, ["ddr1", "cxl0"])
    assert near > 100 and near == pytest.approx(far, rel=1e-9)
    assert host_kv_gb(default, ["ddr1", "cxl0"]) == pytest.approx(0, abs=1e-9)


def test_each_socket_does_half_the_work_on_its_own_cores_and_dram():
    """Mirrored sockets: the two sockets scan, gather and stage the same bytes, together what
    one socket does by default; each receives the whole query; what socket 1 sends the GPU
    (half the uploads) crosses UPI; the step is shorter."""
    profile = symmetric_profile()
    options = {"placement": "first_touch", "lookahead": False}
    default = policy_for(profile, **options).step_plan(WORKLOAD.context)
    split = policy_for(profile, host_socket="all", **options).step_plan(WORKLOAD.context)
    (m_one, one), (m_two, two) = run_step(profile, default), run_step(profile, split)
    for resource in ("attn", "inflight.stream", "inflight.gather"):
        assert two[f"cpu0.{resource}"] == pytest.approx(two[f"cpu1.{resource}"], rel=1e-12)
        assert two[f"cpu0.{resource}"] + two[f"cpu1.{resource}"] == pytest.approx(
            one[f"cpu0.{resource}"], rel=1e-12)
    assert two["ddr0.read"] == pytest.approx(two["ddr1.read"], rel=1e-12)
    assert two["ddr0.read"] + two["ddr1.read"] == pytest.approx(one["ddr0.read"], rel=1e-12)
    w = layer_work(MODEL, WORKLOAD.batch, split.layer, "fp16", "fp16")
    layers = split.num_layers
    # socket 1's half of the uploads comes over UPI; the query and half the evicted token go
    # to it the other way (first touch: its half of the heads lives in its own DRAM)
    assert two["upi0:cpu1->cpu0"] == pytest.approx(layers * w.to_gpu_bytes / 2, rel=1e-12)
    assert two["upi0:cpu0->cpu1"] == pytest.approx(
        layers * (w.q_d2h_bytes + w.evict_bytes / 2), rel=1e-12)
    assert two["gpu0.h2d"] == pytest.approx(one["gpu0.h2d"], rel=1e-12)
    assert m_two.latency_s < 0.75 * m_one.latency_s


def test_a_host_memory_bound_point_gains_and_both_sockets_work():
    """Llama-3.1-8B at 512k x 4 on h100-2socket-cxl: by default socket 0's DRAM read binds and
    socket 1 idles; split, both sockets' DRAM and cores are busy about equally and tokens/s
    rises by more than 1.4x."""
    profile = load_profile(TWO_SOCKET)
    workload = Workload(context=524288, batch=4, gen=1)
    rows = {}
    for name, extra in (("default", {}), ("split", {"host_socket": "all"})):
        rows[name] = simulate(profile, MODEL, "hybridgen", workload,
                              policy_options={"adaptive": False, **extra},
                              fidelity=Fidelity(decode_samples=1, accuracy=False)).to_row()
    default, split = rows["default"], rows["split"]
    assert default["binding"] == "ddr0 read" and default["util_ddr0.read"] > 0.9
    assert default["util_ddr1.read"] == 0 and default["util_cpu1.cores"] == 0
    for resource in ("ddr{}.read", "cpu{}.cores"):
        busy0 = split["util_" + resource.format(0)]
        busy1 = split["util_" + resource.format(1)]
        assert busy0 > 0.9 and busy1 == pytest.approx(busy0, rel=0.05)
    assert split["power_w_cpu1"] == pytest.approx(split["power_w_cpu0"], rel=0.05)
    assert split["tokens_per_s"] > 1.4 * default["tokens_per_s"]


@pytest.mark.parametrize("value", ["both", "ALL", 2])
def test_a_bad_value_names_the_option_and_the_choices(value):
    with pytest.raises(OptionError, match=r"host_socket.*no socket.*or all: every one"):
        policy_for(load_profile(TWO_SOCKET), host_socket=value)


def test_the_cli_refuses_a_bad_value_in_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "hgsim", "simulate", "--profile", TWO_SOCKET, "--model",
         "llama-3.1-8b", "--context", "4k", "--gen", "1", "--option", "host_socket=every"],
        capture_output=True, text=True, check=False)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "host_socket" in lines[0] and "Traceback" not in out.stderr


def test_hw_backend_refuses_a_split_plan():
    plan = policy_for(symmetric_profile(), host_socket="all").step_plan(WORKLOAD.context)
    with pytest.raises(UnsupportedPlan, match="host_socket=all.*simulated only"):
        check_host_socket(plan)
    one = policy_for(load_profile("h100-80gb-spr-cxl"), host_socket="all")
    check_host_socket(one.step_plan(WORKLOAD.context))  # one socket: the default plan


def test_under_tensor_parallelism_every_rank_shares_every_socket():
    """Split, every rank works on both sockets, so each socket's cores, DRAM and CXL are
    shared by all ranks, not only those whose GPU hangs off it. At TP 8 on the HGX host (four
    GPUs per socket) both sockets already work by default: the split changes little; at TP 2
    (both GPUs on socket 0) it brings in socket 1."""
    from hgsim.tensor_parallel import sharers

    profile = load_profile("hgx-h100x8-2socket-cxl")
    assert sharers(profile, 2)["cpu0"] == 2 and sharers(profile, 2, host_shared=True)["cpu0"] == 2
    assert sharers(profile, 8, host_shared=True)["ddr1"] == 8 == 2 * sharers(profile, 8)["ddr1"]
    model = get_model("llama-3.1-70b")
    speed = {}
    for tp in (2, 8):
        workload = Workload(context=524288, batch=4, gen=1, tensor_parallel=tp)
        for split in (False, True):
            speed[tp, split] = simulate(
                profile, model, "hybridgen", workload,
                policy_options={"adaptive": False, **({"host_socket": "all"} if split else {})},
                fidelity=Fidelity(decode_samples=1, accuracy=False)).tokens_per_s
    assert speed[8, True] == pytest.approx(speed[8, False], rel=0.02)
    assert speed[2, True] > 1.8 * speed[2, False]
