"""Kernel-variant fixtures: every variant meets the same case runner."""

import pytest

from suite.decode_cases import VARIANTS


@pytest.fixture
def decode_variant(request):
    """(name, launcher) of a decode-attention variant; parametrized by each test module."""
    return request.param, VARIANTS[request.param]
