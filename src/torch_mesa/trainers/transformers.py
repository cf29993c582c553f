"""``transformers.Trainer`` switch: ``callbacks=[MesaTrainerCallback(config)]``.

The model is converted when training starts (``on_train_begin``), after the
Trainer has loaded a checkpoint to resume from. Each checkpoint directory
(``checkpoint-<step>``) gets ``mesa_config.json`` (and ``mesa_ranges.pt``
with running ranges) beside the weights. On resume, the callback reads them
from ``output_dir/checkpoint-<step>`` (or from ``args.resume_from_checkpoint``
when that is a path) and continues with the saved settings and estimates.
Evaluation and prediction run under ``no_grad``, where a converted model
computes exactly what the plain one does.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

from transformers import TrainerCallback

from ..checkpoint import RANGES_NAME, load_config, save_conversion
from ._common import as_config, convert

__all__ = ["MesaTrainerCallback"]


class MesaTrainerCallback(TrainerCallback):
    """Converts the Trainer's model with ``config`` (default ``MesaConfig()``).

    Attributes:
        report: the :class:`~torch_mesa.ConversionReport` of the conversion
            (None before training starts, or when the model was converted
            already with the same settings).
    """

    def __init__(self, config=None) -> None:
        self.config = as_config(config)
        self.report = None

    @staticmethod
    def _resumed_from(args, state) -> Optional[str]:
        if not state.global_step:
            return None
        candidates = [os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.insert(0, args.resume_from_checkpoint)
        for path in candidates:
            if load_config(path) is not None:
                return path
        warnings.warn(
            f"torch-mesa: training resumes at step {state.global_step}, but no torch-mesa config was found in "
            f"{' or '.join(candidates)}; converting with the callback's settings", UserWarning, stacklevel=3)
        return None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("MesaTrainerCallback: the Trainer passed no model to convert")
        path = self._resumed_from(args, state)
        saved = ranges = None
        if path is not None:
            import torch

            saved = load_config(path)
            rpath = os.path.join(path, RANGES_NAME)
            if os.path.isfile(rpath):
                ranges = torch.load(rpath, map_location="cpu", weights_only=True)
        self.report = convert(model, self.config, saved, ranges, where=path or "")
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is not None and state.is_world_process_zero:
            save_conversion(model, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        return control
