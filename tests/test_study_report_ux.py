"""What report.md and the figures say about what they do not show: a share of the critical
path is not an elasticity, a policy infeasible everywhere is named, a missing bar is marked,
ratios are coloured on a log scale around 1, and numbers keep one precision rule."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from hgsim.study.report import binding_parts, fmt, never_feasible_note


def _frame() -> pd.DataFrame:
    rows = []
    for context in (32768, 131072):
        for policy, binding in (("hybridgen", "pcie0 h2d"), ("cpu_offload", "cxl0 read"),
                                ("gpu_only", "")):
            feasible = policy != "gpu_only"
            rows.append({"workload.context": context, "policy": policy, "feasible": feasible,
                         "tokens_per_s": 10.0 if feasible else math.nan,
                         "binding": binding, "binding_share": 1.0 if feasible else math.nan})
    return pd.DataFrame(rows)


def test_what_binds_says_a_share_is_not_an_elasticity():
    text = "".join(binding_parts(_frame(), ["workload.context", "policy"], "policy", None, 40))
    assert "cxl0 read (100%)" in text
    assert "not an elasticity" in text and "sensitivity" in text


def test_what_binds_names_a_policy_infeasible_at_every_point():
    text = "".join(binding_parts(_frame(), ["workload.context", "policy"], "policy", None, 40))
    assert "infeasible at every point: gpu_only" in text


def test_best_table_note_names_a_policy_infeasible_at_every_point():
    assert "infeasible at every point: gpu_only" in never_feasible_note(_frame(), "policy")
    assert never_feasible_note(_frame()[_frame().policy != "gpu_only"], "policy") == ""


def _bar_frame() -> pd.DataFrame:
    rows = []
    for context in (32768, 131072):
        for upgrade in ("baseline", "H200"):
            for policy in ("hybridgen", "flexgen", "gpu_only"):
                feasible = policy != "gpu_only" or (upgrade == "H200" and context == 32768)
                rows.append({"workload.context": context, "label.upgrade": upgrade,
                             "policy": policy, "feasible": feasible,
                             "tokens_per_s": 5.0 if feasible else math.nan})
    return pd.DataFrame(rows)


def test_a_bar_chart_marks_infeasible_points_where_their_bars_would_be():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from hgsim.study.plots import INFEASIBLE_NOTE, figure
    from hgsim.study.schema import PlotSpec

    spec = PlotSpec(kind="bar", x="label.upgrade", y="tokens_per_s", hue="policy",
                    col="workload.context")
    grid = figure(_bar_frame(), "bars", spec, {"policy": ["hybridgen", "flexgen", "gpu_only"]})
    small, large = grid.axes.flat
    marks = {id(a): [line.get_xdata()[0] for line in a.get_lines() if line.get_marker() == "x"]
             for a in (small, large)}
    # the one feasible gpu_only bar (H200 at 32k) is where the marks stand, a category over
    [gpu_only_bar] = [b.get_x() + b.get_width() / 2 for b in small.patches
                      if b.get_height() > 0 and b.get_x() > 1 + 0.1]
    assert marks[id(small)] == [gpu_only_bar - 1]
    assert sorted(marks[id(large)]) == [gpu_only_bar - 1, gpu_only_bar]
    assert any(t.get_text() == INFEASIBLE_NOTE for t in grid.figure.texts)
    plt.close(grid.figure)


def test_a_bar_chart_marks_a_feasible_point_without_a_baseline_apart_from_infeasible():
    """HybridGen at two zipped top-k ratios against FlexGen, which does not fit at 128k: the
    speedup bars there are missing because the baseline is, not the point. Each setting is a
    bar of its own (not their mean), the baseline, outside `of`, is no legend entry."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from hgsim.study.derived import compute_derived
    from hgsim.study.plots import NO_BASELINE_NOTE, figure
    from hgsim.study.schema import DerivedSpec, PlotSpec

    rows = []
    for context, flexgen in ((32768, 2.0), (131072, math.nan)):
        for policy, ratio, tps in (("hybridgen", 0.05, 8.0), ("hybridgen", 0.2, 4.0),
                                   ("flexgen", None, flexgen)):
            rows.append({"workload.context": context, "policy": policy,
                         "policy_options.topk_ratio": ratio, "feasible": tps == tps,
                         "tokens_per_s": tps})
    axes = ["policy", "policy_options.topk_ratio", "workload.context"]
    zipped = {"policy": ["policy_options.topk_ratio"], "policy_options.topk_ratio": ["policy"]}
    derived = {"speedup": DerivedSpec(metric="tokens_per_s", of={"policy": "hybridgen"},
                                      vs={"policy": "flexgen"})}
    frame = compute_derived(pd.DataFrame(rows), derived, axes, zipped)
    spec = PlotSpec(kind="bar", x="workload.context", y="speedup", hue="policy")
    grid = figure(frame, "sp", spec, {"workload.context": [32768, 131072]}, zipped=zipped,
                  derived=derived)
    (panel,) = grid.axes.flat
    assert [t.get_text() for t in grid.legend.texts] == [
        "hybridgen (topk_ratio 0.05)", "hybridgen (topk_ratio 0.2)"]
    assert sorted(b.get_height() for b in panel.patches if b.get_height() > 0) == [2.0, 4.0]
    hollow = [line.get_xdata()[0] for line in panel.get_lines() if line.get_marker() == "o"]
    assert hollow == pytest.approx([1 - 0.2, 1 + 0.2])  # both settings' slots at 128k
    assert not [line for line in panel.get_lines() if line.get_marker() == "x"]
    (note,) = [t.get_text() for t in grid.figure.texts if t.get_text().startswith("o:")]
    assert note == NO_BASELINE_NOTE.format(y="speedup")
    plt.close(grid.figure)


