"""Regenerate the figure the README shows, from the main study (studies/cxl_sweep.yaml).

    python docs/make_figures.py            # ~35 s on 2 cores; writes docs/img/*.png

Every point is recomputed by default: a stored point's key covers its configuration and the
hgsim version, not changes to the simulator's code, so after a model change reused points
would draw the old physics. ``--reuse`` keeps stored points (after a figure-only change).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "studies" / "cxl_sweep.yaml"
#: study figure -> file under docs/img
FIGURES = {"throughput_vs_cxl_latency.png": "cxl_sweep_latency.png"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "cxl_sweep",
                        help="study output folder (default results/cxl_sweep)")
    parser.add_argument("--reuse", action="store_true", help="reuse stored points")
    parser.add_argument("--jobs", "-j", type=int, help="worker processes (default: all cores)")
    args = parser.parse_args(argv)

    from hgsim import api

    api.run_study(STUDY, out=args.out, force=not args.reuse, jobs=args.jobs, quiet=False)
    target = REPO / "docs" / "img"
    target.mkdir(parents=True, exist_ok=True)
    for source, name in FIGURES.items():
        shutil.copyfile(args.out / "figures" / source, target / name)
        print(f"{target / name} <- {args.out / 'figures' / source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
