"""Finding, loading and tweaking hardware profiles.

Profiles are YAML files validated into ``HardwareProfile``. Studies name them by a short name
(``h100-80gb-spr-cxl``) or a path, load the same one many times, and sweep dotted hardware
parameters (``tiers.cxl0.read_bandwidth_gbps``); this module makes all three cheap and makes
every mistake a one-line ``UserError`` naming the file, line and field.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hgsim.config_io import YamlDocument, load_yaml, validate, validation_error
from hgsim.errors import ConfigError, UserError
from hgsim.search_path import (
    YAML_SUFFIXES,
    existing_file,
    load_cached,
    named_files,
    search_dirs,
    user_path,
)
from hgsim.specs.hardware import HardwareProfile

#: The repository's shipped profiles (``hardware_profiles/`` next to the package).
PROFILE_DIR = Path(__file__).resolve().parent.parent / "hardware_profiles"
#: Colon-separated extra directories, searched before PROFILE_DIR (so a user's copy wins).
PROFILE_PATH_ENV = "HGSIM_PROFILE_PATH"

_cache: dict[tuple[str, int, int], HardwareProfile] = {}


def profile_dirs() -> list[Path]:
    """Directories searched for profile names, in order: $HGSIM_PROFILE_PATH, PROFILE_DIR."""
    return search_dirs(PROFILE_PATH_ENV, PROFILE_DIR)


def list_profiles() -> list[str]:
    """Names of all profiles that ``load_profile`` can resolve, sorted."""
    return sorted(named_files(profile_dirs()))


def resolve_profile(name_or_path: str | os.PathLike[str]) -> Path:
    """The file a name or path refers to.

    Anything that looks like a path (has a directory part or a YAML suffix, or exists) is taken
    as one; otherwise it is a profile name looked up in ``profile_dirs()``.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):  # api.load_profile(None)
        raise UserError(f"expected a profile name or a YAML path, got {name_or_path!r}",
                        field="profile")
    text = os.fspath(name_or_path)
    if not text.strip():
        raise UserError("an empty hardware profile name; give a name (see `hgsim profiles`) "
                        "or the path of a YAML file")
    path = user_path(text)
    looks_like_path = (
        os.sep in text or "/" in text or path.suffix in YAML_SUFFIXES or path.is_file()
    )
    if looks_like_path:
        return existing_file(text)
    files = named_files(profile_dirs())
    if text in files:
        return files[text]
    known = sorted(files)
    close = difflib.get_close_matches(text, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(
        f"unknown hardware profile '{text}'{hint} (known: {', '.join(known) or 'none'}; "
        f"searched {', '.join(str(d) for d in profile_dirs())})"
    )


def load_profile(name_or_path: str | os.PathLike[str]) -> HardwareProfile:
    """Load and validate a profile by name or path; cached by resolved path and mtime.

    Profiles are frozen, so handing out the cached object is safe; editing the file
    (new mtime or size) reloads it.
    """
    return load_cached(resolve_profile(name_or_path), _cache,
                       lambda path: validate(HardwareProfile, load_yaml(path)))


def clear_cache() -> None:
    """Forget loaded profiles (tests, or a long session whose files changed in place)."""
    _cache.clear()


# ------------------------------------------------------------------ dotted overrides
#: A tier has read and write bandwidth; ``tiers.X.bandwidth_gbps`` sets both at once.
_TIER_BANDWIDTH_SHORTHAND = ("read_bandwidth_gbps", "write_bandwidth_gbps")
#: Groups whose keys are data, not schema: a new dtype may be added (validation checks it).
_OPEN_GROUPS = ("peak_tflops", "pcie_switches")  # groups an override may add entries to


def profile_with_overrides(
    profile: HardwareProfile, overrides: Mapping[str, Any]
) -> HardwareProfile:
    """A copy of ``profile`` with dotted parameters replaced, validated again.

    ``{"tiers.cxl0.read_bandwidth_gbps": 64, "gpus.gpu0.peak_tflops.bf16": 500}``. Values may
    carry units (``"64 GB/s"``). A ``*`` segment applies to every entry at that level
    (``tiers.*.latency_ns``). ``tiers.<name>.bandwidth_gbps`` is shorthand for both the read
    and the write bandwidth of that tier. Unknown paths and invalid results are UserErrors.
    """
    if not overrides:
        return profile
    data = profile.model_dump()
    for dotted_path, value in overrides.items():
        parts = str(dotted_path).split(".")
        if not all(parts):
            raise UserError(f"hardware override '{dotted_path}': empty path segment")
        _apply(data, parts, value, dotted_path, [])
    doc = YamlDocument(data, {}, f"profile {profile.name} with overrides")
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as exc:
        error = validation_error(exc, doc)
        raise ConfigError(
            f"{error} (overrides: {_describe(overrides)})",
        ) from None


def _apply(node: Any, parts: list[str], value: Any, full: str, seen: list[str]) -> None:
    head, rest = parts[0], parts[1:]
    if not isinstance(node, dict):
        where = ".".join(seen)
        raise UserError(f"hardware override '{full}': '{where}' is a value, not a group")
    if head == "*":
        if not node:
            where = ".".join(seen)
            raise UserError(f"hardware override '{full}': nothing matches '*' under '{where}'")
        for key in node:
            _apply(node, [key, *rest], value, full, seen)
        return
    if not rest and head == "bandwidth_gbps" and len(seen) == 2 and seen[0] == "tiers":
        for field in _TIER_BANDWIDTH_SHORTHAND:
            node[field] = value
        return
    if head not in node and not (seen and seen[-1] in _OPEN_GROUPS):
        known = sorted(str(k) for k in node)
        close = difflib.get_close_matches(head, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        where = ".".join(seen) or "the profile"
        raise UserError(
            f"hardware override '{full}': unknown key '{head}' in {where}{hint} "
            f"(known: {', '.join(known)})"
        )
    if rest:
        _apply(node[head], rest, value, full, [*seen, head])
    else:
        node[head] = value


def _describe(overrides: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items())
