"""``torch_mesa.verify``: check a model in one line before trusting it.

Runs the model exact and converted on the same batch, from the same random
state, and reports:

* whether the forward outputs are identical (they must be: torch-mesa never
  changes the forward);
* every parameter's gradient against the exact one, worst first: cosine and
  SQNR (dB); a gradient that is mathematically zero (an attention key bias,
  which softmax ignores), or four orders of magnitude below the model's
  median gradient, is recognised as such, and then the converted one must
  differ from it by less than a thousandth of the median; a gradient that
  exists only through a normalisation's ``eps`` (the loss does not depend
  on the parameter's scale: a per-channel weight a batch norm normalises
  right after) is recognised too, and its direction is not judged; so is
  a float32 gradient that is rounding noise of an exact zero (a bias a
  normalisation removes), which must then be as small (inputs given as
  tensors: the exact model runs twice more in float64 to tell these);
* the bytes kept for backward, in total and per module;
* what was left exact and why (conversion report), and every routed call
  that ran as PyTorch runs it (fallbacks), with its reason;
* a per-op breakdown: for each kind of op that keeps something (linear
  inputs, norms, activations, gated products, softmax, matmul, attention),
  the gradient error when only that kind is compressed and everything else
  is kept exact: which op contributes how much of the error;
* where a gradient fails, configs that pass on the same batch by keeping
  the smallest modules around the failing parameters exact (a policy entry
  of ``None`` each; then the same modules in every block), with their
  worst gradient and bytes kept: what to convert with instead.

The model itself is not changed: the two runs use deep copies (so verify
needs memory for two more copies of the parameters).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .config import MesaConfig
from .convert import ConversionReport, compress_, config_of, is_compressed, restore_
from .measure import measure_call
from .ops.recipes import OP_KINDS, exact_ops, record_ops
from .units import format_bytes

__all__ = ["ParamCheck", "Remedy", "VerifyReport", "verify"]


@dataclass
class ParamCheck:
    """One parameter's converted gradient against the exact one."""

    name: str
    cosine: float  # 1.0 where the exact gradient is zero and the converted one negligible
    sqnr_db: float
    exact_norm: float
    converted_norm: float
    zero: bool  # the exact gradient is zero, or numerically negligible (then cosine is not judged)
    ok: bool
    # the exact gradient exists only through a normalisation's eps (then
    # cosine is not judged either; zero is True too)
    eps_only: bool = False
    # the unconverted model's own gradient holds NaN or Inf on this batch:
    # there is nothing to compare with (not judged; ok is False)
    exact_finite: bool = True
    # under autocast, (exact, converted) cosines to the unconverted model's
    # float64 gradient, where the comparison with the exact one failed and
    # was judged against float64 instead (see ``_judge_by_float64``)
    float64_cosines: Optional[Tuple[float, float]] = None


@dataclass
class Remedy:
    """A config that keeps exact the smallest modules around the failing
    parameters, tried on the same batch (:func:`verify` looks for it when a
    gradient fails): convert with ``config`` instead."""

    modules: List[str]  # the policy patterns it keeps exact (an entry of None each)
    config: MesaConfig  # the config to convert with: the one verified plus those entries
    worst: ParamCheck  # its worst judged gradient on the same batch
    kept_exact: int
    kept_converted: int


