"""Converted versions of the standard ``torch.nn`` layers.

Conversion changes a module's class in place (``module.__class__``) to the
subclass below and adds two attributes: ``mesa_spec`` (the resolved
:class:`~torch_mesa.config.QuantSpec`) and ``mesa_states`` (running range
estimates). The module keeps its parameters, buffers, hooks and every other
attribute (``eps``, ``approximate``, ``dim``, ``p``...), so ``state_dict()`` is
unchanged and ``restore_`` only has to switch the class back. Each subclass
is still an instance of the original class (``isinstance(m, nn.Linear)``).
"""

from __future__ import annotations

from typing import Dict, Type

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import MesaConfig
from ..ops.recipes import overwrite
from ..routing.scope import inside_converted_model

Tensor = torch.Tensor


_EXACT = MesaConfig(bits=None)


class MesaModule:
    """Marker mixin of converted modules."""

    mesa_spec = None
    mesa_states = None

    def __init_subclass__(cls, **kwargs):
        # A converted layer's forward is never traced by torch.compile: it
        # keeps Python state (recipes on tensors, range estimates) that a
        # graph would guard on, and Dynamo would compile each of the library
        # frames it passes through on its own. In a compiled model the layer
        # is one graph break (docs/design.md, "torch.compile").
        super().__init_subclass__(**kwargs)
        fn = cls.__dict__.get("forward")
        if fn is not None:
            cls.forward = torch._dynamo.disable(fn)

    @property
    def _spec(self):
        """The layer's spec while a converted model runs; exact otherwise (a
        layer object shared with a model nobody converted)."""
        return self.mesa_spec if inside_converted_model() else _EXACT

    def extra_repr(self) -> str:  # type: ignore[override]
        base = super().extra_repr()  # type: ignore[misc]
        spec = self.mesa_spec
        tag = "mesa=exact" if spec is None else f"mesa={spec.bits}bit"
        return f"{base}, {tag}" if base else tag


class MesaLinear(MesaModule, nn.Linear):
    def forward(self, input: Tensor) -> Tensor:
        return ops.linear(input, self.weight, self.bias, config=self._spec, states=self.mesa_states)


class MesaLayerNorm(MesaModule, nn.LayerNorm):
    def forward(self, input: Tensor) -> Tensor:
        return ops.layer_norm(
            input,
            self.normalized_shape,
            self.weight,
            self.bias,
            self.eps,
            config=self._spec,
            states=self.mesa_states,
        )


class MesaGELU(MesaModule, nn.GELU):
    def forward(self, input: Tensor) -> Tensor:
        return ops.gelu(input, self.approximate, config=self._spec, states=self.mesa_states)


class MesaSiLU(MesaModule, nn.SiLU):
    def forward(self, input: Tensor) -> Tensor:
        out = ops.silu(input, config=self._spec, states=self.mesa_states)
        # inplace=True: the input is overwritten, as PyTorch's module does
        # (code after it may read the input and must see the output)
        return overwrite(input, out) if self.inplace else out


class MesaReLU(MesaModule, nn.ReLU):
    def forward(self, input: Tensor) -> Tensor:
        return ops.relu(input, inplace=self.inplace, config=self._spec, states=self.mesa_states)


class MesaSoftmax(MesaModule, nn.Softmax):
    def forward(self, input: Tensor) -> Tensor:
        if self.dim is None:  # legacy implicit dim: leave it to PyTorch, exact
            return F.softmax(input, self.dim, _stacklevel=5)
        return ops.softmax(input, self.dim, config=self._spec, states=self.mesa_states)


class MesaDropout(MesaModule, nn.Dropout):
    def forward(self, input: Tensor) -> Tensor:
        if self.inplace and not torch.is_grad_enabled():
            return F.dropout(input, self.p, self.training, inplace=True)
        out = ops.dropout(input, self.p, self.training, config=self._spec)
        return overwrite(input, out) if self.inplace and out is not input else out


class _MesaConvNd(MesaModule):
    def forward(self, input: Tensor) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":  # the padded input is what is kept
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return ops.conv(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                        config=self._spec, states=self.mesa_states)


class MesaConv1d(_MesaConvNd, nn.Conv1d):
    pass


class MesaConv2d(_MesaConvNd, nn.Conv2d):
    pass


class MesaConv3d(_MesaConvNd, nn.Conv3d):
    pass


