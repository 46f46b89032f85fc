"""Work per layer of a decode step, as pure functions of the model, the batch and the plan.

These are the numbers the simulator turns into kernels and flows, kept free of SimPy so that
they can be checked by hand (and reused by the analytic estimate in the scheduler).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hgsim.plan import CpuWork, GroupSelect, LayerPlan, Transfer
from hgsim.specs.model import DTYPE_BYTES, ModelSpec

if TYPE_CHECKING:
    from hgsim.accuracy.synthetic import AttentionModelSpec


@dataclass(frozen=True, slots=True)
class Work:
    flops: float = 0.0
    bytes_: float = 0.0


@dataclass(frozen=True, slots=True)
class LayerWork:
    """Everything one layer of one step does, for the whole batch.

    The host side is what ``hw_backend``'s executor does for the plan: the CPU scans keys
    (and, for dense partial attention, values) as a sequential stream; selected rows are
    gathered at random into a DRAM staging buffer (HybridGen's V rows, InfiniGen's K and V
    rows) or attended in place (HGCA); what crosses PCIe is uploaded from that buffer, except
    where the executor copies a contiguous range straight from the tier (FlexGen's KV stream,
    exact HybridGen's V block).

    HybridGen's top-k path under GQA (``plan.GroupSelect``): per query head, a row that several
    heads of a group pick is gathered and sent once per head (``G k`` rows per KV head); per KV
    group each distinct row is gathered and sent once per KV head (``host_rows_per_kv_head``),
    every head of the group receiving its logits over those rows, and the group's heads' logits
    over them are computed on gathered K rows (a second, unstaged gather of as many K rows).
    """

    qkv: Work  # QKV projection on the GPU
    attn: Work  # GPU attention over GPU-resident tokens
    merge: Work  # GPU work on what arrived from the host (softmax union / LSE / streamed KV)
    post: Work  # output projection + FFN
    speculate: Work  # InfiniGen's partial-key speculation kernel
    q_d2h_bytes: float  # what the host needs from the GPU first: the query (InfiniGen: indices)
    cpu_k_bytes: float  # keys the CPU scans (sequential stream)
    cpu_v_bytes: float  # values the CPU streams (dense partial attention)
    cpu_flops: float  # FLOPs of that scan pass
    cpu_topk_inserts: float = 0.0  # expected heap insertions of the per-head top-k
    gather_k_rows: float = 0.0  # K rows the CPU gathers at random (one per query head and pick)
    gather_v_rows: float = 0.0  # V rows likewise
    row_bytes: float = 0.0  # one gathered row (head_dim x KV dtype)
    rows_staged: bool = False  # gathered rows are copied into the staging buffer (not attended)
    gather_flops: float = 0.0  # attention (HGCA) or scores (grouped top-k) on gathered rows
    unstaged_rows: float = 0.0  # of the gathered rows, those used on the CPU only (not staged)
    staged_bytes: float = 0.0  # uploaded from the host staging buffer: logits, rows, outputs
    direct_k_bytes: float = 0.0  # DMA'd straight from the tiers holding K (FlexGen)
    direct_v_bytes: float = 0.0  # ... and V (FlexGen; exact HybridGen's V block)
    host_calls: int = 0  # host kernel calls, each paying the socket's op_overhead_us
    kv_update: Work = Work()  # sliding the HBM recent window: the oldest token leaves for host
    evict_bytes: float = 0.0  # K+V of that token, written to host memory
    append_host_bytes: float = 0.0  # the new token's K+V written to host (no HBM window)

    @property
    def gather_rows(self) -> float:
        return self.gather_k_rows + self.gather_v_rows

    @property
    def staged_share(self) -> float:
        """Share of the gathered rows copied into the staging buffer."""
        if not self.rows_staged or not self.gather_rows:
            return 0.0
        return (self.gather_rows - self.unstaged_rows) / self.gather_rows

    @property
    def to_gpu_bytes(self) -> float:
        """Everything the host path sends over PCIe for the layer."""
        return self.staged_bytes + self.direct_k_bytes + self.direct_v_bytes


def gemm_params(model: ModelSpec) -> tuple[int, int]:
    """One layer's weights by the GEMM that reads them: the fused QKV projection's, and the
    output projection's and FFN's together."""
    qkv = model.hidden_size * (model.q_dim + 2 * model.kv_dim)
    ffn = model.ffn_matrices * model.hidden_size * model.ffn_size
    return qkv, model.q_dim * model.hidden_size + ffn


def layer_work(
    model: ModelSpec, batch: int, lp: LayerPlan, kv_dtype: str, weight_dtype: str,
    *, attention_only: bool = False, attention: AttentionModelSpec | None = None,
) -> LayerWork:
    """``attention_only`` drops the projections and FFN: what hw_backend's executor runs when
    validating the attention path alone; ``attention`` is the synthetic attention whose
    heads' top-k overlap sizes a group union (None: the accuracy model's defaults)."""
    b_kv = DTYPE_BYTES[kv_dtype]
    b_w = DTYPE_BYTES[weight_dtype]
    heads, hd, hidden = model.num_heads, model.head_dim, model.hidden_size

    qkv_params, post_params = gemm_params(model)
    qkv = Work(2.0 * batch * qkv_params, qkv_params * b_w)
    post = Work(2.0 * batch * post_params, post_params * b_w)
    kv_row = model.kv_dim * b_kv  # K (or V) of one token, all kv heads
    if attention_only:
        # No projections, but the new token's K and V are still written into the cache: a
        # launch-bound kernel, as the executor's qkv op (the append) is.
        qkv, post = Work(0.0, 2.0 * batch * kv_row), Work()
    if projects_next_query(lp, attention_only=attention_only):
        # The host starts a layer early (HybridGen's logits, InfiniGen's speculation) on the
        # next layer's query projected from this layer's input: one more q projection per layer.
        qkv = Work(qkv.flops + 2.0 * batch * hidden * model.q_dim,
                   qkv.bytes_ + hidden * model.q_dim * b_w)
    gpu_resident = lp.gpu_tokens + lp.selected_on_gpu
    attn = Work(4.0 * batch * heads * hd * gpu_resident, 2.0 * batch * gpu_resident * kv_row)

    host, sel = lp.host_tokens, lp.host_selected
    row = hd * b_kv  # one head's K or V row of one token
    picks = batch * heads * sel  # (sequence, query head, selected token) triples
    q_bytes = batch * heads * hd * 2.0  # fp16 query
    partial_bytes = batch * heads * (hd + 1) * 4.0  # fp32 output and LSE per head
    logit_bytes = picks * 4.0
    logit_flops = 2.0 * batch * heads * hd * host
    exact = sel == host

    merge = speculate = Work()
    fields: dict[str, float | bool | int] = {}
    q_d2h = cpu_k = cpu_v = cpu_flops = 0.0
    if lp.speculate_key_fraction and host:
        # InfiniGen reads a fraction of every key's channels that it keeps in HBM.
        partial = lp.speculate_key_fraction
        speculate = Work(2.0 * batch * heads * hd * partial * lp.context,
                         batch * lp.context * kv_row * partial)

    if lp.transfer is Transfer.KV_ALL:  # FlexGen: the host range DMA'd from its tiers
        fields.update(direct_k_bytes=batch * host * kv_row, direct_v_bytes=batch * host * kv_row)
        merge = Work(4.0 * batch * heads * hd * host, 2.0 * batch * host * kv_row)
    elif lp.transfer is Transfer.KV_SELECTED:  # InfiniGen: the CPU gathers what the GPU picked
        q_d2h = picks * 8.0  # int64 indices of the speculated tokens
        fields.update(gather_k_rows=picks, gather_v_rows=picks, row_bytes=row,
                      rows_staged=True, staged_bytes=2.0 * picks * row, host_calls=2)
        merge = Work(4.0 * batch * heads * hd * sel, 2.0 * picks * row)
    elif lp.cpu_work is CpuWork.LOGITS_TOPK:  # HybridGen
        q_d2h, cpu_k = q_bytes, batch * host * kv_row
        cpu_flops = logit_flops
        if exact:  # every host token: plain logits, V crosses as the range's block
            fields.update(staged_bytes=batch * heads * host * 4.0,
                          direct_v_bytes=batch * host * kv_row, host_calls=1)
            merge = Work(2.0 * batch * heads * hd * host,
                         batch * host * kv_row + batch * heads * host * 4.0)
        elif lp.group_selection(model.gqa_group) is GroupSelect.PER_HEAD:
            cpu_flops += 2.0 * batch * heads * host  # top-k comparisons
            fields.update(cpu_topk_inserts=_heap_inserts(batch * heads, host, sel),
                          gather_v_rows=picks, row_bytes=row, rows_staged=True,
                          staged_bytes=logit_bytes + picks * row, host_calls=2)
            merge = Work(2.0 * batch * heads * hd * sel, picks * row + logit_bytes)
        else:  # per KV group: distinct rows, gathered and sent once per KV head
            kv_heads = model.num_kv_heads
            per_kv = host_rows_per_kv_head(model, lp, attention)
            rows = batch * kv_heads * per_kv  # distinct (sequence, KV head, token) rows
            scored = batch * heads * per_kv  # every head's logit over its group's rows
            if lp.group_selection(model.gqa_group) is GroupSelect.GROUP_UNION:
                # per-head heaps, then each group's candidates merged into their union
                cpu_flops += 2.0 * batch * heads * host
                inserts = _heap_inserts(batch * heads, host, sel) + batch * heads * sel
            else:  # one heap per group over the aggregate of the group's logits
                cpu_flops += batch * heads * host + 2.0 * batch * kv_heads * host
                inserts = _heap_inserts(batch * kv_heads, host, sel)
            fields.update(cpu_topk_inserts=inserts, gather_k_rows=rows, gather_v_rows=rows,
                          unstaged_rows=rows, row_bytes=row, rows_staged=True,
                          gather_flops=2.0 * scored * hd,
                          staged_bytes=scored * 4.0 + rows * row, host_calls=2)
            merge = Work(2.0 * scored * hd, rows * row + scored * 4.0)
    elif lp.cpu_work is CpuWork.PARTIAL_ATTENTION or (lp.cpu_work is CpuWork.SPARSE_PARTIAL
                                                       and exact):
        q_d2h, cpu_k, cpu_v = q_bytes, batch * host * kv_row, batch * host * kv_row
        cpu_flops = 2.0 * logit_flops + 3.0 * batch * heads * host  # + exp and sums
        fields.update(staged_bytes=partial_bytes, host_calls=1)
    elif lp.cpu_work is CpuWork.SPARSE_PARTIAL:  # HGCA: top-k, then attention over the picks
        q_d2h, cpu_k = q_bytes, batch * host * kv_row
        cpu_flops = logit_flops + 2.0 * batch * heads * host
        fields.update(cpu_topk_inserts=_heap_inserts(batch * heads, host, sel),
                      gather_k_rows=picks, gather_v_rows=picks, row_bytes=row,
                      gather_flops=4.0 * batch * heads * hd * sel + 3.0 * picks,
                      staged_bytes=partial_bytes, host_calls=2)
    if lp.transfer is Transfer.PARTIAL_OUTPUT:
        merge = Work(4.0 * batch * heads * hd, 2 * partial_bytes)
    if not host or lp.host_evicted:
        merge, fields, q_d2h, cpu_k, cpu_v, cpu_flops = Work(), {}, 0.0, 0.0, 0.0, 0.0

    # A recent window in HBM in front of host-resident tokens slides every step: the new token
    # comes in, the oldest goes out to host memory. A small kernel of its own (launch-bound),
    # like the cache-write kernels of serving systems, and the token's K and V written to the
    # host tiers; a window that holds every token (or no window) moves nothing. Without a
    # window the new token itself is written to host memory.
    kv_update = Work()
    if host > 0 and not lp.host_evicted:
        if lp.gpu_recent_tokens > 0:
            kv_update = Work(0.0, 2.0 * 2.0 * batch * kv_row)  # K+V of one token in and one out
            fields["evict_bytes"] = 2.0 * batch * kv_row
        else:
            fields["append_host_bytes"] = 2.0 * batch * kv_row

    return LayerWork(qkv, attn, merge, post, speculate, q_d2h, cpu_k, cpu_v, cpu_flops,
                     kv_update=kv_update, **fields)


def projects_next_query(lp: LayerPlan, *, attention_only: bool = False) -> bool:
    """Whether a layer's qkv also projects the next layer's query (the host starts that layer
    early: HybridGen's look-ahead logits, InfiniGen's speculation); never attention-only."""
    return not attention_only and bool(lp.host_tokens) and not lp.host_evicted and (
        lp.transfer is Transfer.KV_SELECTED
        or (lp.lookahead and lp.cpu_work is not CpuWork.NONE))


def lm_head_work(model: ModelSpec, batch: int, weight_dtype: str) -> Work:
    """The final norm and LM head, once per step: every sequence's hidden state times the
    hidden x vocab matrix (a GEMV that streams the whole matrix: 1.05 GB for Llama-3.1-8B in
    bf16), after a norm that reads a hidden-wide weight vector. The logits it writes (vocab
    floats per sequence) are left out: under a thousandth of the matrix at decode's batches."""
    b_w = DTYPE_BYTES[weight_dtype]
    hidden, vocab = model.hidden_size, model.vocab_size
    return Work(2.0 * batch * hidden * vocab + 4.0 * batch * hidden, (vocab + 1) * hidden * b_w)


