"""Every policy hgsim knows: the built-in ones plus those other packages register.

A package adds a policy by declaring an entry point in the ``hgsim.policies`` group whose name
is the policy's name and whose object is a ``Policy`` subclass with that ``name``::

    [project.entry-points."hgsim.policies"]
    streaming_llm = "hgsim_example_policy:StreamingLLM"

Plugins are discovered once per process, on first use, so ``import hgsim`` stays cheap and a
study's worker processes see the same set as the process that validated the study. A plugin
that cannot be imported, is not a ``Policy`` or takes a name already in use makes every lookup
fail with a one-line ``UserError`` naming its entry point: an installed but unusable policy is a
broken environment, and running a study without it would silently answer a different question.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from hgsim.errors import UserError, quoted

GROUP = "hgsim.policies"

#: name -> (policy class, preset options, description): the shape of ``POLICIES``.
Entry = tuple[type, dict[str, Any], str]


class PolicyPluginError(UserError):
    """An installed policy plugin is unusable (import error, wrong object, name conflict)."""


class UnknownPolicyError(UserError):
    """A policy name that neither hgsim nor any installed plugin provides."""


@dataclass(frozen=True)
class Plugin:
    """Where a registered policy came from: its entry point and distribution."""

    name: str
    value: str  # "module:object"
    dist: str | None  # distribution name, None when unknown
    version: str | None

    @property
    def label(self) -> str:
        origin = f" from {self.dist} {self.version}" if self.dist else ""
        return f"entry point '{self.name} = {self.value}' (group {GROUP}{origin})"


_loaded: tuple[dict[str, Entry], dict[str, Plugin]] | None = None


def _entry_points() -> list[metadata.EntryPoint]:
    """The group's entry points, each (name, value) once even if its distribution is found
    twice on the path (an editable install plus a build directory, say)."""
    seen: dict[tuple[str, str], metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=GROUP):
        seen.setdefault((ep.name, ep.value), ep)
    return sorted(seen.values(), key=lambda ep: (ep.name, ep.value))


def _plugin(ep: metadata.EntryPoint) -> Plugin:
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) if dist is not None else None
    version = getattr(dist, "version", None) if dist is not None else None
    return Plugin(ep.name, ep.value, name, version)


def _load_plugin(ep: metadata.EntryPoint, plugin: Plugin) -> Entry:
    from hgsim.policies.base import Policy, PolicyOptions

    try:
        obj = ep.load()
    except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's, reported
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise PolicyPluginError(f"{plugin.label} cannot be loaded: {type(exc).__name__}"
                                f"{': ' + detail if detail else ''}") from None
    if not (inspect.isclass(obj) and issubclass(obj, Policy)):
        raise PolicyPluginError(f"{plugin.label} must name a subclass of "
                                f"hgsim.policies.base.Policy, not {obj!r}")
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
        raise PolicyPluginError(f"{plugin.label}: {obj.__name__} does not implement {missing}")
    declared = getattr(obj, "name", None)
    if declared != ep.name:
        raise PolicyPluginError(f"{plugin.label}: the class's name is {declared!r}; it must "
                                f"equal the entry point's name {ep.name!r}")
    options = getattr(obj, "Options", None)
    if not (inspect.isclass(options) and issubclass(options, PolicyOptions)):
        raise PolicyPluginError(f"{plugin.label}: {obj.__name__}.Options must subclass "
                                "hgsim.policies.base.PolicyOptions")
    description = getattr(obj, "description", None) or f"plugin policy from {plugin.dist}"
    return obj, {}, str(description)


def _load() -> tuple[dict[str, Entry], dict[str, Plugin]]:
    from hgsim.policies import POLICIES

    entries: dict[str, Entry] = dict(POLICIES)
    plugins: dict[str, Plugin] = {}
    for ep in _entry_points():
        plugin = _plugin(ep)
        if ep.name in POLICIES:
            raise PolicyPluginError(f"{plugin.label} takes the name of the built-in policy "
                                    f"'{ep.name}'; rename the entry point")
        if ep.name in plugins:
            raise PolicyPluginError(f"{plugin.label} and {plugins[ep.name].label} both register "
                                    f"policy '{ep.name}'; uninstall one of them")
        entries[ep.name] = _load_plugin(ep, plugin)
        plugins[ep.name] = plugin
    return entries, plugins


def _registry() -> tuple[dict[str, Entry], dict[str, Plugin]]:
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def registered() -> dict[str, Entry]:
    """Name -> (class, preset options, description): built-in policies first, then plugins."""
    return _registry()[0]


def plugin(name: str) -> Plugin | None:
    """The plugin that registered ``name``; None for a built-in (or unknown) policy."""
    return _registry()[1].get(name)


def lookup(name: Any) -> Entry:
    """The entry of policy ``name``, or an ``UnknownPolicyError`` suggesting the closest one."""
    entries = registered()
    entry = entries.get(name) if isinstance(name, str) else None
    if entry is None:
        close = difflib.get_close_matches(str(name), entries, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnknownPolicyError(f"unknown policy {quoted(str(name))}{hint}; known: "
                                 f"{', '.join(entries)}")
    return entry


def reset() -> None:
    """Forget discovered plugins (tests, or after installing a plugin in a running session)."""
    global _loaded
    _loaded = None
