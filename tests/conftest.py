"""Test configuration: hypothesis profiles.

The default profile runs 200 examples per property (what CI runs, through the README's
test command). ``HYPOTHESIS_PROFILE=dev`` runs 25 for quick local iterations, and
``HYPOTHESIS_PROFILE=thorough`` 2000.
"""

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("default", max_examples=200, **_common)
settings.register_profile("dev", max_examples=25, **_common)
settings.register_profile("thorough", max_examples=2000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
