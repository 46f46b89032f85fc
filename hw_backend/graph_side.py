"""The device half of every plan kind as captured CUDA graphs over static buffers.

Per layer the executor issues four device ops (qkv, attention, merge, post; InfiniGen adds its
speculation). Here each op is one replay of a graph captured per shape bucket
(``graphs.GraphCache``, ``buckets.token_bucket``) from a fixed-shape program
(``graph_programs``), so the device runs a layer's kernels back to back instead of waiting for
Python to issue them. What makes that possible:

* static inputs: queries and the new token's K/V live in ``StepBuffers`` (a model's device work
  writes them in place; an attention-only caller's tensors are copied in);
* per-step counts on the device: at the start of a step one host-to-device copy of a small
  table (per layer: resident slots, the new token's slot, host results, host range, position)
  gives every graph the counts that its bucket pads;
* fixed device slots: the new token is written into its slot by ``index_copy_`` inside the qkv
  graph (a sliding window reuses the leaving token's slot, ``kv_store``), and every new token is
  also written to host memory after its step (write-through: one transfer of all layers' new
  tokens, then a host-worker job), so a token leaving the device later needs no transfer;
* landing buffers: host results are copied on the copy stream into device buffers sized to
  their bucket (zeroed once, so padding is finite); layers alternate between two sets, which
  is safe because a layer's merge is done before the host produces layer i+2's results;
* outputs: each op writes into buffers allocated outside the graphs, so a replay (or the
  warm-up runs of a capture) can be repeated without harm.

Without CUDA the same programs run eagerly over the same buffers (``GraphCache(capture=False)``),
which is how the tests check this path's results against the eager one on a CPU.
"""

from __future__ import annotations

import torch

from hw_backend.buckets import token_bucket
from hw_backend.device_side import DeviceSide, copy_blocks
from hw_backend.graph_programs import (
    lse_merge_pair,
    masked_partial_attention,
    rows_merge,
    softmax_union_padded,
    speculate_topk,
    stream_merge,
)
from hw_backend.graphs import GraphCache, buffer_key
from hw_backend.layer_state import HostPath, LayerState
from hw_backend.step_buffers import StepBuffers

#: Columns of the per-step count table (one row per layer).
N_DEVICE, APPEND_SLOT, HOST_COUNT, HOST_START, HOST_END, POSITION = range(6)
FIELDS = 6


def host_count(state: LayerState) -> int:
    """How many host columns reach the device for the layer's merge (0: none counted)."""
    lp, path = state.lp, state.path
    if path is HostPath.LOGITS:
        return lp.host_tokens if lp.exact else lp.host_selected
    if path is HostPath.STREAM:
        return lp.host_tokens
    if path is HostPath.SPECULATE:
        return lp.host_selected
    return 0


