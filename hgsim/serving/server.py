"""An online server under load: requests arrive, wait, are batched continuously and leave.

The server is iteration-level batching as vLLM and Orca run it. Each iteration it

1. admits waiting requests first come, first served, while the batch is under ``max_batch``
   and the KV cache the batch will hold once every request has finished (prompt plus output,
   reserved at admission, so nothing is ever preempted) still fits the policy's memory; or,
   with paged admission (vLLM's paged allocator), while the KV it holds now fits, and before
   that preempts the request admitted last for as long as the running requests' next tokens
   do not (its KV freed, recomputed when it is readmitted);
2. prefills the prompts it admitted, one after another, while the running requests wait
   (prefill before decode, vLLM's default without chunked prefill); each admitted request's
   first token comes at the end of that prefill;
3. runs one decode step of every running request (one token each); a request that has all its
   tokens leaves.

A request that cannot fit even alone is rejected at the head of the queue (vLLM refuses a
prompt longer than the cache). Step and prefill times come from ``StepTimes``.

With ``StepTimes.prefill_chunk`` (chunked prefill, as Sarathi-Serve and vLLM run it) step 2
changes: an admitted request waits in a prefill queue, and each iteration prefills at most
``prefill_chunk`` tokens of the queue in the same forward as the decode step
(``StepTimes.mixed_step``), so running requests keep getting a token every iteration while a
long prompt is prefilled. The request's first token comes at the end of the
iteration that prefills its last chunk, and it decodes from the next. The chunk is the
iteration's prefill budget: where the head prompt's rest is shorter, the next prompts' first
chunks fill it (packed into the same forward, as vLLM's scheduler fills its token budget).

Conversations (``Request.conversation``): a later turn arrives ``think_s`` after the turn
before it has finished (a refused turn ends its conversation: the later turns are refused
too). With ``prefix_cache`` (vLLM's automatic prefix caching) a finished turn's KV is retained
rather than freed, in the memory the running requests leave free (a policy that keeps KV in
host memory keeps it in its host tiers, the HBM window written out to leave HBM to the running
requests; ``gpu_only`` in HBM), and evicted least recently used when an admission needs its
room; a later turn admitted on the copy that holds its conversation's KV prefills only its
new tokens, attending to the retained ones (a chunk whose past is the prefix,
``StepTimes.mixed_step``, read back from the host tiers where they are there), and takes that
KV into its own reservation.
With a host KV store (``hgsim.serving.kv_offload``, shared by the copies) every finished
turn's KV is written there too, and a later turn whose KV has left the copy's memory loads
its prefix from the store as its prefill runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import simpy

from hgsim.serving.kv_offload import KvOffload, KvStore
from hgsim.serving.requests import Request
from hgsim.serving.step_times import StepTimes
from hgsim.sim.decode import PAST_ON_HOST

#: How the server admits requests: ``reserve`` each one's final KV (prompt plus output) at
#: admission, so nothing is ever preempted; or ``paged``, on the KV blocks the batch holds now,
#: preempting the request admitted last when they run out (vLLM's paged allocator).
ADMISSIONS = ("reserve", "paged")


@dataclass
class Served:
    """What happened to one request (seconds from the start of the run; NaN: never)."""

    request: Request
    admitted_s: float = math.nan
    first_token_s: float = math.nan
    finish_s: float = math.nan
    generated: int = 0
    rejected: str = ""  # why it was refused, if it was
    cached_tokens: int = 0  # prompt tokens whose KV a prefix cache held at admission
    loaded_tokens: int = 0  # of those, the ones loaded from the host KV store
    prefilled: int = 0  # prompt tokens whose KV is in place (chunked prefill's progress)
    copy: int = -1  # the copy of the model that served it (-1: none)
    preemptions: int = 0  # times its KV was freed to make room (paged admission)
    recomputed_tokens: int = 0  # KV tokens it had computed before, computed again
    order: int = 0  # when its copy last admitted it, in admissions (the latest goes first)

    @property
    def context(self) -> int:
        """Its tokens so far, the prompt and what it has generated: what a prefill computes
        (a prompt after preemption is the prompt and the tokens generated before it)."""
        return self.request.prompt_tokens + self.generated


@dataclass
class Iteration:
    """One iteration of one copy of the model: when it started, its prefill and decode
    seconds, the batch it decoded and the requests it admitted."""

    start_s: float
    prefill_s: float
    decode_s: float
    batch: int
    admitted: int
    mean_context: float
    copy: int = 0
    waiting: int = 0  # requests still queued once it had admitted its own
    energy_j: float = math.nan  # the machine's joules over it, this copy's share
    # prompt tokens it prefilled; with chunked prefill its prefill_s is what the chunk added
    # to the decode step (the iteration's seconds beyond the step's alone)
    prefill_tokens: int = 0
    preempted: int = 0  # requests whose KV it freed to make room (paged admission)


class Engine:
    """One copy of the model running iterations over its own batch (its KV cache, its GPUs),
    taking requests from the server's shared queue."""

    def __init__(self, server: Server, copy: int):
        self.server, self.copy = server, copy
        self.running: list[Served] = []
        self.prefilling: deque[Served] = deque()  # admitted, prompt not yet all prefilled
        # requests whose KV was freed to make room (paged admission), readmitted before any
        # waiting request (vLLM puts them back at the head of its queue), last preempted first
        self.preempted: deque[Served] = deque()
        self._admissions = 0
        self._reserved_tokens = 0  # final KV tokens of the admitted requests
        self._context_tokens = 0  # current KV tokens of the running requests
        # the prefix cache: KV tokens of finished turns by conversation, least recently used
        # first, in memory no admitted request reserves
        self.retained: OrderedDict[int, int] = OrderedDict()
        self._retained_tokens = 0

    def run(self):
        server = self.server
        iterate = self._chunked if server.prefill_chunk else self._whole
        while True:
            if not self.running and not self.prefilling and not self._takes_any():
                if server.all_arrived and not server.waiting:
                    return
                yield server.arrival()
                continue
            yield from iterate()

    def _takes_any(self) -> bool:
        """Whether a waiting request may come to this copy."""
        return bool(self.preempted) or self._next_waiting() is not None

    def _next_waiting(self) -> Served | None:
        """The first waiting request that may come to this copy (its conversation's KV is not
        in another copy's prefix cache), or None."""
        return next((s for s in self.server.waiting if self.server.copy_for(s) in (None, self)),
                    None)

    def _whole(self):
        """One iteration: the admitted prompts' prefills, whole, then the decode step."""
        server, env, times = self.server, self.server.env, self.server.times
        start = env.now
        preempted = self._make_room()
        admitted = [] if preempted else self.admit()
        queued = len(server.waiting)
        prefills = [self._prefill(s) for s in admitted]
        prefill_tokens = sum(s.context - s.cached_tokens for s in admitted)
        prefill_s = sum(t for t, _ in prefills)
        # the step times' cells simulate every copy: this copy's share of their joules
        share = 1 / len(server.engines)
        energy_j = share * sum(j for _, j in prefills)
        if admitted:
            yield env.timeout(prefill_s)
            for s in admitted:
                self._first_token(s)
        decode_s, batch, mean_context = 0.0, len(self.running), math.nan
        if self.running:
            mean_context = self._context_tokens / batch
            decode_s, decode_j = times.decode_step(batch, mean_context)
            if not math.isfinite(decode_s):  # admission let in what the simulator refuses
                raise RuntimeError(f"no decode step for batch {batch} at mean context "
                                   f"{mean_context:.0f}, which admission found to fit")
            energy_j += share * decode_j
            yield env.timeout(decode_s)
            for s in list(self.running):
                self._generate(s)
            self.running = [s for s in self.running if math.isnan(s.finish_s)]
        server.iterations.append(Iteration(
            start, prefill_s, decode_s, batch, len(admitted), mean_context, self.copy,
            queued, energy_j, prefill_tokens, preempted))

    def _chunked(self):
        """One iteration: the decode step with the next chunk of the head prompt riding on it
        (or either alone)."""
        server, env, times = self.server, self.server.env, self.server.times
        start = env.now
        preempted = self._make_room()
        admitted = [] if preempted else self.admit()
        self.prefilling.extend(admitted)
        queued = len(server.waiting)
        batch = len(self.running)
        mean_context = self._context_tokens / batch if batch else math.nan
        chunks = self._chunks()
        tokens = sum(n for _, n in chunks)
        decode_s = energy_j = 0.0
        if batch:
            decode_s, energy_j = times.decode_step(batch, mean_context)
        seconds = decode_s
        if chunks:
            (head, first), packed = chunks[0], tuple((s.prefilled, n) for s, n in chunks[1:])
            seconds, energy_j = times.mixed_step(batch, mean_context if batch else 0.0,
                                                 head.prefilled, first,
                                                 server.past_from(head), packed)
        if not math.isfinite(seconds):  # admission let in what the simulator refuses
            raise RuntimeError(f"no step for batch {batch} at mean context {mean_context:.0f} "
                               f"with {tokens} tokens of prefill chunks, which admission "
                               "found to fit")
        yield env.timeout(seconds)
        for s in list(self.running):
            self._generate(s)
        self.running = [s for s in self.running if math.isnan(s.finish_s)]
        for s, n in chunks:
            s.prefilled += n
            if s.prefilled >= s.context:
                self.prefilling.remove(s)
                self._first_token(s)
        # the step times' cells simulate every copy: this copy's share of their joules
        server.iterations.append(Iteration(
            start, max(seconds - decode_s, 0.0), min(decode_s, seconds), batch, len(admitted),
            mean_context, self.copy, queued, energy_j / len(server.engines), tokens,
            preempted))

    def _chunks(self) -> list[tuple[Served, int]]:
        """This iteration's prefill chunks: the iteration's ``prefill_chunk`` tokens filled
        from the prompts being prefilled, in order (the head's next chunk, then, where the
        server packs, the next prompts' first ones, as vLLM's scheduler fills its token
        budget). A prompt whose past must come back from the host first waits to
        head an iteration: one landing block a layer for the read-back is what HBM sets aside."""
        server = self.server
        budget, chunks = server.prefill_chunk, []
        for s in self.prefilling:
            if budget <= 0 or (chunks and (not server.pack or server.past_from(s) is not None)):
                break
            n = min(budget, s.context - s.prefilled)
            chunks.append((s, n))
            budget -= n
        return chunks

    def _first_token(self, s: Served) -> None:
        """``s``'s prompt is prefilled: its first token now (its next, after a preemption),
        and it decodes from the next iteration on."""
        if math.isnan(s.first_token_s):
            s.first_token_s = self.server.env.now
        self._context_tokens += s.context
        self._generate(s)
        if math.isnan(s.finish_s):
            self.running.append(s)

    def _prefill(self, s: Served) -> tuple[float, float]:
        """Seconds and joules of ``s``'s prompt prefilled whole, alone: all of it, or with a
        prefix cache hit only the new tokens, attending to the retained ones."""
        times, prompt = self.server.times, s.context
        if s.cached_tokens:
            return times.mixed_step(0, 0.0, s.cached_tokens, prompt - s.cached_tokens,
                                    self.server.past_from(s))
        return times.prefill(prompt)

    def admit(self) -> list[Served]:
        """Waiting requests that join this iteration (first come, first served; requests
        preempted here first), passing over later turns whose conversation's KV another copy
        holds (they wait for that copy)."""
        server = self.server
        admitted: list[Served] = []
        held = len(self.running) + len(self.prefilling)
        while held + len(admitted) < server.max_batch:
            again = bool(self.preempted)
            head = self.preempted[0] if again else self._next_waiting()
            if head is None:
                break
            batch = held + len(admitted) + 1
            if server.paged:  # the blocks it needs now, beside those the others hold now
                need = self._paged_tokens([*admitted, head])
            else:  # what it and the others will hold once all have finished
                need = self._reserved_tokens + head.request.final_tokens
            cached, loaded = self._cached(head.request)
            why = ""
            times = server.times
            if again:
                pass  # refused or not when first admitted
            elif times.longest_prompt and head.request.prompt_tokens > times.reserved_prompt:
                why = (f"its {head.request.prompt_tokens}-token prompt is longer than any whose "
                       f"KV fits beside the HBM its prefill needs ({times.reserved_prompt} "
                       "tokens)")
            elif not server.prefill_chunk and not cached and not math.isfinite(
                    times.prefill_s(head.request.prompt_tokens)):
                why = "its prompt's prefill does not fit alone"
            elif server.paged and not times.fits(1, head.request.final_tokens):
                why = self._too_long(head)
            if why:
                pass
            # paged, alone: its final KV fits alone (checked above), though the tokens counted
            # for its first iteration may be one more (the first token and the one decoded)
            elif times.fits(batch, need) or (server.paged and batch == 1):
                if again:
                    self.preempted.popleft()
                else:
                    server.waiting.remove(head)
                    head.admitted_s, head.copy = server.env.now, self.copy
                self._admissions += 1
                head.order = self._admissions
                admitted.append(head)
                self._reserved_tokens += head.request.final_tokens
                if cached and not loaded:  # its conversation's KV is its own again
                    self._forget(head.request.conversation)
                else:  # another copy's cache, if one holds it, is left behind
                    server.leave_behind(head.request.conversation, self)
                head.cached_tokens = head.prefilled = cached
                head.loaded_tokens = cached if loaded else 0
                self._evict(batch, admitted)
                continue
            elif batch == 1:
                why = self._too_long(head)
            if not why:
                break  # it waits for room
            server.waiting.remove(head)
            server.refuse(head, why)
        return admitted

    def _too_long(self, s: Served) -> str:
        """Why ``s`` is refused when its final KV does not fit the memory alone."""
        times = self.server.times
        why = f"its {s.request.final_tokens} tokens of KV do not fit alone"
        reserve_gb = times.prefill_reserve_bytes / 1e9 if times.longest_prompt else 0.0
        if reserve_gb >= 0.1:  # say what else holds HBM
            why += (f" beside the {reserve_gb:.1f} GB of HBM set aside to prefill the "
                    f"longest prompt ({times.reserved_prompt} tokens)")
        return why

    def _paged_tokens(self, admitted: Iterable[Served] = ()) -> int:
        """KV tokens the blocks of this copy's requests hold once this iteration has run
        (paged admission): each running request's tokens and the one it adds, each admitted
        prompt whole (prefilled whole or in chunks) and its first token, and a prompt
        prefilled whole this iteration the token it decodes in it too."""
        decodes = 0 if self.server.prefill_chunk else 1
        pending = sum(s.context + 1 for s in self.prefilling) + sum(
            s.context + 1 + decodes for s in admitted)
        return self._context_tokens + len(self.running) + pending

    def _make_room(self) -> int:
        """Paged admission, before the iteration: while this copy's requests and the token
        each adds do not fit, free retained KV (least recently used first), then preempt the
        request admitted last, as vLLM does when its cache runs out (recompute: its KV is
        freed, and it waits at the head of the queue to prefill its prompt and the tokens it
        has generated again). Returns the requests preempted."""
        if not self.server.paged:
            return 0
        fits = self.server.times.fits
        preempted = 0
        while True:
            held = len(self.running) + len(self.prefilling)
            tokens = self._paged_tokens()
            if not held or fits(held, tokens + self._retained_tokens):
                return preempted
            if self.retained:
                self._forget(next(iter(self.retained)))
                continue
            victim = max((*self.running, *self.prefilling), key=lambda s: s.order)
            self._preempt(victim)
            preempted += 1

    def _preempt(self, s: Served) -> None:
        """Free ``s``'s KV; it waits at the head of this copy's queue to be prefilled again."""
        if s in self.running:
            self.running.remove(s)
            self._context_tokens -= s.context
            s.recomputed_tokens += s.context
        else:
            self.prefilling.remove(s)
            s.recomputed_tokens += s.prefilled
        s.prefilled = s.cached_tokens = s.loaded_tokens = 0
        self._reserved_tokens -= s.request.final_tokens  # taken again when it is readmitted
        s.preemptions += 1
        self.preempted.appendleft(s)

    def _forget(self, conversation: int) -> int:
        """Drop ``conversation`` from this copy's prefix cache (taken back, or evicted)."""
        tokens = self.retained.pop(conversation)
        self._retained_tokens -= tokens
        if self.server.holder.get(conversation) is self:
            del self.server.holder[conversation]
        self.server._announce()  # a turn that waited for this copy may go to any now
        return tokens

    def _cached(self, request: Request) -> tuple[int, bool]:
        """Tokens of ``request``'s prompt this copy's prefix cache holds (its conversation's
        KV so far, the turn before's prompt and answer), and whether they come from the host
        KV store (the copy's memory no longer holds them)."""
        server = self.server
        if not server.prefix_cache or request.conversation < 0:
            return 0, False
        if request.conversation in self.retained:
            return min(self.retained[request.conversation], request.prefix_tokens), False
        if server.store is not None:
            stored = min(server.store.get(request.conversation), request.prefix_tokens)
            return stored, stored > 0
        return 0, False

    def _evict(self, batch: int, admitted: list[Served]) -> None:
        """Evict retained KV, least recently used first, until what the ``batch`` admitted
        requests reserve (with paged admission: hold) and what is retained fit together."""
        fits, paged = self.server.times.fits, self.server.paged
        while self.retained:
            held = self._paged_tokens(admitted) if paged else self._reserved_tokens
            if fits(batch, held + self._retained_tokens):
                return
            self._forget(next(iter(self.retained)))

    def _generate(self, s: Served) -> None:
        s.generated += 1
        self._context_tokens += 1
        if s.generated >= s.request.output_tokens:
            s.finish_s = self.server.env.now
            self._reserved_tokens -= s.request.final_tokens
            self._context_tokens -= s.context
            if self.server.prefix_cache and s.request.conversation >= 0:
                # its KV stays, now the cache's: it fit reserved, so it fits retained
                conversation = s.request.conversation
                self._retained_tokens += s.context - self.retained.pop(conversation, 0)
                self.retained[conversation] = s.context
                self.server.holder[conversation] = self
                if self.server.store is not None:  # written through to the host store
                    self.server.store.put(conversation, s.context)
            self.server.finished(1)
            self.server.answered(s)


