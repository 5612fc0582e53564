"""The query parameters of the API's routes: only the known ones, each given once, each valid.

Pure Python (no ComfyUI or aiohttp import). ``POST /generate`` takes ``sync`` (a yes/no word)
and ``timeout`` (seconds, at most the server's ``sync_timeout``); the hosted API's route
``POST /v1/mochi-1`` only ``timeout`` (it is always synchronous); the job routes take none.
Problems are reported like the body's: ``{name: {"message", "allowed", "got"?}}``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

TRUE = ("true", "1", "yes")
FALSE = ("false", "0", "no")
GENERATE = ("sync", "timeout")
HOSTED = ("timeout",)
#: Plain decimal seconds ("30", "2.5"): no sign, exponent, underscore, ``nan`` or ``inf``.
SECONDS = re.compile(r"[0-9]{1,6}(\.[0-9]{0,6})?|\.[0-9]{1,6}")
MIN_TIMEOUT = 1
MAX_ECHO_CHARS = 100


@dataclass(frozen=True)
class SyncOptions:
    """``?sync=`` and the deadline of a synchronous call, in seconds."""

    sync: bool
    timeout: float


def _grouped(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in pairs:
        out.setdefault(name, []).append(value)
    return out


def _echo(value: str) -> str:
    return value if len(value) <= MAX_ECHO_CHARS else f"{value[:MAX_ECHO_CHARS]}…"


def _name_errors(given: dict[str, list[str]], known: tuple[str, ...]) -> dict[str, dict]:
    """Unknown parameters and parameters given more than once."""
    errors = {}
    for name, values in given.items():
        if name not in known:
            errors[_echo(name)] = {"message": f"unknown query parameter {_echo(name)!r}",
                                   "allowed": {"parameters": list(known)}}
        elif len(values) > 1:
            errors[name] = {"message": f"{name} (query) is given {len(values)} times; give it "
                                       "once", "allowed": {"count": 1}, "got": len(values)}
    return errors


def check_none(pairs: Iterable[tuple[str, str]]) -> dict[str, dict]:
    """The errors of a route that takes no query parameter."""
    return _name_errors(_grouped(pairs), ())


def _sync_error(value: str) -> dict | None:
    if value.lower() in TRUE + FALSE:
        return None
    return {"message": f"sync (query) must be one of {', '.join(TRUE + FALSE)}",
            "allowed": {"values": list(TRUE + FALSE)}, "got": _echo(value)}


def _timeout(value: str, limit: float) -> tuple[float, dict | None]:
    seconds = float(value) if SECONDS.fullmatch(value) else -1.0
    if MIN_TIMEOUT <= seconds <= limit:
        return seconds, None
    return 0.0, {"message": f"timeout (query) must be seconds from {MIN_TIMEOUT:g} to "
                            f"{limit:g}",
                 "allowed": {"type": "number", "min": MIN_TIMEOUT, "max": limit},
                 "got": _echo(value)}


def check_generate(pairs: Iterable[tuple[str, str]],
                   sync_timeout: float) -> tuple[SyncOptions, dict[str, dict]]:
    """The options of ``POST /generate`` and the errors of its query (``{}`` when valid)."""
    return _check_sync(_grouped(pairs), GENERATE, sync_timeout)


def check_hosted(pairs: Iterable[tuple[str, str]],
                 sync_timeout: float) -> tuple[SyncOptions, dict[str, dict]]:
    """The options of the hosted API's route (``POST /v1/mochi-1``): always synchronous; only
    ``timeout`` is taken (a client written for the hosted API sends none)."""
    options, errors = _check_sync(_grouped(pairs), HOSTED, sync_timeout)
    return SyncOptions(True, options.timeout), errors


def _check_sync(given: dict[str, list[str]], known: tuple[str, ...],
                sync_timeout: float) -> tuple[SyncOptions, dict[str, dict]]:
    errors = _name_errors(given, known)
    sync_value = given.get("sync", ["false"])[-1]
    if "sync" not in errors and (error := _sync_error(sync_value)):
        errors["sync"] = error
    timeout = sync_timeout
    if "timeout" in given and "timeout" not in errors:
        timeout, error = _timeout(given["timeout"][0], sync_timeout)
        if error:
            errors["timeout"] = error
    return SyncOptions(sync_value.lower() in TRUE, timeout), errors
