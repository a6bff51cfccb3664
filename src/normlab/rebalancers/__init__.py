"""Rebalancers: optimizer companions that rescale weights between steps without changing
the network's function (ENorm), or renormalize weight-normalized rows (Renormalize)."""

from .enorm import ENorm
from .row_renorm import Renormalize

__all__ = ["ENorm", "Renormalize"]