class Server:
    """The queue and ``copies`` engines, as SimPy processes: ``arrivals`` feeds the queue, each
    engine runs iterations until every request has arrived and left. An engine takes the
    head of the queue at the start of its next iteration, so a request goes to the first copy
    with room (one idle, or the first to finish an iteration); a later turn whose
    conversation's KV a copy's prefix cache holds waits for that copy (``copy_for``)."""

    def __init__(self, env: simpy.Environment, times: StepTimes, *, max_batch: int,
                 copies: int = 1, on_finish: Callable[[int], None] | None = None,
                 prefix_cache: bool = True, kv_offload: KvOffload | None = None,
                 pack: bool = True, affinity_wait_s: float = math.inf, paged: bool = False):
        self.env, self.times, self.max_batch = env, times, max_batch
        # admit on the KV blocks requests hold now and preempt when they run out (vLLM's
        # paged allocator), rather than reserve each request's final KV at admission
        self.paged = paged
        # how long a later turn waits for the copy whose cache holds its KV before any copy
        # may take it (inf: it always waits, strict session affinity; 0: it goes to the first
        # copy with room)
        self.affinity_wait_s = affinity_wait_s
        self.prefill_chunk = times.prefill_chunk  # None: prompts prefilled whole
        # a chunk budget the head prompt leaves is filled from the next prompts (False: one
        # prompt's chunk an iteration)
        self.pack = pack
        self.prefix_cache = prefix_cache
        self.kv_offload = kv_offload if prefix_cache else None
        self.store = None if self.kv_offload is None else KvStore(
            self.kv_offload.capacity_gb * 1e9,
            times.model.kv_bytes_per_token(times.kv_dtype))
        self.waiting: deque[Served] = deque()
        self.served: list[Served] = []
        self.iterations: list[Iteration] = []
        self.engines = [Engine(self, copy) for copy in range(copies)]
        self.on_finish = on_finish
        self._unarrived: int | None = None  # requests still to come (None: not yet told)
        self._later: dict[int, deque[Request]] = {}  # conversations' turns still to come
        # the copy whose prefix cache holds each conversation's KV (a later turn goes there)
        self.holder: dict[int, Engine] = {}
        self._arrived: simpy.Event | None = None

    @property
    def all_arrived(self) -> bool:
        return self._unarrived == 0

    def arrival(self) -> simpy.Event:
        """An event that fires at the next arrival (or when the last request has come)."""
        if self._arrived is None or self._arrived.triggered:
            self._arrived = self.env.event()
        return self._arrived

    def _announce(self) -> None:
        if self._arrived is not None and not self._arrived.triggered:
            self._arrived.succeed()

    def arrivals(self, requests: Iterable[Request]):
        """The first turns (every request outside a conversation) at their arrival times;
        the later turns wait for ``answered``."""
        requests = list(requests)
        self._unarrived = len(requests)
        for request in requests:
            if request.turn > 0:
                self._later.setdefault(request.conversation, deque()).append(request)
        for request in requests:
            if request.turn > 0:
                continue
            if request.arrival_s > self.env.now:
                yield self.env.timeout(request.arrival_s - self.env.now)
            self._arrive(request)
        self._announce()

    def _arrive(self, request: Request, rejected: str = "") -> Served:
        served = Served(request, rejected=rejected)
        self.served.append(served)
        self._unarrived -= 1
        if rejected:
            self.finished(1)
        else:
            self.waiting.append(served)
            if (math.isfinite(self.affinity_wait_s) and self.copy_for(served) is not None):
                self.env.process(self._release())
        self._announce()
        return served

    def copy_for(self, s: Served) -> Engine | None:
        """The copy ``s`` waits for: the one whose prefix cache holds its conversation's KV
        (session affinity, as a router in front of several copies sends a conversation's
        turns where its KV is) until it has waited ``affinity_wait_s``, or None: any copy."""
        if not self.prefix_cache or len(self.engines) == 1:
            return None
        if self.env.now - s.request.arrival_s >= self.affinity_wait_s:
            return None
        return self.holder.get(s.request.conversation)

    def leave_behind(self, conversation: int, taker: Engine) -> None:
        """A turn of ``conversation`` was admitted on ``taker`` without the KV another copy's
        prefix cache holds (it waited past ``affinity_wait_s``): that copy drops it, its
        turns from now on going where this one runs."""
        holder = self.holder.get(conversation)
        if holder is not None and holder is not taker and conversation in holder.retained:
            holder._forget(conversation)

    def _release(self):
        """Wake the copies once a request just arrived has waited ``affinity_wait_s`` for the
        copy that holds its KV: any copy may take it then."""
        yield self.env.timeout(self.affinity_wait_s)
        self._announce()

    @functools.cached_property
    def _retains_on_host(self) -> bool:
        """Whether the policy keeps KV in host memory, and so its prefix cache too."""
        from hgsim.policies.registry import lookup

        return lookup(self.times.policy)[0].reads_kv_back

    def past_from(self, s: Served) -> str | None:
        """Where the past of ``s``'s next prefill chunk is, if not in place
        (``PrefillChunk.past_from``): for its first chunk after a hit, the store's tier, or
        the policy's host tiers where the policy keeps retained KV there."""
        if not s.cached_tokens or s.prefilled != s.cached_tokens:
            return None
        if s.loaded_tokens:
            return self.kv_offload.tier
        return PAST_ON_HOST if self._retains_on_host else None

    def answered(self, s: Served) -> None:
        """``s`` has its last token: its conversation's next turn comes after the user's think
        time."""
        later = self._later.get(s.request.conversation)
        if later:
            self.env.process(self._follow(later.popleft()))

    def _follow(self, request: Request):
        yield self.env.timeout(request.think_s)
        self._arrive(dataclasses.replace(request, arrival_s=self.env.now))

    def refuse(self, s: Served, why: str) -> None:
        """``s`` is refused, and with it its conversation's later turns."""
        s.rejected = why
        self.finished(1)
        for request in self._later.pop(s.request.conversation, ()):
            self._arrive(dataclasses.replace(request, arrival_s=self.env.now),
                         rejected="an earlier turn of its conversation was refused")

    def finished(self, n: int) -> None:
        if self.on_finish is not None:
            self.on_finish(n)


