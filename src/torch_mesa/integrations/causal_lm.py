"""Hugging Face causal LMs: the head and the loss without full logits.

Every ``*ForCausalLM`` of the families in :data:`RULES` computes its training
loss the same way: the base model's last hidden states, then
``logits = self.lm_head(hidden)``, then a change of the logits for some
families (Gemma 2/3 soft-capping, Cohere's factor, Granite's divisor), then
``self.loss_function(logits, labels, vocab_size, **kwargs)``, Hugging Face's
``ForCausalLMLoss`` (float32 cross-entropy on the shifted labels). With the
``(batch, tokens, vocabulary)`` logits and their float32 copy kept for
backward, this head outweighs the blocks at a 128k-token vocabulary.

Converting such a model installs two things (instance attributes, removed by
``restore_``): a forward on the causal LM, and its ``_loss_function``
(Hugging Face's own override point). When the model runs with ``labels``
while autograd records, its forward runs as written, except that the head
returns a probe (four known values per token) instead of the logits, and the
loss function computes the loss with :func:`torch_mesa.ops.linear_cross_entropy`
from the head's input, applying the family's change of the logits. The probe
proves the table right on every call: the model's change of the logits
reaches the loss function applied to the probe, and must equal the table's
change applied to it, bit for bit. If it does not (a family changed between
versions of transformers, a model code that does more), the call is run
again as the model writes it (the first call restores the random state
first) and the fused loss is switched off for that model with a warning;
correct and larger, never smaller and wrong.

In those calls the output's ``logits`` is ``None``: nothing of that size
exists. Calls without ``labels``, under ``no_grad`` (evaluation,
``generate``) or with ``MesaConfig(fused_loss=False)`` run as the model
writes them and return the logits.
"""

from __future__ import annotations

import functools
import inspect
import threading
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import quant
from ..ops.loss import linear_cross_entropy
from ..routing.scope import inside_converted_model

__all__ = ["LMRule", "RULES", "match", "install", "uninstall", "CausalLMForward"]


@dataclass(frozen=True)
class LMRule:
    class_name: str  # type(m).__name__, exactly
    change: str = "none"  # "none" | "softcap" | "scale" | "divide" (see _changes)
    head: str = "lm_head"
    module_prefix: str = "transformers.models."


# Families whose causal LM computes its loss as described in the module
# docstring. Each entry is tested against the model's own loss and
# gradients (tests/test_lm_loss.py).
_NONE = (
    "GPT2LMHeadModel", "OpenAIGPTLMHeadModel", "CTRLLMHeadModel", "GPTNeoForCausalLM", "GPTJForCausalLM",
    "GPTNeoXForCausalLM", "GPTBigCodeForCausalLM", "CodeGenForCausalLM", "OPTForCausalLM", "XGLMForCausalLM",
    "BloomForCausalLM", "MptForCausalLM", "FalconForCausalLM", "PersimmonForCausalLM", "StableLmForCausalLM",
    "LlamaForCausalLM", "Llama4ForCausalLM", "DiffLlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
    "MiniMaxForCausalLM", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
    "GemmaForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "PhimoeForCausalLM", "OlmoForCausalLM",
    "Olmo2ForCausalLM", "Olmo3ForCausalLM", "OlmoeForCausalLM", "FlexOlmoForCausalLM", "Starcoder2ForCausalLM",
    "GlmForCausalLM", "Glm4ForCausalLM", "Glm4MoeForCausalLM", "HeliumForCausalLM", "SmolLM3ForCausalLM",
    "Exaone4ForCausalLM", "JetMoeForCausalLM", "DbrxForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM",
    "MiniCPM3ForCausalLM", "Dots1ForCausalLM", "GptOssForCausalLM", "JambaForCausalLM", "Lfm2ForCausalLM",
    "NemotronForCausalLM", "ArceeForCausalLM", "ApertusForCausalLM", "SeedOssForCausalLM",
    "HunYuanDenseV1ForCausalLM", "Ernie4_5ForCausalLM", "DogeForCausalLM", "BitNetForCausalLM", "Jais2ForCausalLM",
)
RULES: Tuple[LMRule, ...] = tuple(
    [LMRule(name) for name in _NONE]
    # softcap * tanh(logits / softcap), config.final_logit_softcapping
    + [LMRule(name, "softcap") for name in ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3nForCausalLM",
                                            "VaultGemmaForCausalLM", "NanoChatForCausalLM")]
    # logits * module.logit_scale
    + [LMRule(name, "scale") for name in ("CohereForCausalLM", "Cohere2ForCausalLM")]
    # logits / config.logits_scaling
    + [LMRule(name, "divide") for name in ("GraniteForCausalLM", "GraniteMoeForCausalLM")]
)

_BY_NAME = {r.class_name: r for r in RULES}

# Probe values per token: the family's change of the logits applied to them
# must match the table's (soft-capping bends -40 and 25, not 0.5).
_PROBES = (-40.0, -3.0, 0.5, 25.0)


