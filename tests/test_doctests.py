"""The examples in normlab's docstrings run, and print what they show."""

import doctest
import importlib
import pkgutil

import pytest
import torch
from torch import nn

import normlab

MODULES = ["normlab"] + sorted(
    info.name for info in pkgutil.walk_packages(normlab.__path__, "normlab.")
    if info.name != "normlab.__main__")


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    names = {"torch": torch, "nn": nn, "normlab": normlab}
    for test in finder.find(module, module_name, globs={**vars(module), **names}):
        torch.manual_seed(0)
        runner.run(test)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, f"{failed} of {attempted} docstring examples failed in {module_name}"
