"""Energy and cost: closed forms against the simulator's record, the cost invariants, and
the profile fields behind them."""

from __future__ import annotations

import re

import pytest
import simpy
from conftest import make_profile, shipped_profiles

from hgsim import energy, tco
from hgsim.errors import ConfigError
from hgsim.memory import Pattern
from hgsim.profiles import PROFILE_DIR, load_profile, profile_with_overrides
from hgsim.sim.machine import Machine
from hgsim.simulate import Fidelity, simulate
from hgsim.workload import Workload

pytestmark = pytest.mark.usefixtures("isolated_profiles")

PJ = 1e-12
TIER_FIGURES = {"ddr0": (0.01, 10, 12), "ddr1": (0.01, 10, 12), "cxl0": (0.02, 15, 18)}
LINK_PJ = {"pcie0": 6, "upi0": 5, "cxl0link": 7}


def _energetic_profile(**gpu):
    return make_profile(
        gpus={"gpu0": {"idle_power_w": 50, "tdp_w": 1000, "energy_pj_per_flop": 1,
                       "hbm_energy_pj_per_bit": 5, **gpu}},
        sockets={s: {"idle_power_w": 20, "active_core_power_w": 3} for s in ("s0", "s1")},
        tiers={t: {"background_power_w_per_gb": bg, "read_energy_pj_per_bit": r,
                   "write_energy_pj_per_bit": w} for t, (bg, r, w) in TIER_FIGURES.items()},
        links={name: {"energy_pj_per_bit": pj} for name, pj in LINK_PJ.items()},
    )


def _run(profile):
    """A kernel, a copy, a CPU scan of CXL, a write across UPI and a read spread over DDR and
    CXL, all at once; returns (machine, end time, when the scan ended)."""
    env = simpy.Environment()
    m = Machine(env, profile, record=False)
    before = m.recorder.snapshot()
    events = [
        m.gpu_kernel("gpu0", 1e12, 2e9, "gemm"),
        m.copy("ddr0", "gpu0", 1e9, "upload"),
        m.write("gpu0", {"ddr1": 1.0}, 3e8, "evict"),
        m.read({"ddr0": 0.25, "cxl0": 0.75}, "gpu0", 4e8, Pattern.DMA, "mixed upload"),
    ]
    scan = m.cpu_attention("s0", "cxl0", 5e8, 1e9, cores=4, label="scan")
    env.run(until=env.all_of([*events, scan]))
    activity = energy.activity_between(m, before, m.recorder.snapshot(), env.now)
    return activity, env.now, scan.value.end_s


# ---------------------------------------------------------------------- closed forms
def test_energy_is_power_times_time_plus_bytes_times_energy_per_bit_by_hand():
    profile = _energetic_profile()
    activity, t, scan_end = _run(profile)
    joules = energy.energy_by_component_j(profile, activity)
    bits = 8
    expected = {
        # idle x T + 1 pJ/FLOP x 1e12 + 5 pJ/bit x (kernel 2e9 + DMA in 1e9 + 4e8 + out 3e8)
        "gpu0": 50 * t + 1e12 * PJ + 5 * PJ * bits * (2e9 + 1e9 + 4e8 + 3e8),
        # idle x T + 3 W x 4 cores held from 0 until the scan ended
        "s0": 20 * t + 3 * 4 * scan_end,
        "s1": 20 * t,
        # background x installed GB x T + read/write pJ/bit x bytes (a quarter of the mixed
        # read comes out of ddr0, three quarters out of cxl0)
        "ddr0": 0.01 * 256 * t + 10 * PJ * bits * (1e9 + 1e8),
        "ddr1": 0.01 * 256 * t + 12 * PJ * bits * 3e8,
        "cxl0": 0.02 * 512 * t + 15 * PJ * bits * (5e8 + 3e8),
        "pcie0": 6 * PJ * bits * (1e9 + 4e8 + 3e8),
        "upi0": 5 * PJ * bits * 3e8,
        "cxl0link": 7 * PJ * bits * (5e8 + 3e8),
    }
    assert joules.keys() == expected.keys()
    for name, value in expected.items():
        assert joules[name] == pytest.approx(value, rel=1e-9), name
    assert 0 < scan_end <= t


def test_a_gpu_draws_at_most_its_power_limit():
    profile = _energetic_profile(tdp_w=60, energy_pj_per_flop=100)
    activity, t, _ = _run(profile)
    assert energy.energy_by_component_j(profile, activity)["gpu0"] == pytest.approx(60 * t)


def test_a_profile_without_energy_figures_has_no_energy():
    profile = make_profile()
    assert "gpus.gpu0.tdp_w" in energy.missing_fields(profile)
    activity, _, _ = _run(profile)
    assert energy.energy_by_component_j(profile, activity) == {}
    assert tco.capex_usd(profile) != tco.capex_usd(profile)  # NaN