def test_a_figure_names_a_policy_plainly_where_its_other_roles_tell_settings_apart():
    """Policies zipped with settings and a label naming them: with the label as the hue the
    x ticks are the bare policies and the legend the bare labels (they read 'gpu_only
    (prefix_cache True, kv_offload_gb 256, ..., cache kept + DRAM store)' before); with the
    settings in no role the policy still names them."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from hgsim.study.plots import figure
    from hgsim.study.schema import PlotSpec

    points = [("hybridgen", True, 0, "kept"), ("hybridgen", False, 0, "not kept"),
              ("gpu_only", True, 0, "kept"), ("gpu_only", False, 0, "not kept"),
              ("gpu_only", True, 256, "kept + store")]
    frame = pd.DataFrame([{"policy": p, "serving.prefix_cache": c, "serving.kv_offload_gb": g,
                           "label.cache": lab, "feasible": True, "rate": float(i + 1)}
                          for i, (p, c, g, lab) in enumerate(points)])
    zipped_axes = ["policy", "serving.prefix_cache", "serving.kv_offload_gb", "label.cache"]
    zipped = {a: [b for b in zipped_axes if b != a] for a in zipped_axes}
    spec = PlotSpec(kind="bar", x="policy", y="rate", hue="label.cache")
    grid = figure(frame, "r", spec, {}, zipped=zipped)
    (panel,) = grid.axes.flat
    assert [t.get_text() for t in panel.get_xticklabels()] == ["hybridgen", "gpu_only"]
    assert [t.get_text() for t in grid.legend.texts] == ["kept", "not kept", "kept + store"]
    assert sorted(b.get_height() for b in panel.patches if b.get_height() > 0) == [
        1.0, 2.0, 3.0, 4.0, 5.0]
    plt.close(grid.figure)
    spec = PlotSpec(kind="bar", x="policy", y="rate")  # the settings in no role: named
    grid = figure(frame, "r", spec, {}, zipped=zipped)
    ticks = [t.get_text() for t in grid.axes.flat[0].get_xticklabels()]
    assert len(ticks) == 5 and ticks[-1].startswith("gpu_only (") and "store" in ticks[-1]
    plt.close(grid.figure)


def test_figures_read_counts_as_tables_do_and_no_labels_collide():
    """A log axis of token counts reads 1k, 4k ... 1M (it read 1e+06 and 100000); the
    heatmap's narrow cells slant their labels (64k128k256k ran together), an infeasible cell
    is an x, not a blank; notes sit below the slanted labels; 'label.upgrade' reads
    'upgrade' in legends."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from hgsim.study.plots import INFEASIBLE_CELL_NOTE, figure
    from hgsim.study.schema import PlotSpec

    contexts = [32768 * 2**i for i in range(5)]
    rows = [{"workload.context": c, "policy": p, "feasible": not (p == "b" and c == contexts[-1]),
             "max_context": float(c), "relative": 1.0, "label.upgrade": "x"}
            for c in contexts for p in ("a", "b")]
    frame = pd.DataFrame(rows)
    frame.loc[~frame.feasible, ["max_context", "relative"]] = math.nan

    bars = figure(frame, "cap", PlotSpec(kind="bar", x="workload.context", y="max_context",
                                          logy=True, hue="label.upgrade"), {})
    (panel,) = bars.axes.flat
    bars.figure.canvas.draw()
    labels = [t.get_text() for t in panel.get_yticklabels() if t.get_text()]
    assert len(labels) >= 3 and all(t[-1] in "kM" for t in labels) and "512k" in labels
    assert bars.legend.get_title().get_text() == "upgrade"
    plt.close(bars.figure)

    heat = figure(frame, "rel", PlotSpec(kind="heatmap", x="workload.context", y="policy",
                                         value="relative", height=2.0, aspect=0.8),
                  {"workload.context": contexts})
    (panel,) = heat.axes.flat
    renderer = heat.figure.canvas.get_renderer()
    ticks = [t for t in panel.get_xticklabels() if t.get_text()]
    assert [t.get_text() for t in ticks] == ["32k", "64k", "128k", "256k", "512k"]
    assert all(t.get_rotation() == 35 for t in ticks)  # upright they overlapped
    assert [t.get_text() for t in panel.texts if t.get_text() == "x"] == ["x"]
    (note,) = [t for t in heat.figure.texts if t.get_text() == INFEASIBLE_CELL_NOTE]
    lowest = min(t.get_window_extent(renderer).y0 for t in ticks)
    assert note.get_window_extent(renderer).y1 < lowest
    plt.close(heat.figure)


