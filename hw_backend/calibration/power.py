"""Measured power: the CPU packages' idle and loaded draw (Linux RAPL) and the GPU's idle draw
(NVML through ``torch.cuda.power_draw``), where the machine exposes them.

Socket ``idle_power_w`` and ``active_core_power_w`` drive the energy model's CPU side; a reading
beats a datasheet estimate, so these override figures copied with ``--energy-from``. RAPL
counters are cumulative microjoules that wrap at ``max_energy_range_uj``; an interval is a
second or so, so at most one wrap is possible and is undone. Unreadable counters (no powercap,
root-only ``energy_uj``, a VM) are not an error: calibration says so in its summary.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hw_backend.calibration.records import Measurement, Measurements
from hw_backend.calibration.settings import Job, Settings
from hw_backend.calibration.summarize import Figure

POWERCAP = Path("/sys/class/powercap")
_PACKAGE_DIR = re.compile(r"^(intel|amd)-rapl:(\d+)$")  # sub-domains are rapl:N:M


@dataclass(frozen=True)
class RaplPackage:
    path: Path
    index: int
    max_range_uj: int

    def read_uj(self) -> int:
        return int((self.path / "energy_uj").read_text())


def rapl_packages(root: Path = POWERCAP) -> tuple[list[RaplPackage], str]:
    """The readable package domains, and why there are none (empty when there are)."""
    if not root.is_dir():
        return [], f"{root} absent (no RAPL powercap interface, e.g. a VM)"
    found: dict[int, RaplPackage] = {}
    why = f"no package domain under {root}"
    for path in sorted(root.iterdir()):
        match = _PACKAGE_DIR.match(path.name)
        if not match or int(match.group(2)) in found:
            continue
        try:
            if not (path / "name").read_text().strip().startswith("package"):
                continue
            pkg = RaplPackage(path, int(match.group(2)),
                              int((path / "max_energy_range_uj").read_text()))
            pkg.read_uj()
        except PermissionError:
            why = f"{path}/energy_uj is not readable (root only on Linux >= 5.10)"
            continue
        except (OSError, ValueError) as exc:
            why = f"{path}: {exc}"
            continue
        found[pkg.index] = pkg
    packages = [found[i] for i in sorted(found)]
    return packages, "" if packages else why


def energy_delta_uj(before: int, after: int, max_range_uj: int) -> int:
    """Energy between two counter readings; a smaller second reading means one wraparound."""
    return after - before if after >= before else after + max_range_uj - before


def package_power_w(packages: list[RaplPackage], seconds: float,
                    work: Callable[[float], None] | None = None) -> list[float]:
    """Average watts of each package over ``seconds``: idle (sleeping) or while ``work(deadline)``
    runs until the ``time.perf_counter`` deadline."""
    before = [p.read_uj() for p in packages]
    t0 = time.perf_counter()
    if work is None:
        time.sleep(seconds)
    else:
        work(t0 + seconds)
    after = [p.read_uj() for p in packages]
    elapsed = time.perf_counter() - t0
    return [energy_delta_uj(b, a, p.max_range_uj) / 1e6 / elapsed
            for p, b, a in zip(packages, before, after, strict=True)]


def _stream_load(threads: int, nbytes: int) -> Callable[[float], None]:
    """The calibration's all-core streaming read (the attention kernels' access), repeated."""
    import numpy as np

    from hw_backend import _cpu_attention

    words = np.ones(nbytes // 8, dtype=np.uint64)

    def work(deadline: float) -> None:
        while time.perf_counter() < deadline:
            _cpu_attention.stream_read(words, threads)

    return work


def rapl_job(settings: Settings, threads: int, root: Path = POWERCAP,
             load: Callable[[float], None] | None = None) -> tuple[list[Job], str]:
    """([the job], "") where RAPL is readable, else ([], why not)."""
    packages, why = rapl_packages(root)
    if not packages:
        return [], why

    def run() -> list[Measurement]:
        work = load or _stream_load(threads, settings.read_bytes)
        idle = package_power_w(packages, settings.power_seconds)
        loaded = package_power_w(packages, settings.power_seconds, work)
        rows = Measurements()
        for pkg, w_idle, w_loaded in zip(packages, idle, loaded, strict=True):
            params = {"package": pkg.index, "seconds": settings.power_seconds,
                      "domain": pkg.path.name}
            rows.append(Measurement("power", "package_idle", w_idle, "W", params))
            rows.append(Measurement("power", "package_loaded", w_loaded, "W",
                                    {**params, "threads": threads}))
        return rows

    return [Job("package power (RAPL): idle, then all-core streaming", run)], ""


def gpu_power_w(device: int = 0) -> float:
    """One NVML reading of the board's draw, in watts (``power_draw`` gives milliwatts)."""
    import torch

    return float(torch.cuda.power_draw(device)) / 1e3


