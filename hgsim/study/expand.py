"""Turning a study into points: every combination of axis values, fully resolved and hashed.

Everything a point needs is resolved here, before anything runs: profile (with dotted hardware
overrides applied and re-validated), model, policy options, workload and fidelity. A bad name,
path or value therefore fails the whole study up front with the file and line of the value
that caused it, instead of as the 400th of 500 points after an hour.

A point's key is a hash of its full resolved configuration (hardware and model contents, not
just their names, plus the hgsim version, a plugin policy's package version and fidelity), so a
stored result is reused exactly when it would be computed the same way again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hgsim import __version__
from hgsim.catalog import get_model
from hgsim.config_io import Loc, YamlDocument, humane
from hgsim.errors import ConfigError, OptionError, UserError
from hgsim.model_files import beside, find_model_file, is_model_path
from hgsim.policies import checked_options, registry
from hgsim.policies.base import host_socket_name
from hgsim.profiles import load_profile, profile_with_overrides, resolve_profile
from hgsim.simulate import Fidelity
from hgsim.specs.hardware import HardwareProfile
from hgsim.specs.model import ModelSpec
from hgsim.study import axes as ax
from hgsim.study import equal_accuracy as eq
from hgsim.study import sensitivity as sens
from hgsim.study.schema import SERVING_AXES, SearchSpec, ServingSpec, Study
from hgsim.workload import Workload


@dataclass(frozen=True)
class PointSpec:
    """Everything a worker needs to compute one point; picklable, no file access needed."""

    key: str
    profile: HardwareProfile
    model: ModelSpec
    policy: str
    policy_options: dict[str, Any]
    workload: Workload
    fidelity: Fidelity
    search: SearchSpec | None = None
    # an equal-accuracy twin: the target and knob searched (hgsim.study.equal_accuracy)
    equal_accuracy: Any = None
    # an online server instead of one simulation (hgsim.study.serving)
    serving: ServingSpec | None = None


@dataclass
class Point:
    """One row of the study: its coordinates (axis column -> table value) and its spec."""

    coords: dict[str, Any]
    spec: PointSpec


@dataclass
class Expansion:
    """The study's points in sweep order, and the axis columns in file order."""

    points: list[Point]
    axes: list[str]
    axis_values: dict[str, list[Any]]  # normalized values, file order, for filters and plots
    profiles: dict[str, Path] = field(default_factory=dict)  # profile value -> its file
    models: dict[str, Path] = field(default_factory=dict)  # model path value -> its file

    def unique_specs(self) -> list[PointSpec]:
        """One spec per key (two coordinates may resolve to the same configuration)."""
        seen: dict[str, PointSpec] = {}
        for point in self.points:
            seen.setdefault(point.spec.key, point.spec)
        return list(seen.values())


# A combination remembers where each of its values was written, for error lines.
_Combo = dict[str, tuple[Any, Loc]]


def axis_locations(study: Study) -> dict[str, Loc]:
    """Axis path -> location of its key in the file (``sweep[i].grid.<path>``)."""
    out: dict[str, Loc] = {}
    for i, group in enumerate(study.sweep):
        for kind in ("zip", "grid"):
            for path in getattr(group, kind):
                out[path] = ("sweep", i, kind, path)
    return out


def _combinations(study: Study) -> list[_Combo]:
    """Groups crossed with each other; inside a group, zip tuples crossed with the grid."""
    per_group: list[list[_Combo]] = []
    for i, group in enumerate(study.sweep):
        rows: list[_Combo] = [{}]
        if group.zip:
            n = len(next(iter(group.zip.values())))
            rows = [
                {p: (vals[j], ("sweep", i, "zip", p, j)) for p, vals in group.zip.items()}
                for j in range(n)
            ]
        for path, values in group.grid.items():
            rows = [
                {**row, path: (value, ("sweep", i, "grid", path, j))}
                for row in rows
                for j, value in enumerate(values)
            ]
        per_group.append(rows)
    combos: list[_Combo] = []
    for parts in itertools.product(*per_group):
        merged: _Combo = {}
        for part in parts:
            merged.update(part)
        combos.append(merged)
    return combos


