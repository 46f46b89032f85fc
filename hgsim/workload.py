"""What is being served: batch, prompt (context) length, tokens generated, dtypes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from hgsim.costs import PREFILL_CHUNK_AUTO, prefill_chunk_candidates, prefill_workspace_bytes
from hgsim.specs.base import SpecModel
from hgsim.units import parse_count

if TYPE_CHECKING:
    from hgsim.specs.model import ModelSpec


class Workload(SpecModel):
    batch: int = Field(default=1, gt=0)
    context: int = Field(gt=0)  # tokens already in the KV cache when decoding starts
    gen: int = Field(default=256, gt=0)  # tokens generated per sequence
    kv_dtype: Literal["fp32", "fp16", "bf16", "fp8"] = "fp16"
    weight_dtype: Literal["fp32", "fp16", "bf16", "fp8", "int8"] = "fp16"
    include_prefill: bool = False  # simulate the prompt's prefill before decoding
    # prompt tokens of each sequence per prefill chunk (None: the whole prompt at once; "auto":
    # the size that minimises the request's time, hgsim.prefill_chunk); vLLM's
    # max_num_batched_tokens is the batch's budget, batch x this
    prefill_chunk_tokens: int | Literal["auto"] | None = None
    seed: int = Field(default=0, ge=0)  # NumPy and torch take no negative seed
    attention_only: bool = False  # simulate only the attention path (validation of hw_backend)
    # GPUs the model is sharded over by tensor parallelism (hgsim.tensor_parallel): the
    # profile's first N GPUs, rank 0 simulated on its share of the host
    tensor_parallel: int = Field(default=1, gt=0)
    # copies of the model (data parallelism), each on the next tensor_parallel GPUs decoding its
    # own ``batch`` sequences, all sharing the host (hgsim.tensor_parallel.rank_view)
    data_parallel: int = Field(default=1, gt=0)
    # which GPUs the copies take (hgsim.tensor_parallel.placed_profile): ``packed``, the
    # profile's order (one socket's GPUs first); ``spread``, each copy on the next socket
    gpu_placement: Literal["packed", "spread"] = "packed"

    @field_validator("context", "gen", "batch", mode="before")
    @classmethod
    def _counts(cls, value: Any) -> Any:
        return parse_count(value) if isinstance(value, str) else value

    @field_validator("prefill_chunk_tokens", mode="before")
    @classmethod
    def _chunk(cls, value: Any) -> Any:
        """A token count (``8k``) or ``auto``; a count must be positive."""
        if value is None or value == PREFILL_CHUNK_AUTO:
            return value
        try:
            tokens = parse_count(value)
        except ValueError:
            raise ValueError(f"expected a token count such as 8k, or auto, got {value!r}") \
                from None
        if tokens <= 0:
            raise ValueError(f"must be a token count > 0, or auto, got {tokens}")
        return tokens

    @property
    def final_context(self) -> int:
        return self.context + self.gen

    def prefill_workspace_bytes(self, model: ModelSpec, *, reads_back: bool = True) -> float:
        """HBM the prompt's prefill holds beside weights and KV (0 without a prefill);
        ``reads_back``: the policy may keep K and V in host memory, so a chunked prefill
        holds the read-back pipeline's blocks."""
        if not self.include_prefill:
            return 0.0
        return self._workspace_bytes(model, self.held_prefill_chunk(model, reads_back=reads_back),
                                     reads_back)

    def held_prefill_chunk(self, model: ModelSpec, *, reads_back: bool = True) -> int | None:
        """The chunk whose workspace a policy holds: the one set, or for ``auto`` (left
        unresolved where only the fit is asked, as a capacity search does) the candidate with
        the smallest workspace: auto fits wherever any candidate does."""
        if self.prefill_chunk_tokens != PREFILL_CHUNK_AUTO:
            return self.prefill_chunk_tokens
        return min(prefill_chunk_candidates(self.context),
                   key=lambda chunk: self._workspace_bytes(model, chunk, reads_back))

    def _workspace_bytes(self, model: ModelSpec, chunk: int | None, reads_back: bool) -> float:
        return prefill_workspace_bytes(model, self.batch, self.context, chunk, self.weight_dtype,
                                       self.kv_dtype, attention_only=self.attention_only,
                                       reads_back=reads_back)

    def weight_bytes(self, model: ModelSpec) -> float:
        return held_weight_bytes(model, self.weight_dtype, attention_only=self.attention_only)


def held_weight_bytes(model: ModelSpec, weight_dtype: str, *, attention_only: bool) -> float:
    """Bytes of weights a run holds: none attention-only (hw_backend's executor then runs
    attention alone and loads none, so no plan may place or stream them, nor a budget hold
    them)."""
    return 0.0 if attention_only else model.weight_bytes(weight_dtype)
