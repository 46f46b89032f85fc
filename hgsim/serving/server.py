"""An online server under load: requests arrive, wait, are batched continuously and leave.

The server is iteration-level batching as vLLM and Orca run it. Each iteration it

1. admits waiting requests first come, first served, while the batch is under ``max_batch``
   and the KV cache the batch will hold once every request has finished (prompt plus output,
   reserved at admission, so nothing is ever preempted) still fits the policy's memory;
2. prefills the prompts it admitted, one after another, while the running requests wait
   (prefill before decode, vLLM's default without chunked prefill); each admitted request's
   first token comes at the end of that prefill;
3. runs one decode step of every running request (one token each); a request that has all its
   tokens leaves.

A request that cannot fit even alone is rejected at the head of the queue (vLLM refuses a
prompt longer than the cache). Step and prefill times come from ``StepTimes``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import simpy

from hgsim.serving.requests import Request
from hgsim.serving.step_times import StepTimes


@dataclass
class Served:
    """What happened to one request (seconds from the start of the run; NaN: never)."""

    request: Request
    admitted_s: float = math.nan
    first_token_s: float = math.nan
    finish_s: float = math.nan
    generated: int = 0
    rejected: str = ""  # why it was refused, if it was

    @property
    def context(self) -> int:
        return self.request.prompt_tokens + self.generated


@dataclass
class Iteration:
    """One server iteration: when it started, its prefill and decode seconds, the batch it
    decoded and the requests it admitted."""

    start_s: float
    prefill_s: float
    decode_s: float
    batch: int
    admitted: int
    mean_context: float


class Server:
    """The engine and its queue, as SimPy processes: ``arrivals`` feeds the queue, ``engine``
    runs iterations until every request has arrived and left."""

    def __init__(self, env: simpy.Environment, times: StepTimes, *, max_batch: int,
                 on_finish: Callable[[int], None] | None = None):
        self.env, self.times, self.max_batch = env, times, max_batch
        self.waiting: deque[Served] = deque()
        self.running: list[Served] = []
        self.served: list[Served] = []
        self.iterations: list[Iteration] = []
        self.on_finish = on_finish
        self._all_arrived = False
        self._wake: simpy.Event | None = None
        self._reserved_tokens = 0  # final KV tokens of the running requests
        self._context_tokens = 0  # current KV tokens of the running requests

    def arrivals(self, requests: Iterable[Request]):
        for request in requests:
            if request.arrival_s > self.env.now:
                yield self.env.timeout(request.arrival_s - self.env.now)
            served = Served(request)
            self.served.append(served)
            self.waiting.append(served)
            if self._wake is not None and not self._wake.triggered:
                self._wake.succeed()
        self._all_arrived = True
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def engine(self):
        env = self.env
        while True:
            if not self.running and not self.waiting:
                if self._all_arrived:
                    return
                self._wake = env.event()
                yield self._wake
                continue
            start = env.now
            admitted = self.admit()
            prefill_s = sum(self.times.prefill_s(s.request.prompt_tokens) for s in admitted)
            if admitted:
                yield env.timeout(prefill_s)
                for s in admitted:
                    s.first_token_s = env.now
                    self._generate(s)
                self.running.extend(s for s in admitted if math.isnan(s.finish_s))
            decode_s, batch, mean_context = 0.0, len(self.running), math.nan
            if self.running:
                mean_context = self._context_tokens / batch
                decode_s = self.times.decode_step_s(batch, mean_context)
                yield env.timeout(decode_s)
                for s in list(self.running):
                    self._generate(s)
                self.running = [s for s in self.running if math.isnan(s.finish_s)]
            self.iterations.append(Iteration(start, prefill_s, decode_s, batch, len(admitted),
                                             mean_context))

    def admit(self) -> list[Served]:
        """Waiting requests that join this iteration (first come, first served)."""
        admitted: list[Served] = []
        while self.waiting and len(self.running) + len(admitted) < self.max_batch:
            head = self.waiting[0]
            batch = len(self.running) + len(admitted) + 1
            final = self._reserved_tokens + head.request.final_tokens
            why = ""
            if not math.isfinite(self.times.prefill_s(head.request.prompt_tokens)):
                why = "its prompt's prefill does not fit alone"
            elif self.times.fits(batch, final):
                self.waiting.popleft()
                head.admitted_s = self.env.now
                admitted.append(head)
                self._reserved_tokens += head.request.final_tokens
                self._context_tokens += head.request.prompt_tokens
                continue
            elif batch == 1:
                why = (f"its {head.request.final_tokens} tokens of KV do not fit alone")
            if not why:
                break  # it waits for room
            self.waiting.popleft()
            head.rejected = why
            if self.on_finish is not None:
                self.on_finish(1)
        return admitted

    def _generate(self, s: Served) -> None:
        s.generated += 1
        self._context_tokens += 1
        if s.generated >= s.request.output_tokens:
            s.finish_s = self.env.now
            self._reserved_tokens -= s.request.final_tokens
            self._context_tokens -= s.context
            if self.on_finish is not None:
                self.on_finish(1)


def run_server(times: StepTimes, requests: list[Request], *, max_batch: int,
               on_finish: Callable[[int], None] | None = None) -> Server:
    """Serve ``requests`` to the end; the server holds every request's record."""
    env = simpy.Environment()
    server = Server(env, times, max_batch=max_batch, on_finish=on_finish)
    env.process(server.arrivals(requests))
    env.process(server.engine())
    env.run()
    return server
