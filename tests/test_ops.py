"""Each op against the PyTorch op: forward identical, gradients close.

Bars: at 8 bits with nearest rounding, every gradient's SQNR against the exact
fp32 gradient is >= 30 dB on data with outliers (``with_outliers``); in
bf16/fp16, within 6 dB of PyTorch's own low-precision gradient where that is
lower. The 4- and 2-bit figures are printed (``pytest -s``) and only checked
to be finite and ordered, since their SQNR is a property of the bit width.
"""


import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

from torch_mesa import MesaConfig, compress_, ops
from torch_mesa.ops import recipes as _saved
from torch_mesa.quant import reference as quant_ref

from conftest import assert_grads_close, draws_in, sqnr_db, with_outliers

pytestmark = pytest.mark.usefixtures("reference_kernel")

CFG8 = MesaConfig(bits=8, rounding="nearest")
LOWP = [torch.bfloat16, torch.float16]


def _grads(fn, inputs, g):
    out = fn(*inputs)
    needs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return out, torch.autograd.grad(out, needs, g)


def _leaf(t, dtype=None):
    t = t.detach()
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_(True)


def _check(mesa_fn, torch_fn, inputs, *, dtype=torch.float32, min_db=30.0, seed=None, what=""):
    """Forward identical in ``dtype``; gradients vs the fp32 exact ones."""
    lowp = [_leaf(t, dtype) for t in inputs]
    exact_in = [_leaf(t, torch.float32) for t in inputs]
    if seed is not None:
        torch.manual_seed(seed)
    ref_out = torch_fn(*lowp)
    g = torch.randn_like(ref_out.float()).to(dtype)
    if seed is not None:
        torch.manual_seed(seed)
    out, grads = _grads(mesa_fn, lowp, g)
    assert out.dtype == ref_out.dtype and torch.equal(out, ref_out), f"{what}: forward differs"
    if seed is not None:
        torch.manual_seed(seed)
    _, torch_lowp = _grads(torch_fn, lowp, g)
    if seed is not None:
        torch.manual_seed(seed)
    _, exact = _grads(torch_fn, exact_in, g.float())
    assert_grads_close(
        [x.float() for x in grads],
        exact,
        min_db=min_db,
        low_precision=None if dtype == torch.float32 else [x.float() for x in torch_lowp],
        what=what,
    )
    return grads, exact


def _masked_scores(*shape):
    x = with_outliers(*shape, shape[-1], requires_grad=False) * 2
    n = shape[-1]
    x = x.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    x[..., 5:, 3] = torch.finfo(x.dtype).min
    return x.requires_grad_()


