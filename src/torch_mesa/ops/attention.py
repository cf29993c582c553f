"""Attention: scaled dot-product attention, batched matmul, softmax.

SDPA keeps q, k and v as codes with one range per head (Mesa's head-wise
quantization: heads have very different value ranges) and nothing else: no
attention map, no output, no log-sum-exp. Backward runs SDPA again on the
rebuilt q, k, v (with the forward's random state when dropout is on, and its
autocast state) and differentiates that: one extra attention forward, in
exchange for keeping 3 values per token and channel at 8 bits or fewer.

With dropout on the CPU, SDPA runs its math path, and drawing the dropout
mask is most of the cost of an attention forward (a (64, 4, 17, 17) map:
0.75 of 1.0 ms). Where the mask at 1 bit per score costs at most a quarter
of the kept q, k and v (short sequences, as in ViTs), the forward runs that
math path itself, which returns the map after dropout, keeps the mask (the
map's nonzeros), and the backward computes the gradients with it: no second
draw, and no output product (:func:`_grads_with_mask`). The output
is checked against ``F.scaled_dot_product_attention`` once per kind of call
(dtypes, autocast, mask kind, causal, GQA, rank); a kind that does not match
bit for bit keeps the rerun with the replayed random state. A score that
the softmax rounded to 0 counts as dropped, which changes nothing: its
product with anything is 0 either way.

The eager path (``softmax(q @ k^T * scale + mask) @ v``) keeps no map either:
``q @ k^T`` keeps q and k per head and lets its consumer rebuild the scores
from them; scaling, adding a mask and casting pass that recipe on (see
:mod:`torch_mesa.routing`), so the softmax keeps only a recipe, and
``attn @ v`` rebuilds the softmax output from it (the original Mesa kept the
map twice, in the softmax and in the matmul). Backward pays one extra
``q @ k^T`` for it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .. import quant
from ..config import QuantSpec
from ..quant.running import RangeStates
from .recipes import combined, derived, exact, keep, kept_of, quantized, quantized_qkv
from .activation import dropout_scale
from .replay import AutocastState, RngReplay, grad_by_recompute
from .saving import OpFunction, as_spec, fresh, load, needs_saving, run_with_kept, save

Tensor = torch.Tensor


def _has_heads(t: Tensor) -> bool:
    return t.dim() >= 4


def _running(states, spec, slot):
    return states.get(spec, slot) if states is not None else None


# ------------------------------------------------------------------ softmax
def _softmax(x: Tensor, *, dim: int, dtype) -> Tensor:
    return F.softmax(x, dim=dim, dtype=dtype)


class _SoftmaxFn(OpFunction):
    """Keeps its input's recipe when it has one (scores rebuilt from q and k,
    with the same scaling and masking), else its *output*, quantized per head:
    the output lies in [0, 1] whatever the input holds, so masks of ``-inf``
    or ``finfo.min`` by design are never quantized as if they were data (the
    original Mesa kept the output too). Either way a converted consumer
    (``attn @ v``) reuses what is kept instead of keeping a second copy."""

    @staticmethod
    def forward(ctx, x, dim: int, dtype, spec: QuantSpec, states):
        fn = functools.partial(_softmax, dim=dim, dtype=dtype)
        out = fn(x)
        autocast = AutocastState(x.device.type)
        inner = kept_of(x) if spec.keep_once else None
        ctx.from_output = inner is None
        if inner is None:
            kept = quantized(out, spec, op="softmax", heads=_has_heads(out), running=_running(states, spec, "output"))
            ctx.mesa_out = kept if spec.keep_once else None
        else:
            kept = inner
            ctx.mesa_out = derived(kept, fn, (), autocast)
        save(ctx, kept)
        ctx.fn, ctx.autocast, ctx.dim, ctx.x_dtype = fn, autocast, dim, x.dtype
        return fresh(out, x)

    @staticmethod
    def backward(ctx, grad_out):
        (kept,) = load(ctx)
        if ctx.from_output:
            # PyTorch's own softmax backward, from the (rebuilt) output
            grad_x = torch.ops.aten._softmax_backward_data(grad_out.to(kept.dtype), kept, ctx.dim, ctx.x_dtype)
        else:
            (grad_x,) = grad_by_recompute(ctx.fn, [kept], [True], grad_out, ctx.autocast)
        return grad_x, None, None, None, None


def softmax(
    x: Tensor,
    dim: int = -1,
    dtype: Optional[torch.dtype] = None,
    *,
    config=None,
    states: Optional[RangeStates] = None,
) -> Tensor:
    """``F.softmax`` that keeps its input's rebuild recipe (attention scores
    from q and k), or else its output quantized (per head for 4-D+ tensors);
    a converted consumer reuses what it keeps."""
    spec = as_spec(config)
    if spec is None or not needs_saving(x):
        return F.softmax(x, dim=dim, dtype=dtype)
    return run_with_kept(_SoftmaxFn, x, dim, dtype, spec, states)


# ------------------------------------------------------------------- matmul
def _sum_to(grad: Tensor, shape) -> Tensor:
    """Undo matmul's batch broadcasting."""
    if tuple(grad.shape) == tuple(shape):
        return grad
    lead = grad.dim() - len(shape)
    if lead > 0:
        grad = grad.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1)
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    return grad


