"""Reading a study file into a validated, expanded plan, or one line saying what is wrong.

All checks (shape, names, hardware paths, columns referenced by derived metrics and plots)
happen here, before an output folder exists, so a broken study writes nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hgsim import __version__
from hgsim.config_io import YamlDocument, load_yaml, validate
from hgsim.errors import ConfigError
from hgsim.study.expand import Expansion, expand
from hgsim.study.schema import Study
from hgsim.study.validate import check


@dataclass
class StudyPlan:
    study: Study
    doc: YamlDocument
    expansion: Expansion
    columns: list[str]
    source: Path


def load_study(path: str | Path) -> StudyPlan:
    """Parse, validate and expand ``path`` (ConfigError with file:line on any problem)."""
    if not str(path).strip():  # Path("") is ".", which would be "a folder, not a file"
        raise ConfigError("an empty file name; give the path of a study YAML file")
    path = Path(path)
    return _plan(load_yaml(path), path.stem, path.resolve().parent, path)


def load_study_data(data: Mapping[str, Any], *, base_dir: str | Path | None = None,
                    source: str = "<study>") -> StudyPlan:
    """A study given as the mapping its YAML file would hold (notebooks, scripts).

    Profile and model file paths are relative to ``base_dir`` (default: the working
    directory); errors name the field instead of a line. ``data`` is not modified.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"a study is a mapping, got {type(data).__name__}", source=source)
    doc = YamlDocument(copy.deepcopy(dict(data)), {}, source)
    return _plan(doc, "study", Path(base_dir or Path.cwd()).resolve(), Path(source))


def _plan(doc: YamlDocument, default_name: str, base_dir: Path, source: Path) -> StudyPlan:
    _normalize(doc, default_name=default_name)
    study = validate(Study, doc)
    expansion = expand(study, doc, base_dir)
    columns = check(study, doc, expansion)
    return StudyPlan(study, doc, expansion, columns, source)


def _normalize(doc: YamlDocument, default_name: str) -> None:
    """Accept shorthands without losing line numbers.

    ``sweep:`` may be one axis group (a mapping with grid/zip) instead of a list of them, and
    ``name`` defaults to the file's stem.
    """
    data = doc.data
    if not isinstance(data, dict):
        return
    data.setdefault("name", default_name)
    sweep = data.get("sweep")
    if isinstance(sweep, dict):
        data["sweep"] = [sweep]
        moved = {}
        for loc, line in doc.lines.items():
            if loc[:1] == ("sweep",) and len(loc) > 1:
                moved[("sweep", 0, *loc[1:])] = line
        doc.lines.update(moved)
        doc.lines.setdefault(("sweep", 0), doc.lines.get(("sweep",), 0))


def resolved_yaml(plan: StudyPlan) -> str:
    """The study as it will run: defaults filled in, shorthands expanded, with provenance.

    Running this file again reproduces the same points (same keys) as long as the files it
    names (profiles, model files) have the content recorded in the header.
    """
    import hashlib

    header = [
        f"# Resolved study written by hgsim {__version__} from {plan.source}",
        f"# {len(plan.expansion.points)} points; rerun with: hgsim study study.resolved.yaml",
    ]
    files = {"profile": plan.expansion.profiles, "model": plan.expansion.models}
    for kind, named in files.items():
        for name, file in sorted(named.items()):
            try:
                digest = hashlib.sha256(Path(file).read_bytes()).hexdigest()[:16]
            except OSError:
                digest = "unreadable"
            header.append(f"# {kind} {name}: {file} (sha256 {digest})")
    data: dict[str, Any] = plan.study.model_dump(mode="json")
    if plan.study.search is not None:  # without a latency SLO, as before the SLO existed
        data["search"] = plan.study.search.key_config()

    def absolute(kind: str, value: Any) -> Any:  # paths are relative to the original study file
        if not isinstance(value, str) or value not in files[kind]:
            return value
        is_path = kind == "model" or "/" in value or value.endswith((".yaml", ".yml"))
        return str(files[kind][value]) if is_path else value

    for kind in files:
        data["base"][kind] = absolute(kind, data["base"][kind])
        for group in data["sweep"]:
            for part in ("grid", "zip"):
                if kind in group[part]:
                    group[part][kind] = [absolute(kind, v) for v in group[part][kind]]
    # Workload defaults written out, so a later change of a default cannot change the study.
    from hgsim.workload import Workload

    defaults = {name: f.default for name, f in Workload.model_fields.items()
                if not f.is_required() and isinstance(f.default, (bool, int, float, str))}
    data["base"]["workload"] = {**defaults, **data["base"]["workload"]}
    from hgsim.accuracy.overrides import override_groups

    for group in override_groups():  # the accuracy model's defaults: as before
        if not data["base"]["fidelity"][group]:
            del data["base"]["fidelity"][group]
    text = yaml.safe_dump(data, sort_keys=False, width=100, default_flow_style=None)
    return "\n".join(header) + "\n" + text
