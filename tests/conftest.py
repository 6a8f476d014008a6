"""Test set-up: kernels run in Triton's CPU interpreter, Hypothesis has a fast and a thorough profile.

TRITON_INTERPRET must be set before anything imports triton (SPEC §5), hence at the very top.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402


def _import_bench():
    """Make `bench` importable: it lives at the repo root, which is not on sys.path under `pytest`
    (and must not be: the root also holds `kernels/`, a name that belongs to another distribution),
    so it is loaded by path."""
    if "bench" not in sys.modules:
        root = Path(__file__).resolve().parents[1] / "bench"
        spec = importlib.util.spec_from_file_location("bench", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = module
        spec.loader.exec_module(module)


_import_bench()

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