@dataclass
class VerifyReport:
    """What :func:`verify` found (``ok`` is the one-word answer)."""

    threshold: float
    forward_equal: bool
    forward_max_diff: float
    params: List[ParamCheck]
    kept_exact: int
    kept_converted: int
    kept_by_module: Dict[str, Tuple[int, int]]
    conversion: Optional[ConversionReport]
    fallbacks: List[Tuple[str, str, str, int]]
    by_op: Dict[str, Tuple[float, str, float]] = field(default_factory=dict)
    forward_notes: List[str] = field(default_factory=list)
    # where gradients fail: configs that meet the threshold by keeping
    # modules exact (the modules found, then the same modules in every block
    # where that passes too); empty: none found short of the whole model
    remedies: List[Remedy] = field(default_factory=list)
    remedy_tried: bool = False

    @property
    def ok(self) -> bool:
        return self.forward_equal and all(p.ok for p in self.params)

    @property
    def worst(self) -> Optional[ParamCheck]:
        """The failing parameter with the lowest cosine, else the lowest of
        those whose cosine is judged (not zero or negligible)."""
        judged = [p for p in self.params if not p.ok or not p.zero]
        return judged[0] if judged else (self.params[0] if self.params else None)

    def failures(self) -> List[ParamCheck]:
        return [p for p in self.params if not p.ok]

    def not_finite_unconverted(self) -> List[ParamCheck]:
        """Parameters whose gradient is NaN or Inf in the unconverted model
        itself on this batch: not judged, and the verdict cannot be OK."""
        return [p for p in self.params if not p.exact_finite]

    def __str__(self) -> str:
        lines = [f"torch-mesa verify: {'OK' if self.ok else 'FAILED'} (gradient cosine threshold {self.threshold})"]
        if self.forward_equal:
            if self.forward_notes:
                lines.append("forward: identical to the unconverted model, except where the head and loss are fused:")
                lines.extend(f"  {note}" for note in self.forward_notes)
            else:
                lines.append("forward: identical to the unconverted model")
        else:
            lines.append(f"forward: DIFFERS from the unconverted model (max |diff| {self.forward_max_diff:.3g})")
        ratio = self.kept_converted / self.kept_exact if self.kept_exact else float("nan")
        lines.append(f"kept for backward: {format_bytes(self.kept_exact)} -> {format_bytes(self.kept_converted)} "
                     f"({ratio:.3f}x)")
        bad = self.failures()
        broken = self.not_finite_unconverted()
        if broken:
            same = sum(not math.isfinite(p.converted_norm) for p in broken)
            lines.append(f"the UNCONVERTED model's own gradients are not finite (NaN or Inf) on this batch for "
                         f"{len(broken)} of {len(self.params)} parameters (first: {broken[0].name}); the converted "
                         f"model's are not finite for {same} of them. Nothing to compare these with: look at the "
                         "model or the batch first (a row of attention with every position masked, a log of 0, "
                         "a NaN in the inputs)")
        lines.append(f"gradients: {len(self.params)} parameters, {len(bad) - len(broken)} below the threshold"
                     + (f", {len(broken)} not judged" if broken else "") + "; worst first:")
        width = max([len(p.name) for p in self.params[:10]] + [9])
        lines.append(f"  {'parameter':<{width}}  {'cosine':>9}  {'SQNR dB':>8}")
        for p in self.params[:10]:
            if not p.exact_finite:
                cos, db, mark = "n/a", "n/a", "  <-- not finite without torch-mesa"
            else:
                cos = ("~0 (eps)" if p.eps_only else "~0") if p.zero else (
                    f"{p.cosine:.6f}" if math.isfinite(p.converted_norm) else "NaN/Inf")
                db = f"{p.sqnr_db:.1f}"
                mark = "" if p.ok else "  <-- below threshold"
                if p.float64_cosines is not None:
                    mark += (f"  (to float64: exact {p.float64_cosines[0]:.6f}, converted "
                             f"{p.float64_cosines[1]:.6f})")
            lines.append(f"  {p.name:<{width}}  {cos:>9}  {db:>8}{mark}")
        if len(self.params) > 10:
            lines.append(f"  ... and {len(self.params) - 10} more")
        eps_only = [p.name for p in self.params if p.eps_only]
        if eps_only:
            lines.append(f"  {len(eps_only)} get a gradient only through a normalisation's eps (~0 (eps): the loss "
                         "does not depend on their scale, as a per-channel weight a batch norm normalises; their "
                         "direction is not judged): " + ", ".join(eps_only[:4]) + (" ..." if len(eps_only) > 4 else ""))
        by_float64 = [p.name for p in self.params if p.float64_cosines is not None]
        if by_float64:
            lines.append(f"  {len(by_float64)} judged against the unconverted model's float64 gradient: under "
                         "autocast its own gradient is far from it, and the converted one passes if it is as close "
                         f"within {1 - self.threshold:.3g} of cosine: " + ", ".join(by_float64[:4])
                         + (" ..." if len(by_float64) > 4 else ""))
        if self.remedies:
            lines.append("configs that pass on this batch, keeping modules exact (report.remedies[i].config):")
            for i, r in enumerate(self.remedies):
                shown = ", ".join(f"{m!r}: None" for m in r.modules[:4]) + (", ..." if len(r.modules) > 4 else "")
                ratio = r.kept_converted / r.kept_exact if r.kept_exact else float("nan")
                lines.append(f"  [{i}] policy={{{shown}}}: worst cosine {r.worst.cosine:.6f} ({r.worst.name}), "
                             f"kept {format_bytes(r.kept_exact)} -> {format_bytes(r.kept_converted)} ({ratio:.3f}x)")
        elif self.remedy_tried:
            lines.append("no config keeping some modules exact passes on this batch, short of the whole model")
        if self.by_op:
            lines.append("error by op kind (only that kind compressed, the rest exact):")
            for kind, (cos, name, db) in sorted(self.by_op.items(), key=lambda kv: kv[1][0]):
                lines.append(f"  {kind:<11} worst cosine {cos:.6f} ({name}), median SQNR {db:.1f} dB")
        if self.conversion is not None and self.conversion.skipped:
            lines.append(f"left exact by the conversion: {len(self.conversion.skipped)}")
            for name, kind, reason in self.conversion.skipped[:10]:
                lines.append(f"  {name or '<root>'} ({kind}): {reason}")
            if len(self.conversion.skipped) > 10:
                lines.append(f"  ... and {len(self.conversion.skipped) - 10} more")
        if self.fallbacks:
            lines.append("calls that ran as PyTorch runs them (kept what PyTorch keeps):")
            for module, func, reason, n in self.fallbacks:
                lines.append(f"  {module or '<root>'}: {func} ({reason}) x{n}")
        else:
            lines.append("fallbacks: none (every routed call ran its torch-mesa op)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "threshold": self.threshold,
            "forward_equal": self.forward_equal,
            "kept_exact": self.kept_exact,
            "kept_converted": self.kept_converted,
            "params": [p.__dict__ for p in self.params],
            "by_op": {k: {"worst_cosine": v[0], "worst_param": v[1], "median_sqnr_db": v[2]}
                      for k, v in self.by_op.items()},
            "fallbacks": [list(f) for f in self.fallbacks],
            "remedies": [{"modules": list(r.modules), "config": r.config.to_dict(), "worst_cosine": r.worst.cosine,
                          "worst_param": r.worst.name, "kept_exact": r.kept_exact,
                          "kept_converted": r.kept_converted} for r in self.remedies],
        }