def _changes(module: nn.Module, rule: LMRule) -> dict:
    """``linear_cross_entropy``'s arguments for the family's change of the logits."""
    cfg = getattr(module, "config", None)
    if rule.change == "softcap":
        return {"softcap": getattr(cfg, "final_logit_softcapping", None)}
    if rule.change == "scale":
        return {"logit_scale": getattr(module, "logit_scale", None)}
    if rule.change == "divide":
        return {"logit_divisor": getattr(cfg, "logits_scaling", None)}
    return {}


def _apply_changes(u: torch.Tensor, changes: dict) -> torch.Tensor:
    if changes.get("logit_scale") is not None:
        u = u * changes["logit_scale"]
    if changes.get("logit_divisor") is not None:
        u = u / changes["logit_divisor"]
    cap = changes.get("softcap")
    if cap is not None:
        u = torch.tanh(u / cap) * cap
    return u


def _hf_causal_lm_loss():
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # pragma: no cover - other versions
        return None
    return ForCausalLMLoss


def match(module: nn.Module) -> Tuple[Optional[LMRule], str]:
    """``(rule, "")`` for a causal LM whose head and loss can be fused, else
    ``(None, reason)`` (``reason`` empty for modules that are no causal LM)."""
    cls = type(module)
    name = cls.__name__
    rule = _BY_NAME.get(name)
    if rule is None or not cls.__module__.startswith(rule.module_prefix):
        if cls.__module__.startswith("transformers.") and (name.endswith("ForCausalLM") or name.endswith("LMHeadModel")):
            return None, "its head and loss are the model's own: this family is not in torch-mesa's causal-LM table"
        return None, ""
    head = getattr(module, rule.head, None)
    if not isinstance(head, nn.Linear) or "forward" in head.__dict__:
        return None, f"its head and loss are the model's own: {rule.head} is not a plain nn.Linear"
    if type(head).forward not in (nn.Linear.forward, _mesa_linear_forward()):
        return None, f"its head and loss are the model's own: {rule.head} has its own forward"
    if "_loss_function" in module.__dict__:
        return None, "its head and loss are the model's own: a custom loss_function is set"
    ours = _hf_causal_lm_loss()
    if ours is None or module.loss_function is not ours:
        return None, "its head and loss are the model's own: its loss_function is not ForCausalLMLoss"
    return rule, ""


def _mesa_linear_forward():
    from ..nn.modules import MesaLinear

    return MesaLinear.forward


class _Call:
    """One forward of a causal LM with the fused loss: what its head saw."""

    __slots__ = ("module", "head", "x", "probe", "used", "failed")

    def __init__(self, module: nn.Module, head: nn.Module) -> None:
        self.module, self.head = module, head
        self.x = self.probe = None
        self.used = False
        self.failed: Optional[str] = None


_local = threading.local()


def _current() -> Optional[_Call]:
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def _logits_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _whole(x: torch.Tensor) -> torch.Tensor:
    """``x``'s base when ``x`` is a view of all of it (``hidden[:, 0:, :]``,
    the models' slicing for ``logits_to_keep=0``): the base carries what its
    producer keeps (a converted norm's recipe), so nothing new is kept."""
    base = x._base
    if (base is not None and base.shape == x.shape and base.stride() == x.stride()
            and base.storage_offset() == x.storage_offset() and base.dtype == x.dtype):
        return base
    return x


class HeadForward:
    """Installed on the head: in a fused call, keep the input and return the probe."""

    def __init__(self, head: nn.Module) -> None:
        self.head = head

    def __call__(self, x, *args, **kwargs):
        head = self.head
        call = _current()
        if call is None or call.head is not head or args or kwargs or call.x is not None:
            return type(head).forward(head, x, *args, **kwargs)
        call.x = _whole(x)
        call.probe = _probe_values(_logits_dtype(x), x.device).expand(*x.shape[:-1], len(_PROBES))
        return call.probe


def _probe_values(dtype: torch.dtype, device) -> torch.Tensor:
    """The probe's values, filled on the device one by one: ``torch.tensor``
    of a list is a copy from the host, which on a GPU waits for every kernel
    queued before it (the model's whole forward, here)."""
    out = torch.empty(len(_PROBES), dtype=dtype, device=device)
    for i, v in enumerate(_PROBES):
        out[i].fill_(v)
    return out


