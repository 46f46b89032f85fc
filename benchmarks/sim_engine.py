"""Speed of the simulation engine (CPU time), to keep its hot paths honest.

Scenarios:
  transfers  N transfers over random 1-3 hop paths of 6 channels, Poisson arrivals tuned so
             that a few flows overlap at any time (every arrival and departure re-solves rates).
  kernels    N kernels on one GPU stream: queued all at once, and launched one by one by a
             process that waits for each (the pattern of a decode loop).
  decode     a decode-shaped mix on the tiny two-socket machine: per layer a CXL->GPU KV copy,
             CPU attention over DDR, and three GPU kernels, for 80 layers x 256 steps
             (Llama-2-70B-sized loop, aggregate recording).
  e2e        hgsim.simulate: HybridGen, Llama-2-70B, 128k context, 256 decode steps, every
             step simulated (no sampling), on the h100-80gb-spr-cxl profile.

Times are CPU seconds of this process (robust to other load on the machine).

Usage: python benchmarks/sim_engine.py [--n 100000] [--record] [--no-e2e]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import simpy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hgsim.sim import ComputeStream, FlowNetwork, Machine, Recorder  # noqa: E402


def _events(env: simpy.Environment) -> int:
    """simpy events scheduled so far (its internal event counter)."""
    return next(env._eid)  # noqa: SLF001 - read-only peek, only used for reporting


def bench_transfers(n: int, record: bool) -> dict:
    rng = random.Random(1)
    env = simpy.Environment()
    net = FlowNetwork(env, Recorder(keep_activities=record))
    chans = [net.add_channel(f"c{i}", rng.uniform(10e9, 50e9)) for i in range(6)]
    paths = [rng.sample(chans, rng.randint(1, 3)) for _ in range(32)]
    done = [0]

    def count(_event):
        done[0] += 1

    def source():
        for _ in range(n):
            path = paths[rng.randrange(32)]
            ev = net.transfer(path, rng.uniform(1e6, 4e7), latency_s=rng.uniform(0, 2e-6))
            ev.callbacks.append(count)
            yield env.timeout(rng.expovariate(1 / 1.5e-3))

    env.process(source())
    t0 = time.process_time()
    env.run()
    cpu = time.process_time() - t0
    assert done[0] == n
    return {"cpu_s": cpu, "ops": n, "events": _events(env), "sim_s": env.now}


def bench_kernels(n: int, record: bool) -> dict:
    env = simpy.Environment()
    stream = ComputeStream(env, "gpu0.compute", Recorder(keep_activities=record))
    t0 = time.process_time()
    for _ in range(n):
        stream.launch(1e-5, "k")
    env.run()
    queued = time.process_time() - t0

    env = simpy.Environment()
    stream = ComputeStream(env, "gpu0.compute", Recorder(keep_activities=record))

    def loop():
        for _ in range(n):
            yield stream.launch(1e-5, "k")

    env.process(loop())
    t0 = time.process_time()
    env.run()
    waited = time.process_time() - t0
    return {"cpu_s": queued, "ops": n, "events": n, "waited_cpu_s": waited}


def bench_decode(layers: int, steps: int, record: bool) -> dict:
    from conftest import make_profile

    env = simpy.Environment()
    m = Machine(env, make_profile(), record=record)
    kv_gpu, kv_cpu = 40e6, 120e6  # bytes of KV per layer read by each side

    def decode():
        for _ in range(steps):
            for _ in range(layers):
                qkv = m.gpu_kernel("gpu0", 2e9, 3e8, "qkv")
                fetch = m.copy("cxl0", "gpu0", kv_gpu, "kv-prefetch")
                yield qkv
                cpu = m.cpu_attention("s0", "ddr0", kv_cpu, 2 * kv_cpu, cores=8, label="cpu-attn")
                gpu = m.gpu_kernel("gpu0", 2 * kv_gpu, kv_gpu, "gpu-attn", after=fetch)
                yield cpu & gpu
                yield m.gpu_kernel("gpu0", 4e9, 6e8, "o+ffn")
            if not record:
                m.recorder.compact(env.now)

    env.process(decode())
    t0 = time.process_time()
    env.run()
    cpu = time.process_time() - t0
    return {"cpu_s": cpu, "ops": 5 * layers * steps, "events": _events(env), "sim_s": env.now}


def bench_e2e(record: bool) -> dict | None:
    try:
        from hgsim.simulate import Fidelity, simulate
        from hgsim.workload import Workload
    except ImportError as exc:  # the policy layer is optional for the engine benchmark
        print(f"e2e        skipped ({exc})")
        return None
    workload = Workload(context=131072, gen=256)
    t0 = time.process_time()
    result = simulate("h100-80gb-spr-cxl", "llama-2-70b", "hybridgen", workload,
                      fidelity=Fidelity(decode_samples=0, accuracy=False, record=record))
    cpu = time.process_time() - t0
    return {"cpu_s": cpu, "ops": 256, "events": result.events,
            "sim_s": sum(s.latency_s for s in result.steps)}


def _report(name: str, r: dict) -> None:
    extra = f", waited launches {r['ops'] / r['waited_cpu_s']:,.0f}/s" if "waited_cpu_s" in r else ""
    sim = f", simulated {r['sim_s']:.3f} s" if "sim_s" in r else ""
    print(
        f"{name:10s} {r['ops']:>8,d} ops in {r['cpu_s']:.3f} s CPU: "
        f"{r['ops'] / r['cpu_s']:,.0f} ops/s, {r['events'] / r['cpu_s']:,.0f} simpy events/s"
        f"{extra}{sim}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--record", action="store_true", help="keep every activity (full mode)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the hgsim.simulate run")
    args = parser.parse_args(argv)
    mode = "full" if args.record else "aggregate"
    print(f"hgsim engine benchmark ({mode} recording, python {sys.version.split()[0]})")
    _report("transfers", bench_transfers(args.n, args.record))
    _report("kernels", bench_kernels(args.n, args.record))
    _report("decode", bench_decode(80, 256, args.record))
    if not args.no_e2e:
        r = bench_e2e(args.record)
        if r is not None:
            _report("e2e", r)
            print(f"{'':10s} (ops = decode steps: {r['cpu_s']:.2f} s CPU for the 256-step run)")


if __name__ == "__main__":
    main()