class GraphDeviceSide(DeviceSide):
    """See the module docstring."""

    def __init__(self, ex, step_buffers: StepBuffers | None = None) -> None:
        super().__init__(ex)
        accel = ex.accel
        self.graphs = GraphCache(capture=not accel.standin,
                                 device=None if accel.standin else accel.device)
        self.buffers = step_buffers
        self._meta_host: torch.Tensor | None = None
        self._meta_dev: torch.Tensor | None = None
        self._landing: dict[tuple, torch.Tensor] = {}
        self._static: dict[tuple, torch.Tensor] = {}
        self._tokens_host: list[torch.Tensor] = []
        self._parity = 0  # which of the two transfer buffers this step's new tokens use
        self._flushed = None  # the previous step's write-through job
        self._empty_device_part: set[int] = set()

    # ------------------------------------------------------------------ buffers
    def _buffer(self, key: tuple, shape: tuple[int, ...], dtype: torch.dtype, *,
                fill: float = 0.0) -> torch.Tensor:
        """A device buffer allocated once per key (filled with ``fill``)."""
        buf = self._static.get(key)
        if buf is None or tuple(buf.shape) != shape or buf.dtype != dtype:
            buf = torch.full(shape, fill, dtype=dtype, device=self.ex.accel.device)
            self._static[key] = buf
        return buf

    def _landing_buffer(self, layer: int, name: str, shape: tuple[int, ...],
                        dtype: torch.dtype) -> torch.Tensor:
        """Where host results land: one of two sets by layer parity, sized to a bucket."""
        key = (layer % 2, name, shape, dtype)
        buf = self._landing.get(key)
        if buf is None:
            buf = torch.zeros(shape, dtype=dtype, device=self.ex.accel.device)
            self._landing[key] = buf
        return buf

    def _step_buffers(self, state: LayerState) -> StepBuffers:
        store, q = self.ex.store, state.q
        shape = {"layers": len(store), "batch": store.batch, "heads": q.shape[1],
                 "kv_heads": store.kv_heads, "head_dim": store.head_dim, "kv_dtype": store.dtype}
        if self.buffers is None or not self.buffers.matches(**shape):
            self.buffers = StepBuffers.allocate(self.ex.accel.device, **shape)
        return self.buffers

    def _meta(self, layers: int) -> torch.Tensor:
        """The step-count table on the device. Allocated empty, not zeroed: this runs on the
        caller's stream, where a zero fill would be unordered with the compute queue's copy of
        the table into it (and could land after it); that copy writes every row each step."""
        if self._meta_dev is None or self._meta_dev.shape[0] != layers:
            self._meta_host = self.ex.accel.host_empty((layers, FIELDS), torch.int64)
            self._meta_dev = torch.empty(layers, FIELDS, dtype=torch.int64,
                                         device=self.ex.accel.device)
        return self._meta_dev

    def _field(self, layer: int, column: int) -> torch.Tensor:
        return self._meta_dev[layer, column : column + 1]

    @staticmethod
    def _stage(static: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        """``given`` copied into ``static`` unless it is that buffer (a model writes in place)."""
        if given is not static and given.data_ptr() != static.data_ptr():
            static.copy_(given)
        return static

    # ------------------------------------------------------------------ compute queue
    def _await_flush(self) -> None:
        """Device reads of host memory (promotion, FlexGen's stream) wait for the previous
        step's write-through; host work is ordered after it on the host worker anyway."""
        if self._flushed is not None:
            self._flushed.wait()
            self._flushed = None

    writes_through = True  # every new device token also reaches host memory (end_step)

    def repartition(self, state, appending) -> None:
        self._await_flush()
        super().repartition(state, appending)

    def begin_step(self, run) -> None:
        """Book every layer's new token and send the step's counts to the device, once."""
        meta_dev = self._meta(len(run.layers))

        def fill() -> None:
            table = self._meta_host.numpy()
            for state in run.layers:
                kv, lp = state.kv, state.lp
                slot = kv.claim_append_slot() if run.appending else None
                state.landing["append_slot"] = slot
                state.landing["appended"] = run.appending
                start, end = lp.host_range()
                table[state.index] = (kv.resident, -1 if slot is None else slot,
                                      host_count(state), start, end, kv.length - 1)
            meta_dev.copy_(self._meta_host, non_blocking=True)

        marker = self.ex.accel.compute.submit(fill, label="step counts")
        run.layers[-1].compute.append(marker)

    def qkv(self, state, new_kv, work) -> None:
        i, kv = state.index, state.kv
        bufs = self._step_buffers(state)
        self._stage(bufs.q[i], state.q)
        k_new, v_new = bufs.new_kv(i)
        if new_kv is not None:
            self._stage(k_new, new_kv[0])
            self._stage(v_new, new_kv[1])
        slot = state.landing.get("append_slot")
        partial = kv.partial_k is not None and new_kv is not None
        if work is None and slot is None and not partial:
            return
        slot_index, position = self._field(i, APPEND_SLOT), self._field(i, POSITION)

        def program() -> None:
            if work is not None:
                work.before_attention(i)
            if slot is not None:
                kv.dev_k.index_copy_(2, slot_index, k_new)
                kv.dev_v.index_copy_(2, slot_index, v_new)
            if partial:
                kv.partial_k.index_copy_(2, position, kv._key_channels(k_new))

        key = ("qkv", i, _work_key(work, i), slot is not None, partial,
               buffer_key(kv.dev_k, kv.dev_v, kv.partial_k, bufs.new_tokens, self._meta_dev))
        self.graphs.run(key, program, "qkv")

    def _device_part(self, i: int, batch: int, heads: int, dim: int):
        out = self._buffer((i, "device out"), (batch, heads, dim), torch.float32)
        lse = self._buffer((i, "device lse"), (batch, heads), torch.float32,
                           fill=float("-inf"))
        return out, lse

    def attention(self, state) -> None:
        i, kv = state.index, state.kv
        bufs = self._step_buffers(state)
        q = bufs.q[i]
        out, lse = self._device_part(i, *q.shape)
        n = kv.resident
        if n == 0:  # nothing resident: the empty block (output 0, LSE -inf)
            if i not in self._empty_device_part:
                out.zero_()
                lse.fill_(float("-inf"))
                self._empty_device_part.add(i)
            state.device_part = (out, lse)
            return
        self._empty_device_part.discard(i)
        bucket = token_bucket(n, limit=kv.dev_k.shape[2])
        valid, scale = self._field(i, N_DEVICE), self.ex.scale

        def program() -> None:
            o, l_ = masked_partial_attention(q, kv.dev_k[:, :, :bucket], kv.dev_v[:, :, :bucket],
                                             valid, scale)
            out.copy_(o)
            lse.copy_(l_)

        key = ("attention", i, bucket, buffer_key(q, kv.dev_k, kv.dev_v, out, self._meta_dev))
        self.graphs.run(key, program, "attention")
        state.device_part = (out, lse)

    def speculate(self, state) -> None:
        i, kv, lp = state.index, state.kv, state.lp
        bufs = self._step_buffers(state)
        given = state.speculative_q
        spec = (given if given.data_ptr() == bufs.ahead_q[i].data_ptr()
                else self._stage(self._buffer((i, "speculative q"), tuple(given.shape),
                                              torch.float32), given))
        _, end = lp.host_range()
        columns = token_bucket(end, limit=kv.partial_k.shape[2])
        chosen = min(token_bucket(lp.host_selected), columns)
        index = self._buffer((i, "speculated", chosen), (spec.shape[0], spec.shape[1], chosen),
                             torch.int64)
        start_at, end_at = self._field(i, HOST_START), self._field(i, HOST_END)

        def program() -> None:
            query = kv.partial_query(spec.to(kv.dtype))
            index.copy_(speculate_topk(query, kv.partial_k[:, :, :columns], start_at, end_at,
                                       chosen))

        key = ("speculate", i, columns, chosen,
               buffer_key(spec, kv.partial_k, kv.partial_channels, index, self._meta_dev))
        self.graphs.run(key, program, "speculate")
        state.landing["speculated"] = index
        state.speculated = index[..., : lp.host_selected]

    def merge(self, state) -> None:
        i = state.index
        device_part = state.device_part
        if state.path is None:
            state.output = device_part[0]
            return
        bufs = self._step_buffers(state)
        q, land, scale = bufs.q[i], state.landing, self.ex.scale
        out = self._buffer((i, "output"), tuple(q.shape), torch.float32)
        count = self._field(i, HOST_COUNT)
        path = state.path
        if path is HostPath.LOGITS:
            per_head = "rows" in land
            values = land["rows"] if per_head else land["values"]
            kv_heads = land.get("kv_heads")  # rows per KV group: their count crossed with them
            count = land.get("count", count)

            def program() -> None:
                out.copy_(softmax_union_padded(device_part, land["logits"], values, count,
                                               per_head=per_head, kv_heads=kv_heads)[0])

            inputs = (land["logits"], values)
        elif path is HostPath.PARTIAL:

            def program() -> None:
                out.copy_(lse_merge_pair(device_part, (land["out"], land["lse"]))[0])

            inputs = (land["out"], land["lse"])
        elif path is HostPath.STREAM:

            def program() -> None:
                out.copy_(stream_merge(device_part, q, land["k"], land["v"], count, scale)[0])

            inputs = (land["k"], land["v"])
        else:  # SPECULATE
            columns = land["bucket"]

            def program() -> None:
                out.copy_(rows_merge(device_part, q, land["k_rows"], land["v_rows"], count,
                                     columns, scale)[0])

            inputs = (land["k_rows"], land["v_rows"])
        key = ("merge", i, path.value, tuple(t.shape for t in inputs), land.get("kv_heads"),
               buffer_key(q, out, *device_part, *inputs, count, self._meta_dev))
        self.graphs.run(key, program, "merge")
        state.output = out

    def post(self, state, work) -> None:
        i, output = state.index, state.output
        key = ("post", i, _work_key(work, i), buffer_key(output))
        self.graphs.run(key, lambda: work.after_attention(i, output), "post")

    def after_layers(self, work) -> None:
        """The final norm and LM head as one replay (its buffers are the work's own)."""
        self.graphs.run(("lm_head", _work_key(work, -1)), work.after_layers, "lm_head")

    # ------------------------------------------------------------------ copy queue
    def upload(self, state, tensors) -> None:
        i, standin = state.index, self.ex.accel.standin
        path, land = state.path, state.landing
        uploaded: dict[str, torch.Tensor] = {}
        if path is HostPath.PARTIAL:
            for name in ("out", "lse"):
                src = self._pinned(state, name, tensors[name])
                dst = self._landing_buffer(i, name, tuple(src.shape), src.dtype)
                dst.copy_(src, non_blocking=True)
                land[name] = uploaded[name] = dst
        elif path is HostPath.LOGITS and "values" in tensors:  # exact: the range's V block
            logits, values = tensors["logits"], tensors["values"]
            n = values.shape[2]
            bucket = token_bucket(n)
            flat = self._landing_buffer(i, "logits", (logits.numel() // n * bucket,),
                                        torch.float32)
            flat[: logits.numel()].copy_(logits.reshape(-1), non_blocking=True)
            padded = self._landing_buffer(i, "values", (*values.shape[:2], bucket,
                                                        values.shape[3]), values.dtype)
            copy_blocks(padded[:, :, :n], values, standin=standin)
            land.update(logits=flat, values=padded)
            uploaded = {"logits": flat[: logits.numel()], "values": padded[:, :, :n]}
        else:  # top-k logits and V rows, or InfiniGen's K and V rows: (B, H, k, ...)
            names = ("logits", "rows") if path is HostPath.LOGITS else ("k_rows", "v_rows")
            k = tensors[names[1]].shape[2]
            bucket = token_bucket(k)
            for name in names:
                src = tensors[name]
                flat = self._landing_buffer(i, name, (src.numel() // k * bucket,), src.dtype)
                flat[: src.numel()].copy_(src.reshape(-1), non_blocking=True)
                land[name] = flat
                uploaded[name] = flat[: src.numel()]
            land["bucket"] = bucket
            if path is HostPath.LOGITS and tensors["rows"].shape[1] != tensors["logits"].shape[1]:
                # rows per KV group: how many the widest group kept is known only now, so it
                # crosses beside them (the step's count table holds the plan's k)
                land["kv_heads"] = tensors["rows"].shape[1]
                land["count"] = self._upload_count(state, k)
        state.uploaded = uploaded

    def _upload_count(self, state: LayerState, count: int) -> torch.Tensor:
        """A one-element device int64 holding ``count``, copied from (pinned) host memory on
        the copy queue; each layer parity has its own."""
        host = self.ex.kernels.buffers.take((id(state.kv), "row count"), (1,), torch.int64)
        host[0] = count
        dev = self._landing_buffer(state.index, "row count", (1,), torch.int64)
        dev.copy_(host, non_blocking=True)
        return dev

    def stream(self, state, start, end) -> None:
        """FlexGen's copy; a new token that belongs to the host range is still only on the
        device (it reaches host memory at the step's end), so it is copied device to device."""
        i, kv, n = state.index, state.kv, end - start
        self._await_flush()
        bucket = token_bucket(n)
        shape = (kv.host_k.shape[0], kv.host_k.shape[1], bucket, kv.host_k.shape[3])
        land_k = self._landing_buffer(i, "k", shape, kv.dtype)
        land_v = self._landing_buffer(i, "v", shape, kv.dtype)
        standin = self.ex.accel.standin
        new_in_range = (state.landing.get("appended") and state.landing.get("append_slot") is None
                        and end == state.lp.context)
        from_host = n - 1 if new_in_range else n
        copy_blocks(land_k[:, :, :from_host], kv.host_k[:, :, start : start + from_host],
                    standin=standin)
        copy_blocks(land_v[:, :, :from_host], kv.host_v[:, :, start : start + from_host],
                    standin=standin)
        if new_in_range:
            k_new, v_new = self.buffers.new_kv(i)
            land_k[:, :, from_host : n].copy_(k_new, non_blocking=True)
            land_v[:, :, from_host : n].copy_(v_new, non_blocking=True)
        state.landing.update(k=land_k, v=land_v)
        state.uploaded = {"k": land_k[:, :, :n], "v": land_v[:, :, :n]}

    def _pinned(self, state, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` in pinned host memory (the C kernel's fresh outputs are not)."""
        if self.ex.accel.standin or t.is_pinned():
            return t
        staged = self.ex.kernels.buffers.take((id(state.kv), "pinned " + name), tuple(t.shape),
                                              t.dtype)
        staged.copy_(t)
        return staged

    # ------------------------------------------------------------------ host worker
    def fetch_index(self, state, after) -> torch.Tensor:
        ex, full = self.ex, state.landing["speculated"]
        host_full = ex.kernels.buffers.take((id(state.kv), "speculated"), tuple(full.shape),
                                            torch.int64)
        ex.accel.fetch(host_full, full, after)
        k = state.lp.host_selected
        index = ex.kernels.buffers.take((id(state.kv), "index"), (*full.shape[:2], k),
                                        torch.int64)
        index.copy_(host_full[..., :k])
        return index

    def host_append(self, state, after) -> None:
        ex, kv, i = self.ex, state.kv, state.index
        source = self.buffers.new_tokens[i]
        staged = ex.kernels.buffers.take((id(kv), "new token"), tuple(source.shape),
                                         source.dtype)
        ex.accel.fetch(staged, source, after)
        position = state.lp.context - 1
        kv.host_k[:, :, position : position + 1].copy_(staged[0])
        kv.host_v[:, :, position : position + 1].copy_(staged[1])
        state.landing["host_written"] = True

    # ------------------------------------------------------------------ step end
    def before_finish(self, run) -> None:
        """All layers' new tokens to host memory in one transfer (two alternating buffers).
        Its body runs on the compute queue: on the stand-in the step's buffers exist only once
        the queue has run a qkv."""
        if not run.appending:
            return
        parity = self._parity

        def copy() -> None:
            tokens = self.buffers.new_tokens
            if not self._tokens_host:
                self._tokens_host = [self.ex.accel.host_empty(tuple(tokens.shape), tokens.dtype)
                                     for _ in range(2)]
            self._tokens_host[parity].copy_(tokens, non_blocking=True)

        self.ex.accel.compute.submit(copy, label="new tokens to host")

    def end_step(self, run) -> None:
        """Write every new token of this step into the host cache (on the host worker, ahead of
        the next step's host work), unless the host path wrote it already; wait for the
        previous step's such job first, so that the transfer buffer it reads is not
        overwritten."""
        self._await_flush()
        if not run.appending or not self._tokens_host:
            return
        tokens = self._tokens_host[self._parity]
        self._parity ^= 1
        writes = [(state.index, state.kv, state.kv.length - 1) for state in run.layers
                  if not state.landing.get("host_written")]
        if not writes:
            return

        def flush() -> None:
            for i, kv, position in writes:
                kv.host_k[:, :, position : position + 1].copy_(tokens[i, 0])
                kv.host_v[:, :, position : position + 1].copy_(tokens[i, 1])

        self._flushed = self.ex.host.submit(flush, label="write-through")

    def step_output(self, state) -> torch.Tensor:
        """A copy of the layer's output (the static buffer is rewritten next step)."""
        return state.output.clone()


def _work_key(work, layer: int) -> tuple:
    if work is None:
        return ()
    key = getattr(work, "graph_key", None)
    return (id(work), *(key(layer) if key is not None else ()))


__all__ = ["FIELDS", "GraphDeviceSide", "host_count"]
