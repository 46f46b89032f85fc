"""A decode step as the hardware runs it: GPU kernels in stream order, the host path of each
layer (CPU scan, gather, PCIe) as processes on the machine model, joined where the GPU needs
the host's contribution.

The step opens with one ``kv_update`` kernel per layer whose HBM recent window slides (the
new token in, the oldest out to host memory). Then per layer ``i`` the GPU stream runs
``qkv -> [speculate] -> attn -> [merge] -> post``. The host
path of layer ``i`` starts at its trigger: after ``qkv(i)``, or with lookahead after
``qkv(i-1)`` (HybridGen's CPU works one layer ahead on the previous layer's input; FlexGen and
InfiniGen prefetch the next layer's KV). ``merge(i)`` waits for the host path. Layers of the CPU
side run in order because each holds all cores of the socket.
"""

from __future__ import annotations

from dataclasses import dataclass

from simpy import Event

from hgsim.costs import LayerWork, Work, layer_work
from hgsim.plan import CpuWork, LayerPlan, StepPlan, Transfer
from hgsim.sim.compute import cpu_stream_rate_Bps
from hgsim.sim.machine import GB, Machine
from hgsim.specs.model import ModelSpec


@dataclass(slots=True)
class StepMeasure:
    latency_s: float = 0.0
    gpu_busy_s: float = 0.0
    cpu_busy_s: float = 0.0
    pcie_busy_s: float = 0.0
    host_s: float = 0.0
    device_s: float = 0.0


class _HostTimes:
    """Per-layer trigger/arrival of the host path and the CPU's busy time."""

    __slots__ = ("trigger_s", "done_s", "cpu_s", "pcie_s")

    def __init__(self) -> None:
        self.trigger_s = 0.0
        self.done_s = 0.0
        self.cpu_s = 0.0
        self.pcie_s = 0.0