def _cases():
    w = torch.randn(33, 65) * 0.1
    b = torch.randn(33)
    lnw, lnb = torch.randn(65), torch.randn(65)
    return {
        "linear": (
            lambda x, w, b: ops.linear(x, w, b, config=CFG8),
            F.linear,
            [with_outliers(3, 197, 65), w, b],
        ),
        "layer_norm": (
            lambda x, w, b: ops.layer_norm(x, (65,), w, b, 1e-6, config=CFG8),
            lambda x, w, b: F.layer_norm(x, (65,), w, b, 1e-6),
            [with_outliers(3, 197, 65), lnw, lnb],
        ),
        "rms_norm": (
            lambda x, w: ops.rms_norm(x, (65,), w, 1e-6, config=CFG8),
            lambda x, w: F.rms_norm(x, (65,), w, 1e-6),
            [with_outliers(3, 197, 65), lnw],
        ),
        "gelu": (lambda x: ops.gelu(x, config=CFG8), F.gelu, [with_outliers(3, 7, 197, 65)]),
        "gelu_tanh": (
            lambda x: ops.gelu(x, "tanh", config=CFG8),
            lambda x: F.gelu(x, approximate="tanh"),
            [with_outliers(3, 7, 197, 65)],
        ),
        "silu": (lambda x: ops.silu(x, config=CFG8), F.silu, [with_outliers(3, 7, 197, 65)]),
        "swiglu": (
            lambda a, u: ops.gated(a, u, "silu", config=CFG8),
            lambda a, u: F.silu(a) * u,
            [with_outliers(3, 197, 65, seed=1), with_outliers(3, 197, 65, seed=2)],
        ),
        "geglu": (
            lambda a, u: ops.gated(a, u, "gelu", config=CFG8),
            lambda a, u: F.gelu(a) * u,
            [with_outliers(3, 197, 65, seed=1), with_outliers(3, 197, 65, seed=2)],
        ),
        "softmax": (
            lambda x: ops.softmax(x, -1, config=CFG8),
            lambda x: F.softmax(x, -1),
            [with_outliers(3, 7, 37, 37)],
        ),
        "matmul": (
            lambda a, b: ops.matmul(a, b, config=CFG8),
            torch.matmul,
            [with_outliers(3, 7, 37, 65, seed=1), with_outliers(3, 7, 65, 37, seed=2)],
        ),
        "matmul_broadcast": (
            lambda a, b: ops.matmul(a, b, config=CFG8),
            torch.matmul,
            [with_outliers(3, 7, 37, 65, seed=1), with_outliers(65, 21, seed=2)],
        ),
        # masks by design: -inf above the diagonal, finfo.min in a padded key
        # column; the softmax keeps its output, never the masked input
        "softmax_masked": (
            lambda x: ops.softmax(x, -1, config=CFG8),
            lambda x: F.softmax(x, -1),
            [_masked_scores(3, 7, 37)],
        ),
        "baddbmm": (
            lambda bias, a, b: ops.baddbmm(bias, a, b, beta=0.5, alpha=0.125, config=CFG8),
            lambda bias, a, b: torch.baddbmm(bias, a, b, beta=0.5, alpha=0.125),
            [torch.randn(21, 1, 37), with_outliers(21, 37, 65, seed=1), with_outliers(21, 65, 37, seed=2)],
        ),
        "einsum": (
            lambda a, b: ops.einsum("bhid,bhjd->bhij", a, b, config=CFG8),
            lambda a, b: torch.einsum("bhid,bhjd->bhij", a, b),
            [with_outliers(3, 7, 37, 65, seed=1), with_outliers(3, 7, 37, 65, seed=2)],
        ),
        "sdpa": (
            lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, config=CFG8),
            F.scaled_dot_product_attention,
            [with_outliers(3, 7, 37, 65, seed=i) for i in range(3)],
        ),
        "sdpa_causal": (
            lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=True, config=CFG8),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            [with_outliers(3, 7, 37, 65, seed=i) for i in range(3)],
        ),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_op_fp32_forward_exact_and_grads_at_8_bits(name):
    mesa_fn, torch_fn, inputs = CASES[name]
    _check(mesa_fn, torch_fn, inputs, what=name)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("name", ["linear", "layer_norm", "gelu", "silu", "swiglu", "softmax", "matmul", "sdpa"])
def test_op_low_precision(name, dtype):
    mesa_fn, torch_fn, inputs = CASES[name]
    if name == "layer_norm" and dtype == torch.float16:
        inputs = [inputs[0]] + [t for t in inputs[1:]]
    _check(mesa_fn, torch_fn, inputs, dtype=dtype, what=f"{name}/{dtype}")


def test_sdpa_masks_and_gqa():
    q = with_outliers(2, 8, 33, 16, seed=1)
    k = with_outliers(2, 2, 33, 16, seed=2)
    v = with_outliers(2, 2, 33, 16, seed=3)
    bool_mask = torch.rand(2, 1, 33, 33) > 0.3
    bool_mask[..., 0] = True  # no fully masked row
    float_mask = torch.randn(2, 1, 33, 33)
    for mask in (bool_mask, float_mask):
        _check(
            lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, config=CFG8),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True),
            [q, k, v],
            what="sdpa masked gqa",
        )


