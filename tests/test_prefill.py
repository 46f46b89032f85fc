"""The prompt's prefill (time to first token): closed forms of the layer kernels and of the
KV the policy keeps in host memory, written out behind them."""

from __future__ import annotations

import pytest
import simpy

from hgsim.catalog import get_model
from hgsim.costs import prefill_activation_bytes, prefill_workspace_bytes
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.sim.decode import DecodeEngine
from hgsim.sim.machine import Machine
from hgsim.simulate import Fidelity, simulate
from hgsim.units import size_text
from hgsim.workload import Workload

H100 = "h100-80gb-spr-cxl"
US, NS, GB = 1e-6, 1e-9, 1e9


def _prefill(policy: str, model: str, context: int, batch: int = 1,
             chunk: int | None = None):
    """Run the prefill alone; returns (TTFT, bytes each channel moved, the plan, the model)."""
    profile, spec = load_profile(H100), get_model(model)
    workload = Workload(batch=batch, context=context, gen=1)
    plan = make_policy(policy, spec, profile, workload, None).step_plan(context)
    machine = Machine(simpy.Environment(), profile, record=False)
    engine = DecodeEngine(machine, spec, "fp16", "fp16")
    ttft = engine.prefill(plan, context, chunk)
    moved = {k: v for k, v in machine.recorder.bytes_by_resource().items() if v}
    return ttft, moved, plan, spec


def _layer_kernel_s(spec, batch: int, context: int) -> float:
    """One layer's prefill kernel on the H100 SXM: 3 us launch + FLOPs at 989.5 TFLOP/s x 0.70
    (compute-bound at these prompts: its weights and the K and V it writes to HBM move at
    3.35 TB/s x 0.85 in far less time)."""
    flops = (2 * spec.params_per_layer() * batch * context
             + 2 * spec.num_heads * spec.head_dim * context**2 * batch)  # causal: half of S^2
    compute_s = flops / (989.5e12 * 0.70)
    assert compute_s > _layer_hbm_bytes(spec, batch, context) / (3350 * GB * 0.85)
    return 3 * US + compute_s


def _layer_hbm_bytes(spec, batch: int, context: int) -> float:
    """The layer's fp16 weights read, every prompt token's K and V written."""
    return 2 * spec.params_per_layer() + batch * context * 2 * spec.kv_dim * 2


def _lm_head_s(spec, batch: int) -> float:
    """The first token's final norm and LM head: 3 us launch + the (vocab + 1) x hidden fp16
    matrix streamed at 3.35 TB/s x 0.85 (memory-bound: 2 FLOPs per weight per sequence)."""
    head_bytes = (spec.vocab_size + 1) * spec.hidden_size * 2
    assert head_bytes / (3350 * GB * 0.85) > batch * head_bytes / (989.5e12 * 0.70)
    return 3 * US + head_bytes / (3350 * GB * 0.85)


def test_gpu_only_prefill_is_its_layer_kernels_and_nothing_crosses_pcie():
    """GPU-only keeps every token's KV in HBM: no write-out, TTFT = layers x kernel + the LM
    head that gives the first token; HBM traffic is each layer's weights and K and V plus the
    LM head's matrix."""
    ttft, moved, _, spec = _prefill("gpu_only", "llama-2-7b", 4096)
    assert ttft == pytest.approx(
        spec.num_layers * _layer_kernel_s(spec, 1, 4096) + _lm_head_s(spec, 1), rel=1e-12)
    assert set(moved) == {"gpu0.compute", "gpu0.hbm"}  # the kernels' bytes, on HBM too
    head_bytes = (spec.vocab_size + 1) * spec.hidden_size * 2
    assert moved["gpu0.compute"] == pytest.approx(
        spec.num_layers * _layer_hbm_bytes(spec, 1, 4096) + head_bytes, rel=1e-12)
    assert moved["gpu0.hbm"] == pytest.approx(moved["gpu0.compute"], rel=1e-12)  # no DMA


