"""What report.md and the figures say about what they do not show: a share of the critical
path is not an elasticity, a policy infeasible everywhere is named, a missing bar is marked,
ratios are coloured on a log scale around 1, and numbers keep one precision rule."""

from __future__ import annotations

import math

import pandas as pd

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
