"""Optimizers that normalized layers need: FastNormSGD."""

from .fastnorm_sgd import FastNormSGD

__all__ = ["FastNormSGD"]