def _named(out, prefix: str = "") -> Dict[str, torch.Tensor]:
    """Every tensor in a model output by its path (``"loss"``, ``"1"``,
    ``"hidden_states.0"``)."""
    if isinstance(out, torch.Tensor):
        return {prefix: out}
    if isinstance(out, dict) or hasattr(out, "items"):
        items = list(out.items())
    elif isinstance(out, (list, tuple)):
        items = list(enumerate(out))
    else:
        return {}
    found: Dict[str, torch.Tensor] = {}
    for k, v in items:
        found.update(_named(v, f"{prefix}.{k}" if prefix else str(k)))
    return found


def _fused_calls(model: nn.Module) -> bool:
    """True when a causal LM inside ``model`` computed its loss with the
    fused head and loss (no logits returned, loss within float32 rounding)."""
    from .integrations.causal_lm import CausalLMForward

    return any(isinstance(m.__dict__.get("forward"), CausalLMForward) and m.forward.checked
               for m in model.modules())


def _compare_outputs(exact: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor], fused: bool):
    """``(equal, max |diff|, notes)``. Outputs must be bit-identical (NaN
    where the unconverted output has NaN, every other value equal), except
    where a causal LM fused its head and loss: there the logits are not
    returned, and the loss is equal within 1e-5 relative (the log-sum-exp is
    summed in another order)."""
    equal, diff, notes = set(got) <= set(exact), 0.0, []
    for key, a in exact.items():
        last = key.rsplit(".", 1)[-1]
        b = got.get(key)
        if b is None:
            if fused and last in ("logits", "1"):
                notes.append(f"{key or 'output'}: not returned (fused head and loss: no logits are made)")
            else:
                equal = False
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            equal = False
            continue
        same_nan = a.isnan() if a.is_floating_point() else None  # NaN where both have NaN is equal
        if same_nan is not None and not torch.equal(same_nan, b.isnan()):
            equal, diff = False, math.nan
            continue
        if a.numel():
            d = (a.double() - b.double()).abs()
            d = d.masked_fill(same_nan | (a == b), 0) if same_nan is not None else d  # (inf - inf)
            diff = max(diff, d.max().item())
        if fused and last in ("loss", "0", "") and a.dim() == 0:
            ok = torch.allclose(b.double(), a.double(), rtol=1e-5, atol=0, equal_nan=True)
            notes.append(f"{key or 'loss'}: {'within' if ok else 'NOT within'} 1e-5 relative of the model's own "
                         f"(fused head and loss; |diff| {abs(a.item() - b.item()):.3g})")
            equal = equal and ok
        elif not (torch.equal(a, b) if same_nan is None else torch.equal(a[~same_nan], b[~same_nan])):
            equal = False
    return equal, diff, notes


