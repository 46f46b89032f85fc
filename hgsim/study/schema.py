"""The study file's schema: what an architect may write, and nothing else.

A study is a base configuration, sweep axes over dotted parameters, optional derived metrics,
plots and a capacity search. Every model forbids unknown keys, because a misspelt key that is
silently ignored runs a different study from the one the person meant. Checks that need the
catalog, the profiles or the whole study at once (unknown names, hardware paths, plot columns)
are semantic and live in ``expand.py`` and ``validate.py``; this module only checks shape.

Format (every key but ``base.profile`` and ``base.model`` is optional)::

    name: cxl_sweep                      # output folder results/<name>; default: file stem
    description: free text for report.md
    base:                                # what every point starts from
      profile: h100-80gb-spr-cxl         # name (hgsim profiles) or path (relative to this file)
      model: llama-2-13b                 # catalog name or alias (hgsim models)
      policy: hybridgen                  # default hybridgen
      policy_options: {topk_ratio: 0.1}  # the policy's Options (unknown keys are errors)
      workload: {batch: 2, context: 32k, gen: 64}   # any Workload field
      hardware: {tiers.cxl0.latency_ns: 250}        # fixed dotted profile overrides
      fidelity: {decode_samples: 12, accuracy: true}   # selection: {...}, attention: {...}
    sweep:                               # list of axis groups, crossed with each other
      - grid:                            # product of its axes
          workload.context: [32k, 128k, 512k]
          policy: [hybridgen, flexgen]
      - zip:                             # advance together (same lengths)
          hardware.tiers.cxl0.bandwidth_gbps: [16, 32, 64]
          hardware.links.cxl0-link.bandwidth_gbps: [16, 32, 64]
    # (a single group may be written as a mapping: ``sweep: {grid: {...}}``)
    # Axis paths: profile, model, policy, workload.<field>, policy_options.<option>,
    # fidelity.<field> (fidelity.selection.<field>, fidelity.attention.<field> too),
    # hardware.<dotted profile path> (``tiers.<t>.bandwidth_gbps`` sets read and write
    # bandwidth; ``*`` matches every key at its level; values may carry units).
    derived:                             # name -> metric vs a baseline at same other coords
      speedup:
        metric: tokens_per_s
        of: {policy: hybridgen}          # rows that get a value (default: all)
        vs: {policy: [flexgen, hgca]}    # a list -> columns speedup_vs_flexgen, ..._vs_hgca
        kind: speedup                    # speedup | ratio | difference
        better: higher                   # default: lower for *_ms/*_s/latency, else higher
        group_by: [workload.context]     # report summary groups
    plots:                               # name -> seaborn figure (PNG + SVG)
      tput:
        kind: line                       # line | bar | scatter | heatmap | pareto
        x: hardware.tiers.cxl0.bandwidth_gbps
        y: tokens_per_s                  # any column, derived ones included
        hue: policy                      # also style, row, col (facets)
        where: {hardware.tiers.cxl0.latency_ns: 250}   # keep only these rows
        logx: true
      heat: {kind: heatmap, x: ..., y: ..., value: speedup_vs_flexgen, col: workload.context}
    sensitivity:                         # one hardware parameter at a time, up and down
      parameters: [tiers.cxl0.latency_ns, sockets.cpu0.cores]   # dotted profile paths
      step: 0.25                         # values x 1.25 and / 1.25 around each point
      metric: tokens_per_s               # -> elasticity d ln(metric) / d ln(parameter)
    search:                              # capacity search instead of simulation
      maximize: workload.context         # or workload.batch
      lo: 1k
      hi: 16M
      step: 1k                           # -> column max_context, exact to one step
      max_token_latency_ms: 100          # optional SLO: also simulate, per-token latency <= it
      latency_stat: mean                 # mean | p50 | p99 (of the simulated per-token latency)
    equal_accuracy:                      # each lossy point again at a target proxy error
      target_rel_error: 0.01             # or a list; -> axis accuracy.target
      resolution: 0.005                  # knob grid step
      knobs: {h2o: budget}               # policy -> option searched (default: its registered knob)
    serving:                             # an online server at every point (docs/serving.md)
      rate_per_s: 0.5                    # Poisson arrivals; or find_rate: true (needs slo)
      requests: 300                      # requests served per run
      prompt: lognormal:32k:0.5          # 32k | uniform:LO:HI | lognormal:MEDIAN:SIGMA
      output: 256                        # tokens generated per request, the same forms
      max_batch: 16                      # most requests decoded together
      admission: paged                   # reserve (final KV, the default) | paged (vLLM)
      prefill_chunk: 2048                # chunked prefill (tokens an iteration; 0: whole)
      turns: 4                           # each arrival a conversation of 4 turns (default 1;
                                         # rate_per_s and requests then count conversations)
      followup: lognormal:1k:0.5         # new tokens of each later turn (default 1k)
      think_s: 30                        # mean seconds between an answer and the next turn
      prefix_cache: true                 # keep a conversation's KV between turns (default)
      kv_offload_gb: 256                 # a host KV store for that cache (default 0: none)
      kv_offload_tier: ddr0              # its tier (default: the GPU socket's DRAM)
      affinity_wait_s: 2                 # most seconds a later turn waits for the copy
                                         # holding its KV (default null: however long)
      seed: 0                            # arrivals and lengths
      slo: {ttft_s: 10, tpot_ms: 100, attainment: 0.9}
    # (a serving point ignores workload.batch/context/gen: its lengths and batch are above;
    # every serving field is an axis: serving.rate_per_s, serving.slo.tpot_ms, ...)
    report: {best_metric: tokens_per_s, best_by: policy, max_rows: 40}
    answer:                              # questions answered in report.md's first lines
      - question: Which upgrade buys the most tokens/s per dollar?
        choose: label.upgrade            # the axis whose value is the answer
        metric: tokens_per_s             # what a choice is ranked by
        per: [workload.context]          # one answer per combination of these columns
        gain_vs: baseline                # rank by (metric - metric at this choice) / ...
        cost: capex_usd                  # ... (cost - cost at it), per `scale` of cost
        scale: 1000                      # e.g. tokens/s gained per 1,000 USD
        among:                           # answer for sets of another axis' values, each
          column: policy                 # represented by its best row (by rank_by)
          sets: {HybridGen: [hybridgen], best baseline: [hgca, flexgen]}
          rank_by: tokens_per_s
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from hgsim.specs.numbers import CheckedNumbers
from hgsim.units import parse_count

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class StudyModel(CheckedNumbers):
    """Strict base: unknown keys are errors, values are not coerced across types silently,
    numbers are finite and plausible and never booleans (``CheckedNumbers``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _filename_safe(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise ValueError(
            f"{what} {value!r} must start with a letter or digit and use only letters, digits, "
            "'_', '-' and '.' (it names files)"
        )
    return value


class FidelitySpec(StudyModel):
    """Simulator accuracy/speed knobs (see ``hgsim.simulate.Fidelity``)."""

    decode_samples: int = Field(default=32, ge=0)  # simulated decode steps; 0 = every step
    accuracy: bool = True  # compute the accuracy proxy for lossy policies
    # the approximate selectors' parameters the accuracy proxy scores with, e.g.
    # {history_decay: 0.95} (hgsim.accuracy.SelectionModel's fields; checked per point)
    selection: dict[str, Any] = Field(default_factory=dict)
    # the shape of the synthetic attention the proxy scores on (and a GQA group union's rows
    # come from), e.g. {heavy_fraction: 0.05} (hgsim.accuracy.ATTENTION's fields; checked per
    # point)
    attention: dict[str, Any] = Field(default_factory=dict)


class BaseConfig(StudyModel):
    """The configuration every point starts from; axes replace parts of it."""

    profile: str
    model: str
    policy: str = "hybridgen"
    policy_options: dict[str, Any] = Field(default_factory=dict)
    # Workload fields (batch, context, gen, kv_dtype, ...); checked against Workload per point.
    workload: dict[str, Any] = Field(default_factory=dict)
    # Fixed dotted hardware overrides applied to the profile, e.g. {tiers.cxl0.latency_ns: 250}
    hardware: dict[str, Any] = Field(default_factory=dict)
    fidelity: FidelitySpec = Field(default_factory=FidelitySpec)


class AxisGroup(StudyModel):
    """One group of axes: ``grid`` axes combine as a product, ``zip`` axes advance together.

    A group may hold both (the zipped tuples are then crossed with the grid). Groups in the
    ``sweep`` list are crossed with each other.
    """

    grid: dict[str, list[Any]] = Field(default_factory=dict)
    zip: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("grid", "zip")
    @classmethod
    def _non_empty_values(cls, axes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for path, values in axes.items():
            if not values:
                raise ValueError(f"{path}: axis has no values")
        return axes

    @model_validator(mode="after")
    def _shape(self) -> AxisGroup:
        if not self.grid and not self.zip:
            raise ValueError("an axis group needs 'grid' or 'zip' axes")
        lengths = {len(v) for v in self.zip.values()}
        if len(lengths) > 1:
            detail = ", ".join(f"{k} has {len(v)}" for k, v in self.zip.items())
            raise ValueError(f"zip axes must have the same number of values ({detail})")
        both = set(self.grid) & set(self.zip)
        if both:
            raise ValueError(f"axis {sorted(both)[0]!r} is both in grid and in zip")
        return self

    def axes(self) -> dict[str, list[Any]]:
        return {**self.zip, **self.grid}


class DerivedSpec(StudyModel):
    """A metric computed from two rows: a point and its baseline at the same other coordinates.

    ``vs`` selects the baseline by axis values; a list of values makes one column per value
    (``<name>_vs_<value>``). ``of`` restricts which rows get a value (others are empty).
    """

    metric: str
    vs: dict[str, Any]
    of: dict[str, Any] = Field(default_factory=dict)
    kind: Literal["speedup", "ratio", "difference"] = "speedup"
    # speedup: row/baseline when higher is better, baseline/row when lower is better.
    # Default: lower for times (``*_ms``, ``*_s``, latency), higher otherwise.
    better: Literal["higher", "lower"] | None = None
    # Report grouping of this metric's summary table (default: by the ``vs`` axes' values).
    group_by: list[str] = Field(default_factory=list)

    @field_validator("vs")
    @classmethod
    def _vs_not_empty(cls, vs: dict[str, Any]) -> dict[str, Any]:
        if not vs:
            raise ValueError("'vs' must select the baseline by at least one axis")
        return vs


class PlotSpec(StudyModel):
    """A seaborn figure of the results table (any column, derived ones included)."""

    kind: Literal["line", "bar", "scatter", "heatmap", "pareto"]
    x: str
    y: str
    value: str | None = None  # heatmap: the colour column (x and y are its two axes)
    hue: str | None = None
    style: str | None = None
    row: str | None = None
    col: str | None = None
    where: dict[str, Any] = Field(default_factory=dict)  # keep rows with these column values
    logx: bool = False
    logy: bool = False
    title: str | None = None
    xlabel: str | None = None
    ylabel: str | None = None
    sharey: bool = True
    col_wrap: int | None = Field(default=None, gt=0)  # panels per line when faceting by col
    # inches per panel (drawn at 130 dpi): over 50 a figure fails only once the
    # whole study has run (matplotlib's size limit), or takes gigabytes to draw
    height: float = Field(default=3.2, gt=0, le=50)
    aspect: float = Field(default=1.3, gt=0)  # panel width / height
    annot: bool = True  # heatmap: print values in cells
    fmt: str = ".2f"  # heatmap cell format
    center: float | None = None  # heatmap: diverging colours around this value (e.g. 0 or 1)
    agg: Literal["mean", "median", "min", "max"] = "mean"  # heatmap: duplicates per cell
    # pareto: which way each axis is better (default: lower for times, errors, costs) and the
    # columns within whose values a front is taken (besides the row/col facets)
    x_better: Literal["higher", "lower"] | None = None
    y_better: Literal["higher", "lower"] | None = None
    front_by: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _heatmap_value(self) -> PlotSpec:
        if self.height * self.aspect > 50:
            raise ValueError(f"aspect: panels {self.height:g} inches high and {self.aspect:g} "
                             f"times as wide are {self.height * self.aspect:g} inches wide, "
                             "over 50")
        if self.kind == "heatmap" and not self.value:
            raise ValueError("value: a heatmap needs 'value' (the colour column)")
        if self.kind != "heatmap" and self.value:
            raise ValueError(f"value: only heatmaps take 'value' (this plot is a {self.kind})")
        if self.kind == "heatmap" and len({self.x, self.y, self.value}) < 3:
            # else the figure fails after the run ("Grouper for ... not 1-dimensional")
            field = "y" if self.y == self.x else "value"
            raise ValueError(f"{field}: a heatmap's x, y and value are three different columns "
                             f"(x {self.x}, y {self.y}, value {self.value})")
        if self.kind == "heatmap" and (self.hue or self.style):
            raise ValueError("hue: a heatmap has no hue/style; use row/col facets")
        if self.col_wrap is not None and (self.row or not self.col):
            raise ValueError("col_wrap: wrapping needs 'col' facets and no 'row'")
        if not _number_format(self.fmt):  # else the figure fails after every point has run
            raise ValueError(f"fmt: {self.fmt!r} is not a number format such as .2f, .3g or "
                             ".1%")
        if self.kind != "heatmap" and self.center is not None:
            raise ValueError(f"center: only heatmaps take 'center' (this plot is a {self.kind})")
        pareto_only = [f for f in ("x_better", "y_better", "front_by") if getattr(self, f)]
        if self.kind != "pareto" and pareto_only:
            raise ValueError(f"{pareto_only[0]}: only pareto plots take it (this plot is a "
                             f"{self.kind})")
        return self

    def columns(self) -> dict[str, str]:
        """Field name -> column for every column this plot reads."""
        fields = ("x", "y", "value", "hue", "style", "row", "col")
        out = {f: getattr(self, f) for f in fields if getattr(self, f)}
        out.update({f"front_by.{i}": c for i, c in enumerate(self.front_by)})
        out.update({f"where.{k}": k for k in self.where})
        return out


def _number_format(fmt: str) -> bool:
    """Whether seaborn can write a heatmap cell with ``fmt`` (``"{:" + fmt + "}"``): a float
    cell, or a whole-number one (``d``, for a min/max of counts)."""
    for value in (1.5, 2):
        try:
            ("{:" + fmt + "}").format(value)
            return True
        except (ValueError, IndexError, KeyError):
            pass
    return False


SEARCHABLE = ("workload.context", "workload.batch")
#: The most values ``pick: fastest`` simulates in one search.
MAX_SCANNED = 256


class SearchSpec(StudyModel):
    """Binary search for the largest value of ``maximize`` whose footprint fits.

    Feasibility is the policy's capacity accounting only (no simulation), assumed monotone in
    the searched quantity; the result is exact to ``step``. With ``max_token_latency_ms`` (a
    latency SLO) a value must also, simulated at the point's fidelity, keep the per-token
    latency statistic ``latency_stat`` within it (latency assumed to grow with the value).

    ``pick: fastest`` answers with the value that decodes fastest (tokens/s) among those up to
    the largest that qualifies, each simulated: the largest batch is not always the fastest
    one, where more sequences push the KV cache out of HBM (``MAX_SCANNED`` values at most).
    """

    maximize: Literal["workload.context", "workload.batch"]
    lo: int = Field(gt=0)
    hi: int = Field(gt=0)
    step: int = Field(default=1, gt=0)
    max_token_latency_ms: float | None = Field(default=None, gt=0)
    latency_stat: Literal["mean", "p50", "p99"] = "mean"
    pick: Literal["largest", "fastest"] = "largest"

    @field_validator("lo", "hi", "step", mode="before")
    @classmethod
    def _counts(cls, value: Any) -> Any:
        return parse_count(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _order(self) -> SearchSpec:
        if self.lo > self.hi:
            raise ValueError(f"lo: lo ({self.lo}) must not exceed hi ({self.hi})")
        if self.step > self.hi - self.lo > 0:  # else the search answers lo, whatever fits
            raise ValueError(f"step: step ({self.step}) is wider than the range searched, "
                             f"hi - lo ({self.hi - self.lo})")
        if self.max_token_latency_ms is None and self.latency_stat != "mean":
            raise ValueError(f"latency_stat: {self.latency_stat} names the statistic a latency "
                             "SLO bounds; set max_token_latency_ms too")
        values = (self.hi - self.lo) // self.step + 1
        if self.pick == "fastest" and values > MAX_SCANNED:
            raise ValueError(f"pick: fastest simulates every value from lo to the largest that "
                             f"qualifies, at most {MAX_SCANNED}; lo..hi by step gives {values} "
                             "(narrow the range or widen the step)")
        return self

    @property
    def slo(self) -> bool:
        """Whether a latency SLO bounds the search (each probe that fits is simulated)."""
        return self.max_token_latency_ms is not None

    @property
    def simulates(self) -> bool:
        """Whether the search simulates (an SLO or ``pick: fastest``), so its rows carry the
        simulation's throughput and latencies."""
        return self.slo or self.pick == "fastest"

    def key_config(self) -> dict[str, Any]:
        """The search as a point's key holds it: without an SLO or a pick, exactly as before
        they existed."""
        data = self.model_dump(mode="json")
        if not self.slo:
            del data["max_token_latency_ms"], data["latency_stat"]
        if self.pick == "largest":
            del data["pick"]
        return data

    @property
    def field(self) -> str:
        return self.maximize.split(".", 1)[1]

    @property
    def column(self) -> str:
        return f"max_{self.field}"


class SensitivitySpec(StudyModel):
    """Elasticity of ``metric`` to each hardware parameter: at every point of the sweep, each
    parameter alone is scaled by ``1 + step`` and by ``1 / (1 + step)`` and
    ``d ln metric / d ln parameter`` is taken as the central difference. An elasticity of -1
    means the metric falls in proportion as the parameter grows (latency-bound on it), 0 that
    the parameter does not matter there."""

    parameters: list[str] = Field(min_length=1)  # dotted profile paths, e.g. tiers.cxl0.latency_ns
    step: float = Field(default=0.25, gt=0, le=1)
    metric: str = "tokens_per_s"

    @field_validator("parameters")
    @classmethod
    def _unique(cls, parameters: list[str]) -> list[str]:
        seen = set()
        for p in parameters:
            if p in seen:
                raise ValueError(f"parameter {p!r} is listed twice")
            seen.add(p)
        return parameters


class EqualAccuracySpec(StudyModel):
    """Every lossy point again at the cheapest setting of its policy's knob whose accuracy-proxy
    error is at most each target (``hgsim.equal_accuracy``); exact policies reach any target
    as configured. The points gain the axis ``accuracy.target`` (``configured`` or
    ``rel_error<=T``), so derived metrics compare policies at equal accuracy too."""

    target_rel_error: float | list[float]
    resolution: float = Field(default=0.005, gt=0, le=0.5)  # knob grid step
    knobs: dict[str, str] = Field(default_factory=dict)  # policy -> option (default: registry)

    @field_validator("target_rel_error")
    @classmethod
    def _targets(cls, value: float | list[float]) -> float | list[float]:
        targets = value if isinstance(value, list) else [value]
        if not targets:
            raise ValueError("give at least one target")
        for target in targets:
            if not 0 <= target < 1:
                raise ValueError(f"a target relative error must lie in [0, 1), got {target}")
        if len(set(targets)) != len(targets):
            raise ValueError("a target is listed twice")
        return value

    @property
    def targets(self) -> list[float]:
        return [float(t) for t in (self.target_rel_error if isinstance(
            self.target_rel_error, list) else [self.target_rel_error])]


class SloSpec(StudyModel):
    """What a request must meet: its time to first token and its mean time per output token
    after the first; ``attainment``, the share of requests that must meet it (``find_rate``)."""

    ttft_s: float | None = Field(default=None, gt=0)
    tpot_ms: float | None = Field(default=None, gt=0)
    attainment: float = Field(default=0.9, gt=0, le=1)

    @property
    def set(self) -> bool:
        return self.ttft_s is not None or self.tpot_ms is not None


#: The serving fields an axis may sweep (``serving.<field>``).
SERVING_AXES = ("rate_per_s", "find_rate", "requests", "prompt", "output", "max_batch",
                "admission", "prefill_chunk", "turns", "followup", "think_s", "prefix_cache",
                "kv_offload_gb", "kv_offload_tier", "affinity_wait_s", "seed", "slo.ttft_s",
                "slo.tpot_ms", "slo.attainment")
#: The serving fields of a conversation beside ``turns`` (they need turns 2 or more), with
#: their defaults.
CONVERSATION_DEFAULTS = {"followup": "1k", "think_s": 30.0, "prefix_cache": True,
                         "kv_offload_gb": 0.0, "kv_offload_tier": None,
                         "affinity_wait_s": None}
#: The fields of a host KV store and the affinity wait, left out of a point's key at their
#: defaults (no store, strict affinity): the points of conversations stored before they
#: existed keep their keys.
KV_OFFLOAD_DEFAULTS = {"kv_offload_gb": 0.0, "kv_offload_tier": None,
                       "affinity_wait_s": None}


class ServingSpec(StudyModel):
    """An online server at every point (``hgsim.serving``, docs/serving.md): ``requests``
    requests with ``prompt`` and ``output`` lengths arrive as a Poisson process of
    ``rate_per_s`` (or, with
    ``find_rate``, at the highest rate at which ``slo.attainment`` of them meet the SLO) and are
    batched continuously, at most ``max_batch`` at a time, admitted on their final KV
    (``admission: reserve``) or on the KV held now, preempted when it runs out (``paged``),
    their prompts prefilled whole or, with ``prefill_chunk``, at most that many tokens an
    iteration in the decode step's forward (chunked prefill; 0: whole). With ``turns`` > 1 each
    arrival is a conversation of that many turns (``rate_per_s`` and ``requests`` count
    conversations): a later turn sends the conversation so far plus ``followup`` new tokens,
    ``think_s`` seconds on average (exponential) after the turn before has finished, and with
    ``prefix_cache`` the server keeps a conversation's KV between its turns, and with
    ``kv_offload_gb`` > 0 writes it to a host KV store of that many GB on ``kv_offload_tier``
    too (default: the DRAM tier of the GPU's socket), a later turn whose KV left HBM loading it
    back (``hgsim.serving.kv_offload``); with several copies (``workload.data_parallel``) a
    later turn waits at most ``affinity_wait_s`` for the copy whose cache holds its KV (no
    effect with one copy). The point's workload gives the dtypes and tensor parallelism; its
    batch, context and gen are not used (the lengths come from here)."""

    rate_per_s: float | None = Field(default=None, gt=0)
    find_rate: bool = False
    requests: int = Field(default=300, ge=1)
    prompt: str | int = "32k"
    output: str | int = 256
    max_batch: int = Field(default=256, ge=1)
    admission: Literal["reserve", "paged"] = "reserve"
    prefill_chunk: int = Field(default=0, ge=0)
    turns: int = Field(default=1, ge=1)
    followup: str | int = "1k"
    think_s: float = Field(default=30.0, ge=0)
    prefix_cache: bool = True
    kv_offload_gb: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    kv_offload_tier: str | None = None
    affinity_wait_s: float | None = Field(default=None, ge=0)  # None: however long
    seed: int = Field(default=0, ge=0)
    slo: SloSpec | None = None

    @field_validator("requests", "max_batch", "prefill_chunk", "turns", mode="before")
    @classmethod
    def _counts(cls, value: Any) -> Any:
        return parse_count(value) if isinstance(value, str) else value

    @field_validator("prompt", "output", "followup", mode="before")
    @classmethod
    def _lengths(cls, value: Any, info: ValidationInfo) -> Any:
        from hgsim.errors import UserError
        from hgsim.serving.requests import output_lengths, prompt_lengths

        try:
            (output_lengths if info.field_name == "output" else prompt_lengths)(value, "length")
        except UserError as exc:
            raise ValueError(str(exc).removeprefix("length: ")) from None
        return value

    @field_validator("turns")
    @classmethod
    def _turns(cls, value: int) -> int:
        from hgsim.serving.requests import MAX_TURNS

        if value > MAX_TURNS:
            raise ValueError(f"at most {MAX_TURNS} turns a conversation, got {value}")
        return value

    @field_validator("think_s")
    @classmethod
    def _think(cls, value: float) -> float:
        from hgsim.serving.requests import MAX_THINK_S

        if value > MAX_THINK_S:
            raise ValueError(f"at most {MAX_THINK_S:g} seconds, got {value:g}")
        return value

    def problem(self, turns_swept: bool = False) -> tuple[str, str] | None:
        """The field and the reason when the fields do not go together (checked per point,
        where an axis may set any of them), else None. The fields of a conversation need
        turns 2 or more, unless ``turns_swept`` (a point of one turn then ignores them)."""
        if self.find_rate and self.rate_per_s is not None:
            return "find_rate", ("searches the rate itself; drop rate_per_s (or set find_rate: "
                                 "false)")
        if self.find_rate and (self.slo is None or not self.slo.set):
            return "find_rate", ("searches the highest rate meeting an SLO: set slo.ttft_s "
                                 "and/or slo.tpot_ms")
        if not self.find_rate and self.rate_per_s is None:
            return "rate_per_s", ("give a Poisson arrival rate (requests/s), or find_rate: true "
                                  "to search the highest one meeting the SLO")
        if self.slo is not None and not self.slo.set:
            return "slo", "give ttft_s and/or tpot_ms (an SLO with neither bounds nothing)"
        from hgsim.serving import prefill_chunk_problem
        from hgsim.serving.requests import MAX_REQUESTS

        why = prefill_chunk_problem(self.prefill_chunk)
        if why is not None:
            return "prefill_chunk", why
        if self.requests * self.turns > MAX_REQUESTS:
            return "turns", (f"{self.requests:,} conversations of {self.turns} turns are more "
                             f"than {MAX_REQUESTS:,} requests")
        if self.turns == 1 and not turns_swept:
            for name in self.conversation_fields_set():
                return name, "applies to conversations: set serving.turns 2 or more"
        if self.turns > 1 and self.kv_offload_gb and not self.prefix_cache:
            return "kv_offload_gb", ("a store serves the prefix cache: set serving.prefix_cache "
                                     "true")
        if self.turns > 1 and self.affinity_wait_s is not None and not self.prefix_cache:
            return "affinity_wait_s", ("a later turn waits for the copy whose prefix cache "
                                       "holds its KV: set serving.prefix_cache true")
        return None

    def conversation_fields_set(self) -> list[str]:
        """The fields of a conversation beside ``turns`` that are not at their defaults."""
        from hgsim.serving.requests import LengthDist

        def same(name: str, value: Any, default: Any) -> bool:
            if name != "followup":
                return value == default
            return str(LengthDist.parse(value, name)) == str(LengthDist.parse(default, name))

        return [name for name, default in CONVERSATION_DEFAULTS.items()
                if not same(name, getattr(self, name), default)]

    def key_config(self) -> dict[str, Any]:
        """The spec as a point's key holds it: lengths in one spelling (32k and 32768 alike)."""
        from hgsim.serving.requests import LengthDist

        data = self.model_dump(mode="json")
        if not data["prefill_chunk"]:  # whole prompts: the key points stored before it had
            del data["prefill_chunk"]
        if data["admission"] == "reserve":  # the key points stored before paged admission had
            del data["admission"]
        if self.turns == 1:  # single requests: the key points stored before conversations had
            for name in ("turns", *CONVERSATION_DEFAULTS):
                del data[name]
        else:
            data["followup"] = str(LengthDist.parse(data["followup"], "followup"))
            data["think_s"] = float(data["think_s"])
            data["kv_offload_gb"] = float(data["kv_offload_gb"])
            for name, default in KV_OFFLOAD_DEFAULTS.items():  # defaults: the key it had before
                if data[name] == default:
                    del data[name]
        for name in ("prompt", "output"):
            data[name] = str(LengthDist.parse(data[name], name))
        return data


class ReportSpec(StudyModel):
    """What ``report.md`` ranks by and how long its tables may get."""

    best_metric: str | None = None  # default: tokens_per_s (max_<field> for searches)
    # The axis whose best value is reported per point; None: the policy, if swept. Not a
    # literal "policy" default: study.resolved.yaml writes every field, and a named best_by
    # must be a sweep axis.
    best_by: str | None = None
    max_rows: int = Field(default=40, gt=0)

    @property
    def best_axis(self) -> str:
        """The axis ranked per point: ``best_by`` as given, else the policy."""
        return self.best_by or "policy"


class AmongSpec(StudyModel):
    """Sets of one axis' values, each represented at every point by its best member (e.g.
    "the best baseline": whichever of several policies is fastest there)."""

    column: str
    sets: dict[str, list[Any]] = Field(min_length=1)
    rank_by: str = "tokens_per_s"
    better: Literal["higher", "lower"] | None = None  # default as for derived metrics

    @field_validator("sets")
    @classmethod
    def _members(cls, sets: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for name, members in sets.items():
            if not members:
                raise ValueError(f"{name}: a set needs at least one value")
        return sets


class AnswerSpec(StudyModel):
    """A question the study answers in the first lines of report.md: which value of the axis
    ``choose`` is best by ``metric``, per combination of the ``per`` columns (and per set of
    ``among``). With ``gain_vs`` a choice is ranked by what it adds over that reference choice
    per unit of ``cost`` spent beyond it: ``(metric - metric_ref) / (cost - cost_ref) x
    scale`` (an infeasible point counts as 0 of the metric: it produces nothing)."""

    question: str
    choose: str
    metric: str
    per: list[str] = Field(default_factory=list)
    better: Literal["higher", "lower"] | None = None  # default as for derived metrics
    gain_vs: Any = None
    cost: str | None = None
    scale: float = Field(default=1.0, gt=0)
    among: AmongSpec | None = None

    @model_validator(mode="after")
    def _gain(self) -> AnswerSpec:
        if (self.gain_vs is None) != (self.cost is None):
            raise ValueError("gain_vs and cost go together (the gain per unit of cost over a "
                             "reference choice)")
        # each of these once made the report die with a pandas traceback after the run
        repeated = next((c for i, c in enumerate(self.per) if c in self.per[:i]), None)
        if repeated is not None:
            raise ValueError(f"per: '{repeated}' is listed twice")
        if self.choose in self.per:  # one choice per group: nothing to choose between
            raise ValueError(f"per: '{self.choose}' is the column chosen (choose); an answer "
                             "per value of it has a single choice")
        ranked = next((c for c in (self.metric, self.cost) if c in self.per), None)
        if ranked is not None:
            raise ValueError(f"per: '{ranked}' ranks the choices (metric, cost); per names "
                             "the axes that group them")
        if self.among is not None and self.among.column in (self.choose, *self.per):
            field = "choose" if self.among.column == self.choose else "per"
            raise ValueError(f"among.column: '{self.among.column}' is also in {field}; among "
                             "takes another axis' values in sets")
        return self


class Study(StudyModel):
    name: str
    description: str = ""
    base: BaseConfig
    sweep: list[AxisGroup] = Field(default_factory=list)
    search: SearchSpec | None = None
    sensitivity: SensitivitySpec | None = None
    equal_accuracy: EqualAccuracySpec | None = None
    serving: ServingSpec | None = None
    derived: dict[str, DerivedSpec] = Field(default_factory=dict)
    plots: dict[str, PlotSpec] = Field(default_factory=dict)
    report: ReportSpec = Field(default_factory=ReportSpec)
    answer: list[AnswerSpec] = Field(default_factory=list)

    @field_validator("answer", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _filename_safe(value, "study name")

    @model_validator(mode="after")
    def _search_or_sensitivity(self) -> Study:
        if self.search is not None and self.sensitivity is not None:
            raise ValueError("sensitivity: a capacity search cannot also vary hardware "
                             "parameters; use two studies")
        if self.equal_accuracy is not None and (self.search or self.sensitivity):
            raise ValueError("equal_accuracy: simulates points at an accuracy target; it "
                             "cannot be combined with a capacity search or sensitivity")
        if self.serving is not None:
            other = next((name for name in ("search", "sensitivity", "equal_accuracy")
                          if getattr(self, name) is not None), None)
            if other is not None:
                raise ValueError(f"serving: runs an online server at every point; it cannot be "
                                 f"combined with {other} (use two studies)")
        return self

    @field_validator("plots")
    @classmethod
    def _plot_names(cls, plots: dict[str, PlotSpec]) -> dict[str, PlotSpec]:
        for name in plots:
            _filename_safe(name, "plot name")
        return plots

    def axes(self) -> dict[str, list[Any]]:
        """Every axis path -> its values as written, in file order."""
        out: dict[str, list[Any]] = {}
        for group in self.sweep:
            out.update(group.axes())
        return out

    def zipped(self) -> dict[str, list[str]]:
        """Axis -> the other axes of its zip group (they advance together)."""
        out: dict[str, list[str]] = {}
        for group in self.sweep:
            for path in group.zip:
                out[path] = [p for p in group.zip if p != path]
        return out

    @property
    def is_search(self) -> bool:
        return self.search is not None

    @property
    def has_slo(self) -> bool:
        """Whether any point's capacity search has a latency SLO (set or swept)."""
        return self.search is not None and (
            self.search.slo or "search.max_token_latency_ms" in self.axes())

    @property
    def picks_fastest(self) -> bool:
        """Whether any point's search answers with its fastest value (``pick``, set or swept)."""
        return self.search is not None and (
            self.search.pick == "fastest" or "search.pick" in self.axes())

    @property
    def serving_slo(self) -> bool:
        """Whether any serving point has an SLO (set or swept): its rows then carry the SLO's
        attainment and goodput."""
        return self.serving is not None and (
            self.serving.slo is not None or any(a.startswith("serving.slo.") for a in self.axes()))

    @property
    def serving_conversations(self) -> bool:
        """Whether any serving point serves conversations (``turns`` above 1, set or swept):
        its rows then carry their turns, follow-up, think time, prefix cache and the share of
        prompt tokens the cache held."""
        return self.serving is not None and (
            self.serving.turns > 1 or "serving.turns" in self.axes())

    @property
    def serving_finds_rate(self) -> bool:
        """Whether any serving point searches its rate (``find_rate``, set or swept)."""
        return self.serving is not None and (
            self.serving.find_rate or "serving.find_rate" in self.axes())

    @property
    def search_simulates(self) -> bool:
        """Whether any point's search simulates (an SLO or ``pick: fastest``, set or swept):
        its rows then carry throughput and latencies."""
        return self.has_slo or self.picks_fastest
