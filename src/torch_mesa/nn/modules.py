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
from ..routing.scope import inside_converted_model

Tensor = torch.Tensor


_EXACT = MesaConfig(bits=None)


class MesaModule:
    """Marker mixin of converted modules."""

    mesa_spec = None
    mesa_states = None

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
        if self.inplace and not torch.is_grad_enabled():
            return input.copy_(out)
        return out


class MesaReLU(MesaModule, nn.ReLU):
    def forward(self, input: Tensor) -> Tensor:
        if self.inplace:  # it overwrites its input: PyTorch's own, exact
            return F.relu(input, inplace=True)
        return ops.relu(input, config=self._spec, states=self.mesa_states)


class MesaSoftmax(MesaModule, nn.Softmax):
    def forward(self, input: Tensor) -> Tensor:
        if self.dim is None:  # legacy implicit dim: leave it to PyTorch, exact
            return F.softmax(input, self.dim, _stacklevel=5)
        return ops.softmax(input, self.dim, config=self._spec, states=self.mesa_states)


class MesaDropout(MesaModule, nn.Dropout):
    def forward(self, input: Tensor) -> Tensor:
        if self.inplace and not torch.is_grad_enabled():
            return F.dropout(input, self.p, self.training, inplace=True)
        return ops.dropout(input, self.p, self.training, config=self._spec)


CONVERTIBLE: Dict[Type[nn.Module], Type[nn.Module]] = {
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
