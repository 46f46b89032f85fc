"""Regenerate the figures the docs show, from the studies that draw them.

    python docs/make_figures.py                  # every study below; writes docs/img/*.png
    python docs/make_figures.py --study serving  # one of them

``cxl_sweep`` (the README's figure) takes ~35 s on 2 cores, ``serving`` (docs/serving.md)
~2 min, ``chunked_prefill`` (docs/serving.md) ~9 min, ``multi_turn`` (docs/serving.md) ~3 min.
Every point is recomputed by default: a stored point's key covers its configuration
and the hgsim version, not changes to the simulator's code, so after a model change reused
points would draw the old physics. ``--reuse`` keeps stored points (after a figure-only
change).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: study (studies/<name>.yaml) -> {its figure -> file under docs/img}
FIGURES = {
    "cxl_sweep": {"throughput_vs_cxl_latency.png": "cxl_sweep_latency.png"},
    "serving": {"max_rate.png": "serving_max_rate.png"},
    "chunked_prefill": {"max_rate.png": "chunked_prefill_max_rate.png"},
    "multi_turn": {"max_rate.png": "multi_turn_max_rate.png"},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=sorted(FIGURES), action="append",
                        help="only this study's figures (repeatable; default: every study)")
    parser.add_argument("--results", type=Path, default=REPO / "results",
                        help="folder of the studies' outputs (default results/)")
    parser.add_argument("--reuse", action="store_true", help="reuse stored points")
    parser.add_argument("--jobs", "-j", type=int, help="worker processes (default: all cores)")
    args = parser.parse_args(argv)

    from hgsim import api

    target = REPO / "docs" / "img"
    target.mkdir(parents=True, exist_ok=True)
    for study in args.study or FIGURES:
        out = args.results / study
        api.run_study(REPO / "studies" / f"{study}.yaml", out=out, force=not args.reuse,
                      jobs=args.jobs, quiet=False)
        for source, name in FIGURES[study].items():
            shutil.copyfile(out / "figures" / source, target / name)
            print(f"{target / name} <- {out / 'figures' / source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
