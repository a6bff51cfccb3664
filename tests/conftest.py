import importlib.util
from pathlib import Path

import pytest

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
