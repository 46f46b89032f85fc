"""The KV cache split the way a plan says: resident rows on the device, the rest in host memory.

Per layer (``LayerKv``):

* host K and V are indexed by absolute token position, (B, KVH, capacity, D), so the host range
  ``[sinks, context - recent)`` of a plan is a plain slice and the C kernel scans it in place
  (``start``/``end``) and returns absolute positions. Host memory is pinned on CUDA.
* device K and V hold the resident tokens (the plan's sinks and recent window) in slots
  ``[0, n)``. Slot order is free because attention does not depend on key order, so moving the
  boundary costs only the rows that cross it: each decode step the oldest recent token usually
  leaves for the host, and the new token lands in a device slot.
* InfiniGen's partial key cache (a share of the key channels of every token, device-resident)
  is kept on request.

Every position below ``length`` is valid on the device or on the host (a token is written to
the host when it leaves the device). ``repartition`` runs on the device's compute queue at the
start of a step, before any host work of that step reads the host range. When the window
slides (one token leaves, the new one arrives) the new token takes the leaving token's slot, so
a steady decode moves no device rows.

``write_through`` is the CUDA graph path's mode (``graph_side``): every token the device
receives is also copied to host memory by the end of its step, so a token leaving the device
needs no copy at all (on CUDA that copy would be a device-to-host transfer that stalls the
queue in the middle of a step).
"""

from __future__ import annotations

import math

import torch

from hw_backend.devices import Accelerator


