"""Transformer architecture specs and the quantities the simulator derives from them.

Only what decode and prefill cost depends on: layer count, widths, attention head layout (GQA
aware) and FFN shape. Derived numbers are pure functions so they can be checked by hand.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from hgsim.specs.base import SpecModel

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5}


class ModelSpec(SpecModel):
    name: str
    family: Literal["opt", "llama", "qwen"]
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    ffn_size: int = Field(gt=0)
    ffn_kind: Literal["gelu", "relu", "swiglu"]  # swiglu has three weight matrices, others two
    vocab_size: int = Field(gt=0)
    max_context: int = Field(gt=0)
    qkv_bias: bool = False
    tied_embeddings: bool = False
    #: Rotary base (config.json ``rope_theta``); None for OPT (no rotary) or where a file gives
    #: none (hw_backend then picks one by name). It changes the values of hw_backend's
    #: whole-model decode, not any simulated or measured cost.
    rope_theta: float | None = Field(default=None, gt=0)
    source: str = ""

    @field_validator("name")
    @classmethod
    def _named(cls, name: str) -> str:
        if not name.strip():  # every result row, report and table names the model by it
            raise ValueError("the model needs a name (a model file without one takes its "
                             "file's name)")
        return name

    @model_validator(mode="after")
    def _heads_consistent(self) -> ModelSpec:
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.family == "opt" and self.rope_theta is not None:
            raise ValueError("rope_theta: OPT has learned positions, no rotary embedding")
        return self

    # ------------------------------------------------------------------ derived
    @property
    def gqa_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def ffn_matrices(self) -> int:
        """Weight matrices of the FFN: gate, up and down for SwiGLU, up and down otherwise."""
        return 3 if self.ffn_kind == "swiglu" else 2

    def params_per_layer(self) -> int:
        attn = self.hidden_size * (self.q_dim + 2 * self.kv_dim) + self.q_dim * self.hidden_size
        ffn = self.ffn_matrices * self.hidden_size * self.ffn_size
        return attn + ffn

    def num_params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return self.num_layers * self.params_per_layer() + embeddings

    def weight_bytes(self, dtype: str = "fp16") -> float:
        return self.num_params() * DTYPE_BYTES[dtype]

    def layer_weight_bytes(self, dtype: str = "fp16") -> float:
        return self.params_per_layer() * DTYPE_BYTES[dtype]

    def kv_bytes_per_token(self, dtype: str = "fp16") -> float:
        """K and V for one token across all layers: 2 * layers * kv_heads * head_dim * bytes."""
        return 2 * self.num_layers * self.kv_dim * DTYPE_BYTES[dtype]

    def kv_bytes_per_token_layer(self, dtype: str = "fp16") -> float:
        return 2 * self.kv_dim * DTYPE_BYTES[dtype]

    def linear_flops_per_token_layer(self) -> float:
        """Multiply-adds of the projections and FFN, counted as 2 FLOPs each."""
        return 2.0 * self.params_per_layer()

    def attention_flops_per_token_layer(self, context: int) -> float:
        """q.k over ``context`` keys plus the weighted sum of as many values, all heads."""
        return 2.0 * 2.0 * self.num_heads * self.head_dim * context

    def flops_per_token_layer(self, context: int) -> float:
        return self.linear_flops_per_token_layer() + self.attention_flops_per_token_layer(context)
