"""The non-attention work of a layer on the device, for attention-level runs of the executor.

In a real decode step the device also runs each layer's QKV projection before attention and
its output projection and FFN after; that is the work HybridGen hides the host path behind.
When the executor runs attention alone (benchmarks, scheduler runs) a ``DeviceWork`` puts that
work back on the device queue: ``DenseLayerWork`` runs GEMMs of a model's shapes,
``FixedDelayWork`` occupies the queue for a set time (deterministic, for tests).
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from hw_backend.devices import Accelerator


class DeviceWork(Protocol):
    def before_attention(self, layer: int) -> None:
        """Runs on the device queue before the layer's query is ready (QKV projection)."""

    def after_attention(self, layer: int, output: torch.Tensor) -> None:
        """Runs on the device queue after the layer's attention output (o_proj + FFN)."""

    # Optional: ``after_layers()``, run on the device queue after the last layer, inside the
    # timed step (a whole model's final norm and LM head, ``ModelDeviceWork``).


class DenseLayerWork:
    """GEMMs with a transformer layer's shapes: QKV before attention, o_proj + FFN after.

    ``hidden``/``ffn`` set the cost; the weights are random and the results discarded (the
    attention inputs come from the caller), so this only occupies the device realistically.
    """

    def __init__(
        self, accel: Accelerator, *, batch: int, hidden: int, ffn: int,
        qkv_width: int | None = None, dtype: torch.dtype = torch.float32,
    ) -> None:
        def weight(rows: int, cols: int) -> torch.Tensor:
            return torch.randn(rows, cols, dtype=dtype, device=accel.device) / rows**0.5

        self.x = torch.randn(batch, hidden, dtype=dtype, device=accel.device)
        self.w_qkv = weight(hidden, qkv_width or 3 * hidden)
        self.w_up = weight(hidden, 2 * ffn)
        self.w_down = weight(ffn, hidden)

    def before_attention(self, layer: int) -> None:
        torch.matmul(self.x, self.w_qkv)

    def after_attention(self, layer: int, output: torch.Tensor) -> None:
        up = torch.matmul(self.x, self.w_up)
        torch.matmul(up[:, : self.w_down.shape[0]], self.w_down)


class FixedDelayWork:
    """Keeps the device queue busy for a fixed time per layer (stand-in only: it sleeps)."""

    def __init__(self, before_s: float = 0.0, after_s: float = 0.0) -> None:
        self.before_s, self.after_s = before_s, after_s

    def before_attention(self, layer: int) -> None:
        if self.before_s:
            time.sleep(self.before_s)

    def after_attention(self, layer: int, output: torch.Tensor) -> None:
        if self.after_s:
            time.sleep(self.after_s)


__all__ = ["DenseLayerWork", "DeviceWork", "FixedDelayWork"]