def test_ratio_columns_are_the_speedups_and_ratios():
    from hgsim.study.derived import ratio_columns
    from hgsim.study.schema import DerivedSpec

    derived = {"speedup": DerivedSpec(metric="tokens_per_s", vs={"policy": ["flexgen", "hgca"]}),
               "cost": DerivedSpec(metric="tokens_per_s", kind="ratio", vs={"policy": "hgca"}),
               "gap": DerivedSpec(metric="tokens_per_s", kind="difference",
                                  vs={"policy": "hgca"})}
    assert ratio_columns(derived) == {"speedup_vs_flexgen", "speedup_vs_hgca", "cost"}


def test_a_ratio_heatmap_colours_around_1_on_a_log_scale():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from hgsim.study.plots import figure
    from hgsim.study.schema import PlotSpec

    frame = pd.DataFrame({"bw": [18, 36, 18, 36], "lat": [150, 150, 600, 600],
                          "speedup_vs_flexgen": [0.98, 1.0, 9.0, 3.0]})
    spec = PlotSpec(kind="heatmap", x="bw", y="lat", value="speedup_vs_flexgen")
    grid = figure(frame, "heat", spec, {}, {"speedup_vs_flexgen"})
    mesh = grid.ax.collections[0]
    cells = mesh.get_array().reshape(2, 2)  # rows top-down: lat 600, then 150
    colour = {9.0: cells[0, 0], 3.0: cells[0, 1], 0.98: cells[1, 0], 1.0: cells[1, 1]}
    assert mesh.norm(colour[1.0]) == pytest.approx(0.5)  # 1 is the centre (white)
    assert mesh.norm(colour[0.98]) == pytest.approx(0.0)  # the only loss: full blue
    assert mesh.norm(colour[3.0]) == pytest.approx(0.5 + 0.5 * math.log(3) / math.log(9))
    assert [t.get_text() for t in grid.ax.texts] == ["9.00", "3.00", "0.98", "1.00"]
    plt.close(grid.figure)
    plain = figure(frame, "heat", spec, {})  # not marked a ratio: the linear scale as before
    assert plain.ax.collections[0].norm(1.0) < 0.01
    plt.close(plain.figure)


