"""Collects what ``benchmarks/gpu_suite.sh`` wrote into one ``summary.md``: the machine, each
stage's exit code and time, the device-time ratios, the calibrated launch and graph figures,
validation MAPE overall and per policy, and the speed-ups, measured beside simulated.

Reads only files the stages wrote; a stage that did not finish is reported as such (its
partial outputs, e.g. ``validate_*.partial.csv``, are used where they exist).

Usage: python benchmarks/gpu_suite_summary.py OUT_DIR
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def stages(out: Path) -> list[str]:
    path = out / "stages.txt"
    if not path.exists():
        return ["(no stages recorded)"]
    lines = ["| stage | exit | seconds |", "|---|---|---|"]
    for line in path.read_text().splitlines():
        name, *fields = line.split()
        values = dict(f.split("=", 1) for f in fields)
        lines.append(f"| {name} | {values.get('rc', '?')} | {values.get('seconds', '?')} |")
    return lines


def device_time(out: Path) -> list[str]:
    path = out / "device_time" / "device_time.md"
    if not path.exists():
        return ["device time: not measured (stage did not finish)"]
    rows = path.read_text().splitlines()
    return rows[2:] if rows and rows[0].startswith("#") else rows


def calibration(out: Path) -> list[str]:
    path = out / "local.calibration.json"
    if not path.exists():
        return ["calibration: none written"]
    doc_summary = json.loads(path.read_text()).get("summary", {})
    summary = doc_summary.get("gpu0", {})
    keys = ("hbm_bandwidth_gbps", "memory_efficiency", "attention_efficiency",
            "kernel_launch_overhead_us", "single_launch_overhead_us", "graph_launch_overhead_us",
            "graph_kernel_gap_us", "h2d_gbps", "d2h_gbps", "h2d_latency_us", "d2h_latency_us")
    lines = ["| figure | value | from |", "|---|---|---|"]
    for key in keys:
        fig = summary.get(key)
        if isinstance(fig, dict):
            lines.append(f"| {key} | {fig.get('value')} | {fig.get('what', '')[:110]} |")
    host = doc_summary.get("cpu0", {})  # the host kernel beside the GPU
    for key in ("attention_gflops_per_core", "attention_rate_by_kv_dtype", "op_overhead_us",
                "topk_ns_per_insert"):
        fig = host.get(key)
        if isinstance(fig, dict):
            lines.append(f"| cpu0 {key} | {fig.get('value')} | {fig.get('what', '')[:110]} |")
    peaks = summary.get("peak_tflops", {}).get("value", {})
    if peaks:
        lines.append("| peak_tflops | " + ", ".join(f"{k} {v['value']}" for k, v in peaks.items())
                     + " | GEMM |")
    meta = json.loads(path.read_text()).get("meta", {})
    if meta.get("quick"):
        lines.append("\n(quick calibration: small buffers, two repeats)")
    for label, error in (meta.get("failed_jobs") or {}).items():
        lines.append(f"\nFAILED benchmark, figures left out: {label}: {error}")
    return lines


def validation(out: Path, name: str) -> list[str]:
    import pandas as pd

    final, partial = out / f"{name}.csv", out / f"{name}.partial.csv"
    path = final if final.exists() else partial if partial.exists() else None
    if path is None:
        return [f"{name}: no cases finished"]
    table = pd.read_csv(path)
    failed = (table[table["failure"].notna()] if "failure" in table
              else table.iloc[0:0])  # cases that raised on CUDA: a row with the reason
    table = table.drop(failed.index)
    state = "" if path is final else " (PARTIAL: the stage was stopped)"
    failures = [f"FAILED case {row['config']} @ {row['context']}: {row['failure']} (left out "
                "of the MAPE)" for _, row in failed.iterrows()]
    if table.empty:  # every case raised: validate's CSV then has no timing columns at all
        return [f"0 cases compared ({len(failed)} failed){state}", "", *failures]
    return _compared(table, state) + (["", *failures] if failures else []) + _cases(table)


def _compared(table, state: str) -> list[str]:
    """MAPE and mean signed error over the compared cases, overall and by policy."""
    errors = table["error_pct"].abs()
    lines = [f"{len(table)} cases{state}; MAPE {errors.mean():.1f}% overall; mean signed "
             f"{table['error_pct'].mean():+.1f}%", "",
             "| policy | cases | MAPE | mean signed error |", "|---|---|---|---|"]
    for policy, group in table.groupby("policy", sort=False):
        lines.append(f"| {policy} | {len(group)} | {group['error_pct'].abs().mean():.1f}% | "
                     f"{group['error_pct'].mean():+.1f}% |")
    return lines


def _cases(table) -> list[str]:
    lines = ["", "| case | measured ms | predicted ms | error |", "|---|---|---|---|"]
    for _, row in table.iterrows():
        lines.append(f"| {row['config']} @ {row['context']} | {row['measured_ms']:.2f} | "
                     f"{row['predicted_ms']:.2f} | {row['error_pct']:+.1f}% |")
    return lines


def speedups(out: Path) -> list[str]:
    path = out / "speedups" / "speedups.md"
    if not path.exists():
        return ["speed-ups: not measured (stage did not finish)"]
    rows = path.read_text().splitlines()
    return rows[2:] if rows and rows[0].startswith("#") else rows


def gpu_tests(out: Path) -> list[str]:
    """pytest's last line for the CUDA-marked tests, and each failure's line."""
    path = out / "gpu_tests.log"
    if not path.exists():
        return ["CUDA tests: not run"]
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return [lines[-1] if lines else "(no output)", *failed]


def device_ratio(out: Path) -> str:
    path = out / "device_time" / "device_time.json"
    if not path.exists():
        return "n/a"
    rows = [r for r in json.loads(path.read_text()) if r.get("device_over_kernel")]
    graphs = [r["device_over_kernel"] for r in rows if r["path"] == "graphs"]
    if not graphs:
        return "n/a (no kernel times: no CUDA)"
    return (f"graph path median {statistics.median(graphs):.2f}x, worst {max(graphs):.2f}x "
            "(target <= 1.3x)")


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    env = (out / "env.txt").read_text() if (out / "env.txt").exists() else "(no env.txt)"
    parts = ["# hw_backend GPU suite", "", "## Machine", "", "```", env.strip(), "```", "",
             "## Stages", "", *stages(out), "",
             "## 1. Device time per layer vs kernel GPU time", "",
             f"device/kernel: {device_ratio(out)}", "", *device_time(out), "",
             "## 3. Calibration (gpu0)", "", *calibration(out), "",
             "## 4. Validation, attention only", "", *validation(out, "validate_attention"), "",
             "## 4. Validation, whole model", "", *validation(out, "validate_model"), "",
             "## 5. Speed-ups (measured beside simulated)", "", *speedups(out), "",
             "## CUDA tests", "", *gpu_tests(out), ""]
    text = "\n".join(parts)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
