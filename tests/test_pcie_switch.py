"""PCIe switches (``pcie_switches``, ``gpus.<name>.pcie_switch``): GPUs behind one switch share
its uplink to the host when they copy at once."""

from __future__ import annotations

import pytest

from hgsim.errors import ConfigError
from hgsim.profiles import load_profile, profile_with_overrides
from hgsim.simulate import Fidelity, simulate
from hgsim.tensor_parallel import host_link, rank_profile
from hgsim.workload import Workload

HGX = "hgx-h100x8-2socket-cxl"
FAST = Fidelity(decode_samples=2, accuracy=False)


def switched(per_switch: int, uplink_gbps: float = 50.0, latency_ns: float = 115.0):
    """The HGX host with ``per_switch`` GPUs behind each switch (in the profile's order)."""
    base = load_profile(HGX)
    gpus = list(base.gpus)
    overrides: dict = {}
    for i, gpu in enumerate(gpus):
        switch = f"sw{i // per_switch}"
        overrides[f"pcie_switches.{switch}"] = {
            "socket": base.gpus[gpu].socket, "uplink_bandwidth_gbps": uplink_gbps,
            "latency_ns": latency_ns}
        overrides[f"gpus.{gpu}.pcie_switch"] = switch
    return profile_with_overrides(base, overrides)


def test_host_link_is_the_lesser_bandwidth_and_the_sum_of_latencies():
    profile = switched(2, uplink_gbps=64.0)
    link = profile.links["pcie0"]
    alone, shared = host_link(profile, "gpu0"), host_link(profile, "gpu0", sharing=2)
    assert alone.bandwidth_gbps == min(link.bandwidth_gbps, 64.0) == 50.0
    assert shared.bandwidth_gbps == 32.0  # 64 / 2 < 50
    assert alone.latency_ns == link.latency_ns + 115.0
    no_switch = load_profile(HGX)
    assert host_link(no_switch, "gpu0") is no_switch.links["pcie0"]


@pytest.mark.parametrize("ranks, sharing", [(1, 1), (2, 2), (4, 2), (8, 2)])
def test_a_rank_sees_its_uplink_divided_by_the_ranks_behind_its_switch(ranks, sharing):
    view = rank_profile(switched(2), ranks)
    (gpu,) = view.gpus.values()
    assert gpu.link == "pcie0 via sw0" and gpu.pcie_switch is None and not view.pcie_switches
    assert view.links[gpu.link].bandwidth_gbps == pytest.approx(min(50.0, 50.0 / sharing))


def test_copies_behind_one_switch_halve_a_pcie_bound_policy_and_spare_hybridgen():
    """FlexGen streams its KV over PCIe every step: two copies behind one x16 uplink get half
    of it each. HybridGen sends only the top-k rows and logits: it barely notices."""
    plain, shared = load_profile(HGX), switched(2)
    rate = {}
    for policy in ("flexgen", "hybridgen"):
        for name, profile in (("plain", plain), ("shared", shared)):
            rate[policy, name] = simulate(
                profile, "llama-3.1-8b", policy,
                Workload(context="128k", batch=4, gen=4, data_parallel=2),
                fidelity=FAST)
    flexgen = rate["flexgen", "shared"]
    assert flexgen.binding == "pcie0 via sw0 h2d"
    assert flexgen.tokens_per_s == pytest.approx(rate["flexgen", "plain"].tokens_per_s / 2,
                                                 rel=0.02)
    assert rate["hybridgen", "shared"].tokens_per_s > 0.98 * rate["hybridgen",
                                                                  "plain"].tokens_per_s


def test_one_gpu_alone_behind_a_switch_has_the_whole_uplink():
    """Only the GPU decoding copies: the switch adds its latency, not a share."""
    one = simulate(switched(2), "llama-3.1-8b", "flexgen",
                   Workload(context="128k", batch=4, gen=4), fidelity=FAST)
    plain = simulate(load_profile(HGX), "llama-3.1-8b", "flexgen",
                     Workload(context="128k", batch=4, gen=4), fidelity=FAST)
    assert one.tokens_per_s == pytest.approx(plain.tokens_per_s, rel=0.01)


def test_energy_charges_the_gpus_own_links_not_the_folded_one():
    result = simulate(switched(2), "llama-3.1-8b", "flexgen",
                      Workload(context="128k", batch=4, gen=4, data_parallel=2), fidelity=FAST)
    assert result.energy_j["pcie0"] == pytest.approx(result.energy_j["pcie1"], rel=1e-9)
    assert result.energy_j["pcie0"] > 0
    assert not any("via" in name for name in result.energy_j)


@pytest.mark.parametrize("overrides, words", [
    ({"gpus.gpu0.pcie_switch": "sw9"}, "gpus.gpu0.pcie_switch: unknown PCIe switch 'sw9'"),
    ({"pcie_switches.sw0": {"socket": "cpu1", "uplink_bandwidth_gbps": 50, "latency_ns": 100},
      "gpus.gpu0.pcie_switch": "sw0"}, "'sw0' runs to cpu1, the GPU hangs off cpu0"),
    ({"pcie_switches.sw0": {"socket": "cpu7", "uplink_bandwidth_gbps": 50, "latency_ns": 100}},
     "pcie_switches.sw0.socket: unknown socket 'cpu7'"),
    ({"pcie_switches.sw0": {"socket": "cpu0", "uplink_bandwidth_gbps": 0, "latency_ns": 100}},
     "uplink_bandwidth_gbps"),
])
def test_a_bad_switch_is_one_line_naming_the_field(overrides, words):
    with pytest.raises(ConfigError) as info:
        profile_with_overrides(load_profile(HGX), overrides)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_the_profile_table_lists_each_switch_with_the_gpus_behind_it():
    from rich.console import Console

    from hgsim.commands.profiles import _links_table

    screen = Console(width=200, record=True)
    screen.print(_links_table(switched(4)))
    text = screen.export_text()
    assert "sw0 uplink" in text and "cpu0 <-> gpu0, gpu1, gpu2, gpu3" in text


def test_the_topology_tree_puts_gpus_under_their_switch():
    from rich.console import Console

    from hgsim.commands.profiles import _topology

    screen = Console(width=200, record=True)
    screen.print(_topology(switched(2)))
    lines = screen.export_text().splitlines()
    switch = next(i for i, line in enumerate(lines) if "sw0: PCIe switch, uplink 50 GB/s" in line)
    depth = len(lines[switch]) - len(lines[switch].lstrip("│├└─ "))
    gpu0 = next(i for i, line in enumerate(lines) if "gpu0: NVIDIA H100" in line)
    assert gpu0 == switch + 1 and len(lines[gpu0]) - len(lines[gpu0].lstrip("│├└─ ")) > depth
