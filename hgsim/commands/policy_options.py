"""``--option KEY=VALUE`` for a policy, shared by ``simulate`` and ``run``: parsed into
typed values and checked against the policy's options, so a typo is a one-line error naming
the option and listing the ones that exist."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hgsim.errors import OptionError, UserError, quoted
from hgsim.search_path import shown
from hgsim.units import MAX_DIGITS, digits_of


def policy_options(pairs: list[str], policy: str) -> dict:
    """``pairs`` as the options of ``policy``, or a UserError naming the wrong ``--option``.

    ``none`` reads as no value, unless the option refuses that and takes the word itself
    (``weight_offload=none``)."""
    options = key_value_pairs(pairs, "--option", "option")
    given = {key.strip(): value.strip() for key, _, value in (p.partition("=") for p in pairs)}
    while True:
        try:
            _check(policy, options)
            return options
        except UserError as exc:
            word = next((key for key, value in options.items() if value is None
                         and exc.field == f"--option {key}"), None)
            if word is None:
                raise
            options[word] = given[word]


def key_value_pairs(pairs: list[str], flag: str, noun: str) -> dict:
    """The ``KEY=VALUE`` pairs of a repeatable ``flag`` (``--option``, ``--selection``,
    ``--attention``) as a dict of values read as YAML would (``command_line_value``); a key
    given twice is an error, not "the last wins"."""
    values: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"expects KEY=VALUE, got {quoted(pair)}", field=flag)
        if key in values:
            raise UserError(f"{quoted(key)} is given twice ({shown(f'{key}={values[key]}')} and "
                            f"{shown(pair.strip())}); give each {noun} once", field=flag)
        digits = digits_of(value)
        if digits > MAX_DIGITS:  # else read as the float inf (Python reads no int of over
            # 4300 digits), or quoted whole in the option's own message
            raise UserError(f"a {digits}-digit number is too large (at most {MAX_DIGITS} "
                            "digits)", field=f"{flag} {shown(key)}")
        values[key] = command_line_value(value.strip())
    return values


def _check(policy: str, options: dict) -> None:
    """The policy accepts ``options``, or a UserError naming the --option that is wrong, or
    ``--policy`` for a name no policy has (the simulator named it 'policy', no flag)."""
    from hgsim.policies import checked_options
    from hgsim.policies.registry import UnknownPolicyError

    try:
        with named_as_flags():
            checked_options(policy, options)
    except UnknownPolicyError as exc:
        raise UserError(str(exc), field="--policy") from None


@contextmanager
def named_as_flags() -> Iterator[None]:
    """An ``OptionError`` raised inside (a bad value, or one the profile rules out, such as a
    ``host_socket`` it lacks) becomes a UserError naming the ``--option`` that set it."""
    try:
        yield
    except OptionError as exc:
        raise UserError(exc.reason, field=f"--option {shown(exc.option)}".strip()) from None


def command_line_value(text: str):
    """A ``KEY=VALUE`` flag's value as YAML would read it: true/false, none/null (None), an
    int, a float, else the text (for every ``key_value_pairs`` flag)."""
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


__all__ = ["command_line_value", "key_value_pairs", "named_as_flags", "policy_options"]
