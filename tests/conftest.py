"""Fixtures shared by every test module; helpers live in :mod:`kvtest`."""

from __future__ import annotations

import pytest

from kvtest import BACKENDS, require


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend whose framework is installed."""
    require(request.param)
    return str(request.param)
