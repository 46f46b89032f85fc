"""Helpers for the bad-input tests: a small valid profile and study to break, and the CLI's
contract for a user mistake (exit 2, one line ``hgsim <verb>: error: ...``, no traceback)."""

from __future__ import annotations

from pathlib import Path

from hgsim.cli import main

#: A complete, valid profile; tests break one line of it.
PROFILE = """\
name: mini
gpus:
  gpu0:
    model: test-gpu
    hbm_capacity_gb: 80
    hbm_bandwidth_gbps: 1000
    peak_tflops: {fp16: 100}
    kernel_launch_overhead_us: 5
    compute_efficiency: 0.5
    memory_efficiency: 0.8
    attention_efficiency: 0.7
    socket: cpu0
    link: pcie0
sockets:
  cpu0:
    model: test-cpu
    cores: 8
    frequency_ghz: 2.0
    simd: avx512
    attention_gflops_per_core: 50
    core_bandwidth_gbps: 5
tiers:
  ddr0:
    kind: ddr
    capacity_gb: 256
    read_bandwidth_gbps: 100
    write_bandwidth_gbps: 80
    latency_ns: 100
    socket: cpu0
links:
  pcie0:
    kind: pcie
    endpoints: [cpu0, gpu0]
    bandwidth_gbps: 25
    latency_ns: 1000
"""

#: A two-point study on the shipped dev profile that runs in a second.
STUDY = """\
name: tiny
base:
  profile: dev-zen4-2core
  model: opt-6.7b
  policy: hybridgen
  workload: {batch: 1, context: 1k, gen: 4}
  fidelity: {decode_samples: 2, accuracy: false}
sweep:
  grid:
    policy: [flexgen, hybridgen]
"""


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the ``nth`` line containing ``needle``."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    return hits[nth - 1]


def replace_line(text: str, needle: str, new: str) -> str:
    """``text`` with the (only) line containing ``needle`` replaced by ``new`` (indent kept)."""
    lines = text.splitlines(keepends=True)
    (index,) = [i for i, line in enumerate(lines) if needle in line]
    indent = lines[index][: len(lines[index]) - len(lines[index].lstrip())]
    lines[index] = indent + new + "\n"
    return "".join(lines)


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def user_error(capsys, *argv: str) -> str:
    """Runs the CLI in-process; asserts a user error and returns its one line."""
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 2, (code, captured.out, captured.err)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    verb = "profiles check" if argv[:2] == ("profiles", "check") else argv[0]
    assert lines[0].startswith(f"hgsim {verb}: error: "), lines[0]
    return lines[0]
