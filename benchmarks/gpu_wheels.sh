#!/usr/bin/env bash
# Wheels of the runtime dependencies that a GPU host without network access lacks, fetched on a
# machine that has network, so that `benchmarks/gpu_suite.sh` can install hgsim there offline
# (it installs from this folder with `pip --no-index --find-links` when the folder exists).
#
#   bash benchmarks/gpu_wheels.sh [DEST]        # default DEST: .gpu_wheels (git-ignored)
#
# Which packages: hgsim's own dependencies that a stock PyTorch image does not carry (the
# 'cuda' image of this project's lent GPU machines holds numpy, scipy, pandas, pyarrow,
# matplotlib, seaborn, pyyaml, tqdm, rich, pytest and hypothesis, but not simpy or pydantic),
# with pydantic's own dependencies, at the versions installed here (so the suite runs what the
# tests here ran). GPU_PYTHON_VERSION (default 3.12) is the GPU host's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python > /dev/null && echo python || echo python3)}
DEST=${1:-.gpu_wheels}
PYVER=${GPU_PYTHON_VERSION:-3.12}

PINNED=$($PY - <<'EOF'
from importlib.metadata import PackageNotFoundError, version

names = ["simpy", "pydantic", "pydantic_core", "annotated-types", "typing-inspection",
         "typing_extensions"]
try:
    print(" ".join(f"{name}=={version(name)}" for name in names))
except PackageNotFoundError as exc:
    raise SystemExit(f"gpu_wheels: {exc.name} is not installed here; install hgsim first")
EOF
)
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
# shellcheck disable=SC2086  # PINNED is a list of requirements
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp "${platforms[@]}" -d "$DEST" $PINNED
echo "gpu_wheels: $(ls "$DEST" | wc -l) wheels for Python $PYVER in $DEST ($(du -sh "$DEST" | cut -f1))"
