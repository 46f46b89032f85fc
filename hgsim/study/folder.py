"""The folder a study writes, checked before anything runs.

A study runs for minutes to hours and keeps every finished point; an output folder that turns
out at the end to be a file, unwritable, or to hold a file where the study writes a folder
(or the reverse) would cost that time or a traceback. ``run_study`` calls this first.
"""

from __future__ import annotations

from pathlib import Path

from hgsim.errors import UserError
from hgsim.outputs import check_output_dir

#: What a study writes into its folder: files, and folders (ending in "/").
STUDY_OUTPUTS = ("points/", "figures/", "results.parquet", "results.csv", "report.md",
                 "run.json", "study.resolved.yaml", "elasticity.csv")


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