def test_a_decode_without_host_work_costs_idle_and_background_power_off_the_gpu():
    """GPU-only decoding holds no core and touches no host tier: off the GPU only idle and
    background power remain, and the window is the decode (every step simulated)."""
    result = simulate("h100-80gb-spr-cxl", "llama-2-7b", "gpu_only",
                      Workload(batch=1, context=4096, gen=4),
                      fidelity=Fidelity(decode_samples=0, accuracy=False))
    profile = load_profile("h100-80gb-spr-cxl")
    t = result.energy_window_s
    assert t == pytest.approx(result.decode_s, rel=1e-9)
    assert result.energy_j["cpu0"] == pytest.approx(profile.sockets["cpu0"].idle_power_w * t)
    for name, tier in profile.tiers.items():
        assert result.energy_j[name] == pytest.approx(
            tier.background_power_w_per_gb * tier.capacity_gb * t)
    gpu = profile.gpus["gpu0"]
    assert gpu.idle_power_w * t < result.energy_j["gpu0"] <= gpu.tdp_w * t
    power = result.power_w
    assert sum(power.values()) == pytest.approx(result.power_total_w)
    assert result.energy_j_per_token == pytest.approx(result.power_total_w / result.tokens_per_s)


def test_hbm_energy_per_bit_moves_only_the_gpu_by_its_traffic():
    """Doubling the GPU's energy per bit adds exactly the HBM term once more."""
    work = dict(model="llama-2-13b", policy="hybridgen",
                workload=Workload(batch=1, context=32768, gen=2),
                fidelity=Fidelity(decode_samples=0, accuracy=False))
    base = load_profile("h100-80gb-spr-cxl")
    pj = base.gpus["gpu0"].hbm_energy_pj_per_bit
    one = simulate(base, **work)
    two = simulate(profile_with_overrides(base, {"gpus.gpu0.hbm_energy_pj_per_bit": 2 * pj}),
                   **work)
    assert two.energy_window_s == pytest.approx(one.energy_window_s, rel=1e-12)
    idle = base.gpus["gpu0"].idle_power_w * one.energy_window_s
    flops_j = one.energy_j["gpu0"] - idle  # FLOP and HBM terms
    hbm_j = two.energy_j["gpu0"] - one.energy_j["gpu0"]
    assert 0 < hbm_j < flops_j
    assert {k: v for k, v in two.energy_j.items() if k != "gpu0"} == pytest.approx(
        {k: v for k, v in one.energy_j.items() if k != "gpu0"}, rel=1e-12)


def test_sampled_steps_give_the_full_runs_average_power_over_every_component():
    """With steps interpolated the energy window is the simulated steps alone: the average
    power they give matches the full run's to 1e-4 (HybridGen shrinking r every few steps: the
    steps differ in length, barely in power), so joules per token move only as the interpolated
    tokens/s does. Every component of the profile is
    charged and nothing else; the components' joules add up to average power x window."""
    profile = load_profile("h100-80gb-spr-cxl")
    runs = [simulate(profile, "llama-2-13b", "hybridgen",
                     Workload(batch=1, context=131072, gen=24),
                     fidelity=Fidelity(decode_samples=samples, accuracy=False))
            for samples in (0, 6)]
    full, sampled = runs
    assert full.decisions and sampled.energy_window_s < 0.5 * full.energy_window_s
    assert sampled.power_w == pytest.approx(full.power_w, rel=1e-4)
    for r in runs:
        assert r.energy_j.keys() == {*profile.gpus, *profile.sockets, *profile.tiers,
                                     *profile.links}
        assert sum(r.energy_j.values()) == pytest.approx(r.power_total_w * r.energy_window_s,
                                                         rel=1e-12)
        assert r.energy_j_per_token * r.tokens_per_s == pytest.approx(r.power_total_w,
                                                                      rel=1e-12)
    assert sampled.energy_j_per_token / full.energy_j_per_token == pytest.approx(
        full.tokens_per_s / sampled.tokens_per_s, rel=1e-4)


# ---------------------------------------------------------------------- cost
def test_cost_per_token_scales_inversely_with_tokens_per_s_at_fixed_hardware():
    runs = [simulate("h100-80gb-spr-cxl", "llama-2-13b", "hybridgen",
                     Workload(batch=1, context=context, gen=8),
                     fidelity=Fidelity(decode_samples=4, accuracy=False))
            for context in (32768, 131072)]
    fast, slow = runs
    assert fast.tokens_per_s > 1.2 * slow.tokens_per_s
    profile = load_profile("h100-80gb-spr-cxl")
    per_s = tco.capex_usd_per_s(profile)
    for r in runs:
        # capital per token x tokens per second is the machine's capital per second
        assert r.usd_per_mtok_capex * r.tokens_per_s == pytest.approx(per_s * 1e6, rel=1e-12)
        electricity = r.energy_j_per_token * tco.electricity_usd_per_j(profile) * 1e6
        assert r.usd_per_mtok == pytest.approx(r.usd_per_mtok_capex + electricity, rel=1e-12)
        row = r.to_row()
        assert row["usd_per_mtok"] == r.usd_per_mtok
        assert row["energy_j_per_token"] == r.energy_j_per_token
        assert row["power_w_gpu0"] > 0 and row["capex_usd"] == tco.capex_usd(profile)
    ratio = slow.usd_per_mtok_capex / fast.usd_per_mtok_capex
    assert ratio == pytest.approx(fast.tokens_per_s / slow.tokens_per_s, rel=1e-12)


