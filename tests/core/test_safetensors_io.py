"""The bounded safetensors header reader: valid files, each refusal, and a fuzz of both."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mochi_core import safetensors_io as sio
from mochi_core.checkpoints import detect_file
from mochi_core.safetensors_io import CheckpointError, LazyTensors, load_tensors, read_header


def sample_tensors() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
            "c": torch.tensor([0.5, 2.0, -1.0], dtype=torch.float32).to(torch.float8_e4m3fn),
            "empty": torch.zeros(0, dtype=torch.float16),
            "scalar": torch.tensor(3, dtype=torch.int64)}


def raw_file(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None
             ) -> Path:
    """A file with an arbitrary header (dict -> JSON) and data; ``length`` overrides the prefix."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def test_valid_file_round_trip(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "ok.safetensors"
    save_file(tensors, str(path), metadata={"kwargs": "{}"})
    header = read_header(path)
    assert header.metadata == {"kwargs": "{}"}
    assert header.shapes() == {k: tuple(v.shape) for k, v in tensors.items()}
    assert header.tensors["c"].torch_dtype == torch.float8_e4m3fn
    loaded = load_tensors(path)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    lazy = LazyTensors(path)
    assert len(lazy) == 5 and torch.equal(lazy["b"], tensors["b"])
    assert "b" in lazy and "zz" not in lazy
    with pytest.raises(KeyError):
        lazy["missing"]


def test_header_length_with_pickle_like_first_byte_is_still_safetensors(tmp_path):
    """A header of 0x280 bytes starts with 0x80 0x02, the pickle protocol-2 magic."""
    body = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    blob = body + b" " * (0x280 - len(body))
    path = raw_file(tmp_path / "padded.safetensors", blob, struct.pack("<f", 2.5))
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert load_tensors(path)["x"].item() == 2.5


def entry(dtype="F32", shape=(1,), offsets=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_HEADERS = [
    ({"x": entry(shape=(2,), offsets=(0, 8))}, 4, "ends at byte 8"),
    ({"x": entry(), "y": entry()}, 4, "overlaps"),
    ({"x": entry(offsets=(4, 8))}, 8, "leaves a hole"),
    ({"x": entry(offsets=(-4, 0))}, 4, "invalid data_offsets"),
    ({"x": entry(offsets=(4, 0))}, 4, "invalid data_offsets"),
    ({"x": entry(dtype="F4")}, 4, "unknown dtype"),
    ({"x": entry(shape=(2,))}, 4, "does not match its byte span"),
    ({"x": entry(shape=(-1,))}, 4, "non-negative"),
    ({"x": entry(shape=(True,))}, 4, "non-negative"),
    ({"x": entry()}, 8, "bytes after the last tensor"),
    ({"x": {"dtype": "F32", "shape": [1]}}, 4, "exactly dtype"),
    ({"x": entry(offsets=(0,))}, 4, "two integers"),
    ({"x": entry(), "__metadata__": {"a": 1}}, 4, "map of strings"),
    ([1, 2], 0, "not a JSON object"),
]


@pytest.mark.parametrize(("header", "data_len", "message"), BAD_HEADERS)
def test_malformed_headers_are_refused(tmp_path, header, data_len, message):
    blob = json.dumps(header).encode()
    path = raw_file(tmp_path / "bad.safetensors", blob, b"\0" * data_len)
    with pytest.raises(CheckpointError, match=message) as err:
        read_header(path)
    assert "bad.safetensors" in str(err.value)


@pytest.mark.parametrize(("blob", "length", "message"), [
    (b"{not json}", None, "not valid JSON"),
    (b'{"x": 1, "x": 2}', None, "duplicate key"),
    (b"\xff\xfe{}", None, "not valid JSON"),
    (b"{}", 10**6, "larger than the file"),
    (b"{}", sio.MAX_HEADER_BYTES + 1, "exceeds"),
    (b"[" * 100_000 + b"]" * 100_000, None, "not valid JSON"),
])
def test_bad_header_bytes(tmp_path, blob, length, message):
    with pytest.raises(CheckpointError, match=message):
        read_header(raw_file(tmp_path / "h.safetensors", blob, length=length))


def test_too_short_and_missing(tmp_path):
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        read_header(tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        read_header(tmp_path / "absent.safetensors")


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(sample_tensors(), str(path))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(path)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("x.ckpt", b"anything", "pickle files"),
    ("x.pth", b"anything", "pickle files"),
    ("x.bin", b"anything", "pickle files"),
    ("x.safetensors", b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00}", "pickle stream"),
    ("x.safetensors", b"PK\x03\x04\x00\x00\x00\x00\x00\x00", "zip archive"),
    ("x.safetensors", b"GGUF\x03\x00\x00\x00\x00\x00", "GGUF"),
])
def test_pickle_family_is_refused(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_header(tmp_path / name)


def _valid_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "base.safetensors"
    save_file(sample_tensors(), str(path), metadata={"format": "pt"})
    return path.read_bytes()


def _check_file(path: Path) -> None:
    """Either a clean CheckpointError, or a header whose tensors all load as described."""
    try:
        header = read_header(path)
    except CheckpointError:
        return
    loaded = load_tensors(path, header=header)
    for key, info in header.tensors.items():
        assert tuple(loaded[key].shape) == info.shape and loaded[key].dtype == info.torch_dtype
    detect_file(path)


FUZZ = settings(max_examples=150, deadline=2000, database=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    _check_file(path)


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_valid_files(tmp_path, data):
    base = bytearray(_valid_bytes(tmp_path))
    n = int.from_bytes(base[:8], "little")
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "digit"]))
        pos = data.draw(st.integers(0, len(base) - 1))
        if kind == "flip":
            base[pos] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del base[pos:pos + data.draw(st.integers(1, 16))]
        elif kind == "insert":
            base[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif n > 0:  # change a digit inside the JSON header (offsets, shapes)
            digits = [i for i in range(8, 8 + n) if i < len(base) and chr(base[i]).isdigit()]
            if digits:
                base[data.draw(st.sampled_from(digits))] = ord(str(data.draw(st.integers(0, 9))))
        if not base:
            base = bytearray(b"\0")
    path = tmp_path / "mutant.safetensors"
    path.write_bytes(bytes(base))
    _check_file(path)


@settings(max_examples=100, deadline=2000, database=None)
@given(keys=st.dictionaries(st.text(max_size=40), st.sampled_from(list(sio.DTYPES)),
                            max_size=12))
def test_fuzz_detection_on_random_key_sets(keys):
    from mochi_core.checkpoints import detect_format

    dtypes = {k: sio.DTYPES[v][0] for k, v in keys.items()}
    assert detect_format(dtypes).kind in {"dit", "vae", "t5", "lora", "all_in_one", "unknown"}
