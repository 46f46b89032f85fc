"""An HBM budget: use only part of a GPU's memory, so that KV spills as on a smaller GPU.

A policy decides what stays in HBM from the profile's ``hbm_capacity_gb`` (``hgsim.capacity``);
the executor places exactly the tokens the policy's plan keeps on the device. Capping that one
figure therefore makes a run on an 80 GB card keep, spill and transfer what it would on a 24 GB
one, in the simulator and on the hardware alike (``hw_backend.devices.limit_device_memory``
also caps torch's allocator there, so the run cannot quietly use more).

Mistakes are one-line ``UserError``s, checked before any work: a budget larger than the device,
or one that cannot hold the model's weights (where the run loads them: not attention-only).
"""

from __future__ import annotations

from dataclasses import dataclass

from hgsim.errors import UserError
from hgsim.profiles import profile_with_overrides
from hgsim.specs.hardware import HardwareProfile
from hgsim.specs.model import ModelSpec
from hgsim.units import parse_quantity, size_text
from hgsim.workload import held_weight_bytes

GB = 1e9


@dataclass(frozen=True)
class HbmBudget:
    """Usable HBM in GB (1e9 bytes)."""

    gb: float

    @staticmethod
    def parse(text: str | float, field: str = "--hbm-budget") -> HbmBudget:
        """``24GB``, ``24 GiB``, ``"24"`` (GB) or a number."""
        try:
            gb = parse_quantity(text, "capacity_gb")
        except ValueError as exc:
            raise UserError(f"{exc} (e.g. 24GB)", field=field) from None
        if not gb > 0:
            raise UserError(f"must be > 0, got {text!r}", field=field)
        return HbmBudget(gb)

    @property
    def bytes_(self) -> float:
        return self.gb * GB

    def check(self, *, device_bytes: float | None, model: ModelSpec, weight_dtype: str,
              device: str = "the device", attention_only: bool = False,
              field: str = "--hbm-budget") -> None:
        """The budget must fit the device and hold the weights the run holds
        (``workload.held_weight_bytes``: none attention-only). ``field`` is where the budget
        was given."""
        if device_bytes is not None and self.bytes_ > device_bytes * (1 + 1e-9):
            raise UserError(f"{self.gb:g} GB exceeds {device}'s {size_text(device_bytes)}",
                            field=field)
        weights = held_weight_bytes(model, weight_dtype, attention_only=attention_only)
        if weights >= self.bytes_:
            raise UserError(f"{self.gb:g} GB cannot hold {model.name}'s {size_text(weights)} of "
                            f"{weight_dtype} weights", field=field)

    def apply(self, profile: HardwareProfile) -> HardwareProfile:
        """``profile`` whose primary GPU has this budget as its HBM capacity."""
        gpu = profile.primary_gpu
        return profile_with_overrides(profile, {f"gpus.{gpu}.hbm_capacity_gb": self.gb})


__all__ = ["HbmBudget"]