def test_only_the_host_resident_kv_is_written_out_to_the_tier_that_holds_it():
    """FlexGen keeps a recent window in HBM and the rest in DDR: each layer writes the host
    tokens' K and V (B x host x 2 x kv_dim x 2 bytes) over PCIe into ddr0, behind the next
    layer's kernel; only the last layer's write adds to TTFT (1.11 us route latency +
    bytes / 50 GB/s: PCIe Gen5 binds, DDR5 writes at 200 GB/s), beside the LM head."""
    ttft, moved, plan, spec = _prefill("flexgen", "llama-2-13b", 131072)
    lp = plan.layer
    assert 0 < lp.host_tokens < lp.context and lp.placement.k_fractions == {"ddr0": 1.0}
    host_bytes = lp.host_tokens * 2 * spec.kv_dim * 2
    kernel_s = _layer_kernel_s(spec, 1, 131072)
    write_s = (1000 + 110) * NS + host_bytes / (50 * GB)
    assert write_s < kernel_s  # the writes never queue behind each other
    assert ttft == pytest.approx(
        spec.num_layers * kernel_s + max(write_s, _lm_head_s(spec, 1)), rel=1e-12)
    assert moved["gpu0.d2h"] == pytest.approx(spec.num_layers * host_bytes, rel=1e-12)
    assert moved["ddr0.write"] == pytest.approx(spec.num_layers * host_bytes, rel=1e-12)
    assert "cxl0.write" not in moved


def test_kv_split_over_tiers_is_written_at_the_slowest_tiers_rate():
    """HybridGen puts K in DDR and V on the CXL expander: V's half of the write-out crosses
    the x8 link into the expander, whose 18 GB/s write bandwidth binds the whole flow
    (half the bytes at 18 GB/s against all of them at PCIe's 50 GB/s)."""
    ttft, moved, plan, spec = _prefill("hybridgen", "llama-2-13b", 131072)
    lp = plan.layer
    assert lp.placement.k_fractions == {"ddr0": 1.0} and lp.placement.v_fractions == {"cxl0": 1.0}
    host_bytes = lp.host_tokens * 2 * spec.kv_dim * 2
    write_s = (1000 + 120 + 150) * NS + 0.5 * host_bytes / (18 * GB)
    assert ttft == pytest.approx(spec.num_layers * _layer_kernel_s(spec, 1, 131072)
                                 + max(write_s, _lm_head_s(spec, 1)), rel=1e-12)
    assert moved["ddr0.write"] == pytest.approx(spec.num_layers * host_bytes / 2, rel=1e-12)
    assert moved["cxl0.write"] == pytest.approx(spec.num_layers * host_bytes / 2, rel=1e-12)


def test_evicted_tokens_are_not_written_out():
    """H2O drops what leaves its HBM budget: nothing of the prompt goes to host memory."""
    ttft, moved, plan, spec = _prefill("h2o", "llama-2-13b", 131072)
    assert plan.layer.host_evicted
    assert "gpu0.d2h" not in moved
    assert ttft == pytest.approx(
        spec.num_layers * _layer_kernel_s(spec, 1, 131072) + _lm_head_s(spec, 1), rel=1e-12)


def test_ttft_is_the_prefill_in_the_trace_and_stays_out_of_decode_throughput(tmp_path):
    """The trace's prefill ends at TTFT and the decode's first kernel starts there; tokens/s
    and the energy window are the decode's alone."""
    import json

    work = dict(workload=Workload(batch=1, context=8192, gen=2, include_prefill=True),
                fidelity=Fidelity(decode_samples=0, accuracy=False))
    trace = tmp_path / "trace.json"
    with_prefill = simulate(H100, "llama-2-7b", "cpu_offload", trace_path=trace, **work)
    without = simulate(H100, "llama-2-7b", "cpu_offload",
                       workload=Workload(batch=1, context=8192, gen=2),
                       fidelity=work["fidelity"])
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    prefill_end = max(e["ts"] + e["dur"] for e in events if e["name"].startswith("prefill"))
    decode_start = min(e["ts"] for e in events if not e["name"].startswith("prefill"))
    assert prefill_end * US == pytest.approx(with_prefill.ttft_s, rel=1e-9)
    assert decode_start * US == pytest.approx(with_prefill.ttft_s, rel=1e-9)
    assert with_prefill.tokens_per_s == pytest.approx(without.tokens_per_s, rel=1e-12)
    assert with_prefill.energy_window_s == pytest.approx(without.energy_window_s, rel=1e-12)


