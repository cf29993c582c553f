"""Converted ``torch.nn`` layers (see :mod:`torch_mesa.nn.modules`)."""

from .modules import CONVERTIBLE, MesaModule

__all__ = ["CONVERTIBLE", "MesaModule"]
