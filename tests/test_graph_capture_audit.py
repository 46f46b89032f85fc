"""Every program the graph path captures is capturable and replays what it captured.

Run eagerly on the CPU stand-in under ``hw_backend.capture_audit``: for every plan kind, over
decode steps whose counts change inside one shape bucket, each graph key must see the same
operators, shapes, non-tensor arguments and input buffers on every run (else a GPU replay would
use the captured step's values), and no program may synchronise with the host.
"""

from __future__ import annotations

import pytest
import torch

from hgsim.catalog import get_model
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.workload import Workload
from hw_backend.capture_audit import CaptureAudit, OpTrace, audit_graph_programs
from hw_backend.decode_loop import SIZED_HBM_OPTIONS, profile_for_gpu_tokens
from hw_backend.devices import CoreSplit, make_accelerator
from hw_backend.graphs import GraphCache, buffer_key
from hw_backend.model_decode import ModelDecode


class _Side:
    """What ``audit_graph_programs`` needs of a graph side: its cache."""

    def __init__(self) -> None:
        self.graphs = GraphCache(capture=False)


# ----------------------------------------------------------------------------- the audit
@pytest.mark.parametrize(("program", "reason"), [
    (lambda x: x.sum().item(), "_local_scalar_dense"),
    (lambda x: bool(x.sum() > 0), "reads a value back"),
    (lambda x: torch.nonzero(x), "nonzero"),
    (lambda x: x[x > 0], "boolean-mask"),
    (lambda x: x.masked_select(x > 0), "masked_select"),
    (lambda x: torch.unique(x), "unique"),
    (lambda x: x + torch.tensor([1.0, 2.0, 3.0]), "torch.tensor"),
    (lambda x: torch.bincount((x > 0).long()), "bincount"),
    (lambda x: x.repeat_interleave((x > 0).long()), "repeat_interleave"),
])
def test_what_would_make_the_host_wait_is_named(program, reason):
    x = torch.tensor([1.0, -2.0, 3.0])
    with OpTrace() as trace:
        program(x)
    assert any(reason in line for line in trace.synchronising), trace.synchronising


def test_device_side_counts_and_masks_do_not_synchronise():
    x, n = torch.arange(8.0), torch.tensor([5])
    with OpTrace() as trace:
        mask = torch.arange(8) < n.reshape(())
        x.masked_fill(~mask, float("-inf")).softmax(-1)
        torch.topk(x, 3)
    assert trace.synchronising == []


def test_a_python_count_that_changes_under_one_key_is_caught():
    """The bug a replay hides: the key names the buffer but the program slices by a host
    integer, so a GPU would replay the first step's length."""
    side, x = _Side(), torch.arange(16.0)
    audit = audit_graph_programs(side)
    out = torch.zeros(())
    for n in (10, 10, 12):
        side.graphs.run(("sum", buffer_key(x, out)), lambda n=n: out.copy_(x[:n].sum()), "sum")
    assert audit.replayed_keys == 1
    assert len(audit.problems) == 1 and audit.problems[0].startswith("sum ('sum',)")


def test_a_changed_scalar_or_buffer_under_one_key_is_caught():
    side = _Side()
    audit = audit_graph_programs(side)
    a, b, out = torch.ones(4), torch.ones(4), torch.zeros(4)
    side.graphs.run(("scale", 0), lambda: torch.mul(a, 2.0, out=out), "scale")
    side.graphs.run(("scale", 0), lambda: torch.mul(a, 3.0, out=out), "scale")  # baked 2.0
    side.graphs.run(("read", 0), lambda: out.copy_(a), "read")
    side.graphs.run(("read", 0), lambda: out.copy_(b), "read")  # baked address of a
    assert [p.split(" ")[0] for p in audit.problems] == ["scale", "read"]


def test_device_counts_under_one_key_replay_the_same_trace():
    """The graph path's way: the count lives in a device tensor written before the replay."""
    side, x, n, out = _Side(), torch.arange(16.0), torch.zeros(1, dtype=torch.int64), torch.zeros(())

    def program() -> None:
        out.copy_(x.masked_fill(torch.arange(16) >= n.reshape(()), 0.0).sum())

    audit = audit_graph_programs(side)
    for count in (10, 11, 12):
        n.fill_(count)
        side.graphs.run(("sum", buffer_key(x, n, out)), program, "sum")
        assert out.item() == sum(range(count))
    assert audit.problems == [] and audit.replayed_keys == 1


# ----------------------------------------------------------------------------- the executor
CONTEXT, STEPS = 300, 6
#: (policy, options, HBM sized for this many tokens or None): every plan kind and merge path
PLANS = [
    ("hybridgen", {}, None),  # adaptive top-k, one selection per KV group, look-ahead
    ("hybridgen_per_head", {"adaptive": False, "topk_ratio": 0.1, "gpu_share": 0.3}, None),
    ("hybridgen_union", {"adaptive": False, "topk_ratio": 0.1, "gpu_share": 0.3}, None),
    ("hybridgen_exact", {"gpu_share": 0.3, "lookahead": False}, None),
    ("cpu_offload", {}, None),
    ("flexgen", {"gpu_kv_fraction": 0.3}, None),
    ("flexgen_cpu", {}, None),
    ("hgca", {}, None),
    ("infinigen", {"topk_ratio": 0.5}, 250),
    ("gpu_only", {}, None),
]


def audited_decode(model_name: str, name: str, options: dict, gpu_tokens: int | None,
                   dtype: str) -> CaptureAudit:
    spec = get_model(model_name)
    workload = Workload(context=CONTEXT, gen=STEPS, kv_dtype=dtype, weight_dtype=dtype)
    profile = load_profile("dev-zen4-2core")
    if gpu_tokens is not None:
        profile = profile_for_gpu_tokens(profile, spec, workload, gpu_tokens)
        options = {**SIZED_HBM_OPTIONS, **options}
    policy = make_policy(name, spec, profile, workload, options)
    with make_accelerator("standin", CoreSplit(1, 1)) as accel, \
            ModelDecode(spec, accel, capacity=CONTEXT + STEPS, graphs=True, dtype=dtype,
                        kv_dtype=dtype) as model:
        model.fill_random(CONTEXT - 1)
        audit = audit_graph_programs(model.executor.side)
        model.decode(policy, STEPS)
    return audit


@pytest.mark.parametrize(("name", "options", "gpu_tokens"), PLANS, ids=[p[0] for p in PLANS])
def test_every_plan_kind_replays_what_it_captured(name, options, gpu_tokens):
    audit = audited_decode("tiny-llama", name, options, gpu_tokens, "fp32")
    assert audit.problems == []
    # the later steps replayed (and so were compared with) what the first ones captured
    assert audit.replayed_keys >= 3 * get_model("tiny-llama").num_layers


@pytest.mark.parametrize("plan", [PLANS[0], PLANS[5], PLANS[8]], ids=lambda p: p[0])
def test_sixteen_bit_weights_and_qkv_bias_replay_what_they_captured(plan):
    """bf16 weights and KV (casts inside the programs) on the Qwen layout (q/k/v bias, one KV
    head for four query heads)."""
    audit = audited_decode("tiny-qwen", *plan, "bf16")
    assert audit.problems == [] and audit.replayed_keys >= 3 * get_model("tiny-qwen").num_layers