def test_offloaded_weights_stream_in_before_each_layer_and_bind_a_short_prompt():
    """Llama-3.1-70B's 141 GB of weights leave 0.98 GB per layer in DDR: each layer's share
    crosses PCIe (50 GB/s, 19.6 ms) before its kernel (5.2 ms at 2k tokens), the loads back to
    back in layer order, so TTFT = 80 loads (each 1.11 us of route latency + bytes / 50 GB/s)
    + the last kernel + the LM head. Without the loads it would be 80 kernels, 3.7x less."""
    ttft, moved, plan, spec = _prefill("flexgen", "llama-3.1-70b", 2048)
    per_layer = plan.offloaded_weight_bytes_per_layer
    assert per_layer > 0.9 * GB and plan.layer.host_tokens == 0
    kernel_s = _layer_kernel_s(spec, 1, 2048)
    load_s = (1000 + 110) * NS + per_layer / (50 * GB)
    assert load_s > kernel_s
    assert ttft == pytest.approx(
        spec.num_layers * load_s + kernel_s + _lm_head_s(spec, 1), rel=1e-12)
    assert moved["gpu0.h2d"] == pytest.approx(spec.num_layers * per_layer, rel=1e-12)


def test_a_run_without_prefill_has_no_time_to_first_token():
    """No prefill simulated: TTFT is missing (NaN), not 0 s, in the row and the printout, so
    a study filtering on ttft_s never reads an instant first token."""
    from hgsim.commands.simulate import summary_rows

    fidelity = Fidelity(decode_samples=0, accuracy=False)
    without = simulate(H100, "llama-2-7b", "gpu_only", Workload(batch=1, context=1024, gen=1),
                       fidelity=fidelity)
    row = without.to_row()
    assert row["ttft_s"] != row["ttft_s"]
    assert "time to first token" not in dict(summary_rows(without))
    with_prefill = simulate(H100, "llama-2-7b", "gpu_only",
                            Workload(batch=1, context=1024, gen=1, include_prefill=True),
                            fidelity=fidelity)
    assert with_prefill.to_row()["ttft_s"] > 0
    assert "time to first token" in dict(summary_rows(with_prefill))


def test_peak_activations_of_a_layer_are_the_swiglu_intermediate_at_long_prompts():
    """Llama-3.1-70B, a 128k prompt, batch 2, fp16: the FFN holds the residual (8192 wide),
    gate and up and their product (3 x 28672) for every token, 49.4 GB; attention's tensors
    (Q, K, V, its output: 2 x 8192 + 2 x 1024 wide, plus an fp32 LSE per head) are smaller."""
    spec = get_model("llama-3.1-70b")
    tokens = 2 * 131072
    ffn = tokens * (8192 + 3 * 28672) * 2
    assert tokens * ((2 * 8192 + 2 * 1024) * 2 + 4 * 64) < tokens * 3 * 28672 * 2
    assert prefill_activation_bytes(spec, 2, 131072, "fp16") == pytest.approx(ffn, rel=1e-12)
    assert ffn == pytest.approx(49.4 * GB, rel=1e-3)
    # a chunk of 8k tokens per sequence holds 1/16 of that, plus three blocks of a chunk's
    # K and V (two landing blocks, the chunk just written) where K and V are read back; none
    # where every token stays in HBM
    assert prefill_workspace_bytes(spec, 2, 131072, 8192, "fp16", "fp16") == pytest.approx(
        ffn / 16 + 3 * 2 * 8192 * 2 * 1024 * 2, rel=1e-12)
    assert prefill_workspace_bytes(spec, 2, 131072, 8192, "fp16", "fp16",
                                   reads_back=False) == pytest.approx(ffn / 16, rel=1e-12)