def _mask_case(variant, b=2, h=4, t=24):
    """``(kwargs, kv heads)`` of one kind of attention mask, as models pass them."""
    g = torch.Generator().manual_seed(11)
    bias = torch.randn(1, h, t, t, generator=g).requires_grad_()  # a learned position bias (T5's)
    padding = torch.zeros(b, 1, 1, t).masked_fill_(torch.arange(t) >= t - 5, torch.finfo(torch.float32).min)
    if variant == "learned bias plus padding":  # (b, h, t, t), needs its gradient
        return {"attn_mask": bias + padding}, h
    if variant == "learned bias":
        return {"attn_mask": bias}, h
    if variant == "learned bias, gqa":
        return {"attn_mask": bias + padding, "enable_gqa": True}, 2
    if variant == "float mask without gradient":
        return {"attn_mask": (bias + padding).detach()}, h
    if variant == "bool mask":
        return {"attn_mask": torch.rand(b, 1, t, t, generator=g) > 0.3}, h
    return {"is_causal": True}, h


@pytest.mark.parametrize("mode", ["fp32", "bf16 autocast", "bf16"])
@pytest.mark.parametrize("variant", ["learned bias plus padding", "learned bias", "learned bias, gqa",
                                     "float mask without gradient", "bool mask", "causal"])
def test_sdpa_forward_is_the_callers_kernel(variant, mode):
    """The forward equals ``F.scaled_dot_product_attention`` bit for bit in
    training, whatever the mask. PyTorch picks SDPA's kernel by grad mode
    as well as by the inputs, and a Function's forward runs with grad off:
    with a mask that needs its gradient (T5's learned position bias) the
    caller got the math path and the converted op the CPU's flash path,
    whose bf16 outputs differ (T5, mT5, UMT5 and Doge under bf16 autocast
    were not identical to the unconverted models)."""
    kw, kv_heads = _mask_case(variant)
    q = with_outliers(2, 4, 24, 16, seed=1)
    k, v = with_outliers(2, kv_heads, 24, 16, seed=2), with_outliers(2, kv_heads, 24, 16, seed=3)
    if mode == "bf16":
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        kw = {n: (t.bfloat16() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kw.items()}
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16 autocast"):
        want = F.scaled_dot_product_attention(q, k, v, **kw)
        got = ops.scaled_dot_product_attention(q, k, v, **kw, config=CFG8)
    assert got.dtype == want.dtype and torch.equal(got, want), (got.float() - want.float()).abs().max()
    got.float().sum().backward()  # (and it trains)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def _dropout_case(variant):
    q, k, v = (with_outliers(2, 3, 33, 16, seed=i) for i in range(3))
    kw = {}
    if variant == "gqa":
        k, v, kw = with_outliers(2, 1, 33, 16, seed=5), with_outliers(2, 1, 33, 16, seed=6), {"enable_gqa": True}
    if variant == "bool mask, a row fully masked":
        mask = torch.rand(33, 33) > 0.4
        mask[4] = False
        kw = {"attn_mask": mask}
    if variant == "-inf float mask":
        kw = {"attn_mask": torch.zeros(2, 1, 33, 33).masked_fill(torch.rand(2, 1, 33, 33) > 0.7, float("-inf"))}
    if variant == "float mask that needs its gradient":
        kw = {"attn_mask": torch.randn(1, 3, 33, 33, requires_grad=True)}
    if variant == "causal, scaled":
        kw = {"is_causal": True, "scale": 0.3}
    if variant == "no heads (3-D)":
        q, k, v = (with_outliers(6, 33, 16, seed=i) for i in range(3))
    if variant == "long sequence":
        q, k, v = (with_outliers(1, 2, 200, 16, seed=i) for i in range(3))
    return q, k, v, kw


_DROPOUT_VARIANTS = ["plain", "gqa", "bool mask, a row fully masked", "-inf float mask",
                     "float mask that needs its gradient", "causal, scaled", "no heads (3-D)", "long sequence"]


def _dropout_grads(fn, inputs, g, p, kw, amp=False, device="cpu", dtype=None):
    """Output, input gradients and random draws of the backward of ``fn``
    with dropout ``p``, from one seed; inputs (and tensor keywords of a
    floating dtype) moved to ``device`` and ``dtype``."""
    leaves = [t.detach().to(device, dtype).requires_grad_() for t in inputs]
    kw = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
          for k, v in kw.items()}
    torch.manual_seed(7)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
        out = fn(*leaves, dropout_p=p, **kw)
    draws = draws_in(lambda: out.float().backward(g.to(device)))
    return out, [t.grad.float() for t in leaves], draws


