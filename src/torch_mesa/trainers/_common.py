"""What both trainer switches do: convert, or convert again with saved settings."""

from __future__ import annotations

import warnings
from typing import Optional

from torch import nn

from ..checkpoint import load_range_state_dict
from ..config import MesaConfig
from ..convert import ConversionReport, compress_, config_of, restore_


def as_config(config) -> MesaConfig:
    if config is None:
        return MesaConfig()
    if isinstance(config, dict):
        return MesaConfig.from_dict(config)
    if not isinstance(config, MesaConfig):
        raise TypeError(f"config must be a torch_mesa.MesaConfig (or its to_dict()), got {type(config).__name__}")
    return config


def convert(model: nn.Module, config: MesaConfig, saved: Optional[MesaConfig] = None, ranges=None,
            where: str = "") -> Optional[ConversionReport]:
    """Convert ``model`` with ``saved`` (the checkpoint's settings) when given,
    else with ``config``; a model converted already with the same settings
    is left as it is. Restores ``ranges`` (running estimates) when given."""
    if saved is not None and saved != config:
        warnings.warn(
            f"torch-mesa: resuming from {where or 'a checkpoint'} converted with other settings than the "
            f"callback's; continuing with the checkpoint's ({saved})", UserWarning, stacklevel=3)
        config = saved
    report = None
    current = config_of(model)
    if current != config:
        if current is not None:
            restore_(model)
        report = compress_(model, config)
    if ranges:
        load_range_state_dict(model, ranges)
    return report
