"""One module per paper's experiment: its grid of runs, its claims and its figures."""

from . import enorm, equinorm, fastnorm, lecture, onlinenorm

__all__ = ["enorm", "equinorm", "fastnorm", "lecture", "onlinenorm"]
