"""Shared pytest setup.

Hypothesis: no per-example deadline (CI machines are noisy; performance is
measured by benchmarks, not by timed tests), derandomized in CI so a red run
is reproducible from its log.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "stockade",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("stockade")