# Converted only with MesaConfig(batch_norm=True) (see its docstring); with
# it off, _MesaBatchNorm runs PyTorch's own forward.
class _MesaBatchNorm(MesaModule):
    def forward(self, input: Tensor) -> Tensor:
        spec = self._spec
        if spec is None or not spec.batch_norm:
            return nn.modules.batchnorm._BatchNorm.forward(self, input)
        # nn.BatchNorm's own bookkeeping (batches tracked, the averaging
        # factor, which statistics), then the op.
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return ops.batch_norm(input, self.running_mean if use_running else None,
                              self.running_var if use_running else None, self.weight, self.bias, batch_stats,
                              factor, self.eps, config=spec, states=self.mesa_states)


class MesaBatchNorm1d(_MesaBatchNorm, nn.BatchNorm1d):
    pass


class MesaBatchNorm2d(_MesaBatchNorm, nn.BatchNorm2d):
    pass


class MesaBatchNorm3d(_MesaBatchNorm, nn.BatchNorm3d):
    pass


class _MesaPiecewise(MesaModule):
    _op = None
    _torch = None  # the torch.nn class
    exact_in_place = True  # (the conversion report lists such a module as left exact)

    def forward(self, input: Tensor) -> Tensor:
        # inplace=True: PyTorch's own, exact. (Compressing these in place as
        # SiLU is works, but MobileNetV3, whose activations timm builds in
        # place, then missed the 0.999 gradient-cosine bar of the sweep on
        # its squeeze-excite biases: 0.998, as it does built without
        # inplace; docs/design.md, "What an op keeps: recipes".)
        if getattr(self, "inplace", False):
            return type(self)._torch.forward(self, input)
        return type(self)._op(input, config=self._spec, states=self.mesa_states)


class MesaReLU6(_MesaPiecewise, nn.ReLU6):
    _op, _torch = staticmethod(ops.relu6), nn.ReLU6


class MesaHardswish(_MesaPiecewise, nn.Hardswish):
    _op, _torch = staticmethod(ops.hardswish), nn.Hardswish


class MesaHardsigmoid(_MesaPiecewise, nn.Hardsigmoid):
    _op, _torch = staticmethod(ops.hardsigmoid), nn.Hardsigmoid


class MesaMaxPool2d(MesaModule, nn.MaxPool2d):
    def forward(self, input: Tensor) -> Tensor:
        if self.return_indices:
            return super().forward(input)
        return ops.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                              config=self._spec)


class MesaLeakyReLU(MesaModule, nn.LeakyReLU):
    exact_in_place = True
    def forward(self, input: Tensor) -> Tensor:
        if self.inplace:  # (exact, as the piecewise ones above)
            return F.leaky_relu(input, self.negative_slope, inplace=True)
        return ops.leaky_relu(input, self.negative_slope, config=self._spec, states=self.mesa_states)


CONVERTIBLE: Dict[Type[nn.Module], Type[nn.Module]] = {
    nn.Conv1d: MesaConv1d,
    nn.Conv2d: MesaConv2d,
    nn.Conv3d: MesaConv3d,
    nn.BatchNorm1d: MesaBatchNorm1d,
    nn.BatchNorm2d: MesaBatchNorm2d,
    nn.BatchNorm3d: MesaBatchNorm3d,
    nn.MaxPool2d: MesaMaxPool2d,
    nn.ReLU6: MesaReLU6,
    nn.Hardswish: MesaHardswish,
    nn.Hardsigmoid: MesaHardsigmoid,
    nn.LeakyReLU: MesaLeakyReLU,
    nn.Linear: MesaLinear,
    nn.LayerNorm: MesaLayerNorm,
    nn.GELU: MesaGELU,
    nn.SiLU: MesaSiLU,
    nn.ReLU: MesaReLU,
    nn.Softmax: MesaSoftmax,
    nn.Dropout: MesaDropout,
}

if hasattr(nn, "RMSNorm"):  # torch >= 2.4

    class MesaRMSNorm(MesaModule, nn.RMSNorm):
        def forward(self, input: Tensor) -> Tensor:
            return ops.rms_norm(
                input,
                self.normalized_shape,
                self.weight,
                self.eps,
                config=self._spec,
                states=self.mesa_states,
            )

    CONVERTIBLE[nn.RMSNorm] = MesaRMSNorm
