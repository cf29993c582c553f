"""Models by name, for the command line: build one and make a batch for it.

Accepted names:

* ``vit:tiny`` / ``vit:small`` / ``vit:base``: the reference ViT of
  :mod:`torch_mesa.tools.models` (ViT-Ti/S/B-16 layouts).
* ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)`` (random init).
* ``hf:FAMILY``: a Hugging Face transformers model built from
  ``AutoConfig.for_model(FAMILY, **sizes)`` (random init; ``gpt2``,
  ``llama``, ``bert``, ``vit``...).
* a path to a ``config.json``: a Hugging Face model built from that config.
* ``package.module:function``: any callable that returns an ``nn.Module``
  (it may take ``image_size`` or ``seq_len`` keyword arguments).

Nothing is downloaded: every model starts from random weights.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelSpec", "resolve", "parse_sizes"]


class ModelError(ValueError):
    """A model name or size that cannot be built (one-line message)."""


@dataclass
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    kind: str  # "image" or "tokens"
    image_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    seq_len: int = 512
    vocab_size: int = 0
    # a language model trained as Hugging Face's trainers do: the batch
    # passes labels (the input ids) and the loss is the model's own (a
    # converted causal LM's fused head and loss); else the logits' cross-entropy
    labels: bool = False

    def batch(self, batch_size: int, device="cpu", seed: int = 0):
        """``(inputs, kwargs, targets)`` for one training batch."""
        g = torch.Generator().manual_seed(seed)
        if self.kind == "image":
            x = torch.randn(batch_size, self.in_chans, self.image_size, self.image_size, generator=g)
            y = torch.randint(0, self.num_classes, (batch_size,), generator=g)
            return (x.to(device),), {}, y.to(device)
        ids = torch.randint(0, self.vocab_size, (batch_size, self.seq_len), generator=g).to(device)
        return (), {"input_ids": ids, **({"labels": ids} if self.labels else {})}, ids

    def loss(self, output, target):
        if self.labels:
            loss = getattr(output, "loss", None)
            if loss is None:
                raise ModelError(f"{self.name} returned no loss for its labels")
            return loss
        logits = _logits(output)
        if self.kind == "image":
            return F.cross_entropy(logits.float(), target)
        if logits.dim() == 3 and logits.shape[-1] == self.vocab_size:
            return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
        return logits.float().square().mean()  # encoders without a head: any scalar will do


def _logits(output):
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if value is None and isinstance(output, dict):
            value = output.get(key)
        if value is not None:
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelError(f"cannot find logits in a model output of type {type(output).__name__}")


def parse_sizes(items: List[str]) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise ModelError(f"--size {item!r} must look like KEY=VALUE, e.g. --size num_hidden_layers=4")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _import(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModelError(f"{module} is not installed; run: pip install 'torch-mesa[{extra}]'") from None


def _vit(size: str, image_size: int) -> ModelSpec:
    from .models import VisionTransformer

    sizes = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
    if size not in sizes:
        raise ModelError(f"unknown built-in ViT size {size!r}; use vit:tiny, vit:small or vit:base")
    if image_size % 16:
        raise ModelError(f"--image-size {image_size} must be a multiple of the patch size 16")
    dim, heads = sizes[size]
    return ModelSpec(
        f"vit:{size}",
        lambda: VisionTransformer(image_size=image_size, dim=dim, depth=12, heads=heads),
        "image",
        image_size=image_size,
    )


def _timm(name: str, image_size: int) -> ModelSpec:
    timm = _import("timm", "timm")
    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        raise ModelError(f"unknown timm model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))

    def build():
        try:
            return timm.create_model(name, pretrained=False, img_size=image_size)
        except TypeError:  # a model without an image size argument (PVT-v2, CNNs): any size works
            return timm.create_model(name, pretrained=False)

    return ModelSpec(f"timm:{name}", build, "image", image_size=image_size)


def _hf_from_config(config, label: str, seq_len: int, image_size: int) -> ModelSpec:
    transformers = _import("transformers", "transformers")
    model_type = getattr(config, "model_type", "")
    if model_type in ("vit", "deit", "swin", "beit", "dinov2"):
        config.image_size = image_size
        return ModelSpec(
            label,
            lambda: transformers.AutoModelForImageClassification.from_config(config),
            "image",
            image_size=image_size,
            in_chans=getattr(config, "num_channels", 3),
            num_classes=max(2, getattr(config, "num_labels", 2)),
        )
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise ModelError(f"{label}: config has no vocab_size; cannot make token inputs")
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and seq_len > limit:
        raise ModelError(f"--seq-len {seq_len} exceeds this model's {limit} positions")

    def build():
        try:
            return transformers.AutoModelForCausalLM.from_config(config)
        except ValueError:
            return transformers.AutoModelForMaskedLM.from_config(config)

    return ModelSpec(label, build, "tokens", seq_len=seq_len, vocab_size=vocab)


def _hf(family: str, sizes: Dict[str, object], seq_len: int, image_size: int) -> ModelSpec:
    transformers = _import("transformers", "transformers")
    try:
        config = transformers.AutoConfig.for_model(family, **sizes)
    except ValueError:
        raise ModelError(f"unknown Hugging Face model family {family!r}; e.g. hf:gpt2, hf:llama, hf:bert") from None
    return _hf_from_config(config, f"hf:{family}", seq_len, image_size)


def _callable(target: str, seq_len: int, image_size: int) -> ModelSpec:
    module_name, _, fn_name = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as err:
        raise ModelError(f"cannot import {target!r}: {err}") from None
    params = inspect.signature(fn).parameters
    kwargs = {}
    if "image_size" in params:
        kwargs["image_size"] = image_size
    if "seq_len" in params:
        kwargs["seq_len"] = seq_len
    probe = fn(**kwargs)
    if not isinstance(probe, nn.Module):
        raise ModelError(f"{target} returned {type(probe).__name__}, not an nn.Module")
    vocab = getattr(getattr(probe, "config", None), "vocab_size", None)
    kind = "tokens" if vocab else "image"
    return ModelSpec(target, lambda: fn(**kwargs), kind, image_size=image_size, seq_len=seq_len,
                     vocab_size=vocab or 0)


def resolve(name: str, *, image_size: int = 224, seq_len: int = 512, sizes: Optional[Dict] = None) -> ModelSpec:
    sizes = dict(sizes or {})
    if image_size < 1 or seq_len < 1:
        raise ModelError("--image-size and --seq-len must be positive")
    if name.startswith("vit:"):
        return _vit(name[4:], image_size)
    if name.startswith("timm:"):
        return _timm(name[5:], image_size)
    if name.startswith("hf:"):
        return _hf(name[3:], sizes, seq_len, image_size)
    if name.endswith(".json") or os.path.isdir(name):
        if not os.path.exists(name):
            raise ModelError(f"no such config file: {name}")
        transformers = _import("transformers", "transformers")
        path = name if os.path.isdir(name) else os.path.dirname(os.path.abspath(name))
        config = transformers.AutoConfig.from_pretrained(path, **sizes)
        return _hf_from_config(config, name, seq_len, image_size)
    if ":" in name and not name.startswith(":"):
        return _callable(name, seq_len, image_size)
    raise ModelError(
        f"unknown model {name!r}; use vit:small, timm:NAME, hf:FAMILY, a config.json path "
        "or package.module:function"
    )
