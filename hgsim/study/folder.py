"""The folder a study writes: checked before anything runs, and made consistent as a run starts.

A study runs for minutes to hours and keeps every finished point; an output folder that turns
out at the end to be a file, unwritable, or to hold a file where the study writes a folder
(or the reverse) would cost that time or a traceback. ``run_study`` calls this first.

The tables, figures and report are rebuilt from the points at the end of a run; until then the
folder holds those of the last complete run. They stay only while they describe the study
that is running (same fingerprint, recorded in ``run.json``): a run of a changed study removes
them first, so an interrupted run never leaves an old study's results beside the new
``study.resolved.yaml``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hgsim.errors import UserError
from hgsim.outputs import check_output_dir, orphaned_temporaries
from hgsim.study.plots import FORMATS

#: What a study writes into its folder: files, and folders (ending in "/").
STUDY_OUTPUTS = ("points/", "figures/", "results.parquet", "results.csv", "report.md",
                 "run.json", "study.resolved.yaml", "elasticity.csv")

#: The outputs built from all points at the end of a run: they describe one study.
STUDY_LEVEL_OUTPUTS = ("results.parquet", "results.csv", "elasticity.csv", "report.md",
                       "figures/")


def check_study_folder(out: Path) -> None:
    """``out`` can hold the study's outputs: a writable folder (or one that can be created)
    in which none of the names it writes is taken by the wrong kind of entry."""
    check_output_dir(out, "--out")
    for name in STUDY_OUTPUTS:
        entry = out / name.rstrip("/")
        wants_folder = name.endswith("/")
        if entry.exists() and entry.is_dir() != wants_folder:
            kind = "a folder" if wants_folder else "a file"
            raise UserError(f"{entry} is in the way: the study writes {kind} there",
                            field="--out")


def study_fingerprint(study: dict[str, Any], point_keys: list[str]) -> str:
    """What the study-level outputs depend on: the study as loaded (plots, derived metrics,
    report settings) and its points' keys (which hash profile contents and hgsim's version)."""
    text = json.dumps({"study": study, "points": sorted(point_keys)}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recorded_fingerprint(out: Path) -> str | None:
    """The fingerprint of the last run started in ``out`` (None: none recorded)."""
    history = read_run_log(out)
    return history[-1].get("fingerprint") if history else None


def read_run_log(out: Path) -> list[dict[str, Any]]:
    """``run.json``'s entries; an unreadable or foreign file reads as no history."""
    try:
        history = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return []
    return [e for e in history if isinstance(e, dict)] if isinstance(history, list) else []


def stale_outputs(out: Path, fingerprint: str) -> list[Path]:
    """What a run of the study ``fingerprint`` must remove before it writes anything:
    temporaries of writers killed mid-write, and the study-level outputs of a different study
    (or of one whose fingerprint is unknown; they are rebuilt at the end of the run). Judged by
    the last run recorded, so called before this run is."""
    stale = orphaned_temporaries(out) + orphaned_temporaries(out / "figures")
    if recorded_fingerprint(out) == fingerprint:
        return stale
    stale += [out / name for name in STUDY_LEVEL_OUTPUTS
              if not name.endswith("/") and (out / name).is_file()]
    if (out / "figures").is_dir():  # the figures a study draws, not whatever else is there
        stale += [p for p in (out / "figures").iterdir()
                  if p.is_file() and p.suffix[1:] in FORMATS]
    return stale
