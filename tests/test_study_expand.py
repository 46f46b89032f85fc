"""Sweep expansion: grid axes multiply, zip axes advance together, groups multiply; keys are
content hashes of the full resolved configuration."""

from __future__ import annotations

import pytest
from test_study_common import write_study

from hgsim.study import load_study

HEAD = """\
name: expand
base:
  profile: h100-80gb-spr-cxl
  model: llama-2-7b
  workload: {context: 32k, gen: 4}
  fidelity: {decode_samples: 2}
"""


def points(tmp_path, sweep: str):
    return load_study(write_study(tmp_path, HEAD + sweep)).expansion.points


def test_grid_is_a_product(tmp_path):
    pts = points(tmp_path, """\
sweep:
  - grid:
      hardware.tiers.cxl0.bandwidth_gbps: [16, 32, 64, 128]
      workload.context: [8k, 32k, 128k]
      policy: [hybridgen, flexgen]
""")
    assert len(pts) == 4 * 3 * 2
    assert len({p.spec.key for p in pts}) == 24


def test_zip_advances_together(tmp_path):
    pts = points(tmp_path, """\
sweep:
  - zip:
      hardware.tiers.cxl0.bandwidth_gbps: [16, 32, 64, 128]
      hardware.links.cxl0-link.bandwidth_gbps: [16, 32, 64, 128]
""")
    assert len(pts) == 4
    for p in pts:
        bw = p.coords["hardware.tiers.cxl0.bandwidth_gbps"]
        assert p.coords["hardware.links.cxl0-link.bandwidth_gbps"] == bw
        assert p.spec.profile.tiers["cxl0"].read_bandwidth_gbps == bw
        assert p.spec.profile.links["cxl0-link"].bandwidth_gbps == bw


def test_groups_multiply_and_zip_inside_group_crosses_grid(tmp_path):
    pts = points(tmp_path, """\
sweep:
  - zip: {workload.batch: [1, 2, 4], workload.gen: [4, 8, 16]}
    grid: {policy: [hybridgen, flexgen]}
  - grid: {workload.context: [8k, 16k]}
""")
    assert len(pts) == 3 * 2 * 2
    assert {(p.spec.workload.batch, p.spec.workload.gen) for p in pts} == {(1, 4), (2, 8), (4, 16)}


def test_values_are_normalized_for_the_table(tmp_path):
    pts = points(tmp_path, """\
sweep:
  - grid:
      workload.context: [32k]
      hardware.tiers.cxl0.latency_ns: ["0.25 us"]
      model: [Llama-2-7B]
""")
    (p,) = pts
    assert p.coords == {"workload.context": 32768, "hardware.tiers.cxl0.latency_ns": 250.0,
                        "model": "llama-2-7b"}
    assert p.spec.workload.context == 32768


def test_key_covers_fidelity_and_hardware_content(tmp_path):
    (a,) = points(tmp_path, "")
    (b,) = load_study(write_study(tmp_path, HEAD.replace("decode_samples: 2",
                                                         "decode_samples: 3"))).expansion.points
    (c,) = points(tmp_path, "sweep: [{grid: {hardware.tiers.cxl0.latency_ns: [151]}}]\n")
    (d,) = points(tmp_path, "sweep: [{grid: {policy: [hybridgen]}}]\n")
    assert len({a.spec.key, b.spec.key, c.spec.key}) == 3
    assert d.spec.key == a.spec.key  # same configuration, written differently: same point


def test_same_configuration_twice_is_one_point_to_compute(tmp_path):
    """Two rows that differ only in a label are one configuration, computed once (the same
    value twice on an axis is an error instead: tests/test_study_schema.py)."""
    plan = load_study(write_study(tmp_path, HEAD + """\
sweep:
  - grid:
      label.variant: [first, second]
"""))
    assert len(plan.expansion.points) == 2
    assert len(plan.expansion.unique_specs()) == 1


@pytest.mark.parametrize("axis", ["fidelity.decode_samples", "policy_options.topk_ratio"])
def test_other_sections_are_axes(tmp_path, axis):
    pts = points(tmp_path, f"sweep: [{{grid: {{{axis}: [4, 0.5]}}}}]\n".replace(
        "[4, 0.5]", "[4, 8]" if "fidelity" in axis else "[0.05, 0.5]"))
    assert len(pts) == 2 and pts[0].spec.key != pts[1].spec.key


def test_null_in_a_zipped_option_leaves_it_unset_for_a_policy_without_it(tmp_path, capsys):
    sweep = """\
sweep:
  - zip:
      policy: [hybridgen, flexgen]
      policy_options.topk_ratio: [0.05, {}]
"""
    hybridgen, flexgen = points(tmp_path, sweep.format("null"))
    assert hybridgen.spec.policy_options == {"topk_ratio": 0.05}
    assert flexgen.spec.policy_options == {}
    assert flexgen.coords["policy_options.topk_ratio"] is None
    from hgsim.cli import main

    study = write_study(tmp_path, HEAD + sweep.format("0.1"))
    assert main(["study", str(study), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "zip.policy_options.topk_ratio[1]: policy 'flexgen' has no option 'topk_ratio'" in err
    assert err.endswith("write null for a policy without it") and "\n" not in err


def test_a_sweep_over_the_point_limit_is_refused_before_any_point_is_built(tmp_path, capsys):
    # 300 x 300 x 300 values was expanded point by point (about 0.25 ms each: two hours and
    # tens of GB before the first simulation); now counted from the axes' lengths and refused
    from bad_input import user_error

    from hgsim.study.expand import MAX_POINTS

    n = 101  # 101 x 100 x 100 x 1 = 1,010,000 > MAX_POINTS
    assert n * 100 * 100 > MAX_POINTS >= 100 * 100 * 100
    counts = lambda k, start: ", ".join(str(start + i) for i in range(k))  # noqa: E731
    study = write_study(tmp_path, HEAD + f"""\
sweep:
  - grid:
      workload.context: [{counts(n, 1000)}]
      workload.gen: [{counts(100, 1)}]
  - grid:
      workload.batch: [{counts(100, 1)}]
      policy: [hybridgen]
""")
    out = tmp_path / "out"
    line = user_error(capsys, "study", str(study), "--out", str(out), "--jobs", "1")
    assert f"{study}:7: sweep: 1,010,000 points (101 x 100 x 100 x 1), over the " \
           f"{MAX_POINTS:,}" in line, line
    assert not out.exists()
