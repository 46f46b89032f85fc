"""NUMA placement of KV-cache buffers.

HybridGen-style tiering keeps hot data (e.g. K, scanned every step) in local DRAM and colder
data (e.g. V, of which only the selected rows are read) on a slower node such as a CXL
memory expander. Linux exposes a CXL expander as a NUMA node with memory and no CPUs, so
placement is plain NUMA binding: ``alloc_on_node`` maps anonymous memory and binds it to one
node with the ``mbind`` system call (through ctypes, no libnuma needed) before any page is
touched, then returns it as a NumPy array (``to_torch`` wraps it without copying).

Where binding is impossible or meaningless (one node, no mbind, unknown architecture) the
buffer is still allocated, unbound, and a warning says so: the code keeps working on a
laptop, but never silently pretends placement happened.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NODE_ROOT = Path("/sys/devices/system/node")
MEMORY_ROOT = Path("/sys/devices/system/memory")

_MPOL_BIND = 2
_MPOL_MF_STRICT = 1
_MPOL_MF_MOVE = 2
# mbind(2) numbers per architecture (asm-generic uses 235).
_SYS_MBIND = {"x86_64": 237, "aarch64": 235, "riscv64": 235, "ppc64le": 259, "s390x": 268}

__all__ = ["NumaNode", "alloc_on_node", "node_online_bytes", "numa_nodes", "to_torch"]


@dataclass(frozen=True)
class NumaNode:
    """One NUMA node as the kernel reports it."""

    id: int
    cpus: tuple[int, ...]
    mem_total_bytes: int
    mem_free_bytes: int

    @property
    def memory_only(self) -> bool:
        """True for a node with memory but no CPUs: how a CXL memory expander appears."""
        return not self.cpus and self.mem_total_bytes > 0


def _parse_cpulist(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(cpus)


def _meminfo_bytes(text: str, field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+)\s*kB", text)
    return int(match.group(1)) * 1024 if match else 0


def _read_node(path: Path) -> NumaNode:
    meminfo = (path / "meminfo").read_text()
    return NumaNode(
        id=int(path.name[4:]),
        cpus=_parse_cpulist((path / "cpulist").read_text()),
        mem_total_bytes=_meminfo_bytes(meminfo, "MemTotal"),
        mem_free_bytes=_meminfo_bytes(meminfo, "MemFree"),
    )


def _whole_machine() -> NumaNode:
    """Single pseudo node for systems without /sys/devices/system/node."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = free = 0
    return NumaNode(0, tuple(range(os.cpu_count() or 1)), total, free)


def numa_nodes(root: Path = NODE_ROOT) -> list[NumaNode]:
    """Online NUMA nodes with their CPUs and memory, sorted by id.

    Read from /sys/devices/system/node; a machine without it (non-Linux, some containers)
    is reported as one node 0 holding every CPU and all memory.
    """
    paths = sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:]))
    nodes = [_read_node(p) for p in paths if (p / "meminfo").exists()]
    return nodes or [_whole_machine()]


def node_online_bytes(node: int, root: Path = NODE_ROOT, memory_root: Path = MEMORY_ROOT) -> int:
    """Memory of ``node`` in online memory blocks, as lsmem counts it: the DRAM installed (or
    the CXL expander's capacity) less firmware holes. MemTotal is ~2% less: it leaves out what
    the kernel keeps, its page descriptors above all (64 B per 4 KiB page). 0 where sysfs lists
    no memory blocks (no memory hotplug support, non-Linux)."""
    try:
        block_bytes = int((memory_root / "block_size_bytes").read_text().strip(), 16)
    except (OSError, ValueError):
        return 0
    online = 0
    for block in (root / f"node{node}").glob("memory[0-9]*"):
        try:
            online += (block / "online").read_text().strip() == "1"
        except OSError:
            continue
    return online * block_bytes