@pytest.mark.parametrize("variant", _DROPOUT_VARIANTS)
def test_sdpa_dropout_same_mask_in_backward(variant):
    """Attention dropout: the same forward as ``F.scaled_dot_product_attention``
    from the same random state, and gradients with the forward's mask. On
    the CPU, where the mask costs at most a quarter of the kept q, k, v, it
    is kept (1 bit per score) and the backward draws nothing; a long
    sequence reruns with the replayed random state instead. Dropout adds no
    error of its own: each gradient is within 3 dB of what 8-bit codes of
    the same q, k, v give without dropout (27-36 dB on these outlier-heavy
    inputs), and a wrong mask would give about 0 dB."""
    q, k, v, kw = _dropout_case(variant)
    g = torch.randn(q.shape[:-1] + v.shape[-1:])
    mesa_fn = functools.partial(ops.scaled_dot_product_attention, config=CFG8)
    out, mesa, draws = _dropout_grads(mesa_fn, (q, k, v), g, 0.3, kw)
    want, exact, _ = _dropout_grads(F.scaled_dot_product_attention, (q, k, v), g, 0.3, kw)
    assert torch.equal(out, want)
    assert (draws > 0) == (variant == "long sequence"), draws
    _, mesa0, _ = _dropout_grads(mesa_fn, (q, k, v), g, 0.0, kw)
    _, exact0, _ = _dropout_grads(F.scaled_dot_product_attention, (q, k, v), g, 0.0, kw)
    for i in range(3):
        bar = min(30.0, sqnr_db(mesa0[i], exact0[i]) - 3.0)
        assert sqnr_db(mesa[i], exact[i]) >= bar, (variant, i, sqnr_db(mesa[i], exact[i]), bar)


@pytest.mark.parametrize("variant", ["plain", "bool mask, a row fully masked", "gqa"])
def test_sdpa_dropout_under_autocast(variant):
    """The same under bf16 autocast, fp32 inputs: the forward equals
    autocast's SDPA bit for bit, the backward draws nothing, and the
    gradients against exact fp32 ones are within 3 dB of what the same
    codes give without dropout (and of autocast's own, within 6 dB)."""
    q, k, v, kw = _dropout_case(variant)
    g = torch.randn(q.shape[:-1] + v.shape[-1:])
    mesa_fn = functools.partial(ops.scaled_dot_product_attention, config=CFG8)
    mesa_out, mesa, draws = _dropout_grads(mesa_fn, (q, k, v), g, 0.3, kw, amp=True)
    amp_out, amp, _ = _dropout_grads(F.scaled_dot_product_attention, (q, k, v), g, 0.3, kw, amp=True)
    _, exact, _ = _dropout_grads(F.scaled_dot_product_attention, (q, k, v), g, 0.3, kw)
    assert draws == 0
    assert mesa_out.dtype == torch.bfloat16 and torch.equal(mesa_out, amp_out)
    _, mesa0, _ = _dropout_grads(mesa_fn, (q, k, v), g, 0.0, kw, amp=True)
    _, exact0, _ = _dropout_grads(F.scaled_dot_product_attention, (q, k, v), g, 0.0, kw)
    for i in range(3):
        bar = min(30.0, sqnr_db(mesa0[i], exact0[i]) - 3.0, sqnr_db(amp[i], exact[i]) - 6.0)
        assert sqnr_db(mesa[i], exact[i]) >= bar, (variant, i, sqnr_db(mesa[i], exact[i]), bar)


@pytest.mark.parametrize("dtype,p", [(torch.float32, 0.25), (torch.float32, 0.1), (torch.float32, 0.021),
                                     (torch.bfloat16, 0.1), (torch.bfloat16, 0.021), (torch.float16, 0.3),
                                     (torch.float64, 0.5)])
