"""Bounded, validated reading of ``.safetensors`` files; pickle checkpoints are refused.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor
name to ``{"dtype", "shape", "data_offsets"}`` (offsets relative to the data section) plus an
optional ``"__metadata__"`` string map, and then the raw tensor bytes.

:func:`read_header` parses and checks the header *before* any tensor is touched: the header
length is capped, the JSON must be an object, every dtype must be known, every byte span must
match its shape and dtype, and the spans must tile the data section exactly (no holes, overlaps
or bytes past the end), which also catches truncated files. Only then are tensors read, lazily
and one at a time, through :class:`LazyTensors`.

Files in the pickle family (``.ckpt``/``.pt``/``.pth``/``.bin``, or any file whose first bytes
are a zip archive or a pickle stream) are refused with a clear message and never unpickled.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: Upper bound on the JSON header (the largest real Mochi header is well under 1 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024

#: Extensions of formats that are unpickled by their usual loaders; we refuse them outright.
PICKLE_EXTENSIONS = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})

#: safetensors dtype name -> (torch dtype, bytes per element).
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "F32": (torch.float32, 4),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
    "F64": (torch.float64, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, malformed, refused or of the wrong kind.

    The message always names the file.
    """


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor; ``start``/``end`` are data-section offsets."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the stored tensor."""
        return DTYPES[self.dtype][0]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensor table, free-form metadata, and where the data begins."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> shape."""
        return {k: v.shape for k, v in self.tensors.items()}


def _fail(path: Path | str, message: str) -> CheckpointError:
    """A :class:`CheckpointError` whose message starts with the file name."""
    return CheckpointError(f"{Path(path).name}: {message}")


def _sniff_non_safetensors(head: bytes) -> str | None:
    """Name the format of a file that is not safetensors, from its first bytes, if recognisable."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save pickle checkpoint)"
    if len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5:
        return "a pickle stream"
    if head.startswith(b"GGUF"):
        return "a GGUF file"
    return None


def refuse_pickle(path: Path | str) -> None:
    """Raise :class:`CheckpointError` for pickle-family files, by extension or by magic bytes.

    The file is never unpickled; at most its first 9 bytes are read.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_EXTENSIONS:
        raise _fail(path, f"'{path.suffix}' checkpoints are pickle files and are refused (they "
                          "can run code when loaded); convert the file to .safetensors")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as err:
        raise _fail(path, f"cannot read file ({err.strerror})") from err
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    kind = None if looks_safetensors else _sniff_non_safetensors(head)
    if kind is not None:
        raise _fail(path, f"file is {kind}, not safetensors; refused without loading it")


def _parse_json(path: Path, raw: bytes) -> dict:
    """The header as a JSON object (duplicate keys refused)."""
    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _fail(path, f"header is not valid JSON ({str(err)[:120]})") from err
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    return header


