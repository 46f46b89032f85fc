"""What the machine is, as far as a profile needs it: NUMA nodes, sockets, CPU model, clocks.

Sockets are the NUMA nodes with CPUs; a node with memory and no CPUs is a CXL expander (that is
how Linux exposes one) and is attached to the socket nearest to it by the firmware's distance
table. Everything here is read from /proc and /sys; nothing is timed.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from hw_backend.numa import NODE_ROOT, NumaNode, numa_nodes


@dataclass(frozen=True)
class Machine:
    nodes: tuple[NumaNode, ...]
    distances: dict[int, tuple[int, ...]]  # node id -> distance to every node, by node order
    cpu_model: str
    frequency_ghz: float
    frequency_source: str
    simd: str
    usable_cpus: tuple[int, ...]  # this process's affinity

    @property
    def cpu_nodes(self) -> list[NumaNode]:
        """Nodes with CPUs this process may use: the sockets of the profile."""
        usable = set(self.usable_cpus)
        return [n for n in self.nodes if set(n.cpus) & usable]

    @property
    def memory_nodes(self) -> list[NumaNode]:
        return [n for n in self.nodes if n.mem_total_bytes > 0]

    def cpus_of(self, node: NumaNode) -> tuple[int, ...]:
        usable = set(self.usable_cpus)
        return tuple(c for c in node.cpus if c in usable)

    def nearest_socket(self, node: NumaNode) -> NumaNode:
        """The CPU node closest to ``node`` (itself when it has CPUs)."""
        sockets = self.cpu_nodes
        if node in sockets:
            return node
        order = [n.id for n in self.nodes]
        row = self.distances.get(node.id)
        if not row:
            return sockets[0]
        return min(sockets, key=lambda s: row[order.index(s.id)] if s.id in order else 1 << 30)


def _distances(root: Path, nodes: list[NumaNode]) -> dict[int, tuple[int, ...]]:
    out = {}
    for node in nodes:
        path = root / f"node{node.id}" / "distance"
        try:
            out[node.id] = tuple(int(x) for x in path.read_text().split())
        except (OSError, ValueError):
            continue
    return out


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _field(text: str, name: str) -> str | None:
    match = re.search(rf"^{name}\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def cpu_model(text: str) -> str:
    return _field(text, "model name") or platform.processor() or platform.machine()


def frequency(text: str) -> tuple[float, str]:
    """(GHz, where it came from): cpufreq's maximum, else /proc/cpuinfo's current clock."""
    max_khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return int(max_khz.read_text()) / 1e6, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    mhz = _field(text, "cpu MHz")
    if mhz:
        return float(mhz) / 1e3, "/proc/cpuinfo cpu MHz (current clock; no cpufreq here)"
    return 1.0, "unknown (no cpufreq, no cpu MHz): 1 GHz placeholder"


def simd(text: str) -> str:
    """The widest vector extension the profile schema knows that /proc/cpuinfo lists."""
    flags = set((_field(text, "flags") or _field(text, "Features") or "").split())
    for flag, name in (("amx_tile", "amx"), ("avx512f", "avx512"), ("avx2", "avx2"),
                       ("sve", "sve"), ("asimd", "neon")):
        if flag in flags:
            return name
    return "scalar"


def discover(root: Path = NODE_ROOT) -> Machine:
    nodes = numa_nodes(root)
    text = _cpuinfo()
    ghz, source = frequency(text)
    usable = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else (
        tuple(range(os.cpu_count() or 1)))
    if not any(set(n.cpus) & set(usable) for n in nodes):  # odd container: treat as one node
        nodes = [NumaNode(nodes[0].id, usable, nodes[0].mem_total_bytes, nodes[0].mem_free_bytes)]
    return Machine(tuple(nodes), _distances(root, nodes), cpu_model(text), ghz, source,
                   simd(text), usable)
