"""What the CPU-attention kernel tests share besides the ``be`` and ``simd`` fixtures (those
are in conftest.py): the KV dtypes, the instruction sets, and the mark for C-only tests."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import hw_backend.cpu_attention as ca  # noqa: E402

SIMD_LEVELS = ca.available_simd_levels()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
needs_c = pytest.mark.skipif(ca.BACKEND != "c", reason="compiled extension not built")