def host_rows_per_kv_head(model: ModelSpec, lp: LayerPlan,
                          attention: AttentionModelSpec | None = None) -> float:
    """Rows HybridGen's top-k path gathers and sends per (sequence, KV head) for ``lp``.

    Per query head ``G k`` (a row several heads pick counts once per head); per KV group the
    distinct rows: ``k`` for a shared top-k, the expected size of the union of the group's
    per-head top-k sets for a union (``accuracy.groups.expected_union_rows``: from the overlap
    of the heads' top-k sets on the accuracy model's synthetic attention, between k and
    ``min(G k, host tokens)``; ``attention`` is that synthetic attention, None its defaults).
    An exact plan sends every host row once per KV head."""
    group, k = model.gqa_group, lp.host_selected
    if lp.exact:
        return float(lp.host_tokens)
    mode = lp.group_selection(group)
    if mode is GroupSelect.PER_HEAD:
        return float(group * k)
    if mode is GroupSelect.GROUP_SHARED:
        return float(k)
    from hgsim.accuracy.groups import expected_union_rows  # numpy/scipy only when needed

    return expected_union_rows(lp.host_tokens, k, group, attention)


def _heap_inserts(heaps: float, n: float, k: float) -> float:
    """Expected insertions of ``heaps`` bounded heaps of k over n scores without structure:
    k * (1 + ln(n/k)) each (0 when every score is kept)."""
    if not 0 < k < n:
        return 0.0
    return heaps * k * (1.0 + math.log(n / k))


