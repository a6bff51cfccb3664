import contextlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def skip_unless_ci(reason: str) -> None:
    """Skip the test where a dependency or dataset is missing; under CI (the environment
    variable CI set, as .ci/run does) fail instead, so nothing is left out silently."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{reason}; CI is set, so the test fails instead of skipping",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=True)


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op threads set to `count` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def no_kernel(*args, **kwargs) -> None:
    """A stand-in for normlab._native.for_tensor: no compiled kernel serves any tensor, so
    the eager torch paths, the kernels' specifications, run (monkeypatch it in)."""
    return None


@pytest.fixture(params=["compiled", "eager"])
def passes(request, monkeypatch):
    """Each test using this runs twice: on the compiled passes over the activations
    (csrc/activations.cpp, where CPU float32/float64 runs) and on the eager torch path."""
    from normlab._ext import loader as _native

    if request.param == "eager":
        monkeypatch.setattr(_native, "for_tensor", no_kernel)
    elif _native.module("activations", openmp=True) is None:
        skip_unless_ci("the compiled activations kernel could not be built on this machine")
    return request.param


def _prepare_module():
    path = REPO / "tools" / "prepare_data.py"
    spec = importlib.util.spec_from_file_location("prepare_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_data(folder: Path = SHARED_DATA) -> Path:
    """`folder` laid out for the loaders (CIFAR-10 materialized once, cached)."""
    if not (folder / "mnist").is_dir():
        skip_unless_ci(f"no shared datasets at {folder}")
    return _prepare_module().prepare(folder, REPO / ".cache" / "test-data")


@pytest.fixture(scope="session")
def data_root() -> Path:
    """../shared/data laid out for the loaders."""
    return shared_data()


def require_module(name: str) -> None:
    """Skip (under CI: fail) unless the test dependency `name` is installed."""
    if importlib.util.find_spec(name) is None:
        skip_unless_ci(f"the test dependency {name} is not installed (pip install -e '.[dev]')")


def monai_basic_unet(spatial_dims: int, norm: str = "instance"):
    """MONAI's BasicUNet at a tiny width (1 input channel, 2 outputs; takes 32 positions a
    side), with `norm` ("instance" or "batch") in its conv blocks; skipped (under CI: failed)
    without MONAI."""
    require_module("monai")
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=spatial_dims, in_channels=1, out_channels=2,
                     features=(4, 4, 8, 8, 8, 4), norm=(norm, {"affine": True}))


@pytest.fixture(scope="session")
def needs_sklearn() -> None:
    """scikit-learn, which ships the digits dataset of the fast training tests."""
    require_module("sklearn")


# Hypothesis profiles for tests/test_properties.py. "ci" (the default) is small
# and derandomized, so CI runs the same examples every time and a failure
# reproduces; NORMLAB_HYPOTHESIS_PROFILE=long searches far more, with fresh
# random examples on every run.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("long", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.load_profile(os.environ.get("NORMLAB_HYPOTHESIS_PROFILE", "ci"))