def test_ratio_bars_on_a_log_axis_grow_from_1_up_for_gains_and_down_for_losses():
    """A 0.98 drawn up from the log axis' floor read as a small gain; from 1 it is a loss."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from hgsim.study.plots import figure
    from hgsim.study.schema import PlotSpec

    frame = pd.DataFrame({"model": ["a", "b", "c", "d"], "feasible": [True] * 3 + [False],
                          "speedup_vs_flexgen": [0.98, 9.0, 0.25, math.nan]})
    spec = PlotSpec(kind="bar", x="model", y="speedup_vs_flexgen", logy=True)
    grid = figure(frame, "sp", spec, {"model": ["a", "b", "c", "d"]}, {"speedup_vs_flexgen"})
    (panel,) = grid.axes.flat
    bars = sorted(panel.patches, key=lambda b: b.get_x())
    spans = [(b.get_y(), b.get_y() + b.get_height()) for b in bars
             if not math.isnan(b.get_height())]
    assert spans == [(1.0, pytest.approx(0.98)), (1.0, pytest.approx(9.0)),
                     (1.0, pytest.approx(0.25))]
    low, high = panel.get_ylim()
    assert low < 0.25 and high > 9.0  # every bar's end is in view
    ones = [line for line in panel.get_lines() if list(line.get_ydata()) == [1, 1]]
    assert len(ones) == 1  # the reference line at 1
    infeasible = [line for line in panel.get_lines() if line.get_marker() == "x"]
    assert [line.get_ydata()[0] for line in infeasible] == [1.0]  # at its bar's foot: 1
    plt.close(grid.figure)
    plain = figure(frame, "sp", spec, {"model": ["a", "b", "c", "d"]})  # not a ratio column
    assert all(b.get_y() == 0 for b in plain.axes.flat[0].patches)
    plt.close(plain.figure)


def test_report_numbers_keep_three_significant_figures():
    assert fmt(0.9995) == fmt(1.0004) == "1.00"
    assert [fmt(v) for v in (85.52, 151.3, 12.34, 0.01234, 1.5)] == [
        "85.5", "151", "12.3", "0.0123", "1.50"]
    assert fmt(99.96) == "100" and fmt(12345.6) == "12,346" and fmt(3.0) == "3"


def test_capacity_table_says_a_point_does_not_fit_even_at_the_search_floor():
    from hgsim.study.report import capacity_table

    frame = pd.DataFrame({"model": ["m", "m"], "policy": ["hybridgen", "gpu_only"],
                          "max_context": [2117632.0, math.nan], "capped": [False, False]})
    (row,) = capacity_table(frame, ["model", "policy"], "policy", "max_context",
                            lo=1024).to_dict("records")
    assert (row["hybridgen"], row["gpu_only"]) == ("2068k", "does not fit at 1k")


def test_each_derived_metric_has_its_own_summary_table(tmp_path):
    """Two derived metrics grouped by different columns: one table of both showed each one's
    group columns as '-' on the other's rows (cxl_sweep: `context -`, `policy -`)."""
    from test_study_common import write_study

    from hgsim.study import load_study
    from hgsim.study.derived import compute_derived
    from hgsim.study.report import RunInfo, write_report

    plan = load_study(write_study(tmp_path, """\
name: two
base: {profile: h100-80gb-spr-cxl, model: llama-2-7b, workload: {context: 32k, gen: 2}}
sweep:
  - grid: {hardware.tiers.cxl0.latency_ns: [150, 300], policy: [hybridgen, flexgen]}
derived:
  speedup: {metric: tokens_per_s, of: {policy: hybridgen}, vs: {policy: flexgen}}
  latency_cost: {metric: tokens_per_s, kind: ratio, vs: {hardware.tiers.cxl0.latency_ns: 150},
                 group_by: [policy]}
"""))
    axes = ["hardware.tiers.cxl0.latency_ns", "policy"]
    frame = pd.DataFrame({"hardware.tiers.cxl0.latency_ns": [150.0, 150.0, 300.0, 300.0],
                          "policy": ["hybridgen", "flexgen"] * 2, "feasible": True,
                          "tokens_per_s": [4.0, 2.0, 3.0, 2.0]})
    frame = compute_derived(frame, plan.study.derived, axes, plan.study.zipped())
    path = write_report(tmp_path / "report.md", plan.study, frame, axes,
                        RunInfo(source="two.yaml", total=4, computed=4, reused=0, missing=0))
    text = path.read_text()
    speedup = text[text.index("`speedup`:\n"):text.index("`latency_cost`:\n")]
    assert "| metric | vs | policy | n | no value | geomean |" in speedup
    assert "| speedup | flexgen | hybridgen | 2 | 0 | 1.73 |" in speedup  # sqrt(2 x 1.5)
    cost = text[text.index("`latency_cost`:\n"):text.index("## Infeasible")]
    assert "| latency_cost | 150 | hybridgen | 1 | 0 | 0.750 |" in cost
    assert "| - |" not in speedup + cost


