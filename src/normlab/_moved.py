"""The lab's modules under the names they had before they moved into :mod:`normlab.lab`.

``normlab.data``, ``normlab.models``, ``normlab.training``, ``normlab.experiments`` (and
the lab's other modules, submodules included) stay importable by their old names and are
the same module objects as their ``normlab.lab`` ones, so code, pickles and stored probe
names written before the move keep working, while ``import normlab`` imports none of them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

LAB_MODULES = ("bench", "cli", "data", "experiments", "models", "text", "training")


def lab_name(old_name: str) -> str | None:
    """``normlab.lab.X...`` for ``normlab.X...`` when X is a lab module, else None."""
    package, _, rest = old_name.partition(".")
    if package != "normlab" or rest.split(".")[0] not in LAB_MODULES:
        return None
    return f"normlab.lab.{rest}"


class LabAliases(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``normlab.X...`` as the module ``normlab.lab.X...`` (one object, two names)."""

    def __init__(self):
        self._own_specs = {}

    def find_spec(self, fullname, path=None, target=None):
        if lab_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(lab_name(spec.name))
        self._own_specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module):
        # the import system gave the module the alias's spec; it keeps its own
        module.__spec__ = self._own_specs.pop(module.__name__)


def install() -> None:
    """Put the aliases first on sys.meta_path (before the finder that would load a second
    copy of ``normlab.experiments.store`` from the package's path); once per process."""
    if not any(isinstance(finder, LabAliases) for finder in sys.meta_path):
        sys.meta_path.insert(0, LabAliases())