def _matmul_in(a, b, *, dtype):
    return torch.matmul(a.to(dtype), b.to(dtype))


class _MatmulFn(OpFunction):
    """``a @ b`` of two activations, or ``beta * bias + alpha * (a @ b)``
    (``torch.baddbmm``, as BLOOM computes ALiBi scores). Keeps each operand
    only when the other one needs a gradient (frozen operands cost nothing);
    the output gets a recipe that rebuilds it from what is kept (attention
    scores: the softmax keeps no N x N map)."""

    @staticmethod
    def forward(ctx, a, b, spec: QuantSpec, states, bias, beta, alpha):
        if bias is None:
            out = torch.matmul(a, b)
        else:
            out = torch.baddbmm(bias, a, b, beta=beta, alpha=alpha)
        need_a, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[0]
        # q @ k^T of attention heads: both kept rotated along the contraction
        # (head) dimension, which leaves the product unchanged
        qk = _has_heads(a) and _has_heads(b)
        kept_a = keep(a, spec, op="matmul", heads=_has_heads(a), running=_running(states, spec, "a"),
                      rotate=-1 if qk else None) if need_a else None
        kept_b = keep(b, spec, op="matmul", heads=_has_heads(b), running=_running(states, spec, "b"),
                      rotate=-2 if qk else None) if need_b else None
        save(ctx, kept_a, kept_b)
        if spec.keep_once and kept_a is not None and kept_b is not None:
            if bias is None:
                ctx.mesa_out = combined(kept_a, kept_b, functools.partial(_matmul_in, dtype=out.dtype))
            elif bias.numel() < out.numel():
                # the operands' recipes rebuilt as a pair, then the (small,
                # ALiBi-like) bias added as baddbmm adds it
                pair = combined(kept_a, kept_b, _pair)
                step = functools.partial(_baddbmm_of_pair, dtype=out.dtype, beta=beta, alpha=alpha)
                ctx.mesa_out = derived(pair, step, (bias,), AutocastState(a.device.type))
        ctx.cd, ctx.alpha, ctx.beta = out.dtype, alpha, beta
        ctx.shapes = (tuple(a.shape), tuple(b.shape), None if bias is None else tuple(bias.shape))
        ctx.dtypes = (a.dtype, b.dtype, None if bias is None else bias.dtype)
        return fresh(out, a, b, bias)

    @staticmethod
    def backward(ctx, grad_out):
        a, b = load(ctx)
        cd = ctx.cd
        g = grad_out.to(cd)
        if ctx.alpha != 1:
            g_ab = g * ctx.alpha
        else:
            g_ab = g
        grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_a = _sum_to(g_ab @ b.to(cd).mT, ctx.shapes[0]).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_b = _sum_to(a.to(cd).mT @ g_ab, ctx.shapes[1]).to(ctx.dtypes[1])
        if ctx.shapes[2] is not None and ctx.needs_input_grad[4]:
            grad_bias = _sum_to(g * ctx.beta if ctx.beta != 1 else g, ctx.shapes[2]).to(ctx.dtypes[2])
        return grad_a, grad_b, None, None, grad_bias, None, None


