"""A converted model's settings and running range estimates, saved and restored.

A model's ``state_dict`` is the same converted or not (checkpoints load into
the plain model), so what torch-mesa adds lives beside the weights, in two
files of a checkpoint directory:

* ``mesa_config.json``: the :class:`~torch_mesa.MesaConfig` the model was
  converted with (``MesaConfig.to_dict``);
* ``mesa_ranges.pt``: the running range estimates (only with
  ``range_estimate="running"``; they are statistics of past steps, not
  parameters), from :func:`range_state_dict`.

``save_pretrained`` of a converted Hugging Face model writes both beside the
weights; :func:`from_pretrained` (or :func:`reapply_` on a model loaded any
other way) converts the loaded model again with them. The trainer switches
(:mod:`torch_mesa.trainers`) write them with each checkpoint and read them
back on resume.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch
from torch import nn

from .config import MesaConfig
from .convert import ConversionReport, compress_, config_of
from .quant.running import RangeStates, RunningRange

__all__ = [
    "CONFIG_NAME",
    "RANGES_NAME",
    "from_pretrained",
    "load_config",
    "load_range_state_dict",
    "range_state_dict",
    "reapply_",
    "save_conversion",
]

CONFIG_NAME = "mesa_config.json"
RANGES_NAME = "mesa_ranges.pt"


def _range_holders(model: nn.Module) -> Dict[str, RangeStates]:
    """Every :class:`RangeStates` of a converted model, by a stable name:
    a converted layer's under its module name, the routing scope's under
    ``"<module name>#<call slot>"``."""
    out: Dict[str, RangeStates] = {}
    for name, m in model.named_modules():
        states = m.__dict__.get("mesa_states")
        if isinstance(states, RangeStates):
            out[name] = states
    scope = getattr(model, "_mesa_scope", None)
    if scope is not None:
        for (name, slot), states in scope._states.items():
            out[f"{name}#{slot}"] = states
    return out


def range_state_dict(model: nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """The running range estimates of a converted model, as plain tensors:
    ``{"<holder>/<slot>": {"lo": ..., "span": ..., "momentum": ...}}``
    (empty with dynamic ranges, or before the first training step)."""
    out = {}
    for holder, states in _range_holders(model).items():
        for slot, r in states.slots.items():
            if r.lo is not None:
                out[f"{holder}/{slot}"] = {"lo": r.lo.detach().cpu().clone(), "span": r.span.detach().cpu().clone(),
                                           "momentum": torch.tensor(r.momentum)}
    return out


def load_range_state_dict(model: nn.Module, state: Dict[str, Dict[str, torch.Tensor]]) -> int:
    """Restore estimates saved by :func:`range_state_dict` into a model
    converted with the same config; returns how many were restored. An
    estimate whose holder the model does not have yet (the routing scope
    creates its own on first use) is created."""
    holders = _range_holders(model)
    scope = getattr(model, "_mesa_scope", None)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n = 0
    for key, value in state.items():
        holder, _, slot = key.rpartition("/")
        states = holders.get(holder)
        if states is None and scope is not None and "#" in holder:
            name, _, idx = holder.rpartition("#")
            states = holders[holder] = scope.states_for(name, int(idx))
        if states is None:
            raise KeyError(f"torch-mesa: saved running range {key!r} has no converted layer in this model "
                           "(was it converted with the same config and model?)")
        r = RunningRange(float(value["momentum"]))
        r.lo, r.span = value["lo"].to(device), value["span"].to(device)
        states.slots[slot] = r
        n += 1
    return n


def save_conversion(model: nn.Module, directory: str, config: Optional[MesaConfig] = None) -> None:
    """Write ``mesa_config.json`` (and ``mesa_ranges.pt`` when the model has
    running estimates) into ``directory``."""
    config = config if config is not None else config_of(model)
    if config is None:
        raise ValueError("save_conversion: this model was not converted by torch_mesa.compress_")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config.to_dict(), f, indent=1, sort_keys=True)
    ranges = range_state_dict(model)
    path = os.path.join(directory, RANGES_NAME)
    if ranges:
        torch.save(ranges, path)
    elif os.path.exists(path):
        os.remove(path)


def load_config(directory: str) -> Optional[MesaConfig]:
    """The config saved in ``directory``, or None when there is none."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return MesaConfig.from_dict(json.load(f))


def reapply_(model: nn.Module, directory: str) -> Optional[ConversionReport]:
    """Convert ``model`` with the config saved in ``directory`` and restore
    its running estimates; returns the report, or None (the model left as it
    is) when ``directory`` holds no torch-mesa config."""
    config = load_config(directory)
    if config is None:
        return None
    report = compress_(model, config)
    path = os.path.join(directory, RANGES_NAME)
    if os.path.isfile(path):
        load_range_state_dict(model, torch.load(path, map_location="cpu", weights_only=True))
    return report


def from_pretrained(model_class, path: str, *args, **kwargs):
    """``model_class.from_pretrained(path, ...)``, converted again with the
    torch-mesa config saved beside the weights (if any)::

        model = torch_mesa.from_pretrained(AutoModelForCausalLM, "out/checkpoint-500")
    """
    model = model_class.from_pretrained(path, *args, **kwargs)
    if os.path.isdir(path):
        reapply_(model, path)
    return model
