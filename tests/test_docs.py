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


PUBLIC_CLASSES = [name for name in normlab.__all__ if isinstance(getattr(normlab, name), type)]


@pytest.mark.parametrize("name", PUBLIC_CLASSES)
def test_public_classes_document_their_arguments(name):
    doc = getattr(normlab, name).__doc__
    assert "Args:" in doc or "Attributes:" in doc, f"{name} has no Args section"


def test_library_code_cites_papers_not_workplace_seed_numbers():
    import pathlib
    import re

    src = pathlib.Path(normlab.__file__).parent
    # experiments/ reproduces the workplace's seed documents and may name them
    offenders = [f"{path.relative_to(src)}:{number}"
                 for path in sorted(src.rglob("*.py"))
                 if "experiments" not in path.parts
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"\bseed 0\d\d\b", line, flags=re.I)]
    assert not offenders, f"seed numbers in library code: {offenders}"