def test_capital_counts_installed_capacity_and_study_overrides_reach_every_price():
    base = load_profile("h100-80gb-spr-cxl")
    more = profile_with_overrides(base, {"tiers.ddr0.capacity_gb": "1536 GiB"})
    assert tco.capex_usd(more) - tco.capex_usd(base) == pytest.approx(
        768 * 2**30 / 1e9 * base.tiers["ddr0"].price_usd_per_gb)
    dear = profile_with_overrides(base, {"cost.electricity_usd_per_kwh": 0.18, "cost.pue": 1.0})
    assert tco.electricity_usd_per_j(dear) == pytest.approx(0.18 / 3.6e6)
    longer = profile_with_overrides(base, {"cost.amortisation_years": 8})
    assert tco.capex_usd_per_s(longer) == pytest.approx(tco.capex_usd_per_s(base) / 2)


# ---------------------------------------------------------------------- profile fields
@pytest.mark.parametrize("name", shipped_profiles())
def test_every_shipped_profile_has_every_energy_and_cost_figure_nonzero(name):
    profile = load_profile(name)
    assert energy.missing_fields(profile) == []
    assert tco.missing_fields(profile) == []
    for section, specs, fields in (("gpus", profile.gpus, (*energy.GPU_FIELDS, "price_usd")),
                                   ("sockets", profile.sockets,
                                    (*energy.SOCKET_FIELDS, "price_usd")),
                                   ("tiers", profile.tiers,
                                    (*energy.TIER_FIELDS, "price_usd_per_gb")),
                                   ("links", profile.links, energy.LINK_FIELDS)):
        for key, spec in specs.items():
            for field in fields:
                assert getattr(spec, field) > 0, f"{name}: {section}.{key}.{field}"
    cost = profile.cost
    assert cost.server_base_usd > 0 and cost.amortisation_years > 0
    assert cost.electricity_usd_per_kwh > 0 and cost.pue >= 1


# the processors' TDP (Intel ARK, AMD product page): what the package draws at all-core load
TDP_W = {"Intel Xeon Platinum 8480+ (Sapphire Rapids)": 350,
         "Intel Xeon Platinum 8592+ (Emerald Rapids)": 350, "AMD EPYC 9554 (Genoa, Zen 4)": 360}


@pytest.mark.parametrize("name", ["a100-40gb-spr-cxl", "h100-80gb-spr-cxl", "h100-2socket-cxl",
                                  "rtx5090-cxl"])
def test_a_socket_with_every_core_busy_draws_its_tdp(name):
    """active_core_power_w is derived as (TDP - idle) / cores: rounding it must not lose the
    package's power at all-core load (64 cores x 0.06 W is 4 W of 350)."""
    for key, sock in load_profile(name).sockets.items():
        drawn = sock.idle_power_w + sock.cores * sock.active_core_power_w
        assert drawn == pytest.approx(TDP_W[sock.model], rel=0.01), f"{name}: sockets.{key}"


BAD = {
    # case: (old text, new text, field named, message part)
    "negative_tdp": ("tdp_w: 700 ", "tdp_w: -700 ", "gpus.gpu0.tdp_w", "greater than 0"),
    "zero_link_energy": ("energy_pj_per_bit: 5.5 ", "energy_pj_per_bit: 0 ",
                         "links.pcie0.energy_pj_per_bit", "greater than 0"),
    "price_with_a_unit": ("price_usd_per_gb: 4.66 ", "price_usd_per_gb: 4.66 GB ",
                          "tiers.ddr0.price_usd_per_gb", "valid number"),
    "pue_below_one": ("pue: 1.4 ", "pue: 0.5 ", "cost.pue", "greater than or equal to 1"),
    "unknown_cost_key": ("  pue: 1.4 ", "  pue: 1.4\n  discount_rate: 0.1 ",
                         "cost.discount_rate", "unknown key"),
    "idle_above_limit": ("idle_power_w: 70 ", "idle_power_w: 900 ", "gpus.gpu0",
                         "idle_power_w (900) must be below tdp_w (700)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_energy_or_cost_field_is_a_one_line_error_naming_it(tmp_path, case):
    old, new, field, part = BAD[case]
    text = (PROFILE_DIR / "h100-80gb-spr-cxl.yaml").read_text()
    assert old in text, f"fixture for {case} no longer matches the profile"
    path = tmp_path / f"{case}.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    message = str(info.value)
    assert "\n" not in message
    assert re.match(rf"^{re.escape(str(path))}:\d+: {re.escape(field)}: ", message), message
    assert part in message