class _Resolver:
    """Caches loaded profiles, overridden profiles and content hashes across points."""

    def __init__(self, doc: YamlDocument, base_dir: Path):
        self.doc = doc
        self.base_dir = base_dir
        self.profile_files: dict[str, Path] = {}
        self._profiles: dict[str, HardwareProfile] = {}
        self._overridden: dict[tuple, tuple[HardwareProfile, str]] = {}
        self._models: dict[str, tuple[ModelSpec, str]] = {}
        self.model_files: dict[str, Path] = {}  # model values that are paths -> their files

    def profile(self, name: str, loc: Loc) -> HardwareProfile:
        self._check_profile_name(name, loc)
        if name not in self._profiles:
            target = name
            if "/" in name or name.endswith((".yaml", ".yml")):
                # relative to the study file, also when missing (the error names that path)
                target = str(self.base_dir / name)
            try:
                self.profile_files[name] = resolve_profile(target).resolve()
                self._profiles[name] = load_profile(target)
            except UserError as exc:  # the profile file's own line and field stay in the message
                raise self.doc.error(loc, str(exc)) from None
        return self._profiles[name]

    def _check_profile_name(self, name: Any, loc: Loc) -> None:
        if not isinstance(name, str):  # before any lookup: a mapping or list is unhashable
            raise self.doc.error(loc, f"profile must be a name or path, got {name!r}")

    def overridden(self, name: str, overrides: dict[str, Any], locs: dict[str, Loc],
                   profile_loc: Loc) -> tuple[HardwareProfile, str]:
        self._check_profile_name(name, profile_loc)
        cache_key = (name, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        hit = self._overridden.get(cache_key)
        if hit is None:
            base = self.profile(name, profile_loc)
            try:
                profile = profile_with_overrides(base, overrides)
            except UserError as exc:
                loc = _blame(exc, locs) or profile_loc
                raise self.doc.error(loc, _strip(exc)) from None
            hit = (profile, _digest(profile.model_dump(mode="json")))
            self._overridden[cache_key] = hit
        return hit

    def model(self, name: Any, loc: Loc) -> tuple[ModelSpec, str]:
        if not isinstance(name, str):
            raise self.doc.error(loc, f"model must be a name, got {name!r}")
        if name not in self._models:
            target = beside(name, self.base_dir)
            try:  # a model file is relative to the study file; its errors name that file
                spec = get_model(target)
                if is_model_path(target):
                    self.model_files[name] = find_model_file(target).resolve()
            except UserError as exc:
                raise self.doc.error(loc, str(exc)) from None
            # keyed by content: ``source`` (a model file's path, or a citation) and
            # ``rope_theta`` (values, not cost) change no result, so moving a file keeps its
            # points (and points stored before rope_theta was a field keep theirs); editing
            # another field recomputes them
            self._models[name] = (spec, _digest(spec.model_dump(
                mode="json", exclude={"source", "rope_theta"})))
        return self._models[name]


def expand(study: Study, doc: YamlDocument, base_dir: Path | None = None) -> Expansion:
    """All points of ``study``, resolved; the first bad value raises a ConfigError at its line."""
    base_dir = base_dir or Path(doc.source).resolve().parent
    seen: set[str] = set()
    for i, group in enumerate(study.sweep):
        for kind in ("zip", "grid"):
            for path in getattr(group, kind):
                if path in seen:
                    raise doc.error(("sweep", i, kind, path),
                                    f"axis '{path}' appears in more than one group")
                seen.add(path)
    _check_size(study, doc)
    locations = axis_locations(study)
    for path, loc in locations.items():
        _check_axis_path(path, study, doc, loc)
    resolver = _Resolver(doc, base_dir)
    _check_swept_base(study, doc, resolver)
    _check_hardware_axes(study, doc, resolver)

    points: list[Point] = []
    for combo in _combinations(study):
        points.append(_resolve(study, combo, doc, resolver))
    _check_distinct(study, doc)  # after _resolve, which names any unreadable value first
    axis_values = {
        path: _unique([ax.normalize(path, v) for v in values])
        for path, values in study.axes().items()
    }
    if "model" in axis_values:  # a model file's name is known once resolved beside the study
        axis_values["model"] = _unique([p.coords["model"] for p in points])
    axes = list(study.axes())
    if study.sensitivity is not None:
        points = _with_sensitivity(study, points, doc, resolver)
        axes += list(sens.AXES)
        for column in sens.AXES:
            axis_values[column] = _unique([p.coords[column] for p in points])
    if study.equal_accuracy is not None:
        points = _with_equal_accuracy(study, points, doc)
        axes.append(eq.AXIS)
        axis_values[eq.AXIS] = _unique([p.coords[eq.AXIS] for p in points])
    return Expansion(points, axes, axis_values, resolver.profile_files, resolver.model_files)


def _with_equal_accuracy(study: Study, points: list[Point], doc: YamlDocument) -> list[Point]:
    """Each point as configured, then once per accuracy target (a lossy policy's twin searches
    its knob; an exact policy's is the same configuration)."""
    spec = study.equal_accuracy
    for policy, option in spec.knobs.items():
        try:
            eq.knob_for(policy, option)
        except (ValueError, registry.UnknownPolicyError) as exc:
            raise doc.error(("equal_accuracy", "knobs", policy), str(exc)) from None
    knobs: dict[str, Any] = {}
    out: list[Point] = []
    for point in points:
        out.append(Point({**point.coords, eq.AXIS: eq.CONFIGURED}, point.spec))
    for target in spec.targets:
        for point in points:
            policy = point.spec.policy
            if policy not in knobs:
                try:
                    knobs[policy] = eq.knob_of(policy, spec.knobs)
                except ValueError as exc:
                    raise doc.error(("equal_accuracy",), str(exc)) from None
            twin = point.spec
            if knobs[policy] is not None:
                twin = eq.twin_spec(twin, eq.AccuracyTarget(target, knobs[policy],
                                                            spec.resolution))
            out.append(Point({**point.coords, eq.AXIS: eq.label(target)}, twin))
    return out


def _with_sensitivity(study: Study, points: list[Point], doc: YamlDocument,
                      resolver: _Resolver) -> list[Point]:
    """Each point, then each sensitivity parameter scaled down and up around it."""
    spec = study.sensitivity
    combos = _combinations(study)
    out: list[Point] = []
    moved: set[str] = set()  # parameters that are not 0 at some point
    for point, combo in zip(points, combos, strict=True):
        out.append(Point({**point.coords, sens.PARAMETER: sens.BASE, sens.FACTOR: 1.0,
                          sens.VALUE: float("nan")}, point.spec))
        for i, parameter in enumerate(spec.parameters):
            loc = ("sensitivity", "parameters", i)
            try:
                value = sens.parameter_value(point.spec.profile, parameter)
            except ValueError as exc:
                raise doc.error(loc, str(exc)) from None
            if value:
                moved.add(parameter)
            for factor, scaled in sens.variants(value, spec.step):
                varied = _resolve(study, {**combo, f"hardware.{parameter}": (scaled, loc)},
                                  doc, resolver)
                coords = {k: v for k, v in varied.coords.items()
                          if k != f"hardware.{parameter}" or k in point.coords}
                if f"hardware.{parameter}" in point.coords:  # swept too: keep the point's
                    coords[f"hardware.{parameter}"] = point.coords[f"hardware.{parameter}"]
                coords.update({sens.PARAMETER: parameter, sens.FACTOR: factor,
                               sens.VALUE: float(scaled)})
                out.append(Point(coords, varied.spec))
    for i, parameter in enumerate(spec.parameters):
        if parameter not in moved:  # its elasticity table would be empty, without a word
            raise doc.error(("sensitivity", "parameters", i),
                            f"'{parameter}' is 0 at every point, and 0 scaled is 0: it has no "
                            "elasticity there (sweep it as a hardware axis instead)")
    return out


#: Most points a study may hold: resolving alone takes about 0.25 ms a point (a million: four
#: minutes and gigabytes of memory before the first simulation), so a grid over it is a typo
#: or a mistake (300 x 300 x 300 values) that would otherwise run out of memory or time.
MAX_POINTS = 1_000_000


def _check_size(study: Study, doc: YamlDocument) -> None:
    """A ConfigError when the sweep (times the sensitivity variants) holds over MAX_POINTS
    points, counted from the axes' lengths before any point is built."""
    factors = []
    for group in study.sweep:
        if group.zip:
            factors.append(len(next(iter(group.zip.values()))))
        factors += [len(values) for values in group.grid.values()]
    if study.sensitivity is not None:  # each point, then each parameter scaled down and up
        factors.append(1 + 2 * len(study.sensitivity.parameters))
    total = math.prod(factors)
    if total > MAX_POINTS:
        shape = " x ".join(f"{n:,}" for n in factors)
        raise doc.error(("sweep",), f"{total:,} points ({shape}), over the {MAX_POINTS:,} a "
                                    "study may hold: thin the axes or split the study")


def _check_axis_path(path: str, study: Study, doc: YamlDocument, loc: Loc) -> None:
    try:
        kind, rest = ax.section(path)
    except ValueError as exc:
        raise doc.error(loc, str(exc)) from None
    if kind == "workload" and rest not in Workload.model_fields:
        raise doc.error(loc, f"unknown workload field '{rest}' (known: "
                             f"{', '.join(Workload.model_fields)})")
    if kind == "fidelity":
        _check_fidelity_path(rest, doc, loc)
    if kind in BLOCK_AXES:  # search.* and serving.* sweep a block the study must have
        what, fields = BLOCK_AXES[kind]
        if getattr(study, kind) is None:
            raise doc.error(loc, f"'{path}' sweeps {what}; the study has no {kind} block")
        if rest not in fields:
            raise doc.error(loc, f"'{path}' cannot be swept ({kind} axes: "
                                 f"{', '.join(f'{kind}.{f}' for f in fields)})")
    if study.serving is not None and kind == "workload" and rest not in SERVING_WORKLOAD:
        why = ("a serving point takes its lengths from serving.prompt and serving.output and "
               "its batch from serving.max_batch; sweep those instead"
               if rest in ("batch", "context", "gen") else
               "a serving point uses only workload." + ", workload.".join(SERVING_WORKLOAD))
        raise doc.error(loc, f"'{path}' cannot be swept with serving: {why}")
    if study.search is not None and path == study.search.maximize:
        raise doc.error(loc, f"'{path}' is searched (search.maximize), it cannot also be an axis")
    if kind == "label":  # a column of names: grouped, ranked and plotted by value
        for j, value in enumerate(study.axes()[path]):
            if isinstance(value, (dict, list)):
                raise doc.error((*loc, j), f"a label is a name or a number, got "
                                           f"{type(value).__name__} {value!r}")
            if isinstance(value, bool):  # YAML reads on/off and yes/no as booleans
                raise doc.error((*loc, j), f"a label is a name or a number, got the YAML "
                                           f"boolean {str(value).lower()} (on/off, yes/no and "
                                           "true/false read as booleans): quote it, 'on'")


#: The workload fields a serving point uses (``hgsim.serving.StepTimes``): the others are not
#: read, so an axis over one would give the same point under several names.
SERVING_WORKLOAD = ("kv_dtype", "weight_dtype", "tensor_parallel", "data_parallel",
                    "gpu_placement")


def _serving(study: Study, values: dict[str, Any], locs: dict[str, Loc],
             doc: YamlDocument) -> ServingSpec | None:
    """The point's online server: the study's, with its swept fields, every field checked
    (each error at the line of the value that caused it)."""
    if study.serving is None:
        return None
    swept = {path.split(".", 1)[1]: path for path in values if path.startswith("serving.")}

    def where(field: str) -> Loc:
        return locs[swept[field]] if field in swept else ("serving", *field.split("."))

    spec = study.serving
    if swept:
        data = spec.model_dump()
        for field, path in swept.items():
            if field.startswith("slo."):
                data["slo"] = {**(data["slo"] or {}), field[len("slo."):]: values[path]}
            else:
                data[field] = values[path]
        try:
            spec = ServingSpec.model_validate(data)
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in error["loc"] if not str(p).endswith("]")
                             and p not in ("str", "int", "float", "bool"))
            field = field if field in SERVING_AXES else next(iter(swept))
            raise doc.error(where(field), humane(error)) from None
        if "find_rate" in swept and spec.find_rate and "rate_per_s" not in swept:
            # the rate is the one of the points that do not search it
            spec = spec.model_copy(update={"rate_per_s": None})
    problem = spec.problem(turns_swept="turns" in swept)
    if problem is not None:
        field, message = problem
        raise doc.error(where(field), message)
    return spec