def test_elasticity_cells_are_fixed_decimals_and_marked_apart_from_axes():
    """A swept axis (the host's cores) and a parameter of the same name had the same header;
    values rounded to three decimals printed as -0.00800 and -0.000."""
    from hgsim.study.report import TIME_SCALING, elasticity_cells

    wide = pd.DataFrame({"hardware.sockets.cpu0.cores": [64], "sockets.cpu0.cores": [0.0510],
                         "tiers.ddr0.latency_ns": [-0.0080001], "links.pcie0.latency_ns":
                         [-0.0000004], TIME_SCALING: [0.9016]})
    cells = elasticity_cells(wide, ["sockets.cpu0.cores", "tiers.ddr0.latency_ns",
                                    "links.pcie0.latency_ns"])
    assert cells.to_dict("records") == [{
        "hardware.sockets.cpu0.cores": 64, "sockets.cpu0.cores (e)": "0.051",
        "tiers.ddr0.latency_ns (e)": "-0.008", "links.pcie0.latency_ns (e)": "0.000",
        TIME_SCALING: "0.902"}]


def test_a_faceted_heatmap_titles_each_panel_above_it_not_in_its_colour_bars_margin():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from hgsim.study.plots import figure
    from hgsim.study.schema import PlotSpec

    frame = pd.DataFrame([{"hardware.sockets.cpu0.cores": cores, "workload.context": context,
                           "policy": policy, "latency_ns": 150, "feasible": True, "v": 1.0}
                          for cores in (64, 8) for context in (32768, 131072)
                          for policy in ("a", "b")])
    spec = PlotSpec(kind="heatmap", x="latency_ns", y="policy", value="v", col="workload.context",
                    row="hardware.sockets.cpu0.cores")
    grid = figure(frame, "h", spec, {})
    assert grid.axes[1, 1].get_title() == "sockets.cpu0.cores = 64 | context = 128k"
    assert not [t for t in grid.figure.texts if "cores" in t.get_text()]  # no margin title
    plt.close(grid.figure)