def test_dropout_same_mask_as_torch_and_exact_gradient(dtype, p):
    """Forward and gradient bit for bit those of ``F.dropout`` (the factor
    ``1 / (1 - p)`` rounded as it rounds it on this device: in fp32 at
    p = 0.021, and in bf16 and fp16 at every p, ``torch.native_dropout``'s
    arithmetic differs from it in the last bit)."""
    x = with_outliers(4, 37, 65, dtype=dtype, seed=1)
    torch.manual_seed(5)
    out = ops.dropout(x, p, True, config=CFG8)
    after = torch.rand(8)
    torch.manual_seed(5)
    ref = F.dropout(x, p, True)
    assert torch.equal(out, ref)
    assert torch.equal(after, torch.rand(8))  # (the generator left where F.dropout leaves it)
    g = with_outliers(4, 37, 65, dtype=dtype, requires_grad=False)
    (gx,) = torch.autograd.grad(out, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(gx, gr)
    assert ops.dropout(x, 0.0, True, config=CFG8) is x
    assert ops.dropout(x, 0.5, False, config=CFG8) is x
    with pytest.raises(ValueError, match="between 0 and 1"):
        ops.dropout(x, 1.5, config=CFG8)


@pytest.mark.parametrize("name", ["linear", "layer_norm", "gelu", "softmax", "sdpa"])
def test_bits_none_is_plain_pytorch(name):
    mesa_fn, torch_fn, inputs = CASES[name]
    exact_cfg = MesaConfig(bits=None)
    fn = {
        "linear": lambda x, w, b: ops.linear(x, w, b, config=exact_cfg),
        "layer_norm": lambda x, w, b: ops.layer_norm(x, (65,), w, b, 1e-6, config=exact_cfg),
        "gelu": lambda x: ops.gelu(x, config=exact_cfg),
        "softmax": lambda x: ops.softmax(x, -1, config=exact_cfg),
        "sdpa": lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, config=exact_cfg),
    }[name]
    leaves = [_leaf(t) for t in inputs]
    out, grads = _grads(fn, leaves, torch.ones_like(torch_fn(*leaves)))
    ref, ref_grads = _grads(torch_fn, leaves, torch.ones_like(out))
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["linear", "layer_norm", "gelu", "swiglu", "softmax", "sdpa"])
def test_fewer_bits_report(name, capsys):
    """4 and 2 bits: print the SQNR (figures for docs), check it is ordered."""
    _, torch_fn, inputs = CASES[name]
    figures = {}
    for bits in (8, 4, 2):
        cfg = MesaConfig(bits=bits, rounding="nearest")
        fn = {
            "linear": lambda x, w, b: ops.linear(x, w, b, config=cfg),
            "layer_norm": lambda x, w, b: ops.layer_norm(x, (65,), w, b, 1e-6, config=cfg),
            "gelu": lambda x: ops.gelu(x, config=cfg),
            "swiglu": lambda a, u: ops.gated(a, u, "silu", config=cfg),
            "softmax": lambda x: ops.softmax(x, -1, config=cfg),
            "sdpa": lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, config=cfg),
        }[name]
        leaves = [_leaf(t) for t in inputs]
        ref = torch_fn(*leaves)
        g = torch.randn_like(ref)
        _, grads = _grads(fn, leaves, g)
        _, exact = _grads(torch_fn, leaves, g)
        figures[bits] = min(sqnr_db(a, e) for a, e in zip(grads, exact))
    with capsys.disabled():
        print(f"\n  {name}: worst grad SQNR 8/4/2 bits: " + " / ".join(f"{figures[b]:.1f}" for b in (8, 4, 2)))
    assert figures[8] > figures[4] > figures[2] > -10


def test_stochastic_rounding_gives_unbiased_gradients(monkeypatch):
    """The mean of 2-bit stochastic gradients converges to the exact gradient.

    Element by element: over n draws, the mean error divided by its standard
    error is Student's t with n - 1 degrees of freedom when the rounding is
    unbiased, so its square averages (n - 1) / (n - 3) = 1.03 over the 1024
    elements (standard deviation about 0.05 for independent elements). A
    bias of b standard errors adds b**2. Per element, each element weighs
    the same: the error power of the whole gradient (an earlier form of this
    test) is dominated by the few elements of the outlier channel and spread
    too widely to judge. The rounding's stream starts afresh, so the test
    draws the same numbers whatever ran before it in the process."""
    monkeypatch.setattr(quant_ref, "_seeds", itertools.count())
    torch.manual_seed(0)
    cfg = MesaConfig(bits=2, rounding="stochastic")
    x = with_outliers(2, 33, 64)
    w = torch.randn(16, 64, requires_grad=True)
    g = torch.randn(2, 33, 16)
    (exact,) = torch.autograd.grad(F.linear(x, w), w, g)
    n = 64
    errors = torch.stack([torch.autograd.grad(ops.linear(x, w, config=cfg), w, g)[0].double() - exact.double()
                          for _ in range(n)])
    assert (errors.std(0) > 0).all(), "every element should vary from draw to draw"
    t = errors.mean(0) / (errors.std(0) / n**0.5)
    # 1.5: ten standard deviations above 1.03, and a bias of 0.7 standard
    # errors per element on average fails
    assert t.pow(2).mean().item() < 1.5, t.pow(2).mean().item()


