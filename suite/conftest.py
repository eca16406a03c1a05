"""Kernel-variant fixtures: every variant meets the same case runner; inner pytest runs."""

from pathlib import Path

import pytest

from suite.decode_cases import VARIANTS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def decode_variant(request):
    """(name, launcher) of a decode-attention variant; parametrized by each test module."""
    return request.param, VARIANTS[request.param]


@pytest.fixture
def inner(pytester, monkeypatch):
    """pytester set up for an inner pytest run with the repository's own pytest.ini."""
    # An inner run shares this process's modules, and its test files may stub suite.perf's launch
    # counter at module level: put it back at teardown, or every later launch count of this process
    # raises (a nightly run in one process lost every decode loop's count so on 2026-11-27).
    import suite.perf
    monkeypatch.setattr(suite.perf, "count_launches", suite.perf.count_launches)
    pytester.syspathinsert(REPO)
    pytester.makefile(".ini", pytest=(REPO / "pytest.ini").read_text())
    return pytester
