"""A language model's head and its cross-entropy in one op, logits never kept.

``linear_cross_entropy(x, weight, target)`` equals
``F.cross_entropy(F.linear(x, weight).float().view(-1, V), target.view(-1))``
(the way Hugging Face computes a causal LM's loss), but the logits are made
one block at a time, chunks of tokens by chunks of the vocabulary, and each
block is reduced at once to three numbers per token: the running
log-sum-exp, the target's logit and (for label smoothing) the sum of the
logits. No block outlives its loop iteration, so neither the forward's
transient memory nor what backward keeps grows with ``tokens x vocabulary``.

Each block is computed as the model computes it: ``F.linear`` in the dtype
it runs in (the autocast dtype under autocast), then the model's own change
of the logits in that dtype (a factor, a divisor, tanh soft-capping: Cohere,
Granite, Gemma 2), then float32, so the loss matches the model's own within
float32 rounding of a different summation order.

Keeps: the head's input ``x`` as a Linear keeps it (8/4/2-bit codes, or
nothing new when ``x`` is a converted norm's output: keep-once), the weight
(the parameter itself), the log-sum-exp (float32, 4 bytes per token) and the
targets. Backward recomputes each block's logits from the rebuilt input;
with the kept log-sum-exp every block's gradient is independent of the
others, ``softmax - (1 - eps) * onehot - eps / V`` times the change's
derivative, so the weight's gradient is summed one vocabulary chunk at a time
in float32 and written once. Backward costs one more product than unfused
(the logits again): time for memory, as in activation checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..quant.running import RangeStates
from .recipes import exact, keep
from .saving import OpFunction, as_spec, load, needs_saving, save

Tensor = torch.Tensor

__all__ = ["linear_cross_entropy"]

# Logits computed at once, in elements (32 MiB in float32), and the vocabulary
# size above which the vocabulary is cut into chunks too.
_BLOCK = 1 << 23
_VOCAB_CHUNK = 32768


@dataclass(frozen=True)
class _Opts:
    ignore_index: int
    reduction: str
    smoothing: float
    scale: Optional[float]
    divisor: Optional[float]
    softcap: Optional[float]
    token_chunk: int
    vocab_chunk: int


def _change(u: Tensor, o: _Opts) -> Tensor:
    """The model's change of its logits, in their dtype, as the model writes it."""
    if o.scale is not None:
        u = u * o.scale
    if o.divisor is not None:
        u = u / o.divisor
    if o.softcap is not None:
        u = u / o.softcap
        u = torch.tanh(u)
        u = u * o.softcap
    return u


def _change_grad(z: Tensor, o: _Opts) -> Optional[Tensor]:
    """d(changed logits)/d(logits) from the changed float32 logits ``z``
    (None: the identity)."""
    factor = 1.0
    if o.scale is not None:
        factor *= o.scale
    if o.divisor is not None:
        factor /= o.divisor
    if o.softcap is not None:
        t = z / o.softcap
        return (1.0 - t * t) * factor
    return None if factor == 1.0 else torch.full((), factor, dtype=z.dtype, device=z.device)


def _spans(n: int, size: int):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _block(x: Tensor, weight: Tensor, bias: Optional[Tensor], v0: int, v1: int, o: _Opts) -> Tensor:
    b = bias[v0:v1] if bias is not None else None
    return _change(F.linear(x, weight[v0:v1], b), o).float()