def _check_kv_store(serving: ServingSpec, profile: HardwareProfile, policy: str,
                    locs: dict[str, Loc], doc: YamlDocument) -> None:
    """The point's host KV store fits its profile (hardware overrides applied) and policy,
    as its run will check (``hgsim.study.serving.kv_store``, called here): a mistake at the
    line of the value that caused it, before anything runs."""
    from hgsim.study.serving import kv_store

    try:
        kv_store(serving, profile, policy)
    except UserError as exc:
        path = exc.field or "serving.kv_offload_gb"
        path = path if path.startswith("serving.") else f"serving.{path}"
        raise doc.error(locs.get(path, tuple(path.split("."))),
                        str(exc).removeprefix(f"{exc.field}: ")) from None


#: The search fields an axis may sweep (``search.<field>``): the latency SLO and the pick.
SEARCH_AXES = ("max_token_latency_ms", "latency_stat", "pick")
#: The blocks whose fields an axis may sweep: what such an axis sweeps, and its fields.
BLOCK_AXES = {"search": ("a capacity search's latency SLO", SEARCH_AXES),
              "serving": ("an online server's setting", SERVING_AXES)}


def _search(study: Study, values: dict[str, Any], locs: dict[str, Loc],
            doc: YamlDocument) -> SearchSpec | None:
    """The point's search: the study's, with its swept SLO fields (each checked at its line)."""
    if study.search is None:
        return None
    swept = {path.split(".", 1)[1]: path for path in values if path.startswith("search.")}
    if not swept:
        return study.search
    data = study.search.model_dump()
    data.update({field: values[path] for field, path in swept.items()})
    try:
        return SearchSpec.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        message = humane(error)
        if error["loc"]:
            field = str(error["loc"][0])
        else:  # the model's own check: its message starts with the field
            field, _, message = message.partition(": ")
        path = swept.get(field, next(iter(swept.values())))
        raise doc.error(locs[path], f"search.{field}: {message}") from None


