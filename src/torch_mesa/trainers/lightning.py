"""Lightning switch: ``Trainer(callbacks=[MesaLightningCallback(config)])``.

The LightningModule is converted in ``setup`` (its submodules' calls are
routed however ``training_step`` reaches them). The config and running
estimates are stored in every checkpoint under ``checkpoint["torch_mesa"]``;
resuming (``trainer.fit(..., ckpt_path=...)``) converts the module again
with them. Works with ``pytorch_lightning`` or ``lightning.pytorch``,
whichever is installed (``pytorch_lightning`` first).
"""

from __future__ import annotations

import warnings

try:
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - the unified package only
    import lightning.pytorch as pl

from ..checkpoint import range_state_dict
from ..config import MesaConfig
from ..convert import config_of
from ._common import as_config, convert

__all__ = ["MesaLightningCallback"]

KEY = "torch_mesa"


class MesaLightningCallback(pl.Callback):
    """Converts the LightningModule with ``config`` (default ``MesaConfig()``)."""

    def __init__(self, config=None) -> None:
        super().__init__()
        self.config = as_config(config)
        self.report = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.report = convert(pl_module, self.config)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        config = config_of(pl_module)
        if config is not None:
            checkpoint[KEY] = {"config": config.to_dict(), "ranges": range_state_dict(pl_module)}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        saved = checkpoint.get(KEY)
        if saved is None:
            warnings.warn("torch-mesa: this checkpoint has no torch-mesa settings; keeping the callback's",
                          UserWarning, stacklevel=2)
            return
        report = convert(pl_module, self.config, MesaConfig.from_dict(saved["config"]), saved.get("ranges"),
                         where="the checkpoint")
        if report is not None:
            self.report = report