def test_keep_once_shares_storages():
    """LayerNorm -> Linear and GELU -> dropout -> Linear keep nothing new for
    the Linear, and the inputs rebuilt from what the producers keep give the
    right forward and gradients."""
    x = with_outliers(2, 17, 32)
    w1 = (torch.randn(64, 32) * 0.2).requires_grad_()
    w2 = (torch.randn(32, 64) * 0.2).requires_grad_()
    lnw = (1 + 0.1 * torch.randn(32)).requires_grad_()
    packed = []

    def pack(t):
        packed.append(t)
        return t

    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = ops.layer_norm(x, (32,), lnw, None, config=CFG8)
        y = ops.linear(h, w1, config=CFG8)
        z = ops.linear(ops.dropout(ops.gelu(y, config=CFG8), 0.1, config=CFG8), w2, config=CFG8)
    storages = {t.untyped_storage().data_ptr() for t in packed}
    params = {p.untyped_storage().data_ptr() for p in (w1, w2, lnw)}
    activations = [t for t in packed if t.untyped_storage().data_ptr() not in params]
    # LN keeps codes + lo + scale + row centre + row width (5), GELU codes +
    # lo + scale + row scale + channel scale (5), dropout its 1-bit mask (1):
    # nothing else is new.
    assert len({t.untyped_storage().data_ptr() for t in activations}) == 11
    assert all(t.dtype in (torch.uint8, torch.float32, torch.bfloat16) for t in activations)
    assert len(storages) == 11 + 3
    # the same dropout mask in the reference: same forward, close gradients
    torch.manual_seed(3)
    ref = F.linear(F.dropout(F.gelu(F.linear(F.layer_norm(x, (32,), lnw), w1)), 0.1), w2)
    assert torch.equal(ref, z)
    g = torch.randn_like(z)
    wrt = [x, w1, w2, lnw]
    assert_grads_close(torch.autograd.grad(z, wrt, g), torch.autograd.grad(ref, wrt, g), min_db=30.0,
                       what="keep-once chain")


def test_keep_once_ignores_outputs_modified_in_place():
    """An attached output changed in place is quantized afresh, not rebuilt
    from the producer's input (which would miss the change)."""
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    h = ops.gelu(x, config=CFG8)
    h.add_(1.0)
    out = ops.linear(h, w, config=CFG8)
    (gw,) = torch.autograd.grad(out.sum(), w)
    (ref,) = torch.autograd.grad(F.linear(F.gelu(x) + 1.0, w).sum(), w)
    assert sqnr_db(gw, ref) > 30


def test_functional_ops_accept_none_and_reject_bad_config():
    x = torch.randn(3, 4, requires_grad=True)
    assert ops.gelu(x).shape == x.shape  # default config
    with pytest.raises(TypeError, match="MesaConfig"):
        ops.gelu(x, config="8bit")
    with pytest.raises(ValueError, match="approximate"):
        ops.gelu(x, "fast")
    with pytest.raises(ValueError, match="same shape"):
        ops.gated(x, torch.randn(3, 5, requires_grad=True))


def test_no_grad_and_inference_mode_keep_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(_saved.quant, "compress", lambda *a, **k: calls.append(1))
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(4, 8, requires_grad=True)
    with torch.no_grad():
        ops.linear(ops.gelu(x), w)
    with torch.inference_mode():
        ops.linear(ops.layer_norm(x, (8,)), w)
    ops.linear(x.detach(), w.detach())
    assert calls == []


