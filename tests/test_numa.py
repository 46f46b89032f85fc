"""NUMA placement: node discovery, binding, and the loud fallback on one-node machines."""

from __future__ import annotations

import errno
import warnings
from pathlib import Path

import numpy as np
import pytest

from hw_backend import numa


def _fake_nodes(*nodes: tuple[int, str]) -> list[numa.NumaNode]:
    return [numa.NumaNode(i, numa._parse_cpulist(cpus), 1 << 30, 1 << 29) for i, cpus in nodes]


def test_numa_nodes_reports_this_machine():
    nodes = numa.numa_nodes()
    assert nodes and nodes[0].id == 0
    assert all(n.mem_total_bytes > 0 for n in nodes)
    assert any(n.cpus for n in nodes)


def test_memory_only_node_reads_as_cxl(tmp_path: Path):
    for node, cpus in [(0, "0-3,8\n"), (2, "\n")]:
        d = tmp_path / f"node{node}"
        d.mkdir()
        (d / "cpulist").write_text(cpus)
        (d / "meminfo").write_text(
            f"Node {node} MemTotal:  2048 kB\nNode {node} MemFree: 1024 kB\n"
        )
    (tmp_path / "possible").write_text("0-3\n")  # not a node directory
    nodes = numa.numa_nodes(tmp_path)
    assert [n.id for n in nodes] == [0, 2]
    assert nodes[0].cpus == (0, 1, 2, 3, 8) and not nodes[0].memory_only
    assert nodes[1].cpus == () and nodes[1].memory_only
    assert nodes[1].mem_total_bytes == 2048 * 1024 and nodes[1].mem_free_bytes == 1024 * 1024


def test_missing_sysfs_gives_one_whole_machine_node(tmp_path: Path):
    (node,) = numa.numa_nodes(tmp_path)
    assert node.id == 0 and node.cpus


def test_alloc_on_node0_works_and_feeds_the_kernels():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one-node machines warn
        K = numa.alloc_on_node((1, 2, 64, 16), "float32", node=0)
        V = numa.alloc_on_node((1, 2, 64, 16), "bfloat16", node=0)
    assert K.dtype == np.float32 and K.shape == (1, 2, 64, 16) and K.flags.c_contiguous
    assert V.dtype == np.uint16 and not K.any() and K.flags.writeable
    K[...] = 1.0
    from hw_backend import cpu_attention as ca

    out, lse = ca.partial_attention(np.ones((1, 4, 16), np.float32), K, K)
    assert np.allclose(out, 1.0)
    scores = ca.logits(np.ones((1, 2, 16), np.float32), V, kv_dtype="bfloat16")
    assert (scores == 0).all()


@pytest.mark.parametrize("node", [10_000, -1, 1.0, True])
def test_bad_node_raises_value_error(node):
    with pytest.raises(ValueError, match="node"):
        numa.alloc_on_node((4,), np.float32, node=node)


def test_memoryless_node_raises(monkeypatch):
    nodes = [numa.NumaNode(0, (0,), 1 << 30, 1 << 29), numa.NumaNode(1, (1,), 0, 0)]
    monkeypatch.setattr(numa, "numa_nodes", lambda: nodes)
    with pytest.raises(ValueError, match="no memory"):
        numa.alloc_on_node((4,), np.float32, node=1)


def test_single_node_falls_back_with_warning(monkeypatch):
    monkeypatch.setattr(numa, "numa_nodes", lambda: _fake_nodes((0, "0-1")))
    with pytest.warns(RuntimeWarning, match="one NUMA node"):
        a = numa.alloc_on_node((3, 5), np.float16, node=0)
    assert a.shape == (3, 5) and a.dtype == np.float16