def _tensors(out) -> List[torch.Tensor]:
    """Every tensor in a model output (tensors, tuples, dicts, ModelOutputs)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "items"):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _default_loss(out) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.dim() == 0:
        return loss
    floats = [t for t in _tensors(out) if t.is_floating_point() and t.requires_grad]
    if not floats:
        raise ValueError("verify: the model's output has no tensor that requires grad; pass loss_fn=")
    return floats[0].float().square().mean()


def _caller(inputs) -> Callable[[nn.Module], Any]:
    if callable(inputs) and not isinstance(inputs, (torch.Tensor, nn.Module)):
        return inputs
    if isinstance(inputs, torch.Tensor):
        return lambda m: m(inputs)
    if isinstance(inputs, dict):
        return lambda m: m(**inputs)
    if isinstance(inputs, (list, tuple)):
        return lambda m: m(*inputs)
    raise TypeError(
        "verify(model, inputs): inputs must be a tensor, a tuple of positional inputs, a dict of "
        f"keyword inputs, or a function fn(model) -> output or loss; got {type(inputs).__name__}"
    )


def _run(model, call, loss_fn, seed, autocast_dtype):
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        with amp:
            out = call(model)
            loss = loss_fn(out) if loss_fn is not None else (out if isinstance(out, torch.Tensor) and out.dim() == 0
                                                           else _default_loss(out))
        loss.backward()
    outs = {k: t.detach() for k, t in _named(out).items()}
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None)
             for n, p in model.named_parameters() if p.requires_grad}
    return outs, grads


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The cosine of two gradients, in float64, at any scale. (PyTorch's
    ``cosine_similarity`` divides by ``max(|a|, 1e-8) * max(|b|, 1e-8)``: a
    model whose gradients are around 1e-9, as a layer scale of 1e-5 at
    initialisation makes them, read as orthogonal.)"""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm().item(), b.norm().item()
    if na == 0 or nb == 0:
        return 0.0
    return (a / na).dot(b / nb).item()


