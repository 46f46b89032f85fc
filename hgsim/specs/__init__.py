"""Typed specifications: hardware profiles and model architectures."""

from hgsim.specs.hardware import (
    CpuSocketSpec,
    GpuSpec,
    HardwareProfile,
    LinkSpec,
    MemoryTierSpec,
)
from hgsim.specs.model import ModelSpec

__all__ = [
    "CpuSocketSpec",
    "GpuSpec",
    "HardwareProfile",
    "LinkSpec",
    "MemoryTierSpec",
    "ModelSpec",
]
