"""The body of a generate call: parsed, range-checked and with ``frames`` snapped to 6k+1.

Pure Python (no ComfyUI import). The body is exactly the hosted Mochi APIs' one; an unknown
field is an error, so no request can name a file, a model or a node input.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass

MAX_SEED = 2**32 - 1
MIN_FRAMES, MAX_FRAMES = 7, 157  # the valid 6k+1 counts inside the accepted 1–160


@dataclass(frozen=True)
class Field:
    """A numeric field: its range, default and whether it must be a whole number."""

    low: float
    high: float
    default: float | None
    integer: bool


NUMERIC = {
    "guidance_scale": Field(2, 10, 4.5, integer=False),
    "fps": Field(7, 30, 16, integer=True),
    "frames": Field(1, 160, 52, integer=True),
    "steps": Field(10, 75, 30, integer=True),
    "seed": Field(0, MAX_SEED, None, integer=True),
}
TEXT = ("prompt", "negative_prompt")
ALLOWED = (*TEXT, *NUMERIC)


@dataclass(frozen=True)
class GenerateRequest:
    """A valid request; ``frames`` is the snapped count actually generated."""

    prompt: str
    negative_prompt: str
    guidance_scale: float
    fps: int
    frames: int
    steps: int
    seed: int
    requested_frames: int

    def as_dict(self) -> dict:
        return asdict(self)


def snap_frames(frames: int) -> int:
    """The nearest count of the form 6k+1 the model can make (7 … 157); ties go down (52 → 49)."""
    k = math.floor((frames - 1) / 6 + 0.5 - 1e-9)
    return min(MAX_FRAMES, max(MIN_FRAMES, 6 * k + 1))


def _allowed(spec: Field) -> dict:
    kind = "integer" if spec.integer else "number"
    return {"type": kind, "min": spec.low, "max": spec.high}


def _number_error(name: str, value, spec: Field) -> dict | None:
    """An error entry naming the allowed range, or None when ``value`` fits."""
    fits = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if fits and spec.integer:
        fits = float(value).is_integer()
    if fits and spec.low <= value <= spec.high:
        return None
    kind = "an integer" if spec.integer else "a number"
    return {"message": f"{name} must be {kind} from {spec.low} to {spec.high}",
            "allowed": _allowed(spec), "got": value}


def _text_error(name: str, value) -> dict | None:
    if isinstance(value, str) and (value.strip() or name != "prompt"):
        return None
    need = "a non-empty string" if name == "prompt" else "a string"
    return {"message": f"{name} must be {need}", "allowed": {"type": "string"}, "got": value}


def parse(body: object) -> tuple[GenerateRequest | None, dict[str, dict]]:
    """``(request, {})`` for a valid body, else ``(None, {field: error})`` for every bad field."""
    if not isinstance(body, dict):
        return None, {"body": {"message": "the body must be a JSON object",
                               "allowed": {"fields": list(ALLOWED)}}}
    errors: dict[str, dict] = {}
    for name in body:
        if name not in ALLOWED:
            errors[name] = {"message": f"unknown field {name!r}",
                            "allowed": {"fields": list(ALLOWED)}}
    if "prompt" not in body:
        errors["prompt"] = {"message": "prompt is required", "allowed": {"type": "string"}}
    for name in TEXT:
        present = name in body if name == "prompt" else body.get(name) is not None
        if present and (error := _text_error(name, body[name])):
            errors[name] = error
    for name, spec in NUMERIC.items():
        value = body.get(name)
        if value is not None and (error := _number_error(name, value, spec)):
            errors[name] = error
    if errors:
        return None, errors
    values = {name: body.get(name, spec.default) for name, spec in NUMERIC.items()}
    if values["seed"] is None:
        values["seed"] = secrets.randbelow(MAX_SEED + 1)
    frames = int(values["frames"])
    return GenerateRequest(
        prompt=body["prompt"], negative_prompt=body.get("negative_prompt") or "",
        guidance_scale=float(values["guidance_scale"]), fps=int(values["fps"]),
        frames=snap_frames(frames), steps=int(values["steps"]), seed=int(values["seed"]),
        requested_frames=frames,
    ), {}