def _is_int(x: object) -> bool:
    """An int that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(path: Path, key: str, entry: object) -> TensorInfo:
    """One validated tensor entry of the header."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _fail(path, f"tensor {key!r}: entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(path, f"tensor {key!r}: unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _fail(path, f"tensor {key!r}: shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise _fail(path, f"tensor {key!r}: data_offsets must be two integers")
    start, end = offsets
    if start < 0 or end < start:
        raise _fail(path, f"tensor {key!r}: invalid data_offsets [{start}, {end}]")
    info = TensorInfo(dtype, tuple(shape), start, end)
    if info.numel * DTYPES[dtype][1] != end - start:
        raise _fail(path, f"tensor {key!r}: shape {info.shape} x {dtype} does not match its "
                          f"byte span of {end - start}")
    return info


def _check_layout(path: Path, tensors: Mapping[str, TensorInfo], data_len: int) -> None:
    """The spans must tile ``[0, data_len)`` exactly: no overlap, hole or byte past the end."""
    position = 0
    for key, info in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.end > data_len:
            raise _fail(path, f"tensor {key!r} ends at byte {info.end} but the data section has "
                              f"{data_len} bytes (truncated file?)")
        if info.start != position:
            what = "overlaps another tensor" if info.start < position else "leaves a hole"
            raise _fail(path, f"tensor {key!r} {what} (offset {info.start}, expected {position})")
        position = info.end
    if position != data_len:
        raise _fail(path, f"{data_len - position} bytes after the last tensor (corrupt file?)")


def _read_raw_header(path: Path) -> tuple[bytes, int]:
    """The header bytes and the data-section length, with the size checks."""
    refuse_pickle(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"file is {size} bytes, too short for a safetensors header")
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES:
                raise _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap")
            if 8 + n > size:
                raise _fail(path, f"header length {n} is larger than the file ({size} bytes)")
            raw = f.read(n)
    except OSError as err:
        raise _fail(path, f"cannot read file ({err.strerror})") from err
    if len(raw) != n:
        raise _fail(path, "file changed while reading its header")
    return raw, size - 8 - n


def read_header(path: Path | str) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file without loading any tensor.

    Raises :class:`CheckpointError` (naming the file) for anything malformed or refused.
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(path, f"no such file: {path}")
    raw, data_len = _read_raw_header(path)
    header = _parse_json(path, raw)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(v, str) for v in metadata.values()
    ):
        raise _fail(path, "__metadata__ must be a map of strings")
    tensors = {key: _parse_entry(path, key, entry) for key, entry in header.items()}
    _check_layout(path, tensors, data_len)
    return SafetensorsHeader(path, tensors, metadata, 8 + len(raw))


class LazyTensors(Mapping[str, torch.Tensor]):
    """Read-only mapping over one validated safetensors file; each lookup reads one tensor.

    Membership tests use the header only. The file stays open (memory-mapped by safetensors)
    until :meth:`close` or garbage collection.
    """

    def __init__(self, path: Path | str, header: SafetensorsHeader | None = None) -> None:
        self.header = header if header is not None else read_header(path)
        self.path = self.header.path
        self._handle = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.header.tensors:
            raise KeyError(key)
        if self._handle is None:
            from safetensors import safe_open  # noqa: PLC0415

            self._handle = _guarded(self.path, lambda: safe_open(str(self.path), framework="pt"))
        return _guarded(self.path, lambda: self._handle.get_tensor(key))

    def __contains__(self, key: object) -> bool:
        return key in self.header.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.header.tensors)

    def __len__(self) -> int:
        return len(self.header.tensors)

    def close(self) -> None:
        """Release the open file."""
        self._handle = None


def _guarded(path: Path, read):
    """``read()``, with errors of the safetensors library reported as :class:`CheckpointError`."""
    try:
        return read()
    except Exception as err:  # the safetensors library raises its own error types
        raise _fail(path, f"cannot read tensors ({err})") from err


def load_tensors(
    path: Path | str,
    keys: Iterable[str] | None = None,
    *,
    device: torch.device | str = "cpu",
    header: SafetensorsHeader | None = None,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Load ``keys`` (default: all) from a safetensors file, after validating its header.

    ``transform(key, tensor)``, if given, is applied to each tensor on the CPU as soon as it is
    read (e.g. a dtype cast, so a 40 GB fp32 file never sits in memory whole), before the move
    to ``device``.
    """
    from safetensors import safe_open  # noqa: PLC0415  (keeps import time low)

    header = header if header is not None else read_header(path)
    wanted = list(header.tensors) if keys is None else list(keys)
    missing = [k for k in wanted if k not in header.tensors]
    if missing:
        raise _fail(header.path, f"missing tensors {missing[:5]}")

    def read() -> dict[str, torch.Tensor]:
        out = {}
        with safe_open(str(header.path), framework="pt", device="cpu") as f:
            for key in wanted:
                tensor = f.get_tensor(key)
                out[key] = (tensor if transform is None else transform(key, tensor)).to(device)
        return out

    return _guarded(header.path, read)