class DecodeEngine:
    """Runs ``StepPlan`` objects on a ``Machine``; one engine per simulation."""

    def __init__(
        self, machine: Machine, model: ModelSpec, kv_dtype: str, weight_dtype: str,
        *, attention_only: bool = False,
    ):
        self.machine = machine
        self.env = machine.env
        self.model = model
        self.kv_dtype = kv_dtype
        self.weight_dtype = weight_dtype
        self.attention_only = attention_only
        profile = machine.profile
        self.gpu = profile.primary_gpu
        self.socket = profile.gpus[self.gpu].socket
        self.stream = machine.gpu_stream(self.gpu)
        self.cores = profile.sockets[self.socket].cores
        self.attn_eff = profile.gpus[self.gpu].attention_efficiency
        self._work_cache: dict[tuple[int, LayerPlan], LayerWork] = {}

    # ------------------------------------------------------------------ costs
    def work(self, batch: int, lp: LayerPlan) -> LayerWork:
        key = (batch, lp)
        w = self._work_cache.get(key)
        if w is None:
            if len(self._work_cache) > 4096:
                self._work_cache.clear()
            w = self._work_cache[key] = layer_work(self.model, batch, lp, self.kv_dtype,
                                                   self.weight_dtype,
                                                   attention_only=self.attention_only)
        return w

    def _kernel_s(self, work: Work, attention: bool = False) -> float:
        if not work.flops and not work.bytes_:
            return 0.0
        return self.machine.kernel_time_s(
            self.gpu, work.flops, work.bytes_, dtype=self.weight_dtype,
            memory_eff=self.attn_eff if attention else None,
        )

    # ------------------------------------------------------------------ one step
    def step(self, plan: StepPlan) -> StepMeasure:
        """Simulate one decode step to completion and return its timing."""
        measure = StepMeasure()
        done = self.env.process(self._step(plan, measure))
        self.env.run(until=done)
        return measure

    def _step(self, plan: StepPlan, measure: StepMeasure):
        env, stream = self.env, self.stream
        t0 = env.now
        lp = plan.layer
        w = self.work(plan.batch, lp)
        d_qkv, d_post = self._kernel_s(w.qkv), self._kernel_s(w.post)
        d_attn = self._kernel_s(w.attn, attention=True)
        d_merge = self._kernel_s(w.merge, attention=True)
        d_spec = self._kernel_s(w.speculate, attention=True)
        has_host = lp.host_tokens > 0 and not lp.host_evicted
        gpu_busy = 0.0
        # The step starts by sliding every layer's HBM window (hw_backend's executor does the
        # same), so host work over a range never misses a token still on its way out.
        upd = w.kv_update
        d_upd = self._kernel_s(upd)
        for i in range(plan.num_layers):
            if i and plan.per_layer is not None:  # rare: layer-specific plans
                upd = self.work(plan.batch, plan.layer_plan(i)).kv_update
                d_upd = self._kernel_s(upd)
            if d_upd:
                stream.launch(d_upd, "kv_update", 0.0, upd.bytes_)
                gpu_busy += d_upd
        host_times: list[_HostTimes] = []
        prev_qkv: Event | None = None
        prev_host: Event | None = None
        last: Event | None = None
        weights: Event | None = None
        posts: list[Event] = []
        for i in range(plan.num_layers):
            if i and plan.per_layer is not None:  # rare: layer-specific plans
                lp = plan.layer_plan(i)
                w = self.work(plan.batch, lp)
            if plan.offloaded_weight_bytes_per_layer:
                buffer_free = posts[i - 2] if i >= 2 else None
                weights = env.process(self._load_weights(plan, weights, buffer_free))
            qkv = stream.launch(d_qkv, "qkv", w.qkv.flops, w.qkv.bytes_,
                                after=weights if weights is not None else ())
            gpu_busy += d_qkv
            if d_spec:
                stream.launch(d_spec, "speculate", w.speculate.flops, w.speculate.bytes_)
                gpu_busy += d_spec
            host = None
            if has_host:
                trigger = self._trigger(lp, i, qkv, prev_qkv, prev_host)
                times = _HostTimes()
                host_times.append(times)
                host = env.process(self._host_path(lp, w, trigger, times))
            if d_attn:
                stream.launch(d_attn, "attention", w.attn.flops, w.attn.bytes_)
                gpu_busy += d_attn
            if host is not None:
                stream.launch(d_merge, "merge", w.merge.flops, w.merge.bytes_, after=host)
                gpu_busy += d_merge
            last = stream.launch(d_post, "out_proj+ffn", w.post.flops, w.post.bytes_)
            posts.append(last)
            gpu_busy += d_post
            prev_qkv, prev_host = qkv, host
        yield last
        measure.latency_s = env.now - t0
        measure.gpu_busy_s = gpu_busy
        # The scheduler compares the host path's elapsed time with the device *work* that can
        # hide it (HybridGen's T_dev): with lookahead the rest of layer i-1 plus layer i up to
        # its own attention, otherwise layer i's attention alone. Work, not elapsed time, so that
        # waiting on a shared link does not read as spare device capacity.
        hide_first = d_qkv + d_spec + d_attn
        hide = hide_first + (d_attn + d_merge + d_post if lp.lookahead else 0.0)
        for i, times in enumerate(host_times):
            measure.host_s += times.done_s - times.trigger_s
            measure.device_s += hide if i else hide_first
            measure.cpu_busy_s += times.cpu_s
            measure.pcie_busy_s += times.pcie_s

    def _load_weights(self, plan: StepPlan, previous: Event | None, buffer_free: Event | None):
        """Stream one layer's offloaded weights into a two-layer HBM buffer, in layer order."""
        if previous is not None and not previous.processed:
            yield previous
        if buffer_free is not None and not buffer_free.processed:
            yield buffer_free
        yield self.machine.copy(plan.weight_tier, self.gpu, plan.offloaded_weight_bytes_per_layer,
                                "weights h2d")

    def _trigger(self, lp: LayerPlan, i: int, qkv: Event, prev_qkv, prev_host) -> Event:
        """When the host path of layer ``i`` may start."""
        if lp.transfer is Transfer.KV_ALL:
            # FlexGen's double buffer: layer i's KV loads as soon as layer i-1's has landed.
            return prev_host if prev_host is not None else self.env.timeout(0)
        if lp.lookahead and prev_qkv is not None:
            return prev_qkv
        return qkv

    # ------------------------------------------------------------------ the host path
    def _host_path(self, lp: LayerPlan, w: LayerWork, trigger: Event, times: _HostTimes):
        env, machine, gpu = self.env, self.machine, self.gpu
        yield trigger
        times.trigger_s = env.now
        placement = lp.placement
        if lp.cpu_work is not CpuWork.NONE:
            t_q = env.now
            yield machine.copy(gpu, self.socket, w.q_d2h_bytes, "q d2h")
            pcie = env.now - t_q
            yield from self._cpu_phase(lp, w, times)
            t_x = env.now
            flows = [machine.copy(self.socket, gpu, w.to_gpu_small_bytes, "to gpu")]
            if w.to_gpu_v_bytes:
                flows += [
                    machine.copy(tier, gpu, w.to_gpu_v_bytes * f, f"gather V {tier}")
                    for tier, f in placement.gather_fractions.items()
                ]
            yield env.all_of(flows)
            times.pcie_s = pcie + env.now - t_x
        else:  # KV streamed or prefetched to the GPU
            t_x = env.now
            flows = [
                machine.copy(tier, gpu, w.to_gpu_k_bytes * f, f"K {tier}")
                for tier, f in placement.k_fractions.items()
            ] + [
                machine.copy(tier, gpu, w.to_gpu_v_bytes * f, f"V {tier}")
                for tier, f in placement.v_fractions.items()
            ]
            yield env.all_of(flows)
            times.pcie_s = env.now - t_x
        times.done_s = env.now

    def _cpu_phase(self, lp: LayerPlan, w: LayerWork, times: _HostTimes):
        """All cores of the socket scan K (and read V) out of the tiers holding them."""
        env, machine = self.env, self.machine
        pool = machine.cores(self.socket)
        yield pool.acquire(self.cores)
        start = env.now
        spec = machine.profile.sockets[self.socket]
        total_bytes = w.cpu_k_bytes + w.cpu_v_bytes
        flops_per_byte = w.cpu_flops / total_bytes if total_bytes else 0.0
        k_tier = next(iter(lp.placement.k_fractions))
        core_Bps = spec.stream_inflight_bytes / machine.path(k_tier, self.socket).latency_s
        cap = cpu_stream_rate_Bps(self.cores, core_Bps, spec.attention_gflops_per_core * GB,
                                  flops_per_byte)
        compute = machine.socket_compute(self.socket)
        v_fractions = (lp.placement.gather_fractions if lp.cpu_work is CpuWork.SPARSE_PARTIAL
                       else lp.placement.v_fractions)
        flows = []
        for bytes_, fractions in ((w.cpu_k_bytes, lp.placement.k_fractions),
                                  (w.cpu_v_bytes, v_fractions)):
            if not bytes_:
                continue
            for tier, f in fractions.items():
                route = machine.path(tier, self.socket)
                share = bytes_ * f
                flows.append(machine.network.transfer(
                    (*route.channels, compute), share, latency_s=route.latency_s,
                    label=f"cpu scan {tier}", max_rate=cap * share / total_bytes,
                    flops=share * flops_per_byte, track=pool.name,
                ))
        yield env.all_of(flows)
        select_ns = w.cpu_topk_inserts * spec.topk_ns_per_insert + w.cpu_gather_rows * spec.gather_ns_per_row
        extra_s = select_ns * 1e-9 / self.cores + spec.op_overhead_us * 1e-6
        if extra_s:  # heap inserts and row gathers spread over the cores, the call's fixed cost
            yield env.timeout(extra_s)
        pool.release(self.cores)
        times.cpu_s = env.now - start
