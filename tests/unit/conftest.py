"""Hypothesis profile of the unit suite: no example database on disk, no per-example deadline
(timing on a loaded CI box is not what these properties are about)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "unit",
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("unit")
