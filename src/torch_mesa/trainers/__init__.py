"""Switches for the trainers people use: one argument converts the model.

* ``transformers.Trainer``: ``callbacks=[MesaTrainerCallback(MesaConfig())]``
  (:mod:`.transformers`, needs ``transformers``);
* Lightning: ``Trainer(callbacks=[MesaLightningCallback(MesaConfig())])``
  (:mod:`.lightning`, needs ``pytorch-lightning`` or ``lightning``).

Both convert the model when training starts, write the config (and running
range estimates) with every checkpoint, and on resume continue with the
settings the checkpoint was written with (a different config given to the
callback is overridden, with a warning). The model's ``state_dict`` is left
unchanged: checkpoints still load into the plain model.

Each class is imported on first use, so neither library is needed for the
other.
"""

__all__ = ["MesaTrainerCallback", "MesaLightningCallback"]


def __getattr__(name):
    if name == "MesaTrainerCallback":
        from .transformers import MesaTrainerCallback

        return MesaTrainerCallback
    if name == "MesaLightningCallback":
        from .lightning import MesaLightningCallback

        return MesaLightningCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