def _pair(a, b):
    return (a, b)


def _baddbmm_of_pair(pair, bias, *, dtype, beta, alpha):
    a, b = pair
    return torch.baddbmm(bias, a.to(dtype), b.to(dtype), beta=beta, alpha=alpha)


def matmul(a: Tensor, b: Tensor, *, config=None, states: Optional[RangeStates] = None) -> Tensor:
    """``torch.matmul`` of two activations (e.g. ``q @ k.transpose(-2, -1)``,
    ``attn @ v``), keeping both operands compressed, per head for 4-D+."""
    spec = as_spec(config)
    if spec is None or not needs_saving(a, b) or a.dim() < 2 or b.dim() < 2:
        return torch.matmul(a, b)
    return run_with_kept(_MatmulFn, a, b, spec, states, None, 1, 1)


def baddbmm(bias: Tensor, a: Tensor, b: Tensor, *, beta=1, alpha=1, config=None,
            states: Optional[RangeStates] = None) -> Tensor:
    """``torch.baddbmm(bias, a, b, beta=beta, alpha=alpha)`` keeping ``a`` and
    ``b`` compressed (and ``bias`` in the output's recipe when it is smaller
    than the output, as BLOOM's ALiBi bias is)."""
    spec = as_spec(config)
    if spec is None or not needs_saving(a, b, bias) or a.dim() != 3 or b.dim() != 3:
        return torch.baddbmm(bias, a, b, beta=beta, alpha=alpha)
    return run_with_kept(_MatmulFn, a, b, spec, states, bias, beta, alpha)


# ------------------------------------------------------------------- einsum
def _einsum(a, b, *, equation, dtype):
    return torch.einsum(equation, a.to(dtype), b.to(dtype))


class _EinsumFn(OpFunction):
    """``torch.einsum(equation, a, b)``: keeps each operand only when the other
    one needs a gradient (a Parameter as itself); backward runs the einsum
    again on the rebuilt operands and differentiates it. An operand that is
    not kept is replaced by zeros of its shape (one broadcast value: the
    product is linear in each operand, so the other's gradient does not
    depend on it)."""

    @staticmethod
    def forward(ctx, a, b, equation: str, spec: QuantSpec, states):
        out = torch.einsum(equation, a, b)
        kept = []
        for i, (t, slot) in enumerate(((a, "a"), (b, "b"))):
            if ctx.needs_input_grad[1 - i]:
                kept.append(keep(t, spec, op="matmul", heads=_has_heads(t), running=_running(states, spec, slot)))
            else:
                kept.append(None)
        save(ctx, *kept)
        step = functools.partial(_einsum, equation=equation, dtype=out.dtype)
        if spec.keep_once and kept[0] is not None and kept[1] is not None:
            ctx.mesa_out = combined(kept[0], kept[1], step)
        ctx.step, ctx.autocast = step, AutocastState(a.device.type)
        ctx.meta = ((a.shape, a.dtype), (b.shape, b.dtype))
        return fresh(out, a, b)

    @staticmethod
    def backward(ctx, grad_out):
        loaded = load(ctx)
        inputs = [
            t if t is not None else torch.zeros((), dtype=dt, device=grad_out.device).expand(shape)
            for t, (shape, dt) in zip(loaded, ctx.meta)
        ]
        needs = list(ctx.needs_input_grad[:2])
        grads = grad_by_recompute(ctx.step, inputs, needs, grad_out, ctx.autocast)
        return (*[g.to(dt) if g is not None else None for g, (_, dt) in zip(grads, ctx.meta)], None, None, None)


