import pytest

from conftest import skip_unless_ci
from normlab._ext import loader as _native


@pytest.fixture
def fresh(monkeypatch):
    """An empty cache of loaded kernels, restored afterwards."""
    monkeypatch.setattr(_native, "_loaded", {})


@pytest.mark.parametrize("name, openmp, functions", [
    ("fastnorm", False, ["fused_step", "recorded_linear"]),
    ("enorm", True, ["balance_chain"]),
    ("equinorm", True, ["forward", "backward"]),
    ("activations", True, ["online_forward", "online_backward_sums", "online_backward_input",
                           "channel_moments", "online_stream_forward",
                           "online_stream_backward", "online_norm_train", "layer_scale_forward",
                           "layer_scale_backward", "batch_renorm_train"]),
])
def test_a_kernel_builds_and_is_named_by_its_source_and_flags(fresh, monkeypatch, name, openmp,
                                                              functions):
    built = []
    from torch.utils import cpp_extension
    original = cpp_extension.load
    monkeypatch.setattr(cpp_extension, "load",
                        lambda name, *a, **kw: built.append(name) or original(name, *a, **kw))
    kernel = _native.module(name, openmp=openmp)
    if kernel is None:
        skip_unless_ci(f"the compiled kernel {name!r} could not be built on this machine")
    assert all(hasattr(kernel, function) for function in functions)
    assert len(built) == 1 and built[0].startswith(f"normlab_{name}_")
    assert _native.module(name, openmp=openmp) is kernel and len(built) == 1  # loaded once


def test_normlab_native_0_turns_the_kernels_off(fresh, monkeypatch):
    monkeypatch.setenv("NORMLAB_NATIVE", "0")
    assert not _native.enabled() and _native.module("fastnorm") is None


def test_a_kernel_that_cannot_be_built_warns_and_gives_none(fresh, monkeypatch, tmp_path):
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(_native, "_SOURCES", tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    with pytest.warns(RuntimeWarning, match="'broken' could not be built"):
        assert _native.module("broken") is None
