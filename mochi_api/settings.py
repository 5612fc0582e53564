"""The server's API settings: environment variables over a JSON settings file, read per request.

Pure Python (no ComfyUI import). The file (``settings.json`` in the host's system user folder
``user/__mochi_api/``, which no HTTP route serves) may hold any of the keys below; each
environment variable overrides its key. Without an API key the routes are off (404).

| key | environment variable | default |
|---|---|---|
| ``api_key`` | ``MOCHI_API_KEY`` | none: the routes answer 404 |
| ``read_key`` | ``MOCHI_API_READ_KEY`` | none (a key that may only read jobs: 403 on generate) |
| ``width``, ``height`` | ``MOCHI_API_WIDTH``, ``MOCHI_API_HEIGHT`` | 848, 480 |
| ``dit``, ``vae``, ``t5`` | ``MOCHI_API_DIT``, ``_VAE``, ``_T5`` | the bundled workflow's files |
| ``max_queue`` | ``MOCHI_API_MAX_QUEUE`` | 8 (tasks in the host's queue, 429 beyond) |
| ``sync_timeout`` | ``MOCHI_API_SYNC_TIMEOUT`` | 600 seconds (504 beyond) |
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ENV = {"api_key": "MOCHI_API_KEY", "read_key": "MOCHI_API_READ_KEY",
       "width": "MOCHI_API_WIDTH", "height": "MOCHI_API_HEIGHT",
       "dit": "MOCHI_API_DIT", "vae": "MOCHI_API_VAE", "t5": "MOCHI_API_T5",
       "max_queue": "MOCHI_API_MAX_QUEUE", "sync_timeout": "MOCHI_API_SYNC_TIMEOUT"}
#: What a key may do: everything, or only read jobs and their videos.
FULL, READ = "full", "read"
INTEGERS = {"width": (16, 4096), "height": (16, 4096), "max_queue": (1, 10_000)}


class SettingsError(ValueError):
    """A settings value the server cannot use (reported in the log, 500 to the client)."""


@dataclass(frozen=True)
class Settings:
    api_key: str
    read_key: str | None = None
    width: int = 848
    height: int = 480
    dit: str | None = None
    vae: str | None = None
    t5: str | None = None
    max_queue: int = 8
    sync_timeout: float = 600.0

    def key_matches(self, given: str | None) -> bool:
        """Constant-time comparison of the client's key with the configured one, as bytes.

        aiohttp (like ``os.environ``) decodes bytes that are not UTF-8 as lone surrogates
        (``surrogateescape``); encoding back the same way recovers the bytes sent, so a key of
        any bytes is compared, and never breaks the comparison. Text that no bytes decode to
        does not match."""
        return given is not None and _same_key(given, self.api_key)

    def key_role(self, given: str | None) -> str | None:
        """``FULL`` for the API key, ``READ`` for the read-only key, None for anything else.
        Both comparisons run, each in constant time, whichever key was sent."""
        full = self.key_matches(given)
        read = self.read_key is not None and given is not None and _same_key(given, self.read_key)
        return FULL if full else READ if read else None


def _same_key(given: str, key: str) -> bool:
    try:
        sent = given.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(sent, _key_bytes(key))


def _key_bytes(key: str) -> bytes:
    """The configured key as bytes (checked to be encodable when the settings are read)."""
    return key.encode("utf-8", "surrogateescape")


def _read_file(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SettingsError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(data, dict) or set(data) - set(ENV):
        raise SettingsError(f"{path}: must be a JSON object with keys among {sorted(ENV)}")
    return data


def _check(raw: dict) -> dict:
    """Typed values; sizes must suit the DiT (multiples of 16)."""
    values = {}
    for name, value in raw.items():
        if name in INTEGERS:
            low, high = INTEGERS[name]
            try:
                value = int(value)
            except (TypeError, ValueError) as err:
                raise SettingsError(f"{name}: {value!r} is not an integer") from err
            if not low <= value <= high or (name in ("width", "height") and value % 16):
                raise SettingsError(f"{name}: {value} is out of range {low}–{high}"
                                    + (" or not a multiple of 16" if name != "max_queue" else ""))
        elif name == "sync_timeout":
            try:
                value = float(value)
            except (TypeError, ValueError) as err:
                raise SettingsError(f"sync_timeout: {value!r} is not a number") from err
            if not value > 0:
                raise SettingsError(f"sync_timeout: {value} must be positive")
        elif not isinstance(value, str):
            raise SettingsError(f"{name}: must be a string")
        elif name in ("api_key", "read_key"):
            _check_key(name, value)
        values[name] = value
    return values


def _check_key(name: str, key: str) -> None:
    try:
        _key_bytes(key)
    except UnicodeEncodeError as err:
        raise SettingsError(f"{name}: holds an unpaired surrogate (not text)") from err


def load(path: Path, env: Mapping[str, str] = os.environ) -> Settings | None:
    """The settings, or None when no API key is configured (the routes are then off).

    Raises :class:`SettingsError` when a key is configured but another value is unusable.
    """
    try:
        raw = _read_file(path)
    except SettingsError:
        if not env.get(ENV["api_key"]):
            log.error("Mochi API: ignoring the settings file", exc_info=True)
            return None
        raise
    raw.update({name: env[var] for name, var in ENV.items() if env.get(var)})
    if not raw.get("api_key"):
        return None
    values = _check(raw)
    if values.get("read_key") == values["api_key"]:
        raise SettingsError("read_key: must differ from api_key")
    return Settings(**values)
