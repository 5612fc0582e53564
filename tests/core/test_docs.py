"""The documents name tests and files that exist.

SECURITY.md states each promise with the tests that check it, and README.md points at files; a
renamed or deleted test would otherwise leave a promise that nothing checks.
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

DOCS = ("SECURITY.md", "README.md", "BENCHMARKS.md")
TEST_NAME = re.compile(r"`(?:[\w/]+\.py::)?(test_\w+)")
TEST_FILE = re.compile(r"`(tests/[\w/]+\.py)")


def _defined_tests() -> set[str]:
    names = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        names |= set(re.findall(r"^\s*(?:async )?def (test_\w+)", path.read_text(), re.M))
    return names


@pytest.mark.parametrize("doc", DOCS)
def test_every_test_a_document_names_exists(doc):
    text = (ROOT / doc).read_text()
    named = set(TEST_NAME.findall(text))
    missing = sorted(named - _defined_tests())
    assert not missing, f"{doc} names tests that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_test_file_a_document_names_exists(doc):
    text = (ROOT / doc).read_text()
    missing = sorted(f for f in set(TEST_FILE.findall(text)) if not (ROOT / f).is_file())
    assert not missing, f"{doc} names test files that do not exist: {missing}"


def test_the_check_sees_a_missing_name():
    assert TEST_NAME.findall("see `test_nothing_here` and `tests/x.py::test_y`") == [
        "test_nothing_here", "test_y"]
    assert "test_nothing_here" not in _defined_tests()