def run_server(times: StepTimes, requests: list[Request], *, max_batch: int, copies: int = 1,
               on_finish: Callable[[int], None] | None = None,
               prefix_cache: bool = True, kv_offload: KvOffload | None = None,
               pack: bool = True, affinity_wait_s: float = math.inf,
               paged: bool = False) -> Server:
    """Serve ``requests`` to the end on ``copies`` copies of the model behind one queue
    (prompts chunked as ``times.prefill_chunk`` says, a chunk budget the head prompt leaves
    filled from the next ones with ``pack``; conversations' KV kept between turns with
    ``prefix_cache``, a later turn waiting at most ``affinity_wait_s`` for the copy that
    holds it; with ``paged`` admitted on the KV they hold now and preempted when it runs
    out, else on their final KV); the server holds every request's record."""
    env = simpy.Environment()
    server = Server(env, times, max_batch=max_batch, copies=copies, on_finish=on_finish,
                    prefix_cache=prefix_cache, kv_offload=kv_offload, pack=pack,
                    affinity_wait_s=affinity_wait_s, paged=paged)
    env.process(_carried(server.arrivals(requests)))
    for engine in server.engines:
        env.process(_carried(engine.run()))
    try:
        env.run()
    except _Carried as carried:
        raise carried.args[0] from None
    return server


class _Carried(Exception):
    """An error raised inside a process, carried out of simpy whole (``args``: the error)."""


def _carried(process):
    """``process``, its errors carried out as ``_Carried``: simpy re-raises a process's error
    as ``type(exc)(*exc.args)``, which an error made from other arguments than its args
    (pydantic's ValidationError) cannot survive; it surfaced as a TypeError from simpy, not
    the one-line error it was."""
    try:
        return (yield from process)
    except Exception as exc:
        raise _Carried(exc) from None