def test_autocast_matches_pytorch_dtype_and_forward():
    x = torch.randn(2, 9, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = ops.layer_norm(x, (32,), config=CFG8)
        out = ops.linear(h, w, config=CFG8)
        ref = F.linear(F.layer_norm(x, (32,)), w)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    assert gx.dtype == rx.dtype and gw.dtype == rw.dtype == torch.float32
    # within 6 dB of bf16's own error against the fp32 computation
    ex, ew = torch.autograd.grad(F.linear(F.layer_norm(x, (32,)), w), (x, w), g.float())
    assert_grads_close([gx, gw], [ex, ew], low_precision=[rx, rw], what="autocast ln->linear")


class _Consumers(torch.nn.Module):
    """One norm's output read by several Linears: q, k, v of attention
    (LayerNorm), gate and up of a gated MLP (RMSNorm), or consumers whose
    backwards are interleaved with another rebuild (a second norm between)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.norm = torch.nn.RMSNorm(48) if kind == "gate-up" else torch.nn.LayerNorm(48)
        self.lin = torch.nn.ModuleList(torch.nn.Linear(48, 48) for _ in range(2 if kind == "gate-up" else 3))
        if kind == "interleaved":
            self.other = torch.nn.LayerNorm(48)

    def forward(self, x):
        h = self.norm(x)
        if self.kind == "qkv":
            return self.lin[0](h) * self.lin[1](h).sigmoid() + self.lin[2](h)
        if self.kind == "gate-up":
            return F.silu(self.lin[0](h)) * self.lin[1](h)
        # interleaved: the second consumer reads h through another norm's rebuild
        return self.lin[0](h) + self.lin[1](self.other(h + self.lin[2](h)))


@pytest.mark.parametrize("kind,saved", [("qkv", 3), ("gate-up", 2), ("interleaved", None)])
def test_one_norm_output_is_rebuilt_once_for_its_consumers(monkeypatch, kind, saved):
    """Consumers of one norm's output (Hugging Face's q, k, v; a gated MLP's
    gate and up) rebuild it once in backward, not once each, and an
    activation's own backward (after the product that rebuilt its output)
    gets the input that product expanded: the same gradients as rebuilding
    it for each, one expansion for all (qkv: the norm's input for k and v,
    the sigmoid's output; gate-up: the norm's input for up, and gate), and
    nothing held once backward ends. The norm's own backward expands its
    input once more: held for it, that input would sit beside the other
    consumers' gradients (tests/test_rebuild_peak.py). Where other rebuilds
    come between, the gradients are still the same."""
    from torch_mesa import quant
    from torch_mesa.ops import recipes

    x = with_outliers(4, 9, 48)
    grads, calls = {}, {}
    for cached in (True, False):
        torch.manual_seed(0)
        m = _Consumers(kind)
        compress_(m)
        if not cached:
            monkeypatch.setattr(recipes, "rebuilt", lambda rebuild, tensors: rebuild(tensors))
        n = [0]
        real = quant.expand

        def counting(*a, **k):
            n[0] += 1
            return real(*a, **k)

        monkeypatch.setattr(quant, "expand", counting)
        m(x.detach()).square().sum().backward()
        monkeypatch.undo()
        grads[cached] = [p.grad for p in m.parameters()]
        calls[cached] = n[0]
        assert not recipes._held
    for a, b in zip(grads[True], grads[False]):
        assert torch.equal(a, b)
    if saved is not None:
        assert calls[False] - calls[True] == saved, calls
    else:
        assert calls[True] <= calls[False], calls


@pytest.mark.parametrize("layout,calls_expected", [("rotated", 2), ("qkv-views", 1)])
def test_sdpa_keeps_q_k_v_by_fewer_quantizations(monkeypatch, layout, calls_expected):
    """SDPA's q and k, kept rotated, are quantized by one call and expanded
    by one; without the rotation (heads under 32 channels), q, k and v
    unbound from one projection's output are kept by one call over the view
    they share. Every range lies within one of them, so the codes, the
    gradients and the bytes kept are those of keeping each on its own."""
    from torch_mesa import quant
    from torch_mesa.ops import attention

    if layout == "rotated":
        leaves = q, k, v = tuple(with_outliers(3, 5, 33, 64, seed=s) for s in range(3))
    else:
        leaves = (with_outliers(3, 33, 3 * 5 * 16),)
        q, k, v = leaves[0].reshape(3, 33, 3, 5, 16).permute(2, 0, 3, 1, 4).unbind(0)
    g = torch.randn(q.shape)
    runs = {}
    for pair in (True, False):
        if not pair:
            monkeypatch.setattr(attention, "quantized_qkv", lambda *a, **kw: None)
        calls = {"compress": 0, "expand": 0}
        for name in calls:
            real = getattr(quant, name)
            monkeypatch.setattr(quant, name, lambda *a, _real=real, _name=name, **kw: (
                calls.__setitem__(_name, calls[_name] + 1), _real(*a, **kw))[1])
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = ops.scaled_dot_product_attention(q, k, v, config=MesaConfig())
        runs[pair] = (out, torch.autograd.grad(out, leaves, g), calls, sum(storages.values()))
        monkeypatch.undo()
    (out, grads, calls, kept), (out0, grads0, calls0, kept0) = runs[True], runs[False]
    assert torch.equal(out, out0) and all(torch.equal(a, b) for a, b in zip(grads, grads0))
    assert calls == {"compress": calls_expected, "expand": calls_expected}, calls
    assert calls0 == {"compress": 3, "expand": 3}, calls0
    assert kept == kept0


def _strided_heads(kind):
    """Queries or keys as attention code gets them: views of one projection's
    output (3 x 6 heads x 64 channels, 9 tokens, batch 2)."""
    qkv = with_outliers(2, 9, 3 * 6 * 64, requires_grad=False)
    heads = qkv.reshape(2, 9, 3, 6, 64)
    if kind == "bhnd":  # permuted to (B, H, N, D), as timm and SDPA callers do
        return heads.permute(2, 0, 3, 1, 4)[1]
    if kind == "bnhd":  # (B, N, H, D), a slice not yet transposed
        return heads[:, :, 1]
    if kind == "keys-t":  # k^T for q @ k^T: (B, H, D, N)
        return heads.permute(2, 0, 3, 1, 4)[1].transpose(-2, -1)
    return heads.permute(2, 0, 3, 1, 4)[1].contiguous()


@pytest.mark.parametrize("kind", ["bhnd", "bnhd", "keys-t", "contiguous"])
def test_rotation_is_one_fp32_product_for_every_layout(kind):
    """The q/k rotation gives ``x @ r`` in fp32 for strided views of a
    projection's output, into ``out`` or not, with bf16 autocast on or off:
    autocast would otherwise run it in bf16 (an error of 2^-9 of each value
    before the 8-bit codes are even taken)."""
    from torch_mesa.quant.reference import rotate_last

    x = _strided_heads(kind)
    r = _saved.rotation(x.shape[-1], x.device)  # (keys-t: 9 tokens, the QR rotation)
    want = (x.double() @ r.double()).float()
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = rotate_last(x, r)
            into = rotate_last(x, r, out=torch.empty(x.shape))
        for t in (got, into):
            assert t.dtype == torch.float32 and t.shape == x.shape
            torch.testing.assert_close(t, want, rtol=1e-5, atol=1e-5)  # fp32 sums of 64 products


@pytest.mark.parametrize("kind,dim", [("bhnd", -1), ("contiguous", -1), ("keys-t", -2)])
def test_kept_rotated_query_does_not_depend_on_autocast(kind, dim):
    """A query or key kept rotated (hand-written attention's ``q @ k^T``)
    has the same codes, and rebuilds to the same tensor, under bf16 autocast
    as without: the rotation is fp32 either way."""
    x = _strided_heads(kind)
    spec = MesaConfig().resolve("attn")
    kept = {}
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            recipe = _saved.quantized(x, spec, op="matmul", heads=True, rotate=dim)
        kept[autocast] = (recipe.tensors, recipe.rebuild(recipe.tensors))
    (t0, r0), (t1, r1) = kept[False], kept[True]
    assert all(torch.equal(a, b) for a, b in zip(t0, t1))
    assert torch.equal(r0, r1)
    assert sqnr_db(x, r0) > 30  # a kept copy of x, 8 bits per head and channel