def einsum(equation: str, a: Tensor, b: Tensor, *, config=None, states: Optional[RangeStates] = None) -> Tensor:
    """``torch.einsum(equation, a, b)`` of two operands, keeping them
    compressed (per head for 4-D+); its output gets a rebuild recipe."""
    spec = as_spec(config)
    if spec is None or not needs_saving(a, b):
        return torch.einsum(equation, a, b)
    return run_with_kept(_EinsumFn, a, b, equation, spec, states)


# --------------------------------------------------------------------- SDPA
def _sdpa(q, k, v, mask, *, kwargs):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)


def _cpu_autocast_dtype() -> Optional[torch.dtype]:
    try:
        on = torch.is_autocast_enabled("cpu")
        return torch.get_autocast_dtype("cpu") if on else None
    except TypeError:  # (before PyTorch 2.4)
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def _same(t):
    return t


def _detached(t):
    # (a pack hook keeping the live tensor would keep its grad_fn: for a
    # saved output, a reference cycle through C++ that nothing reclaims
    # when the graph is dropped without a backward, as this one is)
    return t.detach()


def _sdpa_as_called(q, k, v, mask, *, kwargs):
    """The forward's SDPA, run as the caller's own call runs it. PyTorch
    picks SDPA's kernel by grad mode too, which a Function's forward turns
    off: with a mask that needs a gradient (T5's learned position bias) the
    caller got the math path, and with grad off the CPU took another, whose
    bf16 output differs (T5, mT5, UMT5, Doge and Hugging Face's BEiT and
    Swin were not identical to the unconverted models under bf16 autocast).
    (``torch._fused_sdp_choice`` does not tell which: it named the flash
    path for SAM's 3-D inputs, which the call itself does not take.) So it
    runs with grad on, and the output is detached: the small graph it makes
    is dropped at once, and saved-tensor hooks of the caller's (a
    measurement, offloading) never see what it saves. What that graph saves
    is detached: kept as it was, the output it saves would hold its own
    grad_fn, and the dropped graph (the qkv projection's output, q, k, v,
    this output) would live on, a leak of every call."""
    enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", lambda: True)()
    own = torch.autograd.graph.saved_tensors_hooks(_detached, _same) if enabled else contextlib.nullcontext()
    with torch.enable_grad(), own:
        return _sdpa(q, k, v, mask, kwargs=kwargs).detach()


_MATH = getattr(torch.ops.aten, "_scaled_dot_product_attention_math", None)
_math_matches: dict = {}  # kind of call -> whether the math path gave F.sdpa's output bit for bit


def _as_sdpa_casts(q, k, v, mask):
    """The operands as ``F.scaled_dot_product_attention`` takes them on the
    CPU: in autocast's dtype under autocast, a boolean mask made additive."""
    amp = _cpu_autocast_dtype()
    if amp is not None:
        q, k, v = (t.to(amp) if t.is_floating_point() else t for t in (q, k, v))
        if mask is not None and mask.is_floating_point():
            mask = mask.to(amp)
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(mask.logical_not(), float("-inf"))
    return q, k, v, mask


def _sdpa_math(q, k, v, mask, *, kwargs):
    """SDPA's math path as ``F.scaled_dot_product_attention`` runs it with
    dropout on the CPU; returns the output and the map after dropout."""
    q, k, v, mask = _as_sdpa_casts(q, k, v, mask)
    extra = {"enable_gqa": True} if kwargs.get("enable_gqa") else {}
    with torch.autocast("cpu", enabled=False):
        return _MATH(q, k, v, mask, kwargs["dropout_p"], kwargs["is_causal"], None, scale=kwargs["scale"], **extra)