def _compare(exact: Dict[str, Optional[torch.Tensor]], got: Dict[str, Optional[torch.Tensor]],
             threshold: float) -> List[ParamCheck]:
    typical = _typical([g.double().norm().item() for g in exact.values() if g is not None])
    checks = []
    for name, e in exact.items():
        c = got.get(name)
        if e is None and c is None:
            continue  # unused parameter in both
        e = torch.zeros_like(c) if e is None else e
        c = torch.zeros_like(e) if c is None else c
        ed, cd = e.double().flatten(), c.double().flatten()
        en, cn = ed.norm().item(), cd.norm().item()
        if not math.isfinite(en):  # the model's own gradient: nothing to compare with
            checks.append(ParamCheck(name, math.nan, math.nan, en, cn, False, False, exact_finite=False))
            continue
        noise = (cd - ed).norm().item()
        sqnr = math.inf if noise == 0 else (10 * math.log10(en**2 / noise**2) if en > 0 else -math.inf)
        zero = en <= 1e-6 * typical
        if zero:
            # mathematically zero (softmax ignores a shift shared by a row):
            # the converted gradient must be negligible too
            ok = cn <= 1e-3 * typical
            cos = 1.0 if ok else 0.0
        else:
            cos = cosine(cd, ed) if cn > 0 else 0.0
            ok = cos >= threshold and math.isfinite(cn)
            if not ok and en <= 1e-4 * typical and noise <= 1e-3 * typical and math.isfinite(cn):
                # numerically negligible: four orders of magnitude below the
                # model's typical gradient (a query/key whose attention is
                # uniform), where a direction is fp32 noise; the difference
                # is negligible next to every other gradient, so it passes
                zero = True
                ok = True
        checks.append(ParamCheck(name, cos, sqnr, en, cn, zero, ok))
    _worst_first(checks)
    return checks


def _typical(norms: List[float]) -> float:
    """The model's typical gradient norm: the median of the nonzero ones."""
    nonzero = [n for n in norms if n > 0]
    return statistics.median(nonzero) if nonzero else 0.0


def _judged_apart(params: List[ParamCheck]) -> set:
    """Names of the parameters the comparison with the exact gradient does
    not decide: ~0 and eps's, not finite in the unconverted model, and
    those that passed against float64 under autocast."""
    return {p.name for p in params if p.zero or not p.exact_finite or (p.ok and p.float64_cosines is not None)}


def _worst_first(checks: List[ParamCheck]) -> None:
    # judged failures first, then gradients the unconverted model itself
    # makes NaN or Inf (not judged), then the rest
    checks.sort(key=lambda p: (p.ok, not p.exact_finite, p.zero) + (
        (p.cosine, p.sqnr_db) if p.exact_finite else (0.0, 0.0)))


_EPS_SHRINK = 1e4  # the factor every normalisation's eps is divided by
_EPS_DRIVEN = 100.0  # a gradient that shrinks at least this much with it exists only through eps


def _norms_eps(model: nn.Module):
    """``(module, attribute)`` of every normalisation's positive float eps
    (``eps``; Hugging Face's RMS norms: ``variance_epsilon``)."""
    found = []
    for m in model.modules():
        if not (isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))
                or "norm" in type(m).__name__.lower()):
            continue
        for attr in ("eps", "variance_epsilon"):
            value = getattr(m, attr, None)
            if isinstance(value, float) and value > 0:
                found.append((m, attr))
    return found


