"""The fast unit tier: pure pieces of tsnsrv, no processes, no network, no root.

Hypothesis runs a modest number of examples per property so the whole tier stays
within a few seconds; set HYPOTHESIS_PROFILE=thorough for a deeper search.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("unit", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "unit"))
