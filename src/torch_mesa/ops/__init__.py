"""Functional ops: exact forward, compressed save, backward from the rebuilt inputs.

Each function has the signature of its PyTorch counterpart plus keyword-only
``config`` (a :class:`~torch_mesa.MesaConfig`; ``None`` for the default) and
``states`` (running range estimates, held by converted modules). With
``config.bits=None``, or when autograd is not recording (``no_grad``,
``inference_mode``, inputs that need no gradient), each one simply calls the
PyTorch op: no cost, identical results.
"""

from ..quant.running import RangeStates
from .activation import (clamp, dropout, gated, gelu, hardsigmoid, hardswish, leaky_relu, mul, relu, relu6, sigmoid,
                         silu, tanh)
from .conv import batch_norm, conv, max_pool2d
from .attention import baddbmm, einsum, matmul, scaled_dot_product_attention, softmax
from .linear import linear
from .loss import linear_cross_entropy
from .norm import layer_norm, rms_norm
from .recompute import recompute

__all__ = [
    "RangeStates",
    "baddbmm",
    "batch_norm",
    "conv",
    "clamp",
    "dropout",
    "einsum",
    "gated",
    "gelu",
    "hardsigmoid",
    "hardswish",
    "layer_norm",
    "leaky_relu",
    "linear",
    "linear_cross_entropy",
    "matmul",
    "max_pool2d",
    "mul",
    "recompute",
    "relu",
    "relu6",
    "rms_norm",
    "scaled_dot_product_attention",
    "sigmoid",
    "silu",
    "softmax",
    "tanh",
]
