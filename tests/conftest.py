"""Test set-up: kernels run in Triton's CPU interpreter, Hypothesis has a fast and a thorough profile.

TRITON_INTERPRET must be set before anything imports triton (SPEC §5), hence at the very top.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# `ci` (default): 25 examples a property, no deadline (the interpreter takes ~0.2-2 s per fused call).
# `thorough`: many more examples, for a GPU machine or a long local run:
#     pytest --hypothesis-profile=thorough
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=False, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=200, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
