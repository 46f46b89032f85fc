"""Cost of ownership: dollars per second of a machine, and dollars per million tokens.

Pure functions of the profile's prices (``price_usd`` of each GPU and socket,
``price_usd_per_gb`` of each tier times its installed capacity, ``cost.server_base_usd``) and
its running cost (``cost.electricity_usd_per_kwh`` x ``cost.pue`` x the simulated average
power, ``hgsim/energy.py``)::

    usd_per_s   = capex_usd / (amortisation_years x seconds per year)
                + power_w x pue x electricity_usd_per_kwh / 3.6e6
    usd_per_mtok = usd_per_s x 1e6 / tokens_per_s

Installed capacity is what is paid for, used or not; the machine is assumed busy decoding
for the whole amortisation period (an idle machine costs the same capital per hour and
produces no tokens, so utilisation below 100% scales both terms' $/Mtok up alike).
"""

from __future__ import annotations

from hgsim.specs.hardware import HardwareProfile

SECONDS_PER_YEAR = 365.25 * 24 * 3600
J_PER_KWH = 3.6e6


def missing_fields(profile: HardwareProfile) -> list[str]:
    """Dotted names of the cost figures ``profile`` lacks (empty: it has every one)."""
    out = [f"gpus.{k}.price_usd" for k, g in profile.gpus.items() if g.price_usd is None]
    out += [f"sockets.{k}.price_usd" for k, s in profile.sockets.items() if s.price_usd is None]
    out += [f"tiers.{k}.price_usd_per_gb" for k, t in profile.tiers.items()
            if t.price_usd_per_gb is None]
    if profile.cost is None:
        out.append("cost")
    return out


def capex_usd(profile: HardwareProfile) -> float:
    """What the machine costs to buy: components at installed capacity plus the server."""
    if missing_fields(profile):
        return float("nan")
    return (sum(g.price_usd for g in profile.gpus.values())
            + sum(s.price_usd for s in profile.sockets.values())
            + sum(t.price_usd_per_gb * t.capacity_gb for t in profile.tiers.values())
            + profile.cost.server_base_usd)


def capex_usd_per_s(profile: HardwareProfile) -> float:
    """Capital cost spread evenly over the amortisation period."""
    if profile.cost is None:
        return float("nan")
    return capex_usd(profile) / (profile.cost.amortisation_years * SECONDS_PER_YEAR)


def electricity_usd_per_j(profile: HardwareProfile) -> float:
    """Price of one joule drawn by the machine, facility overhead (PUE) included."""
    if profile.cost is None:
        return float("nan")
    return profile.cost.electricity_usd_per_kwh * profile.cost.pue / J_PER_KWH


def usd_per_mtok(usd_per_s: float, tokens_per_s: float) -> float:
    """Dollars per million tokens at ``tokens_per_s`` for a machine costing ``usd_per_s``."""
    return usd_per_s * 1e6 / tokens_per_s if tokens_per_s > 0 else float("nan")