def prefill_chunks(prompt: int, chunk_tokens: int | None) -> list[tuple[int, int]]:
    """(first position, tokens) of each chunk the prompt is prefilled in, in order; one chunk
    of the whole prompt when ``chunk_tokens`` is None or not shorter than it."""
    size = prompt if chunk_tokens is None else min(chunk_tokens, prompt)
    return [(start, min(size, prompt - start)) for start in range(0, prompt, size)]


# ``prefill_chunk_tokens: auto`` picks the chunk size itself (``hgsim.prefill_chunk``)
PREFILL_CHUNK_AUTO = "auto"
# The smallest chunk auto weighs, per sequence: vLLM's first chunked-prefill default token
# budget, 512 (the best inter-token latency on an A100 in its benchmark:
# https://github.com/vllm-project/vllm/pull/4580). Halving the chunk halves the workspace but
# doubles the host read-backs (prompt^2 / chunk) and re-reads every weight twice as often.
PREFILL_AUTO_FLOOR_TOKENS = 512


def prefill_chunk_candidates(prompt: int) -> list[int]:
    """Chunk sizes auto weighs, largest first: the whole prompt, then the powers of two below
    it down to ``PREFILL_AUTO_FLOOR_TOKENS`` (the whole prompt alone when no shorter)."""
    below, size = [], PREFILL_AUTO_FLOOR_TOKENS
    while size < prompt:
        below.append(size)
        size *= 2
    return [prompt, *reversed(below)]