def _statistics(x2: Tensor, weight: Tensor, bias: Optional[Tensor], t: Optional[Tensor], o: _Opts):
    """Per token: log-sum-exp, target logit, sum of logits (float32); with
    no targets ``t``, the log-sum-exp only."""
    n, vocab = x2.shape[0], weight.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=x2.device)
    zt = torch.zeros_like(lse) if t is not None else None
    zsum = torch.zeros_like(lse) if o.smoothing > 0 and t is not None else None
    for t0, t1 in _spans(n, o.token_chunk):
        xc = x2[t0:t1]
        m = s = None
        for v0, v1 in _spans(vocab, o.vocab_chunk):
            z = _block(xc, weight, bias, v0, v1, o)
            if t is not None:
                local = t[t0:t1] - v0
                inside = (local >= 0) & (local < v1 - v0)
                picked = z.gather(1, local.clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
                zt[t0:t1] += torch.where(inside, picked, torch.zeros_like(picked))
            if zsum is not None:
                zsum[t0:t1] += z.sum(1)
            mc = z.amax(1)
            if m is None:
                m = mc
                s = torch.exp(z - m.unsqueeze(1)).sum(1)
            else:
                new = torch.maximum(m, mc)
                s = s * torch.exp(m - new) + torch.exp(z - new.unsqueeze(1)).sum(1)
                m = new
        lse[t0:t1] = m + torch.log(s) if m is not None else float("-inf")
    return lse, zt, zsum


def _check_targets(t: Tensor, vocab: int, o: _Opts):
    """Raise on a target outside the vocabulary (as ``F.cross_entropy``
    does); return which targets count (not ``ignore_index``) and the token
    chunks that have one (backward skips the others). One read of values on
    the host for both, in the forward: on a GPU every such read waits for the
    kernels queued before it, and backward makes none (it read one per token
    chunk, and a ``nonzero`` per block)."""
    valid = t != o.ignore_index
    bad = valid & ((t < 0) | (t >= vocab))
    spans = _spans(t.numel(), o.token_chunk)
    pad = spans[-1][0] + o.token_chunk - t.numel() if spans else 0
    chunks = F.pad(valid, (0, pad)).reshape(len(spans), o.token_chunk).any(1)
    facts = torch.cat([bad.any().reshape(1), chunks]).tolist()
    if facts[0]:
        value = int(t[bad][0])
        raise IndexError(f"linear_cross_entropy: target {value} is out of bounds for a vocabulary of {vocab}")
    return valid, [span for span, has in zip(spans, facts[1:]) if has]


class _LinearCrossEntropyFn(OpFunction):
    @staticmethod
    def forward(ctx, x, weight, bias, target, spec, states: Optional[RangeStates], o: _Opts):
        vocab = weight.shape[0]
        x2 = x.reshape(-1, x.shape[-1])
        t = target.reshape(-1)
        valid, token_spans = _check_targets(t, vocab, o)
        with torch.no_grad():
            lse, zt, zsum = _statistics(x2, weight, bias, t, o)
            per_token = lse - zt
            if zsum is not None:
                per_token = (1.0 - o.smoothing) * per_token + o.smoothing * (lse - zsum / vocab)
            per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
            if o.reduction == "mean":
                count = valid.sum().to(torch.float32)
                loss = per_token.sum() / count
            elif o.reduction == "sum":
                count = None
                loss = per_token.sum()
            else:
                count = None
                loss = per_token.reshape(target.shape)
        if spec is None:
            kept_x = exact(x)
        else:
            running = states.get(spec, "input") if states is not None else None
            kept_x = keep(x, spec, op="linear", running=running)
        save(ctx, kept_x, exact(weight), exact(bias), exact(target), exact(count))
        probe = F.linear(x2[:0], weight[:0])  # the dtype the forward's products ran in
        ctx.compute_dtype = probe.dtype
        ctx.x_dtype = x.dtype
        ctx.x_shape = x.shape
        ctx.o = o
        ctx.token_spans = token_spans
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, bias, target, count = load(ctx)
        o, cd = ctx.o, ctx.compute_dtype
        vocab, hidden = weight.shape
        x2 = x.reshape(-1, hidden).to(cd)
        t = target.reshape(-1)
        valid = t != o.ignore_index
        # d loss / d per-token loss, per token (zero where ignored)
        if o.reduction == "mean":
            coef = (grad_loss.float() / count).expand(t.shape)
        elif o.reduction == "sum":
            coef = grad_loss.float().expand(t.shape)
        else:
            coef = grad_loss.reshape(-1).float()
        coef = torch.where(valid, coef, torch.zeros_like(coef))
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        w = weight.to(cd)
        b = bias.to(cd) if bias is not None else None
        grad_x = torch.zeros(x2.shape, dtype=torch.float32, device=x2.device) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        token_spans = ctx.token_spans
        vocab_spans = _spans(vocab, o.vocab_chunk)
        every_row = torch.arange(min(o.token_chunk, x2.shape[0]), device=x2.device)  # (sliced per token chunk)
        # The log-sum-exp of the logits recomputed here, from the rebuilt
        # input: softmax normalised over the very logits it is applied to
        # (the forward's, from the exact input, would leave a mismatch as
        # large as one bf16 rounding step of a dominant logit).
        with torch.no_grad():
            lse = _statistics(x2, w, b, None, o)[0] if len(vocab_spans) > 1 else None
        for v0, v1 in vocab_spans:
            acc_w = torch.zeros((v1 - v0, hidden), dtype=torch.float32, device=x2.device) if need_w else None
            acc_b = torch.zeros(v1 - v0, dtype=torch.float32, device=x2.device) if need_b else None
            for t0, t1 in token_spans:
                xc, tc = x2[t0:t1], t[t0:t1]
                with torch.no_grad():
                    z = _block(xc, w, b, v0, v1, o)
                    row_lse = torch.logsumexp(z, 1) if lse is None else lse[t0:t1]
                    g = torch.exp(z - row_lse.unsqueeze(1))
                    if o.smoothing > 0:
                        g -= o.smoothing / vocab
                    local = tc - v0
                    inside = (local >= 0) & (local < v1 - v0)
                    # (every row indexed, the ones without their target in
                    # this chunk less 0: no nonzero, whose size the host reads)
                    g[every_row[:t1 - t0], local.clamp(0, v1 - v0 - 1)] -= inside.to(g.dtype) * (1.0 - o.smoothing)
                    d = _change_grad(z, o)
                    if d is not None:
                        g *= d
                    g *= coef[t0:t1].unsqueeze(1)
                    gc = g.to(cd)
                    if need_x:
                        grad_x[t0:t1] += (gc @ w[v0:v1]).float()
                    if need_w:
                        acc_w += (gc.t() @ xc).float()
                    if need_b:
                        acc_b += g.sum(0)
            if need_w:
                grad_w[v0:v1] = acc_w.to(weight.dtype)
            if need_b:
                grad_b[v0:v1] = acc_b.to(bias.dtype)
        if need_x:
            grad_x = grad_x.to(ctx.x_dtype).reshape(ctx.x_shape)
        return grad_x, grad_w, grad_b, None, None, None, None


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    logit_scale: Optional[float] = None,
    logit_divisor: Optional[float] = None,
    softcap: Optional[float] = None,
    token_chunk: Optional[int] = None,
    vocab_chunk: Optional[int] = None,
    config=None,
    states: Optional[RangeStates] = None,
    keep_exact: bool = False,
) -> Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias).float(), target)``, with
    the logits computed block by block and never kept (see module docstring).

    Args:
        x: ``(..., hidden)``, the head's input (a causal LM's last hidden
            states, already aligned with ``target``).
        weight, bias: the head's, ``(vocab, hidden)`` and ``(vocab,)``.
        target: class indices, ``x.shape[:-1]`` (any shape with that many
            elements); ``ignore_index`` entries contribute nothing.
        reduction, label_smoothing, ignore_index: as in ``F.cross_entropy``.
        logit_scale, logit_divisor, softcap: the logits are multiplied by
            ``logit_scale`` (Cohere), divided by ``logit_divisor`` (Granite),
            and soft-capped as ``softcap * tanh(logits / softcap)`` (Gemma 2),
            in this order and in the logits' dtype, before the float32 loss.
        token_chunk, vocab_chunk: block shape (default: the whole vocabulary
            up to 32768 entries, else chunks of 32768; tokens so that a block
            holds about 8M logits).
        config: a :class:`~torch_mesa.MesaConfig` (``None``: the default,
            8 bits) for keeping ``x``; ``MesaConfig(bits=None)`` runs the
            PyTorch ops on full logits. ``keep_exact=True`` keeps ``x`` as it
            is but still never keeps the logits.

    Returns:
        The float32 loss (a scalar, or ``target``'s shape for ``"none"``).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r} is not supported; use 'mean', 'sum' or 'none'")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 1]")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match: "
                         "weight must be (vocab, hidden) with hidden = x.shape[-1]")
    if target.is_floating_point() or target.is_complex():
        raise TypeError("linear_cross_entropy takes class indices as targets, not probabilities")
    if target.numel() != x.numel() // x.shape[-1]:
        raise ValueError(f"target has {target.numel()} elements for {x.numel() // x.shape[-1]} tokens")
    for name, value in (("logit_divisor", logit_divisor), ("softcap", softcap)):
        if value is not None and float(value) == 0.0:
            raise ValueError(f"{name} must be nonzero")
    vocab = weight.shape[0]
    vc = int(vocab_chunk) if vocab_chunk else (vocab if vocab <= _VOCAB_CHUNK else _VOCAB_CHUNK)
    tc = int(token_chunk) if token_chunk else max(16, _BLOCK // max(vc, 1))
    if vc < 1 or tc < 1:
        raise ValueError("token_chunk and vocab_chunk must be positive")
    o = _Opts(int(ignore_index), reduction, float(label_smoothing), logit_scale, logit_divisor, softcap, tc, vc)
    spec = None if keep_exact else as_spec(config)
    if (spec is None and not keep_exact) or not needs_saving(x, weight, bias):
        logits = _change(F.linear(x, weight, bias), o).float()
        return F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=label_smoothing).reshape(
                                   target.shape if reduction == "none" else ())
    return _LinearCrossEntropyFn.apply(x, weight, bias, target, spec, states, o)