def _float64(inputs):
    """``inputs`` with their floating tensors in float64 (None for a function
    of the model, whose tensors verify cannot reach)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.double() if inputs.is_floating_point() else inputs
    if isinstance(inputs, dict):
        return {k: _float64(v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_float64(v) for v in inputs)
    if callable(inputs) and not isinstance(inputs, nn.Module):
        return None
    return inputs


def _judge_by_float64(checks: List[ParamCheck], exact: nn.Module, inputs,
                      run: Callable[[nn.Module, Callable], Dict[str, Optional[torch.Tensor]]],
                      autocast: Optional[Tuple[Dict[str, Optional[torch.Tensor]], Dict[str, Optional[torch.Tensor]]]]
                      = None, threshold: float = 0.999) -> None:
    """Look again at the failing checks with float64 gradients of the exact
    model, run twice more: with every normalisation's eps as it is and
    ``_EPS_SHRINK`` times smaller. Two kinds of gradient are then recognised:

    * *eps's alone*: it shrinks with eps (a per-channel weight whose output a
      batch norm normalises: the loss does not depend on its scale, and what
      is left is eps's share of the normalising width, linear in eps; in
      float32 a nearly constant channel's variance is rounding noise at that
      eps, hence float64). The converted gradient's error is larger than
      such a gradient in any direction; it is judged by being finite;
    * *float32 rounding noise*: the float64 gradient is 1000x smaller than
      the float32 one (it is 0 in exact arithmetic: a bias that a
      normalisation removes on every path). Its direction is noise on both
      sides; the converted one must be as small (10x the float32 noise, or a
      thousandth of the model's median gradient);
    * *autocast's own error* (``autocast``: the exact and converted
      gradients of runs under autocast): the exact gradient is itself that
      far from float64's (Doge's dynamic-mask parameter under bf16: cosine
      0.994), and two such gradients with independent roundings compare
      below the bar with each other. Then the converted gradient passes if
      its cosine to float64's is within ``1 - threshold`` of the exact
      one's: the conversion adds no more than the bar allows to what
      autocast already loses (both cosines are reported).

    Inputs given as a function of the model cannot be widened: then nothing
    changes."""
    failing = [p for p in checks if not p.ok and p.exact_norm > 0]
    wide = _float64(inputs) if failing else None
    if wide is None:
        return
    grads = []
    for shrink in (1.0, _EPS_SHRINK):
        model = copy.deepcopy(exact).double()
        for m, attr in _norms_eps(model):
            setattr(m, attr, getattr(m, attr) / shrink)
        try:
            grads.append(run(model, _caller(wide)))
        except (RuntimeError, TypeError):  # a model that does not run in float64 (a dtype fixed inside)
            return
    typical = _typical([p.exact_norm for p in checks])
    for p in failing:
        base, shrunk = grads[0].get(p.name), grads[1].get(p.name)
        if base is None or shrunk is None or not math.isfinite(p.converted_norm):
            continue
        wide_norm = base.norm().item()
        if wide_norm * 1000 < p.exact_norm:
            p.zero = True
            p.ok = p.converted_norm <= max(10 * p.exact_norm, 1e-3 * typical)
        elif shrunk.norm().item() * _EPS_DRIVEN <= wide_norm:
            p.eps_only = p.zero = p.ok = True
        elif autocast is not None and not p.zero:
            e, c = autocast[0].get(p.name), autocast[1].get(p.name)
            if e is not None and c is not None:
                p.float64_cosines = (cosine(e, base), cosine(c, base))
                p.ok = p.float64_cosines[1] >= p.float64_cosines[0] - (1 - threshold)
    _worst_first(checks)


def verify(
    model: nn.Module,
    inputs,
    *,
    config: Optional[MesaConfig] = None,
    loss_fn: Optional[Callable[[Any], torch.Tensor]] = None,
    threshold: float = 0.999,
    by_op: bool = True,
    remedy: bool = True,
    autocast_dtype: Optional[torch.dtype] = None,
    seed: int = 0,
) -> VerifyReport:
    """Run ``model`` exact and converted on the same batch and report forward
    equality, per-parameter gradient fidelity, bytes kept, what was left exact
    and every fallback (see the module docstring).

    Args:
        model: a plain model (converted here with ``config``) or one already
            converted by :func:`compress_` (compared with its restored copy).
            It is not modified.
        inputs: a tensor, a tuple of positional inputs, a dict of keyword
            inputs, or a function ``fn(model)`` returning the output or a
            scalar loss.
        config: the :class:`MesaConfig` to convert with (plain models only).
        loss_fn: ``loss_fn(output) -> scalar``; default: the output's ``loss``
            if it has one, else the mean square of its first float tensor.
        threshold: the gradient cosine every parameter must reach.
        by_op: also measure each op kind's share of the error (one more
            forward and backward per kind present).
        remedy: where a gradient fails, look for configs that pass by
            keeping the smallest modules around the failing parameters
            exact (a converted forward and backward per try, at most
            ``_REMEDY_TRIES`` + 1); the report shows them, ``report.remedies``.
        autocast_dtype: run both under ``torch.autocast`` with this dtype.
        seed: the random state both runs start from (dropout draws alike).

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is the verdict.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"verify expects an nn.Module, got {type(model).__name__}")
    call = _caller(inputs)
    conversion = None
    converted = copy.deepcopy(model)
    exact = copy.deepcopy(model)
    base = config if config is not None else MesaConfig()
    if is_compressed(model):
        base = config_of(model)
        if config is not None:
            raise ValueError("verify: the model is already converted; config= applies to plain models only "
                             "(call torch_mesa.restore_(model) to verify another config)")
        restore_(exact)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the report below says what was converted
            conversion = compress_(converted, config)
    scope = getattr(converted, "_mesa_scope", None)
    if scope is not None:
        scope.fallbacks.clear()

    out_e, grads_e = _run(exact, call, loss_fn, seed, autocast_dtype)
    with record_ops() as kinds:
        out_c, grads_c = _run(converted, call, loss_fn, seed, autocast_dtype)
    equal, diff, notes = _compare_outputs(out_e, out_c, _fused_calls(converted))
    params = _compare(grads_e, grads_c, threshold)
    _judge_by_float64(params, exact, inputs, lambda m, c: _run(m, c, loss_fn, seed, None)[1],
                      (grads_e, grads_c) if autocast_dtype is not None else None, threshold)
    # (what the float64 look judged apart stays apart in the breakdown too,
    # as do gradients the unconverted model itself makes NaN or Inf)
    apart = _judged_apart(params)
    fallbacks = [(m, f, r, n) for (m, f, r), n in sorted((scope.fallbacks if scope else {}).items())]

    kept_e = measure_call(exact, lambda m: _loss_of(m, call, loss_fn), autocast_dtype=autocast_dtype)
    kept_c = measure_call(converted, lambda m: _loss_of(m, call, loss_fn), autocast_dtype=autocast_dtype)
    names = list(kept_e.by_module) + [n for n in kept_c.by_module if n not in kept_e.by_module]
    by_module = {n: (kept_e.by_module.get(n, 0), kept_c.by_module.get(n, 0)) for n in names}

    breakdown: Dict[str, Tuple[float, str, float]] = {}
    if by_op and len(kinds) > 1:
        for kind in [k for k in OP_KINDS if k in kinds]:
            with exact_ops(set(OP_KINDS) - {kind}):
                _, grads_k = _run(converted, call, loss_fn, seed, autocast_dtype)
            checks = [p for p in _compare(grads_e, grads_k, threshold) if not p.zero and p.name not in apart]
            if checks:
                worst = min(checks, key=lambda p: p.cosine)
                finite = [p.sqnr_db for p in checks if math.isfinite(p.sqnr_db)]
                breakdown[kind] = (worst.cosine, worst.name, statistics.median(finite) if finite else math.inf)
    found, tried = [], False
    if remedy and base is not None and any(not p.ok and p.exact_finite for p in params):
        tried = True
        found = _find_remedies(exact, base, params, grads_e, threshold,
                               lambda m: _run(m, call, loss_fn, seed, autocast_dtype)[1],
                               lambda m: measure_call(m, lambda m: _loss_of(m, call, loss_fn),
                                                      autocast_dtype=autocast_dtype).total_bytes)
    return VerifyReport(threshold, equal, diff, params, kept_e.total_bytes, kept_c.total_bytes, by_module,
                        conversion, fallbacks, breakdown, notes, found, tried)