def _mbind(addr: int, nbytes: int, node: int) -> None:
    """Binds [addr, addr + nbytes) to ``node`` (MPOL_BIND); raises OSError on failure."""
    number = _SYS_MBIND.get(platform.machine())
    if not sys.platform.startswith("linux") or number is None:
        where = f"{sys.platform}/{platform.machine()}"
        raise OSError(errno.ENOSYS, f"mbind is not available on {where}")
    bits = 8 * ctypes.sizeof(ctypes.c_ulong)
    mask = (ctypes.c_ulong * (node // bits + 1))()
    mask[node // bits] = 1 << (node % bits)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(
        ctypes.c_long(number),
        ctypes.c_void_p(addr),
        ctypes.c_ulong(nbytes),
        ctypes.c_int(_MPOL_BIND),
        mask,
        # the kernel reads maxnode - 1 bits
        ctypes.c_ulong(len(mask) * bits + 1),
        ctypes.c_uint(_MPOL_MF_STRICT | _MPOL_MF_MOVE),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mbind to node {node} failed: {os.strerror(err)}")


def _storage_dtype(dtype: Any) -> np.dtype:
    """NumPy storage for a KV dtype name; bfloat16 is kept as uint16 bits."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        return np.dtype(np.uint16)
    return np.dtype(dtype)


def _ask_for_huge_pages(buf: mmap.mmap) -> None:
    """madvise(MADV_HUGEPAGE): 2 MiB pages spare the streaming kernels most TLB misses.

    With transparent huge pages in "madvise" mode (a common default) anonymous memory gets
    4 KiB pages unless asked; scanning KV then measurably loses bandwidth. Best effort.
    """
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            buf.madvise(advice)
        except OSError:
            pass


def _anonymous_huge(nbytes: int) -> np.ndarray:
    """An untouched anonymous mapping of ``nbytes`` that asks for huge pages, as bytes."""
    buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    _ask_for_huge_pages(buf)
    return np.frombuffer(buf, np.uint8)


def huge_page_tensor(shape, dtype):
    """Zero-filled torch tensor in huge-page memory, wherever the kernel places it.

    The host KV cache the C kernel streams: torch's allocator gives 4 KiB pages where
    transparent huge pages are opt-in, and the kernel then reads slower than on the huge-page
    buffers calibration times it on (docs/calibration.md, history).
    """
    name = str(dtype).removeprefix("torch.")
    storage = _storage_dtype("bfloat16" if name == "bfloat16" else np.dtype(name))
    shape = tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * storage.itemsize
    raw = _anonymous_huge(nbytes)
    raw[:: mmap.PAGESIZE] = 0  # fault the pages in now, not inside a timed step
    array = raw[:nbytes].view(storage).reshape(shape)
    return to_torch(array, "bfloat16" if name == "bfloat16" else None)


def alloc_on_node(
    shape, dtype: Any = np.float32, node: int = 0, *, populate: bool = True
) -> np.ndarray:
    """Zero-filled C-contiguous array whose pages live on NUMA node ``node``.

    ``dtype`` is any NumPy dtype or "bfloat16" (stored as uint16; pass
    ``kv_dtype="bfloat16"`` to hw_backend.cpu_attention, or use ``to_torch(a, "bfloat16")``).
    The memory is bound before first touch and asks for transparent huge pages, and
    ``populate`` touches every page now so the placement (and the page-fault cost) happens
    here rather than inside a timed kernel.

    Raises ValueError for a node that does not exist or has no memory. On a one-node
    machine, or when mbind fails, the array is allocated without binding and a
    RuntimeWarning is issued.
    """
    if isinstance(node, bool) or not isinstance(node, (int, np.integer)):
        raise ValueError(f"node: expected an integer node id, got {node!r}")
    nodes = {n.id: n for n in numa_nodes()}
    if node not in nodes:
        raise ValueError(f"node: {node} does not exist; nodes are {sorted(nodes)}")
    if nodes[node].mem_total_bytes == 0:
        raise ValueError(f"node: {node} has no memory")
    dt = _storage_dtype(dtype)
    shape = tuple(int(s) for s in np.atleast_1d(shape))
    if any(s < 0 for s in shape):
        raise ValueError(f"shape: negative dimension in {shape}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = _anonymous_huge(nbytes)
    if len(nodes) < 2:
        warnings.warn(
            f"only one NUMA node; node {node} placement is implicit (allocated without mbind)",
            RuntimeWarning,
            stacklevel=2,
        )
    else:
        try:
            _mbind(raw.ctypes.data, len(raw), int(node))
        except OSError as exc:
            warnings.warn(f"{exc}; allocated without NUMA binding", RuntimeWarning, stacklevel=2)
    if populate:
        raw[:: mmap.PAGESIZE] = 0
    return raw[:nbytes].view(dt).reshape(shape)


def to_torch(array: np.ndarray, dtype: str | None = None):
    """Zero-copy torch tensor over ``array`` (e.g. from ``alloc_on_node``).

    ``dtype="bfloat16"`` reinterprets 16-bit integer storage as torch.bfloat16. Imports
    torch only when called.
    """
    import torch

    if dtype == "bfloat16":
        if array.dtype.itemsize != 2 or array.dtype.kind not in "iu":
            raise ValueError(f"array: bfloat16 needs 16-bit integer storage, got {array.dtype}")
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    if dtype is not None:
        raise ValueError(f"dtype: only None or 'bfloat16' is supported, got {dtype!r}")
    return torch.from_numpy(array)