class LayerKv:
    """One layer's split cache; see the module docstring."""

    def __init__(
        self, accel: Accelerator, *, batch: int, kv_heads: int, head_dim: int,
        dtype: torch.dtype, capacity: int,
    ) -> None:
        self.accel = accel
        self.shape = (batch, kv_heads, head_dim)
        self.dtype = dtype
        self.host_k = accel.host_empty((batch, kv_heads, capacity, head_dim), dtype)
        self.host_v = accel.host_empty((batch, kv_heads, capacity, head_dim), dtype)
        self.dev_k = accel.empty((batch, kv_heads, 0, head_dim), dtype)
        self.dev_v = accel.empty((batch, kv_heads, 0, head_dim), dtype)
        self.slot_pos: list[int] = []  # absolute position held by each device slot
        self._slot_of: dict[int, int] = {}
        self.length = 0
        self.sinks = 0
        self.recent = 0
        self.partial_channels: torch.Tensor | None = None  # (KVH, c) channel ids, device
        self.partial_k: torch.Tensor | None = None  # (B, KVH, capacity, c), device
        self.write_through = False  # host memory already holds every device-resident token

    # ------------------------------------------------------------------ views
    @property
    def capacity(self) -> int:
        return self.host_k.shape[2]

    @property
    def resident(self) -> int:
        return len(self.slot_pos)

    def device_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Resident K and V, (B, KVH, n, D) views of the device slots."""
        n = self.resident
        return self.dev_k[:, :, :n], self.dev_v[:, :, :n]

    # ------------------------------------------------------------------ filling
    def load(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """The prompt's K and V (B, KVH, T, D); everything starts host-resident."""
        if k.shape[:2] != self.shape[:2] or k.shape[3] != self.shape[2] or k.shape != v.shape:
            raise ValueError(f"expected K, V of shape (B, KVH, T, D) = {self.shape}, got {k.shape}")
        tokens = k.shape[2]
        self._ensure_host_capacity(tokens)
        self.host_k[:, :, :tokens].copy_(k)
        self.host_v[:, :, :tokens].copy_(v)
        self._drop_slots(list(self.slot_pos))
        self.length, self.sinks, self.recent = tokens, 0, 0
        if self.partial_channels is not None:  # rebuild InfiniGen's cache from the new keys
            fraction = self.partial_channels.shape[1] / self.shape[2]
            self.partial_channels = self.partial_k = None
            self.enable_partial_keys(fraction)

    def truncate(self, tokens: int) -> None:
        """Forget every token from position ``tokens`` on and make the rest host-resident, as
        after ``load`` of the first ``tokens``: host rows below ``tokens`` are never changed by
        a decode (new tokens land at the end), so a benchmark can run several policies over
        one filled context without refilling it (at 128k tokens of an 8B model, 17 GB)."""
        if tokens > self.length:
            raise ValueError(f"cannot truncate {self.length} tokens to {tokens}")
        if not self.write_through and self.resident:
            leaving = [p for p in self.slot_pos if p < tokens]
            if leaving:  # eagerly, device rows below ``tokens`` may exist only on the device
                self._offload(leaving)
        self.slot_pos, self._slot_of = [], {}
        self.length, self.sinks, self.recent = tokens, 0, 0
        # the next decode reserves the slots its own policy needs: one policy's larger
        # reservation must not take device memory from the next under the same HBM budget
        self._resize_slots(0)
        if self.partial_channels is not None:  # rebuilt from the host keys when next needed
            self.partial_channels = self.partial_k = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """One new token (B, KVH, 1, D): into a device slot when the plan keeps it resident."""
        position = self.length
        slot = self.claim_append_slot()
        if slot is not None:
            self.dev_k[:, :, slot : slot + 1].copy_(k)
            self.dev_v[:, :, slot : slot + 1].copy_(v)
        else:
            self.host_k[:, :, position : position + 1].copy_(k)
            self.host_v[:, :, position : position + 1].copy_(v)
        if self.partial_k is not None:
            self.partial_k[:, :, position : position + 1].copy_(self._key_channels(k))

    def claim_append_slot(self) -> int | None:
        """Book the new token (position ``length``): its device slot, or None when it lands in
        host memory. Moves no data (``append`` does, or a captured graph)."""
        position = self.length
        self._ensure_host_capacity(position + 1)
        slot = None
        if position < self.sinks or self.recent > 0:
            slot = self._slot_of.get(position)  # reserved by repartition (a sliding window)
            if slot is None:
                self._ensure_slots(self.resident + 1)
                slot = self.resident
                self.slot_pos.append(position)
                self._slot_of[position] = slot
        self.length = position + 1
        return slot

    def reserve_device_slots(self, slots: int) -> None:
        """Allocate device room for ``slots`` resident tokens now, so that no step reallocates
        (a reallocation also invalidates captured graphs, which then capture again). Exactly
        ``slots``, not ``_ensure_slots``'s doubling: a policy sizes its resident tokens to fill
        an HBM budget, and twice its KV would not fit beside the weights."""
        if slots > self.dev_k.shape[2]:
            self._resize_slots(slots)

    # ------------------------------------------------------------------ partition
    def repartition(self, sinks: int, recent: int, context: int) -> None:
        """Make the device hold ``[0, sinks)`` and ``[context - recent, context)``.

        ``context`` is the length after this step's append (``length`` or ``length + 1``);
        the slot for a token not appended yet is reserved by ``append``.
        """
        if context not in (self.length, self.length + 1):
            raise ValueError(f"plan context {context} does not follow cache length {self.length}")
        if sinks + recent > context:
            raise ValueError("sinks and recent tokens exceed the context")
        wanted = set(range(min(sinks, self.length)))
        wanted.update(range(context - recent, self.length))
        leaving = [p for p in self.slot_pos if p not in wanted]
        arriving = sorted(wanted.difference(self._slot_of))
        new_position = self.length
        new_on_device = context > self.length and (new_position < sinks or recent > 0)
        if leaving:
            self._offload(leaving, keep_slot_for=new_position if new_on_device else None)
        if arriving:
            self._promote(arriving)
        self.sinks, self.recent = sinks, recent

    def _offload(self, positions: list[int], keep_slot_for: int | None = None) -> None:
        """Move ``positions`` to host memory; with ``keep_slot_for``, the first one's slot is
        handed to that (new) position instead of being freed."""
        if not self.write_through:
            slots = torch.tensor([self._slot_of[p] for p in positions], device=self.accel.device)
            where = torch.tensor(positions)
            self.host_k[:, :, where] = self.dev_k[:, :, slots].to("cpu")
            self.host_v[:, :, where] = self.dev_v[:, :, slots].to("cpu")
        if keep_slot_for is not None:
            first, positions = positions[0], positions[1:]
            slot = self._slot_of.pop(first)
            self.slot_pos[slot] = keep_slot_for
            self._slot_of[keep_slot_for] = slot
        self._drop_slots(positions)

    def _promote(self, positions: list[int]) -> None:
        first = self.resident
        self._ensure_slots(first + len(positions))
        where = torch.tensor(positions)
        count = len(positions)
        device = self.accel.device
        self.dev_k[:, :, first : first + count] = self.host_k[:, :, where].to(device)
        self.dev_v[:, :, first : first + count] = self.host_v[:, :, where].to(device)
        for i, p in enumerate(positions):
            self.slot_pos.append(p)
            self._slot_of[p] = first + i

    def _drop_slots(self, positions: list[int]) -> None:
        """Free the slots of ``positions``, refilling holes with the last slots (swap-remove)."""
        if not positions:
            return
        removed = {self._slot_of.pop(p) for p in positions}
        keep = len(self.slot_pos) - len(removed)
        holes = sorted(s for s in removed if s < keep)
        movers = [s for s in range(keep, len(self.slot_pos)) if s not in removed]
        if holes:
            device = self.accel.device
            dst, src = torch.tensor(holes, device=device), torch.tensor(movers, device=device)
            self.dev_k[:, :, dst] = self.dev_k[:, :, src]
            self.dev_v[:, :, dst] = self.dev_v[:, :, src]
            for hole, mover in zip(holes, movers, strict=True):
                position = self.slot_pos[mover]
                self.slot_pos[hole] = position
                self._slot_of[position] = hole
        del self.slot_pos[keep:]

    # ------------------------------------------------------------------ InfiniGen
    def enable_partial_keys(self, fraction: float) -> None:
        """Keep ``ceil(fraction * D)`` key channels of every token on the device.

        Per KV head the channels with the largest mean |K| over the cached tokens are kept,
        standing in for InfiniGen's offline choice of skewed channels; fraction 1 keeps all.
        """
        head_dim = self.shape[2]
        keep = min(head_dim, max(1, math.ceil(fraction * head_dim)))
        if self.partial_channels is not None and self.partial_channels.shape[1] == keep:
            return  # kept up to date by append (and grown with the host buffers)
        keys = self.host_k[:, :, : self.length]
        if keep == head_dim or self.length == 0:
            channels = torch.arange(head_dim).expand(self.shape[1], head_dim)[:, :keep]
        else:
            magnitude = keys.float().abs().mean(dim=(0, 2))  # (KVH, D)
            channels = torch.topk(magnitude, keep, dim=-1).indices.sort(dim=-1).values
        self.partial_channels = channels.to(self.accel.device)
        batch, kv_heads, _ = self.shape
        self.partial_k = self.accel.empty((batch, kv_heads, self.capacity, keep), self.dtype)
        if self.length:
            self.partial_k[:, :, : self.length] = self._key_channels(keys.to(self.accel.device))

    def _key_channels(self, k: torch.Tensor) -> torch.Tensor:
        assert self.partial_channels is not None
        idx = self.partial_channels[None, :, None, :].expand(*k.shape[:3], -1)
        return torch.gather(k.to(self.accel.device), 3, idx)

    def partial_query(self, q: torch.Tensor) -> torch.Tensor:
        """The kept channels of each query head's KV group: (B, H, D) -> (B, KVH, G, c)."""
        assert self.partial_channels is not None
        batch, heads, dim = q.shape
        kv_heads = self.shape[1]
        grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim)
        idx = self.partial_channels[None, :, None, :].expand(batch, -1, heads // kv_heads, -1)
        return torch.gather(grouped, 3, idx)

    # ------------------------------------------------------------------ storage growth
    def _ensure_host_capacity(self, tokens: int) -> None:
        if tokens <= self.capacity:
            return
        size = max(tokens, 2 * self.capacity)
        for name in ("host_k", "host_v"):
            old = getattr(self, name)
            new = self.accel.host_empty((*old.shape[:2], size, old.shape[3]), self.dtype)
            new[:, :, : self.length].copy_(old[:, :, : self.length])
            setattr(self, name, new)
        if self.partial_k is not None:
            old = self.partial_k
            self.partial_k = self.accel.empty((*old.shape[:2], size, old.shape[3]), self.dtype)
            self.partial_k[:, :, : self.length] = old[:, :, : self.length]

    def _ensure_slots(self, slots: int) -> None:
        """Room for ``slots`` resident tokens, grown geometrically (a decode adds one a step)."""
        if slots <= self.dev_k.shape[2]:
            return
        self._resize_slots(max(slots, 2 * self.dev_k.shape[2], 16))

    def _resize_slots(self, size: int) -> None:
        """Device K and V with ``size`` slots, the resident tokens' rows kept."""
        n = self.resident
        for name in ("dev_k", "dev_v"):
            old = getattr(self, name)
            # zeroed: the graph path attends over a padded bucket of slots (masked, but 0 x NaN
            # garbage would still be NaN)
            new = torch.zeros((*old.shape[:2], size, old.shape[3]), dtype=self.dtype,
                              device=self.accel.device)
            new[:, :, :n] = old[:, :, :n]
            setattr(self, name, new)


class KvStore:
    """All layers' split caches of one batch of sequences."""

    def __init__(
        self, accel: Accelerator, *, num_layers: int, batch: int, kv_heads: int, head_dim: int,
        dtype: torch.dtype = torch.float32, capacity: int = 0,
    ) -> None:
        self.layers = [
            LayerKv(accel, batch=batch, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                    capacity=capacity)
            for _ in range(num_layers)
        ]
        self.batch, self.kv_heads, self.head_dim, self.dtype = batch, kv_heads, head_dim, dtype

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> LayerKv:
        return self.layers[layer]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def reserve_device_slots(self, slots: int) -> None:
        for layer in self.layers:
            layer.reserve_device_slots(slots)

    def truncate(self, tokens: int) -> None:
        for layer in self.layers:
            layer.truncate(tokens)


__all__ = ["KvStore", "LayerKv"]
