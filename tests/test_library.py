"""The library stands apart from the lab: it imports without the lab's dependencies, and
`import normlab` loads none of the lab's modules."""

import importlib
import subprocess
import sys

import pytest

# Run in a fresh interpreter where importing matplotlib or tqdm fails (a None entry in
# sys.modules makes `import` raise ImportError), as it does where only the library is
# installed.
WITHOUT_LAB_DEPENDENCIES = """
import sys
for blocked in ("matplotlib", "tqdm"):
    sys.modules[blocked] = None
import importlib, pathlib
import normlab
lab_loaded = sorted(name for name in sys.modules if name.startswith("normlab.lab"))
assert not lab_loaded, f"import normlab loaded lab modules: {lab_loaded}"
root = pathlib.Path(normlab.__file__).parent
library = [".".join(("normlab", *path.relative_to(root).with_suffix("").parts)).removesuffix(
               ".__init__") for path in sorted(root.rglob("*.py"))
           if path.relative_to(root).parts[0] != "lab" and path.name != "__main__.py"]
for name in library:
    importlib.import_module(name)
lab_loaded = sorted(name for name in sys.modules if name.startswith("normlab.lab"))
assert not lab_loaded, f"library modules loaded lab modules: {lab_loaded}"
print(len(library))
"""


def test_library_imports_without_the_labs_dependencies():
    done = subprocess.run([sys.executable, "-c", WITHOUT_LAB_DEPENDENCIES],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 10  # the walk found the library's modules


def test_the_labs_old_names_are_its_modules():
    import normlab.experiments.store
    from normlab import data, experiments, models, training
    from normlab.lab import data as lab_data
    from normlab.lab import experiments as lab_experiments
    from normlab.lab import models as lab_models
    from normlab.lab import training as lab_training
    from normlab.lab.experiments import store

    assert (data, experiments, models, training) == (lab_data, lab_experiments, lab_models,
                                                     lab_training)
    assert normlab.experiments.store is store
    assert store.__spec__.name == "normlab.lab.experiments.store"
    assert normlab.data.load is lab_data.load


@pytest.mark.parametrize("old, new", [
    ("normlab._native", "normlab._ext.loader"),
    ("normlab.kernels", "normlab.functional.aten_helpers"),
    ("normlab.enorm", "normlab.rebalancers.enorm"),
    ("normlab.renorm", "normlab.rebalancers.row_renorm"),
])
def test_a_moved_library_module_keeps_its_old_name_with_a_warning(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} is now {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


@pytest.mark.parametrize("module, old, new", [
    ("normlab.functional", "weight_normalized_linear", "row_scaled_linear"),
    ("normlab.functional", "weight_normalized_conv2d", "row_scaled_conv"),
    ("normlab.functional", "row_scaled_conv2d", "row_scaled_conv"),
    ("normlab.distributed", "SyncBatchNorm", "GlobalBatchNorm"),
])
def test_a_renamed_public_name_keeps_working_with_a_warning(module, old, new):
    module = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"{old} is now {new}"):
        assert getattr(module, old) is getattr(module, new)


@pytest.mark.parametrize("name", ["tracked_sq_norms", "KERNEL_MAX_BATCH"])
def test_fastnorms_math_answers_at_its_old_place_in_the_layers_module_with_a_warning(name):
    from normlab.functional import fastnorm as fastnorm_math
    from normlab.layers import fastnorm as fastnorm_layers

    with pytest.warns(DeprecationWarning, match=f"normlab.layers.fastnorm.{name} is now "
                                                f"normlab.functional.fastnorm.{name}"):
        assert getattr(fastnorm_layers, name) is getattr(fastnorm_math, name)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        fastnorm_layers.no_such_name  # noqa: B018
