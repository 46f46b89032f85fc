"""Accuracy proxy for lossy KV policies: synthetic attention, token selection, fidelity.

* ``synthetic``: a parameterised, seedable attention model (sinks, recency, heavy hitters)
  realised as real (q, K, V) tensors whose logits follow the design exactly.
* ``selection``: which tokens each ``Selector`` attends (exact/speculative top-k, H2O, ...).
* ``fidelity``: attention mass kept and relative output error against exact float64 attention,
  for any (q, K, V), synthetic or captured from ``hw_backend``.
* ``proxy``: ``accuracy_proxy(layer_plan)``, the cached per-configuration call of the simulator.
* ``groups``: the expected number of distinct rows a KV group's union of per-head top-k sets
  holds (HybridGen's ``GroupSelect.GROUP_UNION``), from the same synthetic attention.
"""

from hgsim.accuracy.fidelity import (
    Fidelity,
    attention_logits,
    exact_attention,
    fidelity,
    fidelity_from_logits,
    fidelity_from_probs,
    output_error,
    relative_error,
    softmax,
)
from hgsim.accuracy.groups import UnionCurve, expected_union_rows, union_curve
from hgsim.accuracy.proxy import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_SPEC,
    ScaledProblem,
    accuracy_proxy,
    cache_info,
    clear_caches,
    group_spec,
    is_lossless,
    proxy_case,
    scale_problem,
    zoom_spec,
)
from hgsim.accuracy.selection import (
    SelectionModel,
    TokenWindow,
    Window,
    group_topk_mask,
    heavy_hitter_mask,
    history_similarities,
    lag_similarity,
    query_history,
    resident_mask,
    selection_mask,
    speculative_logits,
    topk_mask,
)
from hgsim.accuracy.synthetic import (
    ATTENTION,
    AttentionModelSpec,
    SyntheticAttention,
    attention_model,
    case_logits,
    design_logit_parts,
    design_logits,
    next_query,
    persistent_energy_share,
    synthesize,
    synthesize_case,
)

__all__ = [
    "ATTENTION",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_SPEC",
    "AttentionModelSpec",
    "attention_model",
    "Fidelity",
    "ScaledProblem",
    "SelectionModel",
    "SyntheticAttention",
    "TokenWindow",
    "UnionCurve",
    "Window",
    "accuracy_proxy",
    "attention_logits",
    "cache_info",
    "case_logits",
    "clear_caches",
    "design_logit_parts",
    "design_logits",
    "exact_attention",
    "expected_union_rows",
    "fidelity",
    "fidelity_from_logits",
    "fidelity_from_probs",
    "group_spec",
    "group_topk_mask",
    "heavy_hitter_mask",
    "history_similarities",
    "lag_similarity",
    "is_lossless",
    "next_query",
    "persistent_energy_share",
    "output_error",
    "proxy_case",
    "relative_error",
    "query_history",
    "resident_mask",
    "scale_problem",
    "selection_mask",
    "softmax",
    "speculative_logits",
    "synthesize",
    "synthesize_case",
    "topk_mask",
    "union_curve",
    "zoom_spec",
]