_REMEDY_TRIES = 6  # modules kept exact, widened this many times at most
_REMEDY_PRUNE = 12  # tries at most spent dropping modules the found set passes without


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def _find_remedies(exact: nn.Module, base: MesaConfig, params: List[ParamCheck], grads_e, threshold: float,
                   grads_of: Callable[[nn.Module], Dict[str, Optional[torch.Tensor]]],
                   kept_of: Callable[[nn.Module], int]) -> List[Remedy]:
    """Keep exact the module of each failing parameter, convert the exact
    model again with those policy entries added, and compare on the same
    batch; for a parameter still failing, keep its module's parent exact
    instead, and so on up to (not including) the model itself. Then drop
    the modules the set passes without (all at once, else by halves): a
    parameter upstream of an op that compresses badly fails with it (its
    gradient comes through that op's backward), and its own module needs
    no exactness.
    Parameters the main comparison judged apart (~0, eps's, not finite in
    the unconverted model) stay apart.
    Where the set passes, the same modules in every block (``blocks.*.se``)
    are tried too: what fails in some blocks on this batch is near the bar
    in the others, and another batch picks others."""
    apart = _judged_apart(params)

    def attempt(modules: List[str]):
        """The failing judged checks with ``modules`` exact, and the remedy it would be."""
        config = dataclasses.replace(base, policy=base.policy + tuple((m, None) for m in modules))
        trial = copy.deepcopy(exact)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compress_(trial, config)
        checks = [p for p in _compare(grads_e, grads_of(trial), threshold) if p.name not in apart]
        judged = [p for p in checks if not p.zero] or checks
        return [p for p in checks if not p.ok], (modules, config, judged[0], trial)

    # (the model itself is never a candidate: a parameter of its own, a
    # class token, or of a module just below it waits for the others')
    chosen = {p.name: _owner(p.name) for p in params if not p.ok and p.name not in apart and _owner(p.name)}
    for _ in range(_REMEDY_TRIES):
        modules = sorted(set(chosen.values()))
        modules = [m for m in modules if not any(m.startswith(o + ".") for o in modules)]
        if not modules:
            return []
        failing, found = attempt(modules)
        if not failing:
            break
        # one level up at a time, the deepest first: widening a shallow
        # module too (a norm beside the MLP that failed) would take in the
        # deep one's parent whole (the block)
        at = {p.name: next((m for m in modules if p.name.startswith(m + ".")), None) for p in failing}
        deepest = max((m.count(".") for m in at.values() if m and "." in m), default=None)
        before = dict(chosen)
        for p in failing:
            if at[p.name] is None:
                if _owner(p.name):
                    chosen[p.name] = _owner(p.name)  # failing only now
            elif at[p.name].count(".") == deepest:
                chosen[p.name] = _owner(at[p.name])
        if chosen == before:
            return []  # only the whole model exact would do
    else:
        return []
    budget = [_REMEDY_PRUNE]

    def prune(found, drop):
        """``found`` without as many of ``drop`` as it passes without: all at
        once, else each half in turn (a try each, within the budget)."""
        if not drop or budget[0] <= 0:
            return found
        rest = [m for m in found[0] if m not in drop]
        if rest:  # (none left is the config verified, which failed)
            budget[0] -= 1
            failing, smaller = attempt(rest)
            if not failing:
                return smaller
        if len(drop) == 1:
            return found
        half = len(drop) // 2
        return prune(prune(found, drop[:half]), drop[half:])

    if len(modules) > 1:
        found = prune(found, modules)
    kept = kept_of(exact)
    remedies = [Remedy(found[0], found[1], found[2], kept, kept_of(found[3]))]
    general = sorted({".".join("*" if part.isdigit() else part for part in m.split(".")) for m in found[0]})
    general = [g for g in general if not any(g.startswith(o + ".") for o in general)]  # (inside another)
    if general != found[0]:
        failing, wide = attempt(general)
        if not failing:
            remedies.append(Remedy(general, wide[1], wide[2], kept, kept_of(wide[3])))
    # (every module exact but in name: no saving left, no remedy)
    return [r for r in remedies if r.kept_converted < r.kept_exact]


def _loss_of(model, call, loss_fn):
    out = call(model)
    if loss_fn is not None:
        return loss_fn(out)
    return out if isinstance(out, torch.Tensor) and out.dim() == 0 else _default_loss(out)
