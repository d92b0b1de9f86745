"""Hypothesis profile of the unit suite: no example database on disk, no per-example deadline
(timing on a loaded CI box is not what these properties are about); the fixtures the
settings and connection tests share."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from tests.unit import pki as pki_module
from tests.unit.pki import Pki

settings.register_profile(
    "unit",
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("unit")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The developer's or CI's own PIPELINE_* variables must not leak into a test."""
    for name in list(os.environ):
        if name.upper().startswith("PIPELINE_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA with server and client certificates (openssl)."""
    if not pki_module.available():
        pytest.skip("openssl is not installed")
    return pki_module.make(tmp_path_factory.mktemp("pki"))
