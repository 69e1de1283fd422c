"""Reading ``INFINITETALK_*`` environment variables: the one parser of numbers, switches and choices.

Every setting of a server or CLI run is read through these helpers (by
:meth:`infinitetalk.settings.Settings.from_env` and :meth:`infinitetalk.storage.StorageConfig.from_env`),
so a bad value always fails the same way: a :class:`SettingsError` with one line that names the
variable and what it accepts. An unset or blank variable means the default. This module imports
nothing of the package (everything else may import it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

PREFIX = "INFINITETALK_"
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A setting in the environment (or given to :class:`~infinitetalk.settings.Settings`) is invalid;
    the message is one line that names it and the values it accepts."""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def env_text(env: Mapping[str, str], name: str) -> str | None:
    """The stripped value of ``name``; None when it is unset or blank."""
    value = env.get(name)
    return value.strip() if value is not None and value.strip() else None


def env_number(env: Mapping[str, str], name: str, default: float, lo: float, hi: float, *,
               integer: bool = False, unit: str = "") -> float:
    """A number in ``[lo, hi]`` (an ``int`` when ``integer``); ``default`` when unset."""
    raw = env_text(env, name)
    if raw is None:
        return default
    of_unit = f" of {unit}" if unit else ""
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise SettingsError(f"{name} must be {kind}{of_unit}, got {raw!r}") from None
    if not lo <= value <= hi:  # NaN fails here too
        raise SettingsError(f"{name} must be between {_num(lo)} and {_num(hi)}{' ' + unit if unit else ''}, got {raw}")
    return value


def env_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A switch: 1/0 (also true/false, yes/no, on/off, any case); ``default`` when unset."""
    raw = env_text(env, name)
    if raw is None:
        return default
    if raw.lower() in TRUE:
        return True
    if raw.lower() in FALSE:
        return False
    raise SettingsError(f"{name} must be 1 or 0 (or true/false, yes/no, on/off), got {raw!r}")


def env_choice(env: Mapping[str, str], name: str, default: str, choices: Sequence[str]) -> str:
    """One of ``choices`` (lower case; the value is compared without case); ``default`` when unset."""
    raw = env_text(env, name)
    if raw is None:
        return default
    if raw.lower() not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}; got {raw!r}")
    return raw.lower()


__all__ = ["PREFIX", "SettingsError", "env_choice", "env_flag", "env_number", "env_text"]