def test_a_prefill_whose_activations_do_not_fit_is_infeasible_until_chunked():
    """Llama-3.1-8B in HBM (16 GB of weights, 6.1 GB reserve on 85.9 GB) prefilling 128k
    tokens for 8 sequences at once needs 98.8 GB of activations: infeasible, short by the
    difference; in chunks of 16k tokens it needs 1/8 of that and runs, the KV the plan keeps
    in HBM making room for it (vLLM sizes its KV cache after its token budget's activations)."""
    spec, fidelity = get_model("llama-3.1-8b"), Fidelity(decode_samples=0, accuracy=False)
    options = {"weight_offload": "none"}
    whole = Workload(batch=8, context=131072, gen=1, include_prefill=True)
    need = 8 * 131072 * (4096 + 3 * 14336) * 2
    result = simulate(H100, spec, "flexgen", whole, policy_options=options, fidelity=fidelity)
    capacity = load_profile(H100).gpus["gpu0"].hbm_capacity_gb * GB
    left = capacity - (1 * GB + 0.06 * capacity) - spec.weight_bytes("fp16")
    assert not result.feasible
    assert f"hbm short by {size_text(need - left)} for the prefill" in result.reason
    assert "prefill_chunk_tokens" in result.reason
    chunked = simulate(H100, spec, "flexgen", whole.model_copy(update={
        "prefill_chunk_tokens": 16384}), policy_options=options, fidelity=fidelity)
    without = simulate(H100, spec, "flexgen", Workload(batch=8, context=131072, gen=1),
                       policy_options=options, fidelity=fidelity)
    assert chunked.feasible and chunked.ttft_s > 0
    workspace = need / 8 + 3 * 8 * 16384 * 2 * 1024 * 2
    # FlexGen's recent window over L - 2 layers (two layers' buffers stream the rest) gave up
    # the workspace's bytes, to one token
    per_token = 8 * (spec.num_layers - 2) * 2 * spec.kv_dim * 2
    gpu_tokens = chunked.steps[0].gpu_tokens
    lost = (without.steps[0].gpu_tokens - gpu_tokens) * per_token
    assert workspace <= lost < workspace + per_token


def _chunk_kernel_s(spec, batch: int, tokens: int, past: int) -> float:
    """One layer's kernel over a chunk of ``tokens`` after ``past`` prefilled: 3 us launch +
    the roofline of its GEMMs and attention over the past and (causally) its own tokens, and
    of its weights, the past's K and V read and its own written (H100 SXM, fp16)."""
    flops = (2 * spec.params_per_layer() * batch * tokens
             + 2 * spec.num_heads * spec.head_dim * batch * tokens * (tokens + 2 * past))
    hbm = 2 * spec.params_per_layer() + batch * (tokens + past) * 2 * spec.kv_dim * 2
    return 3 * US + max(flops / (989.5e12 * 0.70), hbm / (3350 * GB * 0.85))


def test_chunked_gpu_only_prefill_is_the_sum_of_its_chunk_kernels():
    """GPU-only, a 16k prompt in 4 chunks of 4k: TTFT = layers x the four chunk kernels + the
    LM head; the chunks' attention FLOPs add up to the whole prompt's (causal half of S^2)."""
    ttft, moved, _, spec = _prefill("gpu_only", "llama-2-7b", 16384, chunk=4096)
    chunks = [(4096 * c, 4096) for c in range(4)]
    assert sum(t * (t + 2 * s) for s, t in chunks) == 16384**2
    per_layer = sum(_chunk_kernel_s(spec, 1, t, s) for s, t in chunks)
    assert ttft == pytest.approx(spec.num_layers * per_layer + _lm_head_s(spec, 1), rel=1e-12)
    assert set(moved) == {"gpu0.compute", "gpu0.hbm"}  # nothing crosses PCIe
    assert moved["gpu0.hbm"] == pytest.approx(moved["gpu0.compute"], rel=1e-12)