class FusedLoss:
    """Installed as the causal LM's ``_loss_function``: Hugging Face's
    ``ForCausalLMLoss`` outside fused calls, ``linear_cross_entropy`` in them."""

    def __init__(self, module: nn.Module, rule: LMRule) -> None:
        self.module, self.rule = module, rule

    def __call__(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                 shift_labels=None, **kwargs):
        call = _current()
        if call is None or call.module is not self.module:
            return _hf_causal_lm_loss()(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                        ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        head, m = call.head, self.module
        changes = _changes(m, self.rule)
        reason = self._mismatch(call, logits, vocab_size, changes)
        if reason is not None:
            call.failed = reason
            return torch.zeros((), device=logits.device if isinstance(logits, torch.Tensor) else None)
        call.used = True
        x = call.x
        if shift_labels is None:
            labels = F.pad(labels.to(x.device), (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        spec = getattr(head, "mesa_spec", None)
        loss = linear_cross_entropy(
            x, head.weight, shift_labels.to(x.device), head.bias, ignore_index=ignore_index,
            reduction="sum" if num_items_in_batch is not None else "mean",
            config=spec, states=getattr(head, "mesa_states", None), keep_exact=spec is None, **changes,
        )
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss

    @staticmethod
    def _mismatch(call: _Call, logits, vocab_size, changes) -> Optional[str]:
        if call.x is None or call.used:
            return "the loss function was called without (or after) the head's logits"
        if vocab_size is not None and vocab_size != call.head.weight.shape[0]:
            return f"vocab_size {vocab_size} differs from the head's {call.head.weight.shape[0]} outputs"
        if not isinstance(logits, torch.Tensor) or logits.shape != call.probe.shape:
            return "the loss function received something else than the head's logits"
        want = _apply_changes(call.probe, changes)
        if logits.dtype != want.dtype or not torch.equal(logits, want):
            return "the model changes its logits in a way torch-mesa's causal-LM table does not describe"
        return None


def _without_logits(out, call: _Call):
    """The model's output with ``logits`` None (it holds the probe)."""
    if isinstance(out, tuple):
        return tuple(None if (isinstance(v, torch.Tensor) and v.shape == call.probe.shape and i == 1) else v
                     for i, v in enumerate(out))
    if hasattr(out, "keys") and "logits" in out.keys():
        return type(out)(**{k: v for k, v in out.items() if k != "logits"})
    return out


# Kept out of Dynamo: the caller's frame runs as Python, but a frame it
# calls is compiled on its own, and Dynamo fails on ``get_rng_state_all``
# (an assertion in PyTorch 2.11 under ``torch.compile`` of a converted model
# on CUDA).
@torch._dynamo.disable
def _rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@torch._dynamo.disable
def _set_rng_state(state) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class CausalLMForward:
    """Installed on the causal LM: fused head and loss in calls with labels
    while autograd records (see module docstring)."""

    def __init__(self, module: nn.Module, rule: LMRule) -> None:
        self.module, self.rule = module, rule
        self.checked = False  # a fused call has matched the table once
        self.disabled: Optional[str] = None  # why the fused loss was switched off
        self._labels_at: Optional[int] = None

    def _labels(self, original, args, kwargs):
        if "labels" in kwargs:
            return kwargs["labels"]
        if self._labels_at is None:
            params = list(inspect.signature(original).parameters)
            self._labels_at = params.index("labels") if "labels" in params else -1
        i = self._labels_at
        return args[i] if 0 <= i < len(args) else None

    def _without_data(self, args, kwargs) -> bool:
        """Fake or meta tensors (a ``FakeTensorMode``, a model on the meta
        device): the fused call's first check compares logits, which they
        cannot; the model's own head and loss run for such a call."""
        head = getattr(self.module, self.rule.head)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        return quant.without_data(head.weight, *tensors)

    # This frame runs as Python under torch.compile (it keeps Python state
    # per call); the model's own forward it calls is compiled.
    @functools.partial(torch._dynamo.disable, recursive=False)
    def __call__(self, *args, **kwargs):
        m = self.module
        original = type(m).forward.__get__(m)
        if (self.disabled is not None or not torch.is_grad_enabled()
                or not inside_converted_model() or m.__dict__.get("_loss_function") is None
                or self._labels(original, args, kwargs) is None or self._without_data(args, kwargs)):
            return original(*args, **kwargs)
        rng = _rng_state() if not self.checked else None
        call = _Call(m, getattr(m, self.rule.head))
        stack = _local.__dict__.setdefault("stack", [])
        stack.append(call)
        try:
            out = original(*args, **kwargs)
        finally:
            stack.pop()
        if call.used and call.failed is None:
            self.checked = True
            return _without_logits(out, call)
        self.disabled = call.failed or "the model did not compute its loss from its head's logits"
        warnings.warn(
            f"torch-mesa: {type(m).__name__}: {self.disabled}; its head and loss now run as the model "
            "writes them (correct, with full logits kept for backward)", UserWarning, stacklevel=2)
        if rng is None:
            raise RuntimeError(
                f"torch-mesa: {type(m).__name__}'s fused loss failed after earlier calls had matched "
                f"({self.disabled}); it is now off for this model: run the step again")
        out = None  # (the graph of the first try goes before the second one runs)
        _set_rng_state(rng)
        return original(*args, **kwargs)


def install(module: nn.Module, rule: LMRule) -> None:
    head = getattr(module, rule.head)
    head.forward = HeadForward(head)
    module.forward = CausalLMForward(module, rule)
    module._loss_function = FusedLoss(module, rule)


def uninstall(module: nn.Module) -> bool:
    fwd = module.__dict__.get("forward")
    if not isinstance(fwd, CausalLMForward):
        return False
    head = getattr(module, fwd.rule.head, None)
    if head is not None and isinstance(head.__dict__.get("forward"), HeadForward):
        del head.__dict__["forward"]
    del module.__dict__["forward"]
    module.__dict__.pop("_loss_function", None)
    return True
