"""Work per layer of a decode step, as pure functions of the model, the batch and the plan.

These are the numbers the simulator turns into kernels and flows, kept free of SimPy so that
they can be checked by hand (and reused by the analytic estimate in the scheduler).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hgsim.plan import CpuWork, LayerPlan, Transfer
from hgsim.specs.model import DTYPE_BYTES, ModelSpec


@dataclass(frozen=True, slots=True)
class Work:
    flops: float = 0.0
    bytes_: float = 0.0


@dataclass(frozen=True, slots=True)
class LayerWork:
    """Everything one layer of one step does, for the whole batch."""

    qkv: Work  # QKV projection on the GPU
    attn: Work  # GPU attention over GPU-resident tokens
    merge: Work  # GPU work on what arrived from the host (softmax union / LSE / streamed KV)
    post: Work  # output projection + FFN
    speculate: Work  # InfiniGen's partial-key speculation kernel
    q_d2h_bytes: float  # query sent to the CPU
    cpu_k_bytes: float  # keys the CPU scans
    cpu_v_bytes: float  # values the CPU reads (dense or gathered)
    cpu_flops: float
    to_gpu_v_bytes: float  # V rows (or K+V rows) read from host tiers and sent over PCIe
    to_gpu_k_bytes: float  # K rows sent over PCIe (streaming policies)
    to_gpu_small_bytes: float  # logits or partial outputs (from a DRAM staging buffer)
    cpu_topk_inserts: float = 0.0  # expected heap insertions of the per-head top-k
    cpu_gather_rows: float = 0.0  # scattered V rows the CPU copies (one per head and selection)
    kv_update: Work = Work()  # sliding the HBM recent window: the oldest token leaves for host


def layer_work(
    model: ModelSpec, batch: int, lp: LayerPlan, kv_dtype: str, weight_dtype: str,
    *, attention_only: bool = False,
) -> LayerWork:
    """``attention_only`` drops the projections and FFN: what hw_backend's executor runs when
    validating the attention path alone."""
    b_kv = DTYPE_BYTES[kv_dtype]
    b_w = DTYPE_BYTES[weight_dtype]
    heads, hd, hidden = model.num_heads, model.head_dim, model.hidden_size
    ffn_mats = 3 if model.ffn_kind == "swiglu" else 2

    qkv_params = hidden * (model.q_dim + 2 * model.kv_dim)
    post_params = model.q_dim * hidden + ffn_mats * hidden * model.ffn_size
    qkv = Work(2.0 * batch * qkv_params, qkv_params * b_w)
    post = Work(2.0 * batch * post_params, post_params * b_w)
    kv_row = model.kv_dim * b_kv  # K (or V) of one token, all kv heads
    if attention_only:
        # No projections, but the new token's K and V are still written into the cache: a
        # launch-bound kernel, as the executor's qkv op (the append) is.
        qkv, post = Work(0.0, 2.0 * batch * kv_row), Work()
    gpu_resident = lp.gpu_tokens + lp.selected_on_gpu
    attn = Work(4.0 * batch * heads * hd * gpu_resident, 2.0 * batch * gpu_resident * kv_row)

    host, sel = lp.host_tokens, lp.host_selected
    q_bytes = batch * heads * hd * 2.0  # fp16 query
    partial_bytes = batch * heads * (hd + 1) * 4.0  # fp32 output and LSE per head
    logit_bytes = batch * heads * sel * 4.0
    v_rows_q = batch * heads * sel * hd * b_kv  # one V row per query head per selected token

    merge = Work()
    speculate = Work()
    q_d2h = cpu_k = cpu_v = cpu_flops = v_gpu = k_gpu = small = inserts = rows = 0.0
    if lp.transfer is Transfer.KV_ALL:
        k_gpu = v_gpu = batch * host * kv_row
        merge = Work(4.0 * batch * heads * hd * host, 2.0 * batch * host * kv_row)
    elif lp.transfer is Transfer.KV_SELECTED:
        k_gpu = v_gpu = batch * sel * kv_row
        merge = Work(4.0 * batch * heads * hd * sel, 2.0 * batch * sel * kv_row)
    elif lp.transfer is Transfer.LOGITS_AND_V:
        v_gpu, small = v_rows_q, logit_bytes
        merge = Work(2.0 * batch * heads * hd * sel, v_rows_q + logit_bytes)
    elif lp.transfer is Transfer.PARTIAL_OUTPUT:
        small = partial_bytes
        merge = Work(4.0 * batch * heads * hd, 2 * partial_bytes)

    if lp.speculate_key_fraction and host:
        # InfiniGen reads a fraction of every key's channels that it keeps in HBM.
        partial = lp.speculate_key_fraction
        speculate = Work(2.0 * batch * heads * hd * partial * lp.context, batch * lp.context * kv_row * partial)

    if lp.cpu_work is not CpuWork.NONE:
        q_d2h = q_bytes
        cpu_k = batch * host * kv_row
        logit_flops = 2.0 * batch * heads * hd * host
        if lp.cpu_work in (CpuWork.LOGITS_TOPK, CpuWork.SPARSE_PARTIAL) and 0 < sel < host:
            # a bounded heap of k over n scores without structure: k * (1 + ln(n/k)) inserts
            inserts = batch * heads * sel * (1.0 + math.log(host / sel))
        if lp.cpu_work is CpuWork.LOGITS_TOPK:
            cpu_flops = logit_flops + 2.0 * batch * heads * host  # scan + top-k comparisons
            rows = batch * heads * sel
        elif lp.cpu_work is CpuWork.PARTIAL_ATTENTION:
            cpu_v = batch * host * kv_row
            cpu_flops = 2.0 * logit_flops + 3.0 * batch * heads * host  # + exp and sums
        elif lp.cpu_work is CpuWork.SPARSE_PARTIAL:
            cpu_v = v_rows_q
            cpu_flops = logit_flops + 2.0 * batch * heads * host + 2.0 * batch * heads * hd * sel

    # A recent window in HBM in front of host-resident tokens slides every step: the new token
    # comes in, the oldest goes out to host memory. A small kernel of its own (launch-bound),
    # like the cache-write kernels of serving systems; a window that holds every token (or no
    # window) moves nothing.
    kv_update = Work()
    if lp.gpu_recent_tokens > 0 and host > 0 and not lp.host_evicted:
        kv_update = Work(0.0, 2.0 * 2.0 * batch * kv_row)  # K+V of one token in and one out

    return LayerWork(qkv, attn, merge, post, speculate, q_d2h, cpu_k, cpu_v, cpu_flops,
                     v_gpu, k_gpu, small, inserts, rows, kv_update)


def prefill_layer_work(model: ModelSpec, batch: int, prompt: int, weight_dtype: str) -> Work:
    """One layer of prefill over the whole prompt: GEMMs plus causal attention (half of n^2)."""
    linear = model.linear_flops_per_token_layer() * batch * prompt
    attention = 2.0 * model.num_heads * model.head_dim * prompt * prompt * batch  # causal: half
    return Work(linear + attention, model.layer_weight_bytes(weight_dtype))