def test_mbind_failure_falls_back_with_warning(monkeypatch):
    def refuse(addr, nbytes, node):
        raise OSError(errno.EPERM, "mbind refused")

    monkeypatch.setattr(numa, "numa_nodes", lambda: _fake_nodes((0, "0"), (1, "")))
    monkeypatch.setattr(numa, "_mbind", refuse)
    with pytest.warns(RuntimeWarning, match="without NUMA binding"):
        a = numa.alloc_on_node(1000, np.float32, node=1)
    assert a.shape == (1000,) and not a.any()


def test_real_mbind_binds_the_mapping(monkeypatch):
    """With two nodes visible the real mbind path runs; node 0 exists on every machine."""
    monkeypatch.setattr(numa, "numa_nodes", lambda: _fake_nodes((0, "0"), (1, "")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = numa.alloc_on_node((1 << 20,), np.uint8, node=0)
    if caught:
        pytest.skip(f"mbind unavailable here: {caught[0].message}")
    maps = Path("/proc/self/numa_maps")
    if not maps.exists():
        pytest.skip("no /proc/self/numa_maps")
    start = f"{a.ctypes.data & ~(4095):x} "
    line = next(ln for ln in maps.read_text().splitlines() if ln.startswith(start))
    assert "bind:0" in line


def test_to_torch_is_zero_copy():
    torch = pytest.importorskip("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a = numa.alloc_on_node((2, 8), "bfloat16", node=0)
        b = numa.alloc_on_node((2, 8), np.float32, node=0)
    t = numa.to_torch(a, "bfloat16")
    assert t.dtype == torch.bfloat16 and t.data_ptr() == a.ctypes.data
    t[0, 0] = 1.0
    assert a[0, 0] == 0x3F80  # bfloat16 bits of 1.0
    assert numa.to_torch(b).data_ptr() == b.ctypes.data
    with pytest.raises(ValueError, match="array"):
        numa.to_torch(b, "bfloat16")


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
def test_huge_page_tensor_is_a_zeroed_contiguous_tensor_of_that_dtype(dtype_name):
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype_name)
    t = numa.huge_page_tensor((1, 2, 3000, 128), dtype)
    assert t.dtype == dtype and t.shape == (1, 2, 3000, 128) and t.is_contiguous()
    assert not t.any()
    t.fill_(1.5)  # writable, and an ordinary tensor to the kernels
    assert float(t.float().sum()) == 1.5 * t.numel()
    assert numa.huge_page_tensor((0, 4), dtype).shape == (0, 4)


def test_standin_host_buffers_for_the_kv_cache_get_huge_page_memory():
    torch = pytest.importorskip("torch")
    from hw_backend.devices import HUGE_PAGE_MIN_BYTES, CoreSplit, StandInAccelerator

    accel = StandInAccelerator(CoreSplit(1, 1, pin=False))
    try:
        big = accel.host_empty((HUGE_PAGE_MIN_BYTES // 4,), torch.float32)
        small = accel.host_empty((16,), torch.float32)
    finally:
        accel.close()
    assert big.untyped_storage().resizable() is False  # wraps our mapping, not torch's allocator
    assert small.untyped_storage().resizable() is True


def test_a_node_s_memory_is_its_online_memory_blocks(tmp_path: Path):
    """lsmem's count: online blocks x block size (the installed DRAM), not MemTotal, which
    leaves out the kernel's page descriptors; 0 without memory blocks in sysfs."""
    nodes, memory = tmp_path / "node", tmp_path / "memory"
    (nodes / "node1").mkdir(parents=True)
    memory.mkdir()
    (memory / "block_size_bytes").write_text("8000000\n")  # hex: 128 MiB
    for block, online in [(32, "1"), (33, "1"), (34, "0"), (35, "1")]:
        (nodes / "node1" / f"memory{block}").mkdir()
        (nodes / "node1" / f"memory{block}" / "online").write_text(online + "\n")
    assert numa.node_online_bytes(1, nodes, memory) == 3 * 128 * 2**20
    assert numa.node_online_bytes(0, nodes, memory) == 0
    assert numa.node_online_bytes(1, nodes, tmp_path / "absent") == 0
