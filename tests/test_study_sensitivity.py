"""Sensitivity studies: one parameter at a time, the elasticity table and heatmap, what binds
each point in the report, and the schema's one-line errors."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from test_study_common import run_cli, write_study

from hgsim.cli import main
from hgsim.errors import ConfigError
from hgsim.study import load_study
from hgsim.study.sensitivity import variants

SENSITIVITY = """\
name: sens
base:
  profile: h100-80gb-spr-cxl
  model: llama-2-13b
  workload: {batch: 2, context: 128k, gen: 4}
  fidelity: {decode_samples: 2, accuracy: false}
sweep:
  - grid:
      policy: [flexgen, cpu_offload]
sensitivity:
  step: 0.25
  parameters:
    - links.pcie0.bandwidth_gbps
    - tiers.cxl0.latency_ns
    - tiers.ddr0.bandwidth_gbps
    - sockets.cpu0.cores
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sens")
    out = tmp / "out"
    assert main(["study", str(write_study(tmp, SENSITIVITY)), "--out", str(out), "--quiet"]) == 0
    return out


def test_each_parameter_alone_scaled_down_and_up(finished):
    frame = pd.read_parquet(finished / "results.parquet")
    assert len(frame) == 2 * (1 + 4 * 2)
    cores = frame[frame["sensitivity.parameter"] == "sockets.cpu0.cores"]
    assert sorted(cores["sensitivity.value"].unique()) == [51.0, 80.0]  # 64 / 1.25, 64 x 1.25
    base = frame[frame["sensitivity.parameter"] == "base"]
    assert set(base["policy"]) == {"flexgen", "cpu_offload"}


def test_elasticities_follow_what_binds(finished):
    table = pd.read_csv(finished / "elasticity.csv").set_index(["policy", "parameter"])
    e = table["elasticity"]
    # FlexGen streams every host token over PCIe: throughput follows PCIe bandwidth
    assert e["flexgen", "links.pcie0.bandwidth_gbps"] == pytest.approx(1.0, abs=0.02)
    assert e["flexgen", "tiers.cxl0.latency_ns"] == pytest.approx(0.0, abs=1e-6)
    # CPU offload streams it from DRAM with 64 cores: DRAM bandwidth, not PCIe
    assert e["cpu_offload", "tiers.ddr0.bandwidth_gbps"] > 0.8
    assert abs(e["cpu_offload", "links.pcie0.bandwidth_gbps"]) < 0.01


def test_report_has_sensitivity_and_binding_sections_and_a_heatmap(finished):
    report = (finished / "report.md").read_text()
    assert "## Sensitivity" in report and "## What binds" in report
    assert "pcie0 h2d" in report  # FlexGen's binding resource
    assert (finished / "figures" / "elasticity.png").stat().st_size > 0
    # FlexGen's step is PCIe transfers: the listed rates and times cover all of it
    section = report.split("## Sensitivity")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| flexgen |"))
    assert "`rates - times`" in report and "in neither: `sockets.cpu0.cores`" in report
    assert float(row.strip("| ").split(" | ")[-1]) == pytest.approx(1.0, abs=0.01)


def test_whole_parameters_move_by_a_whole_step():
    assert variants(64, 0.25) == [(51 / 64, 51), (80 / 64, 80)]
    assert variants(2, 0.25) == [(0.5, 1), (1.5, 3)]
    assert variants(1, 0.25) == [(2.0, 2)]  # cannot go below one
    (down, v_down), (up, v_up) = variants(110.0, 0.25)
    assert v_down == pytest.approx(88.0) and v_up == pytest.approx(137.5)
    assert math.isclose(down * up, 1.0)