def prefill_layer_work(model: ModelSpec, batch: int, tokens: int, weight_dtype: str,
                       kv_dtype: str, *, past_tokens: int = 0,
                       attention_only: bool = False) -> Work:
    """One layer of prefill over a chunk of ``tokens`` prompt positions per sequence, after
    ``past_tokens`` already prefilled (0: the whole prompt at once): GEMMs plus attention over
    the earlier tokens and, causally, the chunk's own (half of tokens^2). It reads the layer's
    weights and the earlier tokens' K and V, and writes the chunk's K and V into HBM. Summed
    over the chunks of a prompt the FLOPs are the whole prompt's: (sum of chunks)^2 = sum of
    squares + twice the cross terms. ``attention_only`` keeps the attention and the K and V
    alone (no projections, FFN or weights: what the executor runs when validating attention)."""
    kv_token = model.kv_bytes_per_token_layer(kv_dtype)
    per_pair = 2.0 * model.num_heads * model.head_dim * batch  # causal: half of 4 H d
    attention = per_pair * tokens * (tokens + 2.0 * past_tokens)
    kv_bytes = batch * (tokens + past_tokens) * kv_token  # the chunk's written, the past read
    if attention_only:
        return Work(attention, kv_bytes)
    linear = model.linear_flops_per_token_layer() * batch * tokens
    return Work(linear + attention, model.layer_weight_bytes(weight_dtype) + kv_bytes)