def _grads_with_mask(q, k, v, mask, grad_out, needs, *, kwargs, dropout_mask):
    """Gradients of the attention that ran with ``dropout_mask`` (packed
    by ``quant.pack_bits``, a set bit: kept) for q, k and v, written out: scores, softmax (0 for rows with every
    score masked, as SDPA's), then the backward's four products. The output
    product ``attn @ v`` is never formed (only its gradients are needed),
    and no autograd graph is built: on small heads on the CPU each batched
    product is a loop over (batch, head) matrices, the largest cost here."""
    dtypes = (q.dtype, k.dtype, v.dtype)
    q, k, v, mask = _as_sdpa_casts(q, k, v, mask)
    g = grad_out.to(q.dtype)
    groups = q.shape[-3] // k.shape[-3] if kwargs.get("enable_gqa") and q.dim() >= 4 else 1
    if groups > 1:
        k, v = (t.repeat_interleave(groups, dim=-3) for t in (k, v))
    scale = kwargs["scale"] if kwargs["scale"] is not None else q.shape[-1] ** -0.5
    with torch.autocast("cpu", enabled=False):
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
        masked = kwargs["is_causal"] or mask is not None
        if kwargs["is_causal"]:
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
            scores.masked_fill_(causal.logical_not(), float("-inf"))
        if mask is not None:
            scores.add_(mask)
        if masked:
            none = (scores == float("-inf")).all(-1, keepdim=True)
            scores.masked_fill_(none, 0.0)
        attn = torch.softmax(scores, -1)
        del scores
        if masked:
            attn.masked_fill_(none, 0.0)
        # the math path's dropout noise (its factor rounded as it rounds it),
        # applied from the packed mask's bits
        noise = dropout_scale(kwargs["dropout_p"], attn.dtype, "cpu")
        grad_v = torch.matmul(quant.apply_bits(attn, dropout_mask, noise).transpose(-2, -1), g) if needs[2] else None
        grad_scores = None
        if needs[0] or needs[1]:
            grad_attn = quant.apply_bits(torch.matmul(g, v.transpose(-2, -1)), dropout_mask, noise)
            grad_scores = torch.ops.aten._softmax_backward_data(grad_attn, attn, -1, attn.dtype).mul_(scale)
        grad_q = torch.matmul(grad_scores, k) if needs[0] else None
        grad_k = torch.matmul(grad_scores.transpose(-2, -1), q) if needs[1] else None
    if groups > 1:
        grad_k, grad_v = (None if t is None else t.unflatten(-3, (-1, groups)).sum(-3) for t in (grad_k, grad_v))
    return [None if t is None else t.to(dt) for t, dt in zip((grad_q, grad_k, grad_v), dtypes)]


def _rerun_with_mask(q, k, v, mask, *, kwargs, dropout_mask):
    """The same attention as a differentiable function, with a given dropout
    mask (packed, a set bit: kept): for a mask that needs its own gradient."""
    q, k, v, mask = _as_sdpa_casts(q, k, v, mask)
    with torch.autocast("cpu", enabled=False):
        if kwargs.get("enable_gqa") and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        scale = kwargs["scale"] if kwargs["scale"] is not None else q.shape[-1] ** -0.5
        scores = (q @ k.transpose(-2, -1)) * scale
        if kwargs["is_causal"]:
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(causal.logical_not(), float("-inf"))
        if mask is not None:
            scores = scores + mask
        none = (scores == float("-inf")).all(-1, keepdim=True)  # (no NaN from such rows, forward or backward)
        attn = torch.softmax(scores.masked_fill(none, 0.0), -1).masked_fill(none, 0.0)
        dropped = quant.unpack_bits(dropout_mask, attn.shape).logical_not()
        attn = attn.masked_fill(dropped, 0.0) * dropout_scale(kwargs["dropout_p"], attn.dtype, "cpu")
        return attn @ v


def _keeps_dropout_mask(q, k, v, kwargs) -> bool:
    """Dropout on the CPU, with a mask of at most a quarter of the kept
    q, k and v's bytes (8 bits each; the mask is 1 bit per score)."""
    if _MATH is None or kwargs.get("dropout_p", 0.0) <= 0.0 or q.device.type != "cpu" or q.dim() < 3:
        return False
    if quant.without_data(q, k, v):  # (its first call compares outputs: no data to compare)
        return False
    nq, nk = q.shape[-2], k.shape[-2]
    return nq * nk <= 2 * (nq * q.shape[-1] + nk * k.shape[-1] + nk * v.shape[-1])