@pytest.mark.parametrize("edit, message", [
    ("- tiers.cxl0.latency_ns", "listed twice"),
    ("- tiers.cxl9.latency_ns", "cxl9"),
    ("- sockets.cpu0.simd", "not a number"),
])
def test_bad_parameters_are_one_line_errors_with_the_line(tmp_path, edit, message):
    text = SENSITIVITY.replace("    - sockets.cpu0.cores\n", f"    - sockets.cpu0.cores\n    {edit}\n")
    if "listed twice" not in message:
        text = text.replace("    - tiers.cxl0.latency_ns\n", "", 1)
    path = write_study(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_study(path)
    assert f"{path.name}:" in str(info.value)
    result = run_cli("study", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_search_cannot_also_be_a_sensitivity_study(tmp_path):
    text = SENSITIVITY + "search: {maximize: workload.context, lo: 1k, hi: 1M}\n"
    with pytest.raises(ConfigError, match="sensitivity"):
        load_study(write_study(tmp_path, text))


def test_a_parameter_that_is_0_at_every_point_is_an_error(tmp_path):
    """0 scaled up and down is 0: the study ran the same point three times and its elasticity
    table came out empty, without a word."""
    text = SENSITIVITY.replace("  fidelity:", "  hardware: {sockets.cpu0.op_overhead_us: 0}\n"
                                              "  fidelity:")
    text = text.replace("    - sockets.cpu0.cores\n", "    - sockets.cpu0.op_overhead_us\n")
    path = write_study(tmp_path, text)
    line = text.splitlines().index("    - sockets.cpu0.op_overhead_us") + 1
    with pytest.raises(ConfigError, match=rf"{path.name}:{line}: sensitivity.parameters\[3\]: "
                                          r"'sockets.cpu0.op_overhead_us' is 0 at every point"):
        load_study(path)


def test_heatmap_row_labels_are_horizontal():
    """seaborn writes them vertically unless it sees them overlap before the layout is final;
    in the elasticity heatmap 'hgca' and 'cpu_offload' ran into each other."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from hgsim.study.plots import _heatmap
    from hgsim.study.schema import PlotSpec

    data = pd.DataFrame({"parameter": ["a", "b"] * 2, "policy": ["hybridgen"] * 2 + ["hgca"] * 2,
                         "elasticity": [0.1, -0.2, 0.3, 0.9]})
    spec = PlotSpec(kind="heatmap", x="parameter", y="policy", value="elasticity", center=0.0)
    grid = _heatmap(data, spec, {"height": 2.0, "aspect": 1.0}, {"parameter": ["a", "b"],
                                                                 "policy": ["hybridgen", "hgca"]})
    labels = grid.axes.flat[0].get_yticklabels()
    assert [t.get_text() for t in labels] == ["hgca", "hybridgen"]
    assert all(t.get_rotation() == 0 for t in labels)


def test_time_scaling_sum_of_elasticities():
    """Every rate x s and every time / s gives tokens/s x s (checked on the simulator below),
    so sum(rate elasticities) - sum(time elasticities) is the share of the step the listed
    parameters cover: 1 when they are all listed; cores and bytes in flight count in neither."""
    from hgsim.study.sensitivity import time_role, time_scaling_sum

    assert [time_role(p) for p in ("tiers.ddr0.bandwidth_gbps", "tiers.cxl0.latency_ns",
                                   "sockets.cpu0.op_overhead_us", "gpus.gpu0.peak_tflops.fp16",
                                   "sockets.cpu0.gather_ns_per_row", "sockets.cpu0.cores",
                                   "sockets.cpu0.stream_inflight_bytes",
                                   "sockets.cpu0.attention_gflops_per_core")] == [
        1, -1, -1, 1, -1, 0, 0, 1]
    wide = pd.DataFrame({"policy": ["a"], "tiers.ddr0.bandwidth_gbps": [0.7],
                         "tiers.ddr0.latency_ns": [-0.2], "sockets.cpu0.cores": [0.5]})
    assert time_scaling_sum(wide).tolist() == [pytest.approx(0.9)]


def test_simulated_tokens_per_s_scale_with_every_rate_and_time():
    """The closed form the report's time-scaling column rests on."""
    from hgsim import api
    from hgsim.profiles import load_profile
    from hgsim.study.sensitivity import time_role

    leaves: dict[str, float] = {}

    def walk(node, path):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{path}{key}.")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                leaves[f"{path}{key}"] = value

    walk(load_profile("h100-80gb-spr-cxl").model_dump(), "")
    lean = {"sockets.cpu0.cores": 8, "tiers.ddr0.capacity_gb": 128}
    speeds = []
    for s in (1.0, 1.25):
        hardware = {**lean, **{p: v * s ** time_role(p) for p, v in leaves.items()
                               if time_role(p)}}
        speeds.append(api.simulate("h100-80gb-spr-cxl", "llama-2-13b", "hybridgen",
                                   context="128k", batch=2, gen=4, samples=2, accuracy=False,
                                   hardware=hardware).tokens_per_s)
    assert speeds[1] / speeds[0] == pytest.approx(1.25, rel=1e-9)


def test_one_sided_elasticities_show_a_kink():
    """PCIe binds InfiniGen only when scaled down: the central difference (0.5 here) hides
    that one side is 1 and the other 0; elasticity.csv has both."""
    from hgsim.study.sensitivity import BASE, FACTOR, PARAMETER, VALUE, elasticities

    frame = pd.DataFrame({
        "policy": ["infinigen"] * 3, PARAMETER: [BASE, "bw", "bw"],
        FACTOR: [1.0, 0.8, 1.25], VALUE: [math.nan, 80.0, 125.0],
        "tokens_per_s": [1.0, 0.8, 1.0]})
    (row,) = elasticities(frame, ["policy", PARAMETER, FACTOR], "tokens_per_s").to_dict(
        "records")
    assert row["elasticity_down"] == pytest.approx(1.0)
    assert row["elasticity_up"] == pytest.approx(0.0)
    assert row["elasticity"] == pytest.approx(math.log(1 / 0.8) / math.log(125 / 80))