def test_chunks_read_the_earlier_host_resident_kv_back_over_pcie():
    """FlexGen keeps llama-2-13b's oldest tokens in DDR: in chunks of 32k, each layer writes
    every chunk's host tokens out and reads back the earlier chunks' host tokens but the
    chunk just written (still in HBM): per layer sum over chunks c >= 2 of |host range before
    chunk c-1| x K+V bytes."""
    ttft, moved, plan, spec = _prefill("flexgen", "llama-2-13b", 131072, chunk=32768)
    lp = plan.layer
    start, end = lp.host_range()
    kv_token = 2 * spec.kv_dim * 2
    back = sum(max(0, min(end, s) - start) for s in range(0, 131072 - 32768, 32768)[1:])
    assert back > 0
    assert moved["gpu0.h2d"] == pytest.approx(spec.num_layers * back * kv_token, rel=1e-12)
    assert moved["gpu0.d2h"] == pytest.approx(
        spec.num_layers * lp.host_tokens * kv_token, rel=1e-12)


def test_an_attention_only_prefill_runs_attention_alone():
    """Attention-only (the executor validating the attention path): no projections, FFN,
    weights or LM head; each layer's kernel is the causal attention over the prompt (2 H d S^2
    FLOPs) writing its K and V, so TTFT = layers x (3 us + that at 989.5 TFLOP/s x 0.70)."""
    profile, spec = load_profile(H100), get_model("llama-2-7b")
    workload = Workload(batch=1, context=4096, gen=1, attention_only=True)
    plan = make_policy("gpu_only", spec, profile, workload, None).step_plan(4096)
    assert plan.offloaded_weight_bytes_per_layer == 0
    machine = Machine(simpy.Environment(), profile, record=False)
    engine = DecodeEngine(machine, spec, "fp16", "fp16", attention_only=True)
    ttft = engine.prefill(plan, 4096)
    flops = 2 * spec.num_heads * spec.head_dim * 4096**2
    kv_bytes = 4096 * 2 * spec.kv_dim * 2
    assert flops / (989.5e12 * 0.70) > kv_bytes / (3350 * GB * 0.85)
    assert ttft == pytest.approx(spec.num_layers * (3 * US + flops / (989.5e12 * 0.70)),
                                 rel=1e-12)
    moved = machine.recorder.bytes_by_resource()
    assert moved["gpu0.compute"] == pytest.approx(spec.num_layers * kv_bytes, rel=1e-12)
    # its workspace holds attention's tensors alone: Q, K, V, the output, an fp32 LSE per head
    assert prefill_activation_bytes(spec, 1, 4096, "fp16", attention_only=True) == (
        4096 * ((2 * 4096 + 2 * 4096) * 2 + 4 * 32))