def _forward_keeping_dropout_mask(q, k, v, mask, kwargs):
    """(output, kept mask as a Recipe) by the math path, or None where that
    kind of call did not give ``F.scaled_dot_product_attention``'s output."""
    kind = (q.dtype, k.dtype, v.dtype, None if mask is None else mask.dtype, _cpu_autocast_dtype(),
            kwargs["is_causal"], bool(kwargs.get("enable_gqa")), q.dim(), k.shape[-3] != q.shape[-3])
    matches = _math_matches.get(kind)
    if matches is False:
        return None
    if matches is None:  # first call of this kind: both, from the same random state
        state = torch.get_rng_state()
        want = _sdpa_as_called(q, k, v, mask, kwargs=kwargs)
        torch.set_rng_state(state)
    out, scores = _sdpa_math(q, k, v, mask, kwargs=kwargs)
    if matches is None:
        _math_matches[kind] = matches = torch.equal(out, want)
        if not matches:
            return None
    kept = exact(quant.pack_bits(scores != 0))  # (applied from its bits: quant.apply_bits)
    return out, kept


class _SDPAFn(OpFunction):
    @staticmethod
    def forward(ctx, q, k, v, mask, spec: QuantSpec, states, kwargs):
        rng = RngReplay(q.device) if kwargs.get("dropout_p", 0.0) > 0.0 else None
        fn = functools.partial(_sdpa, kwargs=kwargs)
        with_mask = _forward_keeping_dropout_mask(q, k, v, mask, kwargs) if _keeps_dropout_mask(q, k, v, kwargs) \
            else None
        if with_mask is not None:
            out, kept_drop = with_mask
            rng = None
        else:
            out, kept_drop = _sdpa_as_called(q, k, v, mask, kwargs=kwargs), None
        kept_qkv = quantized_qkv(q, k, v, spec, op="attention") or (
            keep(q, spec, op="attention", heads=True, running=_running(states, spec, "q"), rotate=-1),
            keep(k, spec, op="attention", heads=True, running=_running(states, spec, "k"), rotate=-1),
            keep(v, spec, op="attention", heads=True, running=_running(states, spec, "v")))
        save(
            ctx,
            *kept_qkv,
            # a mask built from smaller tensors (a bias plus a broadcast shift
            # mask, as in Swin) is kept as those, exactly
            (kept_of(mask) if spec.keep_once else None) or exact(mask),
            kept_drop,
        )
        ctx.fn, ctx.rng, ctx.autocast = fn, rng, AutocastState(q.device.type)
        return fresh(out, q, k, v, mask)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask, dropout_mask = load(ctx)
        needs = list(ctx.needs_input_grad[:4])
        if dropout_mask is not None and not needs[3]:
            with ctx.autocast():
                grads = _grads_with_mask(q, k, v, mask, grad_out, needs, kwargs=ctx.fn.keywords["kwargs"],
                                         dropout_mask=dropout_mask) + [None]
        elif dropout_mask is not None:
            fn = functools.partial(_rerun_with_mask, kwargs=ctx.fn.keywords["kwargs"], dropout_mask=dropout_mask)
            grads = grad_by_recompute(fn, [q, k, v, mask], needs, grad_out, ctx.autocast)
        elif ctx.rng is not None:
            with ctx.rng:
                grads = grad_by_recompute(ctx.fn, [q, k, v, mask], needs, grad_out, ctx.autocast)
        else:
            grads = grad_by_recompute(ctx.fn, [q, k, v, mask], needs, grad_out, ctx.autocast)
        return (*grads, None, None, None)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    config=None,
    states: Optional[RangeStates] = None,
) -> Tensor:
    """``F.scaled_dot_product_attention`` keeping q, k, v per head at low
    precision and never the attention map; same arguments, same output."""
    kwargs = {"dropout_p": dropout_p, "is_causal": is_causal, "scale": scale}
    if enable_gqa:
        kwargs["enable_gqa"] = True
    spec = as_spec(config)
    if spec is None or not needs_saving(query, key, value, attn_mask):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, **kwargs)
    return _SDPAFn.apply(query, key, value, attn_mask, spec, states, kwargs)