def _check_fidelity_path(rest: str, doc: YamlDocument, loc: Loc) -> None:
    """``fidelity.<rest>`` names a knob: decode_samples, accuracy, or a field of one of the
    accuracy model's groups (``selection.<field>``, ``attention.<field>``)."""
    from hgsim.accuracy.overrides import override_groups

    groups = override_groups()
    name, _, field = rest.partition(".")
    if field and name in groups:
        if field not in groups[name].fields:
            raise doc.error(loc, f"unknown {name} field '{field}' (known: "
                                 f"{', '.join(groups[name].fields)})")
    elif rest not in ("decode_samples", "accuracy"):
        known = ", ".join(["decode_samples", "accuracy", *(f"{g}.<field>" for g in groups)])
        raise doc.error(loc, f"unknown fidelity field '{rest}' (known: {known})")


def _check_distinct(study: Study, doc: YamlDocument) -> None:
    """Each value once per grid axis, each tuple once per zip group, as the table shows them:
    ``[1k, 1024]`` or ``[llama-2-7b, Llama-2-7B]`` would be the same points twice, as
    duplicate rows that derived metrics and figures then count twice."""
    for i, group in enumerate(study.sweep):
        runs = [("grid", [path], [(value,) for value in values])
                for path, values in group.grid.items()]
        if group.zip:
            runs.append(("zip", list(group.zip), list(zip(*group.zip.values(), strict=True))))
        for kind, paths, rows in runs:
            first: dict[tuple, int] = {}
            for j, row in enumerate(rows):
                shown = [ax.normalize(path, value) for path, value in zip(paths, row,
                                                                           strict=True)]
                key = tuple(_same(value) for value in shown)
                if key in first:
                    raise doc.error(("sweep", i, kind, paths[0], j),
                                    f"repeats [{first[key]}] "
                                    f"({', '.join(ax.label(v) for v in shown)}): each point "
                                    "would be computed and listed twice")
                first[key] = j