def test_prefill_energy_is_the_energy_model_over_the_prefill_alone():
    """GPU-only, a 128-token prompt (memory-bound: under the board's power limit): the GPU draws idle power over TTFT plus pJ/FLOP x the layers'
    and LM head's FLOPs plus pJ/bit x their HBM bytes; the socket and the
    memory tiers their idle/background power over TTFT, the links nothing. Its cost is the
    capital over TTFT plus those joules' electricity; without a prefill both are NaN."""
    fidelity = Fidelity(decode_samples=0, accuracy=False)
    result = simulate(H100, "llama-2-7b", "gpu_only",
                      Workload(batch=1, context=128, gen=1, include_prefill=True),
                      fidelity=fidelity)
    profile, spec, t = load_profile(H100), get_model("llama-2-7b"), result.ttft_s
    flops = spec.num_layers * (2 * spec.params_per_layer() * 128
                               + 2 * spec.num_heads * spec.head_dim * 128**2)
    flops += 2 * spec.hidden_size * spec.vocab_size + 4 * spec.hidden_size
    hbm = (spec.num_layers * _layer_hbm_bytes(spec, 1, 128)
           + (spec.vocab_size + 1) * spec.hidden_size * 2)
    gpu = profile.gpus["gpu0"]
    expected = {"gpu0": gpu.idle_power_w * t + gpu.energy_pj_per_flop * 1e-12 * flops
                + gpu.hbm_energy_pj_per_bit * 1e-12 * 8 * hbm}
    assert expected["gpu0"] < 0.9 * gpu.tdp_w * t
    expected.update({n: s.idle_power_w * t for n, s in profile.sockets.items()})
    expected.update({n: m.background_power_w_per_gb * m.capacity_gb * t
                     for n, m in profile.tiers.items()})
    expected.update({n: 0.0 for n in profile.links})
    assert result.prefill_energy_j.keys() == expected.keys()
    for name, joules in expected.items():
        assert result.prefill_energy_j[name] == pytest.approx(joules, rel=1e-9, abs=1e-12)
    row = result.to_row()
    assert row["prefill_energy_j"] == pytest.approx(sum(expected.values()), rel=1e-9)
    assert row["prefill_usd"] == pytest.approx(
        result.capex_usd_per_s * t + sum(expected.values()) * result.electricity_usd_per_j,
        rel=1e-9)
    without = simulate(H100, "llama-2-7b", "gpu_only", Workload(batch=1, context=128, gen=1),
                       fidelity=fidelity).to_row()
    assert without["prefill_energy_j"] != without["prefill_energy_j"]
    assert without["prefill_usd"] != without["prefill_usd"]


def _pipeline(policy: str, model: str, batch: int, context: int, chunk: int, *,
              attention_only: bool = False, options: dict | None = None):
    """Run a chunked prefill; returns (TTFT, bytes each channel moved, the layer plan, the
    model, each chunk's (first position, tokens, host tokens written, host tokens read back))."""
    profile, spec = load_profile(H100), get_model(model)
    workload = Workload(batch=batch, context=context, gen=1, include_prefill=True,
                        prefill_chunk_tokens=chunk, attention_only=attention_only)
    plan = make_policy(policy, spec, profile, workload, options).step_plan(context)
    assert plan.offloaded_weight_bytes_per_layer == 0
    machine = Machine(simpy.Environment(), profile, record=False)
    engine = DecodeEngine(machine, spec, "fp16", "fp16", attention_only=attention_only)
    ttft = engine.prefill(plan, context, chunk)
    moved = {k: v for k, v in machine.recorder.bytes_by_resource().items() if v}
    h0, h1 = plan.layer.host_range()
    starts = list(range(0, context, chunk))
    chunks = [(s, min(chunk, context - s), max(0, min(h1, s + chunk) - max(h0, s)),
               max(0, min(h1, starts[c - 1]) - h0) if c >= 2 else 0)
              for c, s in enumerate(starts)]
    return ttft, moved, plan.layer, spec, chunks


def _pcie_s(bytes_: float) -> float:
    """A DMA between HBM and ddr0 either way: 1.11 us route latency + bytes at PCIe Gen5
    x16's 50 GB/s per direction (DDR5 moves 200 GB/s, it does not bind)."""
    return (1000 + 110) * NS + bytes_ / (50 * GB)


