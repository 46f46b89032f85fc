"""The compiled memory probes (``hw_backend._membench``) do what their timings assume.

No timing is asserted: what the chases visit, what the gathers read, how the background load is
reported, and that bad arguments are refused.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("hw_backend._membench", reason="memory probes not built")

from hw_backend import _membench, memprobe  # noqa: E402


def test_a_cycle_visits_every_line_once_and_chains_start_evenly():
    cycle = memprobe.random_cycle(64 * 1024, seed=3)
    lines = 1024
    assert len(cycle.order) == lines and sorted(cycle.order // 8) == list(range(lines))
    at, seen = int(cycle.order[0]), set()
    for _ in range(lines):
        seen.add(at)
        at = int(cycle.next[at])
    assert at == cycle.order[0] and len(seen) == lines
    starts = cycle.starts(4)
    assert [int(np.where(cycle.order == s)[0][0]) for s in starts] == [0, 256, 512, 768]
    with pytest.raises(ValueError):
        cycle.starts(0)


def test_chases_go_on_where_the_last_one_stopped():
    cycle = memprobe.random_cycle(64 * 1024, seed=1)
    assert memprobe.chase_seconds(cycle, 2, 100) >= 0
    assert cycle.cursor == 100
    # the C loop ends where Python's walk does: chain j advanced `steps` links from its start
    starts = cycle.starts(3)
    ends = [int(cycle.order[(cycle.cursor + j * (1024 // 3) + 50) % 1024]) for j in range(3)]
    assert _membench.chase(cycle.next, starts, 50) == sum(ends)


def test_gather_reads_one_word_of_every_line_of_every_row():
    buf = np.arange(4096, dtype=np.uint64)  # 32 KiB: word i holds i
    idx = np.array([0, 5, 5, 63], np.int64)
    for row_bytes in (64, 128, 192):  # a size with no specialised loop too
        for threads in (1, 2):
            cpu_s, wall_s, share, total = _membench.gather(buf, idx, row_bytes, threads)
            words = [r * row_bytes // 8 + w for r in idx for w in range(0, row_bytes // 8, 8)]
            assert total == sum(words)
            assert cpu_s >= 0 and wall_s >= 0 and 0 <= share <= 1.5
    timing = memprobe.gather(buf.view(np.uint8), idx, 64, 1)
    assert timing.cpu_s >= 0 and timing.wall_s > 0


def test_out_of_range_indices_read_row_zero_instead_of_out_of_bounds():
    buf = np.arange(64, dtype=np.uint64)  # 8 rows of 64 B
    bad = np.array([-1, 8, 1 << 40], np.int64)
    assert _membench.gather(buf, bad, 64, 1)[3] == 0  # row 0's first word is 0
    links = np.array([5, 1 << 40, -3], np.int64)
    assert _membench.chase(links, np.array([0], np.int64), 3) >= 0


def test_loaded_chase_reports_the_background_rate_and_whether_it_ran_alongside():
    cycle = memprobe.random_cycle(256 * 1024)
    background = np.ones(1 << 20, np.uint64)
    idle = memprobe.loaded_chase(cycle, 2000, background, 0, 0.0)
    assert idle.background_gbps == 0.0 and idle.ns_per_load > 0
    busy = memprobe.loaded_chase(cycle, 20000, background, 1, 0.0)
    assert busy.ns_per_load > 0 and busy.background_gbps >= 0 and 0 <= busy.share <= 1.5
    assert cycle.cursor == (2000 + 20000) % 4096  # 256 KiB: 4096 lines


def test_probe_arguments_are_checked():
    buf = np.zeros(1024, np.uint64)
    idx = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="row_bytes"):
        memprobe.gather(buf, idx, 60, 1)
    with pytest.raises(ValueError, match="threads"):
        memprobe.gather(buf, idx, 64, 0)
    with pytest.raises(ValueError, match="int64"):
        memprobe.gather(buf, idx.astype(np.int32), 64, 1)
    with pytest.raises(ValueError):
        _membench.chase(np.zeros(8, np.int64), np.zeros(300, np.int64), 1)
    with pytest.raises(ValueError):
        memprobe.random_rows(100, 128, 5)


def test_huge_page_share_and_parallel_timing_are_read_where_linux_has_them():
    share = memprobe.huge_page_fraction(memprobe.row_buffer(4 << 20))
    assert share is None or 0.0 <= share <= 1.0
    timing = memprobe.parallel_call(lambda: sum(range(1000)), 2)
    assert timing.cpu_s >= 0 and timing.wall_s > 0


def test_a_cycle_can_run_through_an_existing_buffer():
    buf = np.zeros(64 * 100 + 10, np.uint8)  # a ragged tail is left out
    cycle = memprobe.cycle_in(buf, seed=2)
    assert len(cycle.order) == 100
    at, seen = int(cycle.order[0]), set()
    for _ in range(100):
        seen.add(at)
        at = int(cycle.next[at])
    assert len(seen) == 100 and at == cycle.order[0]
    assert np.shares_memory(cycle.next, buf)  # the links live in the buffer itself
    with pytest.raises(ValueError):
        memprobe.cycle_in(np.zeros(64, np.uint8))