def gpu_idle_job(settings: Settings, samples: int = 10) -> tuple[list[Job], str]:
    """([the job], "") where NVML answers, else ([], why not); the idle draw is the median of
    ``samples`` readings spread over ``settings.power_seconds`` with no work queued."""
    try:
        gpu_power_w()
    except Exception as exc:  # no NVML, no pynvml, an old torch, a driver without the query
        return [], f"torch.cuda.power_draw unavailable ({type(exc).__name__}: {exc})"

    def run() -> list[Measurement]:
        import torch

        torch.cuda.synchronize()
        readings = []
        for _ in range(samples):
            try:
                readings.append(gpu_power_w())
            except Exception:  # answered at planning, not now: keep what was read
                break
            time.sleep(settings.power_seconds / samples)
        if not readings:
            return []
        return [Measurement("power", "gpu_idle", statistics.median(readings), "W",
                            {"samples": samples, "seconds": settings.power_seconds,
                             "readings_w": [round(r, 2) for r in readings]})]

    return [Job("GPU idle power (NVML)", run)], ""


def socket_figures(ms: Measurements, sockets: int, index: int) -> dict[str, Figure]:
    """Socket ``index``'s idle_power_w and active_core_power_w from the RAPL rows (none: {}).

    Package i is socket i when the counts agree; otherwise every socket gets the packages'
    total shared evenly. The load ran on every usable core, spread evenly over the sockets.
    """
    idle = sorted(ms.select("power", "package_idle"), key=lambda r: r.params["package"])
    loaded = sorted(ms.select("power", "package_loaded"), key=lambda r: r.params["package"])
    if not idle or len(idle) != len(loaded):
        return {}
    secs = idle[0].params.get("seconds")
    if len(idle) == sockets:
        w_idle, w_loaded = idle[index].value, loaded[index].value
        where = f"RAPL {idle[index].params.get('domain', 'package')}"
    else:
        w_idle = sum(r.value for r in idle) / sockets
        w_loaded = sum(r.value for r in loaded) / sockets
        where = f"RAPL, {len(idle)} package(s) shared over {sockets} socket(s)"
    busy = loaded[0].params["threads"] / sockets
    out = {"idle_power_w": Figure(round(w_idle, 1), f"{where} over {secs:g} s idle")}
    if w_loaded > w_idle and busy > 0:
        out["active_core_power_w"] = Figure(
            round((w_loaded - w_idle) / busy, 2),
            f"{where}: ({w_loaded:.1f} W under all-core streaming - {w_idle:.1f} W idle) / "
            f"{busy:g} busy cores, {secs:g} s each")
    return out


def gpu_figures(ms: Measurements) -> dict[str, Figure]:
    rows = ms.select("power", "gpu_idle")
    if not rows:
        return {}
    r = rows[0]
    return {"idle_power_w": Figure(round(r.value, 1), f"torch.cuda.power_draw (NVML), median of "
                                                      f"{r.params['samples']} readings over "
                                                      f"{r.params['seconds']:g} s, no work queued")}