def test_report_header_counts_rows_sharing_a_point_and_times_each_point_once(tmp_path):
    """paper_reproduction: 288 rows of 192 points (an exact policy's equal-accuracy twins
    are its configured point); the header said 'points: 192' beside a 288-row table and
    summed the repeated rows' simulation time again (267 s for 246 s)."""
    from test_study_common import write_study

    from hgsim.study import load_study
    from hgsim.study.report import RunInfo, write_report

    plan = load_study(write_study(tmp_path, """\
name: twins
base: {profile: h100-80gb-spr-cxl, model: llama-2-7b, workload: {context: 32k, gen: 2}}
sweep: {grid: {policy: [hybridgen, flexgen]}}
"""))
    frame = pd.DataFrame({"policy": ["hybridgen", "flexgen", "flexgen"], "feasible": True,
                          "tokens_per_s": [4.0, 2.0, 2.0], "point": ["a", "b", "b"],
                          "wall_s": [1.0, 2.0, 2.0]})
    text = write_report(tmp_path / "report.md", plan.study, frame, ["policy"],
                        RunInfo(source="t.yaml", total=2, computed=2, reused=0,
                                missing=0)).read_text()
    assert "- rows: 3; 1 repeat a point computed once" in text
    assert "simulation time summed over points: 3.0 s" in text


def test_what_binds_keeps_a_row_where_no_policy_is_feasible():
    from hgsim.study.report import binding_table

    frame = _frame()
    frame.loc[frame["workload.context"] == 131072, ["feasible", "binding"]] = (False, None)
    table = binding_table(frame, ["workload.context", "policy"], "policy")
    assert table["workload.context"].tolist() == [32768, 131072]
    assert table[["hybridgen", "cpu_offload"]].iloc[1].isna().all()
    assert "gpu_only" not in table  # infeasible everywhere: named in a note instead


def test_report_times_a_sensitivity_study_over_its_variant_points_too(tmp_path):
    """studies/sensitivity.yaml's report said 'simulation time summed over points: 9.0 s; this
    run took 163.5 s': the sum covered the 16 base points, not the 432 it ran (271 s)."""
    from test_study_common import write_study

    from hgsim.study import load_study
    from hgsim.study.report import RunInfo, write_report

    plan = load_study(write_study(tmp_path, """\
name: sens
base: {profile: h100-80gb-spr-cxl, model: llama-2-7b, workload: {context: 32k, gen: 2}}
sweep: {grid: {policy: [hybridgen]}}
sensitivity: {step: 0.25, metric: tokens_per_s, parameters: [tiers.cxl0.latency_ns]}
"""))
    frame = pd.DataFrame({"policy": "hybridgen", "feasible": True,
                          "sensitivity.parameter": ["base", "tiers.cxl0.latency_ns",
                                                    "tiers.cxl0.latency_ns"],
                          "sensitivity.factor": [1.0, 1.25, 0.8],
                          "tokens_per_s": [4.0, 3.9, 4.1], "point": ["a", "b", "c"],
                          "wall_s": [1.0, 2.0, 3.0]})
    text = write_report(tmp_path / "report.md", plan.study, frame, ["policy"],
                        RunInfo(source="t.yaml", total=3, computed=3, reused=0,
                                missing=0)).read_text()
    assert "simulation time summed over points: 6.0 s" in text


def test_the_configuration_table_shows_capacities_in_the_results_unit(tmp_path):
    """cxl_sweep's configuration table said '768 GiB' where the results tables show the
    same capacity as 825 (decimal GB, the unit of every *_gb column); it now shows both."""
    from test_study_common import write_study

    from hgsim.study import load_study
    from hgsim.study.report import RunInfo, write_report

    plan = load_study(write_study(tmp_path, """\
name: gib
base:
  profile: h100-80gb-spr-cxl
  model: llama-2-7b
  workload: {context: 32k, gen: 2}
  hardware: {tiers.cxl0.capacity_gb: 512 GiB, tiers.cxl0.latency_ns: 250}
sweep: {grid: {hardware.tiers.ddr0.capacity_gb: [768 GiB, 1000GB, 512],
                 policy: [hybridgen, flexgen]}}
"""))
    gb = [768 * 2**30 / 1e9, 1000.0, 512.0]
    frame = pd.DataFrame({"hardware.tiers.ddr0.capacity_gb": gb * 2,
                          "policy": ["hybridgen"] * 3 + ["flexgen"] * 3, "feasible": True,
                          "tokens_per_s": [4.0, 5.0, 3.0, 2.0, 2.5, 1.5],
                          "point": list("abcdef"), "wall_s": 1.0})
    text = write_report(tmp_path / "report.md", plan.study, frame,
                        ["hardware.tiers.ddr0.capacity_gb", "policy"],
                        RunInfo(source="t.yaml", total=6, computed=6, reused=0,
                                missing=0)).read_text()
    assert "| hardware.tiers.cxl0.capacity_gb | 550 (512 GiB) |  |" in text
    assert "| hardware.tiers.cxl0.latency_ns | 250 |  |" in text
    assert "| hardware.tiers.ddr0.capacity_gb |  | 825 (768 GiB), 1000, 512 |" in text
    results = text[text.index("## Best"):]
    assert "| 825 |" in results and "GiB" not in results


