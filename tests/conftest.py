import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _prepare_module():
    path = REPO / "tools" / "prepare_data.py"
    spec = importlib.util.spec_from_file_location("prepare_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def data_root() -> Path:
    """../shared/data laid out for the loaders (CIFAR-10 materialized once, cached)."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"no shared datasets at {SHARED_DATA}")
    return _prepare_module().prepare(SHARED_DATA, REPO / ".cache" / "test-data")


# Hypothesis profiles for tests/test_properties.py. "ci" (the default) is small
# and derandomized, so CI runs the same examples every time and a failure
# reproduces; NORMLAB_HYPOTHESIS_PROFILE=long searches far more, with fresh
# random examples on every run.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("long", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.load_profile(os.environ.get("NORMLAB_HYPOTHESIS_PROFILE", "ci"))