def test_where_pcie_binds_each_chunk_waits_for_its_read_back_not_for_the_write_before():
    """Attention-only llama-2-7b, batch 32, a 6k prompt in 1k chunks: FlexGen keeps 1678
    tokens of each layer in DDR (chunk 0 and part of chunk 1). Chunk c reads back the host
    tokens before chunk c-1 (chunk c-1's are still in HBM) on the host-to-device engine while
    chunk c-1's kernel runs and its write-out drains on the other engine; the reads (>= 10 ms)
    outlast the kernels (<= 4.4 ms), so per layer TTFT = kernel 0 + write 0 (the first read
    needs it on the host) + the reads back to back + the last kernel; the sum over chunks
    c >= 2 of max(kernel c-1, read c) plus those edges."""
    ttft, moved, lp, spec, chunks = _pipeline("flexgen", "llama-2-7b", 32, 6144, 1024,
                                              attention_only=True)
    kv_token = 32 * 2 * spec.kv_dim * 2
    assert [c[2] for c in chunks] == [1024, 654, 0, 0, 0, 0]
    assert [c[3] for c in chunks] == [0, 0, 1024, 1678, 1678, 1678]

    def kernel_s(tokens: int, past: int) -> float:
        flops = 2 * spec.num_heads * spec.head_dim * 32 * tokens * (tokens + 2 * past)
        hbm = 32 * (tokens + past) * 2 * spec.kv_dim * 2
        return 3 * US + max(flops / (989.5e12 * 0.70), hbm / (3350 * GB * 0.85))

    kernels = [kernel_s(t, s) for s, t, _, _ in chunks]
    reads = [_pcie_s(back * kv_token) if back else 0.0 for *_, back in chunks]
    write0, write1 = _pcie_s(1024 * kv_token), _pcie_s(654 * kv_token)
    assert all(reads[c] > kernels[c - 1] for c in range(2, 6))
    assert kernels[1] < write0 + reads[2] and write0 + write1 < write0 + reads[2]
    per_layer = (kernels[0] + write0 + sum(max(kernels[c - 1], reads[c]) for c in range(2, 6))
                 + kernels[5])
    assert ttft == pytest.approx(spec.num_layers * per_layer, rel=1e-12)
    assert moved["gpu0.h2d"] == pytest.approx(
        spec.num_layers * sum(c[3] for c in chunks) * kv_token, rel=1e-12)
    assert moved["gpu0.d2h"] == pytest.approx(spec.num_layers * 1678 * kv_token, rel=1e-12)


def test_where_compute_binds_the_copies_hide_behind_the_kernels():
    """Llama-3.1-8B in HBM, batch 8, a 128k prompt in 16k chunks: FlexGen keeps each layer's
    oldest 89589 tokens in DDR. Every write-out (<= 10.8 ms) and the read-back it gates
    (<= 59 ms) finish within the next kernel (>= 108 ms), so TTFT = layers x the chunk kernels
    + the LM head; the last layer's last write-out (chunk 5) lands before its kernels end."""
    ttft, moved, lp, spec, chunks = _pipeline(
        "flexgen", "llama-3.1-8b", 8, 131072, 16384, options={"weight_offload": "none"})
    kv_token = 8 * 2 * spec.kv_dim * 2
    assert lp.host_range() == (0, 89589)
    kernels = [_chunk_kernel_s(spec, 8, t, s) for s, t, _, _ in chunks]
    writes = [_pcie_s(out * kv_token) if out else 0.0 for _, _, out, _ in chunks]
    reads = [_pcie_s(back * kv_token) if back else 0.0 for *_, back in chunks]
    n = len(chunks)
    assert all(writes[c - 2] + reads[c] < kernels[c - 1] for c in range(2, n))
    assert all(writes[c] < kernels[(c + 1) % n] for c in range(n))
    assert writes[-1] == 0.0
    assert ttft == pytest.approx(spec.num_layers * sum(kernels) + _lm_head_s(spec, 8),
                                 rel=1e-12)
    assert moved["gpu0.h2d"] == pytest.approx(
        spec.num_layers * sum(c[3] for c in chunks) * kv_token, rel=1e-12)


@pytest.mark.parametrize("policy", ["gpu_only", "h2o"])
def test_a_policy_that_never_reads_kv_back_holds_no_landing_blocks(policy):
    """GPU-only keeps every token in HBM and H2O drops what leaves its budget: a chunked
    prefill reads nothing back, so the HBM set aside is the chunk's activations alone."""
    spec, profile = get_model("llama-3.1-8b"), load_profile(H100)
    workload = Workload(batch=1, context=32768, gen=1, include_prefill=True,
                        prefill_chunk_tokens=8192)
    pol = make_policy(policy, spec, profile, workload, None)
    assert pol.prefill_workspace_bytes == pytest.approx(
        8192 * (4096 + 3 * 14336) * 2, rel=1e-12)
