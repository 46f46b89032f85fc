"""KV-management policies, all expressed as the same partition plan.

``POLICIES`` maps a name to (policy class, preset options): ablations are presets of HybridGen.
Other packages add policies through entry points (``registry``); look names up there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from hgsim.errors import OptionError, UserError, quoted
from hgsim.policies.base import Policy, PolicyOptions
from hgsim.policies.cpu_offload import CpuOffload
from hgsim.policies.flexgen import FlexGen, FlexGenCpuAttention
from hgsim.policies.gpu_only import GpuOnly
from hgsim.policies.h2o import H2O
from hgsim.policies.hgca import Hgca
from hgsim.policies.hybridgen import HybridGen
from hgsim.policies.infinigen import InfiniGen

POLICIES: dict[str, tuple[type[Policy], dict[str, Any], str]] = {
    "hybridgen": (HybridGen, {}, HybridGen.description),
    "gpu_only": (GpuOnly, {}, GpuOnly.description),
    "flexgen": (FlexGen, {}, FlexGen.description),
    "flexgen_cpu": (FlexGenCpuAttention, {}, FlexGenCpuAttention.description),
    "h2o": (H2O, {}, H2O.description),
    "infinigen": (InfiniGen, {}, InfiniGen.description),
    "hgca": (Hgca, {}, Hgca.description),
    "cpu_offload": (CpuOffload, {}, CpuOffload.description),
    # HybridGen ablations
    "hybridgen_static": (HybridGen, {"adaptive": False}, "HybridGen with a static top-k ratio"),
    "hybridgen_nocxl": (HybridGen, {"allow_cxl": False}, "HybridGen without CXL memory"),
    "hybridgen_firsttouch": (HybridGen, {"placement": "first_touch"},
                             "HybridGen, first-touch placement (DRAM until full, then CXL)"),
    "hybridgen_interleave": (HybridGen, {"placement": "interleave"},
                             "HybridGen, pages interleaved 1:1 over DRAM and CXL"),
    "hybridgen_weighted": (HybridGen, {"placement": "weighted_interleave"},
                           "HybridGen, pages interleaved by tier bandwidth"),
    "hybridgen_importance": (HybridGen, {"placement": "importance"}, "HybridGen, importance mapping"),
    "hybridgen_nolookahead": (HybridGen, {"lookahead": False}, "HybridGen without lookahead"),
    "hybridgen_exact": (HybridGen, {"topk_ratio": 1.0, "adaptive": False}, "HybridGen, top-k = all"),
    # HybridGen's GQA selection granularity (plan.GroupSelect)
    "hybridgen_per_head": (HybridGen, {"selection": "per_head"},
                           "HybridGen, top-k per query head (rows sent once per head)"),
    "hybridgen_union": (HybridGen, {"selection": "group_union"},
                        "HybridGen, per KV group: union of the heads' top-k, rows sent once"),
    "hybridgen_shared": (HybridGen, {"selection": "group_shared"},
                         "HybridGen, per KV group: one top-k by the group's max logit (default)"),
}

BASELINES = ["gpu_only", "flexgen", "flexgen_cpu", "h2o", "infinigen", "hgca", "cpu_offload"]


def policy_names() -> list[str]:
    """Built-in and plugin policies (``hgsim.policies.registry``)."""
    from hgsim.policies.registry import registered

    return list(registered())


def checked_options(name: str, options: Mapping[str, Any] | None) -> PolicyOptions:
    """The options of policy ``name``: ``options`` over its preset, validated. Raises
    ``registry.UnknownPolicyError`` for a name no policy has and ``OptionError`` for the first
    bad option, the one check behind ``simulate``, ``run``, studies and validation studies."""
    from hgsim.config_io import humane, schema_loc
    from hgsim.policies.registry import lookup

    cls, preset, _ = lookup(name)
    try:
        return cls.Options(**{**preset, **(options or {})})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        # without pydantic's tags: host_socket=inf was '--option host_socket.int'
        key = ".".join(str(part) for part in schema_loc(first["loc"]))
        if first["type"] == "extra_forbidden":
            raise OptionError(key, f"policy '{name}' has no option {quoted(key)} (its options: "
                                   f"{', '.join(cls.Options.model_fields)})",
                              unknown=True) from None
        raise OptionError(key, humane(first), unknown=False) from None


def is_lossy(name: str) -> bool:
    """Whether policy ``name`` (a class or a preset) drops attention with its preset options:
    ``hybridgen_exact`` is HybridGen's class set to attend to everything."""
    from hgsim.policies.registry import lookup

    cls, _, _ = lookup(name)
    return cls.lossy_with(checked_options(name, {}))


def make_policy(name: str, model, profile, workload, options: dict[str, Any] | None = None,
                *, attention=None) -> Policy:
    """Build a built-in or plugin policy by name; ``options`` override the preset (unknown keys
    are errors); ``attention`` the accuracy model's ``AttentionModelSpec`` (None: defaults).
    With ``workload.tensor_parallel`` above 1 the policy gets rank 0's shard of the model and
    its view of ``profile`` (``hgsim.tensor_parallel.rank_view``)."""
    from hgsim.policies.base import host_shared
    from hgsim.policies.registry import UnknownPolicyError, lookup
    from hgsim.tensor_parallel import rank_view

    try:
        cls, _, _ = lookup(name)
    except UnknownPolicyError as exc:
        raise UserError(str(exc), field="policy") from None
    # tensor parallelism: the policy places rank 0's shard in its share of the machine
    view = rank_view(profile, model, getattr(workload, "tensor_parallel", 1),
                     host_shared(options), getattr(workload, "data_parallel", 1),
                     getattr(workload, "gpu_placement", "packed"))
    return cls(view.model, view.profile, workload, checked_options(name, options),
               attention=attention)


__all__ = ["BASELINES", "POLICIES", "Policy", "PolicyOptions", "checked_options", "is_lossy",
           "make_policy", "policy_names"]