def prefill_chunk_works(model: ModelSpec, past_tokens: int, tokens: int, weight_dtype: str,
                        kv_dtype: str, *, attention_only: bool = False
                        ) -> tuple[Work, Work, Work]:
    """One layer of a prompt's chunk riding on a decode step (``DecodeEngine.step``): what it
    adds to the fused QKV and post GEMMs (their FLOPs and the chunk's rows in and out; the
    weights are the step's, read once) and its attention kernel (``prefill_layer_work``'s
    attention over the earlier tokens and its own). ``attention_only``: the attention alone."""
    attention = prefill_layer_work(model, 1, tokens, weight_dtype, kv_dtype,
                                   past_tokens=past_tokens, attention_only=True)
    if attention_only:
        return Work(), Work(), attention
    act = DTYPE_BYTES[activation_dtype(weight_dtype)]
    qkv_params, post_params = gemm_params(model)
    qkv = Work(2.0 * tokens * qkv_params,
               tokens * (model.hidden_size + model.q_dim + 2 * model.kv_dim) * act)
    post = Work(2.0 * tokens * post_params, tokens * (model.q_dim + model.hidden_size) * act)
    return qkv, post, attention


def activation_dtype(weight_dtype: str) -> str:
    """What activations are kept in: fp32 with fp32 weights, else 16-bit (int8 and fp8
    weights are dequantised into fp16/bf16 GEMMs)."""
    return "fp32" if weight_dtype == "fp32" else "fp16"


def prefill_activation_bytes(model: ModelSpec, batch: int, tokens: int, weight_dtype: str,
                             *, attention_only: bool = False) -> float:
    """Peak HBM that one layer's prefill of a chunk of ``tokens`` positions per sequence holds
    beyond weights and the KV cache: the larger of the tensors live at once in attention
    (the residual stream, the fused QKV output, the attention output, fp32 log-sum-exp per head:
    FlashAttention's working set is O(tokens x heads x head_dim), never tokens^2) and in the FFN
    (residual, the gate and up outputs and their activated product for SwiGLU, up and its
    activation otherwise: ``ffn_matrices`` x ffn_size wide). Attention-only holds the attention's
    tensors alone."""
    b = DTYPE_BYTES[activation_dtype(weight_dtype)]
    attention = (2 * model.q_dim + 2 * model.kv_dim) * b + 4.0 * model.num_heads
    if attention_only:
        return batch * tokens * attention
    # as many ffn_size-wide tensors live as the FFN has matrices: gate, up and their product
    # for SwiGLU, up and its activation otherwise
    residual, ffn = model.hidden_size * b, model.ffn_matrices * model.ffn_size * b
    return batch * tokens * (residual + max(attention, ffn))


# A chunked prefill that reads K and V back from host memory holds three blocks of one chunk's
# K and V beside its activations: two landing blocks (double buffer: the kernel attends over
# one while the host-to-device engine fills the other; earlier tokens come back through them
# block by block) and the chunk just written, kept in HBM for the next chunk's kernel while
# its write-out drains (its own K and V are part of the activations).
PREFILL_PIPELINE_KV_BLOCKS = 3


def prefill_workspace_bytes(model: ModelSpec, batch: int, prompt: int,
                            chunk_tokens: int | None, weight_dtype: str, kv_dtype: str,
                            *, attention_only: bool = False, reads_back: bool = True) -> float:
    """HBM the prefill needs on top of weights and the KV the plan keeps: one layer's peak
    activations over a chunk, and when the prompt is chunked and the plan may keep K and V in
    host memory (``reads_back``), the pipeline's blocks of one chunk's K and V each
    (``PREFILL_PIPELINE_KV_BLOCKS``)."""
    tokens = prefill_chunks(prompt, chunk_tokens)[0][1]
    peak = prefill_activation_bytes(model, batch, tokens, weight_dtype,
                                    attention_only=attention_only)
    if tokens < prompt and reads_back:
        peak += (PREFILL_PIPELINE_KV_BLOCKS * batch * tokens
                 * model.kv_bytes_per_token_layer(kv_dtype))
    return peak