def _same(value: Any) -> Any:
    """A key equal for values the table shows as equal (1 and 1.0 alike)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ("number", float(value))
    return ("other", repr(value))


def _check_swept_base(study: Study, doc: YamlDocument, resolver: _Resolver) -> None:
    """``base.policy``, ``base.model`` and ``base.profile`` name real things even where an
    axis replaces them in every point: a typo there is still a mistake in the file."""
    axes = study.axes()
    if "policy" in axes:
        _check_policy(study.base.policy, {}, ("base", "policy"), {}, doc)
    if "model" in axes:
        resolver.model(study.base.model, ("base", "model"))
    if "profile" in axes:
        resolver.profile(study.base.profile, ("base", "profile"))


def _check_hardware_axes(study: Study, doc: YamlDocument, resolver: _Resolver) -> None:
    """Each hardware axis value alone on each profile, so a bad path names its own line."""
    axes = study.axes()
    profiles = axes.get("profile", [study.base.profile])
    profile_locs = (
        [("sweep", *axis_locations(study)["profile"][1:], j) for j in range(len(profiles))]
        if "profile" in axes else [("base", "profile")]
    )
    base_hw = {k: (v, ("base", "hardware", k)) for k, v in study.base.hardware.items()}
    hw_axes = {
        path[len("hardware."):]: [(v, (*axis_locations(study)[path], j)) for j, v in
                                  enumerate(values)]
        for path, values in axes.items() if path.startswith("hardware.")
    }
    base_values = {key: value for key, (value, _) in base_hw.items()}
    for name, ploc in zip(profiles, profile_locs, strict=True):
        for key, (value, loc) in base_hw.items():
            resolver.overridden(name, {key: value}, {key: loc}, ploc)
        # each axis value on the base's overrides (a value may name what the base adds, e.g. a
        # PCIe switch); the base alone passed, so what fails now is the value's
        for key, values in hw_axes.items():
            for value, loc in values:
                resolver.overridden(name, {**base_values, key: value}, {key: loc}, loc)


def _resolve(study: Study, combo: _Combo, doc: YamlDocument, resolver: _Resolver) -> Point:
    base = study.base
    values = {path: value for path, (value, _) in combo.items()}
    locs = {path: loc for path, (_, loc) in combo.items()}

    def pick(path: str, default: Any) -> tuple[Any, Loc]:
        return (values[path], locs[path]) if path in values else (default, ("base", path))

    profile_name, profile_loc = pick("profile", base.profile)
    hw = {k: v for k, v in base.hardware.items()}
    hw_locs: dict[str, Loc] = {k: ("base", "hardware", k) for k in base.hardware}
    for path in values:
        if path.startswith("hardware."):
            hw[path[len("hardware."):]] = values[path]
            hw_locs[path[len("hardware."):]] = locs[path]
    profile, profile_hash = resolver.overridden(profile_name, hw, hw_locs, profile_loc)

    model_name, model_loc = pick("model", base.model)
    model, model_hash = resolver.model(model_name, model_loc)

    policy, policy_loc = pick("policy", base.policy)
    options = dict(base.policy_options)
    option_locs: dict[str, Loc] = {k: ("base", "policy_options", k) for k in options}
    for path in values:
        if path.startswith("policy_options."):
            option = path.split(".", 1)[1]
            if values[path] is None:  # not set here: the policy's default, or no such option
                options.pop(option, None)
                option_locs.pop(option, None)
                continue
            options[option] = values[path]
            option_locs[option] = locs[path]
    canonical_options = _check_policy(policy, options, policy_loc, option_locs, doc)
    try:  # an option that names a part of the machine: checked against this point's profile
        host_socket_name(profile, canonical_options.get("host_socket"))
    except OptionError as exc:
        raise doc.error(option_locs.get(exc.option, policy_loc), exc.reason) from None

    wl = dict(base.workload)
    wl_locs: dict[str, Loc] = {k: ("base", "workload", k) for k in wl}
    for path in values:
        if path.startswith("workload."):
            wl[path.split(".", 1)[1]] = values[path]
            wl_locs[path.split(".", 1)[1]] = locs[path]
    search = _search(study, values, locs, doc)
    if search is not None:
        wl[search.field] = search.lo  # placeholder; the search sets it
    serving = _serving(study, values, locs, doc)
    if serving is not None:
        _check_kv_store(serving, profile, policy, locs, doc)
        # not read: the requests' lengths and max_batch replace them
        wl.update(batch=1, context=1, gen=1)
    workload = _workload(wl, wl_locs, doc)
    try:
        profile.gpus[profile.primary_gpu].peak_flops(workload.weight_dtype)
    except UserError as exc:
        raise doc.error(wl_locs.get("weight_dtype", profile_loc),
                        f"profile {profile.name}: {exc}") from None
    try:  # the model shards over the profile's GPUs (hgsim.tensor_parallel), every replica's
        from hgsim.tensor_parallel import rank_view

        rank_view(profile, model, workload.tensor_parallel, replicas=workload.data_parallel,
                  placement=workload.gpu_placement)
    except UserError as exc:
        field = str(exc.field or "").removeprefix("workload.")
        raise doc.error(wl_locs.get(field, wl_locs.get("tensor_parallel", profile_loc)),
                        str(exc).removeprefix(f"{exc.field}: ")) from None

    from hgsim.accuracy.overrides import override_groups

    fid = base.fidelity.model_dump()
    fid_locs = {f"fidelity.{group}.{k}": ("base", "fidelity", group, k)
                for group in override_groups() for k in fid[group]}
    for path in values:
        name, _, field = path.removeprefix("fidelity.").partition(".")
        if path.startswith("fidelity.") and field:  # a field of a group (checked: it exists)
            fid[name][field] = values[path]
            fid_locs[path] = locs[path]
        elif path.startswith("fidelity."):
            fid[name] = values[path]
    fidelity = _fidelity(fid, {**locs, **fid_locs}, doc)

    fidelity_config = {"decode_samples": fidelity.decode_samples, "accuracy": fidelity.accuracy}
    # only when set (the keys of points without them stay as they were), and only those the
    # policy's results depend on: an exact policy's point is the same whatever the accuracy
    # model assumes, and HybridGen's (exact top-k) whatever the approximate selectors do
    for name, group in override_groups().items():
        overrides = _relevant_overrides(policy, options, name,
                                        group.overrides_of(getattr(fidelity, name)))
        if overrides:
            fidelity_config[name] = overrides

    kind = "search" if study.search else "serving" if serving else "simulate"
    workload_key = workload.model_dump(mode="json", exclude={
        name for name, default in (("tensor_parallel", 1), ("data_parallel", 1),
                                   ("gpu_placement", "packed"))
        if getattr(workload, name) == default})
    if serving is not None:  # what the server's step times read (hgsim.serving.StepTimes)
        workload_key = {name: getattr(workload, name) for name in SERVING_WORKLOAD}
    config = {
        "hgsim": __version__,
        "kind": kind,
        "profile": profile_hash,
        "model": model_hash,
        "policy": policy,
        "policy_options": canonical_options,
        # one GPU (tensor_parallel 1, one replica, packed) keeps the key points had before
        # those fields existed
        "workload": workload_key,
        # a search sizes memory alone: of the fidelity only the attention shape can move it
        # (HybridGen's group-union landing buffers); none set keeps the key it always had.
        # A latency SLO or ``pick: fastest`` simulates: then all of the fidelity counts
        "fidelity": ({"attention": fidelity_config["attention"]}
                     if "attention" in fidelity_config else None)
        if search and not search.simulates else None if serving else fidelity_config,
        # without an SLO, the search as it always was (the same key)
        "search": search.key_config() if search else None,
    }
    if serving is not None:  # only where set: every other point keeps the key it had
        config["serving"] = serving.key_config()
    plugin = registry.plugin(policy)
    if plugin is not None:  # a new plugin release may plan differently: recompute its points
        config["policy_plugin"] = f"{plugin.dist} {plugin.version}"
    spec = PointSpec(
        key=_digest(config)[:20], profile=profile, model=model, policy=policy,
        policy_options=options, workload=workload, fidelity=fidelity, search=search,
        serving=serving,
    )
    coords: dict[str, Any] = {}
    for path, value in values.items():
        coords[path] = model.name if path == "model" else _table_value(path, value, doc, locs)
    return Point(coords, spec)


def _relevant_overrides(policy: str, options: dict[str, Any], group: str,
                        overrides: dict[str, Any]) -> dict[str, Any]:
    """The ``fidelity.<group>`` overrides ``policy`` with ``options`` is run with: none for an
    exact one (its error is 0, and it selects no rows), every ``attention`` field for a lossy
    one, the ``selection`` fields in its ``selector_parameters``."""
    if not overrides:
        return {}
    cls, _, _ = registry.lookup(policy)
    if not cls.lossy_with(checked_options(policy, options)):
        return {}
    fields = cls.selector_parameters if group == "selection" else None
    return {k: v for k, v in overrides.items() if fields is None or k in fields}


def _check_policy(policy: Any, options: dict[str, Any], loc: Loc, option_locs: dict[str, Loc],
                  doc: YamlDocument) -> dict[str, Any]:
    """The policy exists and accepts the options; returns its full (canonical) options."""
    try:
        return checked_options(policy, options).model_dump(mode="json")
    except registry.UnknownPolicyError as exc:
        raise doc.error(loc, str(exc)) from None
    except OptionError as exc:
        zipped = len(option_locs.get(exc.option, ())) > 1 and option_locs[exc.option][2] == "zip"
        hint = ("; write null for a policy without it" if zipped else
                "; use a zip group to pair policies with their own options") if exc.unknown else ""
        raise doc.error(option_locs.get(exc.option, loc), exc.reason + hint) from None


def _workload(values: dict[str, Any], locs: dict[str, Loc], doc: YamlDocument) -> Workload:
    unknown = [k for k in values if k not in Workload.model_fields]
    if unknown:
        raise doc.error(locs.get(unknown[0], ("base", "workload")),
                        f"unknown workload field '{unknown[0]}' (known: "
                        f"{', '.join(Workload.model_fields)})")
    try:
        return Workload(**values)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        key = str(first["loc"][0]) if first["loc"] else ""
        message = "required (set it in base.workload or sweep it)" if first["type"] == "missing" \
            else humane(first)
        raise doc.error(locs.get(key, ("base", "workload", key)), message) from None


def _fidelity(values: dict[str, Any], locs: dict[str, Loc], doc: YamlDocument) -> Fidelity:
    samples, accuracy = values["decode_samples"], values["accuracy"]
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        raise doc.error(locs.get("fidelity.decode_samples", ("base", "fidelity")),
                        f"decode_samples must be an integer >= 0, got {samples!r}")
    if not isinstance(accuracy, bool):
        raise doc.error(locs.get("fidelity.accuracy", ("base", "fidelity")),
                        f"accuracy must be true or false, got {accuracy!r}")
    from hgsim.accuracy.overrides import FieldError, override_groups

    models = {}
    for name, group in override_groups().items():
        try:
            models[name] = group.build(values[name])
        except FieldError as exc:
            raise doc.error(locs.get(f"fidelity.{name}.{exc.field}",
                                     ("base", "fidelity", name)), exc.reason) from None
    return Fidelity(decode_samples=samples, accuracy=accuracy, **models)


def _table_value(path: str, value: Any, doc: YamlDocument, locs: dict[str, Loc]) -> Any:
    try:
        return ax.normalize(path, value)
    except ValueError as exc:
        raise doc.error(locs[path], str(exc)) from None


def _blame(exc: UserError, locs: dict[str, Loc]) -> Loc | None:
    """The override an error message names, so the error points at that value's line."""
    text = str(exc)
    for key in sorted(locs, key=len, reverse=True):
        if key in text:
            return locs[key]
    return None


def _strip(exc: UserError) -> str:
    """The message without its own source prefix (the study's file:line replaces it)."""
    if isinstance(exc, ConfigError) and exc.source and str(exc).startswith(exc.source + ": "):
        return str(exc)[len(exc.source) + 2:]
    return str(exc)


def _unique(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