MET = "the SLO is met even with all 10 requests arriving at once"
MISSED = "the SLO is missed even at 0.01 requests/s, where requests rarely overlap"


def _searches() -> pd.DataFrame:
    """Rate searches at three prompts: one finds a rate and one none (no limit) at 4k, both
    find no limit at 8k, and both miss the SLO at every rate at 16k."""
    def row(prompt, policy, rate, bound, reason):
        return {"serving.prompt": prompt, "policy": policy, "max_rate_per_s": rate,
                "rates_tried": 0 if reason == "alone" else 9, "slo_bound_by": bound,
                "reason": reason}

    return pd.DataFrame([row("4k", "gpu_only", 7.6, "tpot", ""),
                         row("4k", "hybridgen", math.nan, "", MET),
                         row("8k", "gpu_only", math.nan, "", MET),
                         row("8k", "hybridgen", math.nan, "", MET),
                         row("16k", "gpu_only", math.nan, "ttft", MISSED),
                         row("16k", "hybridgen", math.nan, "ttft", MISSED)])


def test_a_rate_search_without_a_limit_is_not_infeasible():
    from hgsim.study.report import NO_LIMIT, best_table, no_limit

    frame = _searches()
    assert no_limit(frame).tolist() == [False, True, True, True, False, False]
    table = best_table(frame, ["serving.prompt", "policy"], "policy", "max_rate_per_s")
    rows = {r["serving.prompt"]: r for r in table.to_dict("records")}
    # no limit ranks above any rate found, with its reason
    assert rows["4k"]["best"] == "hybridgen" and rows["4k"]["max_rate_per_s"] == NO_LIMIT
    assert rows["4k"]["runner-up"] == "gpu_only" and math.isnan(rows["4k"]["margin"])
    assert rows["4k"]["note"] == MET
    assert rows["8k"]["best"] == "gpu_only = hybridgen" and rows["8k"]["note"] == MET
    assert rows["8k"]["max_rate_per_s"] == NO_LIMIT
    # missed at every rate: infeasible, and why
    assert rows["16k"]["best"] == "none feasible" and rows["16k"]["note"] == MISSED


def test_a_table_of_rates_found_has_no_note_column():
    from hgsim.study.report import best_table

    frame = _searches().iloc[:1]
    frame = pd.concat([frame, frame.assign(policy="hybridgen", max_rate_per_s=3.8)])
    table = best_table(frame, ["serving.prompt", "policy"], "policy", "max_rate_per_s")
    assert "note" not in table and table.iloc[0]["margin"] == pytest.approx(2.0)


def test_fixed_rate_points_rank_by_what_differs_by_policy():
    from hgsim.study.report import fixed_rate_metric

    frame = pd.DataFrame({"slo_attainment": [1.0, 0.8], "e2e_mean_s": [1.0, 2.0]})
    assert fixed_rate_metric(frame) == "slo_attainment"
    assert fixed_rate_metric(frame.drop(columns="slo_attainment")) == "e2e_mean_s"
    assert fixed_rate_metric(frame.assign(slo_attainment=math.nan)) == "e2e_mean_s"
