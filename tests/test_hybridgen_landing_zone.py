"""HybridGen's HBM landing zone: sized for the ratios the run can reach, capped to fit."""

from __future__ import annotations

from hgsim.catalog import get_model
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.workload import Workload


def _policy(context: str, **options):
    workload = Workload(batch=2, context=context, gen=4)
    return make_policy("hybridgen", get_model("llama-3.1-70b"),
                       load_profile("h100-80gb-spr-cxl"), workload, options)


def test_a_static_run_sizes_its_zone_for_its_own_ratio():
    adaptive = _policy("128k", selection="per_head", topk_ratio=0.05)
    static = _policy("128k", selection="per_head", topk_ratio=0.05, adaptive=False)
    assert static.scheduler.config.max_ratio == 0.05
    assert adaptive.scheduler.config.max_ratio == 0.5
    # the smaller zone leaves HBM to recent tokens
    assert static.scheduler.max_gpu_share > adaptive.scheduler.max_gpu_share


def test_the_ratio_ceiling_drops_to_the_largest_zone_that_fits():
    pol = _policy("512k", selection="per_head")
    assert pol.feasible
    ceiling = pol.scheduler.config.max_ratio
    assert 0.01 < ceiling < 0.5
    final, batch = pol.workload.final_context, pol.workload.batch
    hbm = pol.footprint
    left = hbm.capacity_bytes["hbm"] - hbm.used_bytes["hbm"]
    assert left >= 0
    zone = final * 2 * batch * pol._landing_bytes_per_pick(ceiling)
    # one percent more ratio would not have fitted in what HBM had before the zone
    assert final * 2 * batch * pol._landing_bytes_per_pick(ceiling * 1.01) > zone + left
    assert pol.scheduler.max_gpu_share == 0.0


def test_a_zone_that_fits_keeps_the_configured_ceiling():
    pol = _policy("128k")  # group_shared: a small zone
    assert pol.scheduler.config.max_ratio == 0.5
