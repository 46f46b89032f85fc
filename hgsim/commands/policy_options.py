"""``--option KEY=VALUE`` for a policy, shared by ``simulate`` and ``run``: parsed into
typed values and checked against the policy's options, so a typo is a one-line error naming
the option and listing the ones that exist."""

from __future__ import annotations

from pydantic import ValidationError

from hgsim.errors import UserError


def policy_options(pairs: list[str], policy: str) -> dict:
    """``pairs`` as the options of ``policy``, or a UserError naming the wrong ``--option``."""
    options = _parse(pairs)
    _check(policy, options)
    return options


def _parse(pairs: list[str]) -> dict:
    """``KEY=VALUE`` pairs as a dict; a key given twice is an error, not "the last wins"."""
    options: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--option expects KEY=VALUE, got {pair!r}")
        key = key.strip()
        if key in options:
            raise UserError(f"'{key}' is given twice ({key}={options[key]} and {pair.strip()}); "
                            "give each option once", field="--option")
        options[key] = _scalar(value.strip())
    return options


def _check(policy: str, options: dict) -> None:
    """The policy accepts ``options``, or a UserError naming the --option that is wrong
    (unknown policies are left to the simulator, which lists the known ones)."""
    from hgsim.config_io import humane
    from hgsim.policies import POLICIES

    entry = POLICIES.get(policy)
    if entry is None:
        return
    cls, preset, _ = entry
    try:
        cls.Options(**{**preset, **options})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        key = str(first["loc"][0]) if first["loc"] else ""
        message = humane(first)
        if first["type"] == "extra_forbidden":
            message = (f"policy '{policy}' has no option '{key}' (its options: "
                       f"{', '.join(cls.Options.model_fields)})")
        raise UserError(message, field=f"--option {key}".strip()) from None


def _scalar(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


__all__ = ["policy_options"]
