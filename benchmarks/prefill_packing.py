"""Does packing several prompts into one iteration's prefill budget pay? Side by side, one run.

With chunked prefill the server fills each iteration's ``prefill_chunk`` tokens from the
prompts waiting, in order (``hgsim.serving.server.Engine._chunks``, as vLLM's scheduler fills
its token budget); ``run_server(..., pack=False)`` instead prefills one prompt's chunk an
iteration (Sarathi-Serve's first scheduler). Three loads on Llama-3.1-8B, ``h100-80gb-spr-cxl``,
a 2048-token budget:

* ``burst``: 20 prompts of 100 tokens arriving together at an idle server (gpu_only, 32 output
  tokens): packed, one forward prefills all of them, its GEMMs still reading the weights for
  few rows; one an iteration, each waits for those before it;
* ``1k-prompts``: lognormal 1k-token prompts at 25 and 40 requests/s (gpu_only, 300 requests,
  128 output tokens, at most 64 in a batch): each chunk keeps the GEMMs compute-bound already;
* ``conversations``: 100 conversations of 4 turns, first prompts lognormal around 16k,
  1k-token follow-ups, 30 s think time, 0.5 conversations/s (HybridGen and gpu_only, at most 32
  in a batch).

Prints mean and p90 TTFT, mean TPOT, output tokens/s and simulations (the packed steps are each
iteration's own) for both schedulers; ``--quick`` leaves out the conversations.

Usage: python benchmarks/prefill_packing.py [--quick]
"""

from __future__ import annotations

import argparse
import time

from hgsim.catalog import get_model
from hgsim.profiles import load_profile
from hgsim.serving import LengthDist, Request, RequestMix, StepTimes
from hgsim.serving.result import ServeResult, Slo
from hgsim.serving.server import run_server

PROFILE, MODEL, BUDGET = "h100-80gb-spr-cxl", "llama-3.1-8b", 2048


def serve(policy: str, requests: list[Request], max_batch: int, pack: bool,
          turns: int = 1) -> tuple[ServeResult, float]:
    times = StepTimes(load_profile(PROFILE), get_model(MODEL), policy, prefill_chunk=BUDGET,
                      longest_prompt=max(r.prompt_tokens for r in requests))
    wall = time.perf_counter()
    server = run_server(times, requests, max_batch=max_batch, pack=pack)
    wall = time.perf_counter() - wall
    return ServeResult(labels={"turns": turns}, rate_per_s=float("nan"), served=server.served,
                       iterations=server.iterations, slo=Slo(), simulations=times.simulations,
                       copies=1), wall


def row(name: str, result: ServeResult, wall_s: float, pack: bool) -> str:
    s = result.summary()
    return (f"| {name} | {'packed' if pack else 'one prompt'} | {s['ttft_mean_s'] * 1e3:.1f} | "
            f"{s['ttft_p90_s'] * 1e3:.1f} | {s['tpot_mean_s'] * 1e3:.2f} | "
            f"{s['output_tokens_per_s']:.0f} | {result.simulations} | {wall_s:.1f} |")


def mix(prompt: str, output: str, count: int, **conversations) -> RequestMix:
    extra = {}
    if conversations:
        extra = {"turns": conversations["turns"], "think_s": conversations["think_s"],
                 "followup": LengthDist.parse(conversations["followup"], "followup")}
    return RequestMix(prompt=LengthDist.parse(prompt, "prompt"),
                      output=LengthDist.parse(output, "output"), count=count, seed=0, **extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="leave out the conversations")
    args = parser.parse_args()
    print("| load | scheduler | mean TTFT (ms) | p90 TTFT (ms) | mean TPOT (ms) | output tok/s "
          "| simulations | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    burst = [Request(i, 0.0, 100, 32) for i in range(20)]
    for pack in (False, True):
        result, wall = serve("gpu_only", burst, 32, pack)
        print(row("burst of 20 x 100 tokens", result, wall, pack))
    for rate in (25.0, 40.0):
        requests = mix("lognormal:1k:0.5", "128", 300).requests(rate)
        for pack in (False, True):
            result, wall = serve("gpu_only", requests, 64, pack)
            print(row(f"1k prompts at {rate:g}/s", result, wall, pack))
    if not args.quick:
        requests = mix("lognormal:16k:0.5", "256", 100, turns=4, think_s=30.0,
                       followup="1k").requests(0.5)
        for policy in ("hybridgen", "gpu_only"):
            for pack in (False, True):
                result, wall = serve(policy, requests, 32, pack, turns=4)
                print(row(f"conversations, {policy}", result, wall, pack))


if __name__ == "__main__":
    main()
