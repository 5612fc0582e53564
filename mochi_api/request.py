"""The body of a generate call: decoded, range-checked and with ``frames`` snapped to 6k+1.

No ComfyUI import (the prompt rule comes from ``mochi_core``). The body is exactly the hosted
Mochi APIs' one; an unknown field is an error, so no request can name a file, a model or a node
input. The prompts follow the core's rule (:func:`mochi_core.text.prompt_problem`,
:func:`mochi_core.text.is_blank`), the same one the text encode node applies, so the API refuses
a bad prompt before anything is queued. Every problem is reported as
``{field: {"message", "allowed", "got"?}}``.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import asdict, dataclass

from mochi_core import text

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


#: Integers with more digits than this are out of every range; they are kept as their text.
MAX_INT_DIGITS = 30
#: Unknown fields named in one answer (a body may hold thousands).
MAX_UNKNOWN_NAMED = 20
#: Strings echoed back as ``got`` up to this length (longer ones are described).
MAX_ECHO_CHARS = 100


class Unrepresentable:
    """A JSON number no float or bounded integer holds (``NaN``, ``Infinity``, ``1e999``,
    ``10**400``): kept as its literal text, so that the field holding it is named as out of
    range instead of the number breaking a conversion."""

    __slots__ = ("literal",)

    def __init__(self, literal: str) -> None:
        self.literal = literal if len(literal) <= 40 else f"{literal[:20]}… ({len(literal)} chars)"


class DuplicateField(ValueError):
    """A JSON object that repeats a key (JSON parsers would silently keep one of the values)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _float(literal: str) -> float | Unrepresentable:
    value = float(literal)
    return value if math.isfinite(value) else Unrepresentable(literal)


def _int(literal: str) -> int | Unrepresentable:
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        return Unrepresentable(literal)
    return int(literal)


def _unique(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for name, value in pairs:
        if name in out:
            raise DuplicateField(name)
        out[name] = value
    return out


def _body_error(message: str) -> dict[str, dict]:
    return {"body": {"message": message, "allowed": {"type": "a JSON object in UTF-8",
                                                     "fields": list(ALLOWED)}}}


def decode(raw: bytes) -> tuple[object, dict[str, dict]]:
    """``(value, {})`` for a body that is JSON in UTF-8, else ``(None, {field: error})``.

    Refused: bytes that are not UTF-8 (a leading byte-order mark is ignored), text that is not
    JSON, nesting too deep for the parser, and an object that repeats a key. ``NaN``,
    ``Infinity`` and numbers too large for a float become :class:`Unrepresentable`.
    """
    try:
        body = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, _body_error(f"the body is not valid UTF-8 (at byte {err.start})")
    try:
        return json.loads(body.removeprefix("\ufeff"), object_pairs_hook=_unique,
                          parse_float=_float, parse_int=_int,
                          parse_constant=Unrepresentable), {}
    except DuplicateField as err:
        name = _name(err.name)
        return None, {name: {"message": f"{name!r} appears more than once in the body",
                             "allowed": {"fields": list(ALLOWED)}}}
    except RecursionError:
        return None, _body_error("the body is nested too deeply to be read")
    except ValueError as err:
        return None, _body_error(f"the body is not valid JSON ({err})")


def _name(name: str) -> str:
    """A field name as an answer shows it: at most 100 characters, lone surrogates escaped."""
    short = name if len(name) <= MAX_ECHO_CHARS else f"{name[:MAX_ECHO_CHARS]}…"
    return short.encode("utf-8", "backslashreplace").decode("utf-8")


def shown(value: object) -> object:
    """``value`` as an error echoes it: a number or a short valid string as it is, anything else
    described, so that an answer stays small, flat and valid JSON."""
    if isinstance(value, Unrepresentable):
        return value.literal
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        if len(value) <= MAX_ECHO_CHARS and text.prompt_problem("", value) is None:
            return value
        return f"a string of {len(value):,} characters"
    return f"a JSON {'object' if isinstance(value, dict) else 'array'}"


def _allowed(spec: Field) -> dict:
    kind = "integer" if spec.integer else "number"
    return {"type": kind, "min": spec.low, "max": spec.high}


def _fits(value: object, spec: Field) -> bool:
    """Whether ``value`` is a number (not a bool) in the range, whole when it must be. Integers
    are compared as integers, never converted to float (10**400 has no float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and spec.integer and not value.is_integer():
        return False
    return spec.low <= value <= spec.high


def _number_error(name: str, value: object, spec: Field) -> dict | None:
    """An error entry naming the allowed range, or None when ``value`` fits."""
    if _fits(value, spec):
        return None
    kind = "an integer" if spec.integer else "a number"
    return {"message": f"{name} must be {kind} from {spec.low} to {spec.high}",
            "allowed": _allowed(spec), "got": shown(value)}


def _text_error(name: str, value: object) -> dict | None:
    """The core's prompt rule; ``prompt`` must also hold a visible character."""
    if not isinstance(value, str):
        message = f"{name} must be a string"
    elif problem := text.prompt_problem(name, value):
        message = problem
    elif name == "prompt" and text.is_blank(value):
        message = ("prompt has no visible character (whitespace, control and zero-width "
                   "characters do not count)")
    else:
        return None
    allowed = {"type": "string", "max_length": text.MAX_PROMPT_CHARS}
    return {"message": message, "allowed": allowed, "got": shown(value)}


def _unknown_errors(body: dict) -> dict[str, dict]:
    unknown = [name for name in body if name not in ALLOWED]
    errors = {_name(name): {"message": f"unknown field {_name(name)!r}",
                            "allowed": {"fields": list(ALLOWED)}}
              for name in unknown[:MAX_UNKNOWN_NAMED]}
    if len(unknown) > MAX_UNKNOWN_NAMED:
        errors["body"] = {"message": f"the body has {len(unknown)} unknown fields; the first "
                                     f"{MAX_UNKNOWN_NAMED} are named",
                          "allowed": {"fields": list(ALLOWED)}}
    return errors


def _field_errors(body: dict) -> dict[str, dict]:
    errors = _unknown_errors(body)
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
    return errors


def parse(body: object) -> tuple[GenerateRequest | None, dict[str, dict]]:
    """``(request, {})`` for a valid body, else ``(None, {field: error})`` for every bad field."""
    if not isinstance(body, dict):
        return None, _body_error("the body must be a JSON object")
    if errors := _field_errors(body):
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
