"""``nn.MultiheadAttention`` and what is built on it (``nn.Transformer*``
layers, torchvision's ViT). Its forward is PyTorch's composite
``F.multi_head_attention_forward``, whose calls once ran with the routing mode
off: exact, and not compressed (torchvision's ViT kept 0.39x of its bytes,
its attention nothing less than unconverted). Its code now runs with the mode
on (``calls.composite_body``). Each variant: the forward bit for bit the
unconverted module's, every gradient within 30 dB of the exact one (8 bits),
and the attention's bytes cut."""

import copy

import pytest
import torch
from torch import nn

from torch_mesa import compress_, measure

from conftest import assert_grads_close, with_outliers

pytestmark = pytest.mark.usefixtures("reference_kernel")

E, H, L, S, N = 64, 4, 12, 9, 3

VARIANTS = {
    # name: (module kwargs, call kwargs builder, cross attention, batch_first)
    "self, no mask": ({}, lambda: {"need_weights": False}, False),
    "self, weights returned": ({}, lambda: {}, False),
    "self, weights per head": ({}, lambda: {"average_attn_weights": False}, False),
    "key padding, bool": ({}, lambda: {"key_padding_mask": _padding(L), "need_weights": False}, False),
    "key padding, float": ({}, lambda: {"key_padding_mask": _padding(L).float() * -1e4, "need_weights": False}, False),
    "causal, bool mask": ({}, lambda: {"attn_mask": _causal(L), "need_weights": False}, False),
    "causal, is_causal": ({}, lambda: {"attn_mask": _causal(L), "is_causal": True, "need_weights": False}, False),
    "3-D float mask and padding": ({}, lambda: {"attn_mask": torch.randn(N * H, L, L), "key_padding_mask": _padding(L),
                                                "need_weights": False}, False),
    "dropout": ({"dropout": 0.1}, lambda: {"need_weights": False}, False),
    "dropout, weights returned": ({"dropout": 0.1}, lambda: {}, False),
    "cross, kdim and vdim": ({"kdim": 24, "vdim": 40}, lambda: {"need_weights": False}, True),
    "cross, same dims, padding": ({}, lambda: {"key_padding_mask": _padding(S), "need_weights": False}, True),
    "bias_kv and zero attention": ({"add_bias_kv": True, "add_zero_attn": True}, lambda: {"need_weights": False}, False),
    "sequence first": ({"batch_first": False}, lambda: {"need_weights": False}, False),
}


def _padding(n):
    m = torch.zeros(N, n, dtype=torch.bool)
    m[0, -3:] = True
    m[2, -1:] = True
    return m


def _causal(n):
    return torch.ones(n, n, dtype=torch.bool).triu(1)


class _Wrap(nn.Module):
    """The module as a model calls it, with a Linear after it (a consumer)."""

    def __init__(self, mha):
        super().__init__()
        self.mha, self.head = mha, nn.Linear(E, 5)

    def forward(self, q, k, v, **kw):
        out, weights = self.mha(q, k, v, **kw)
        out = self.head(out)
        return out if weights is None else out + weights.mean() * 0.0 + weights.sum(-1).mean()


def _inputs(kwargs, cross, batch_first):
    kdim, vdim = kwargs.get("kdim", E), kwargs.get("vdim", E)
    q = with_outliers(N, L, E, seed=1, requires_grad=False)
    k = with_outliers(N, S, kdim, seed=2, requires_grad=False) if cross else q
    v = with_outliers(N, S, vdim, seed=3, requires_grad=False) if cross else q
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    return q, k, v


def _run(model, q, k, v, call, amp):
    leaves = [t.clone().requires_grad_() for t in dict.fromkeys((q, k, v))]  # (self-attention: one leaf)
    qkv = [leaves[[id(t) for t in dict.fromkeys((q, k, v))].index(id(t))] for t in (q, k, v)]
    torch.manual_seed(4)  # (dropout: the same draws)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(*qkv, **call)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out, leaves + params, g)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16 autocast"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_multihead_attention_is_routed_exactly(name, amp):
    kwargs, call, cross = VARIANTS[name]
    batch_first = kwargs.pop("batch_first", True) if "batch_first" in kwargs else True
    torch.manual_seed(0)
    plain = _Wrap(nn.MultiheadAttention(E, H, batch_first=batch_first, **kwargs))
    conv = copy.deepcopy(plain)
    compress_(conv)
    q, k, v = _inputs(kwargs, cross, batch_first)
    c = call()
    out, grads = _run(plain, q, k, v, c, amp)
    out_c, grads_c = _run(conv, q, k, v, c, amp)
    assert torch.equal(out_c, out), f"{name}: the forward differs from nn.MultiheadAttention's"
    if amp:  # against fp32, within 6 dB of what bf16 itself costs the unconverted module
        _, exact = _run(plain, q, k, v, c, False)
        assert_grads_close(grads_c, exact, min_db=30.0, low_precision=grads, what=name)
    else:
        assert_grads_close(grads_c, grads, min_db=30.0, what=name)
    if not amp:
        kept, kept_c = (measure(m.mha, q, k, v, **c).total_bytes for m in (plain, conv))
        assert kept_c < 0.5 * kept, f"{name}: kept {kept_c} of {kept} bytes"
    scope = conv._mesa_scope  # the calls inside the module were routed, none fell back
    assert scope.routed > 0 and not scope.fallbacks, (scope.routed, dict(scope.fallbacks))


@pytest.mark.parametrize("layer", ["encoder, post-norm", "encoder, pre-norm, gelu", "decoder"])
def test_transformer_layers_are_compressed(layer):
    torch.manual_seed(0)
    if layer == "decoder":
        plain = nn.TransformerDecoderLayer(E, H, 128, dropout=0.1, batch_first=True)
    else:
        plain = nn.TransformerEncoderLayer(E, H, 128, dropout=0.1, batch_first=True, norm_first="pre" in layer,
                                           activation="gelu" if "gelu" in layer else "relu")
    conv = copy.deepcopy(plain)
    compress_(conv)
    x = with_outliers(N, L, E, seed=1, requires_grad=False)
    mem = with_outliers(N, S, E, seed=2, requires_grad=False)
    call = (lambda m, t: m(t, mem, tgt_mask=_causal(L), tgt_is_causal=True)) if layer == "decoder" \
        else (lambda m, t: m(t, src_key_padding_mask=_padding(L)))
    res = []
    for m in (plain, conv):
        xi = x.clone().requires_grad_()
        torch.manual_seed(4)
        out = call(m, xi)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        res.append((out, torch.autograd.grad(out, [xi, *m.parameters()], g)))
    assert torch.equal(res[1][0], res[0][0])
    assert_grads_close(res[1][1], res[0][1], min_db=30.0, what=layer)
    kept = [measure(m, x) if layer != "decoder" else measure(m, x, mem) for m in (plain, conv)]
    assert kept[1].total_bytes < 0.25 * kept[0].total_bytes


def test_torchvision_vit_keeps_less():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    plain = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                                 mlp_dim=128, num_classes=10, dropout=0.1, attention_dropout=0.1)
    conv = copy.deepcopy(plain)
    compress_(conv)
    img = with_outliers(4, 3, 32, 32, seed=1, requires_grad=False)
    res = []
    for m in (plain, conv):
        torch.manual_seed(4)
        out = m(img)
        res.append((out, torch.autograd.grad(out.square().sum(), list(m.parameters()))))
    assert torch.equal(res[1][0], res[0][0])
    assert_grads_close(res[1][1], res[0][1], min_db=30.0, what="torchvision ViT")
    kept = [measure(m, img).by_module for m in (plain, conv)]
    attn = "encoder.layers.encoder_layer_0.self_attention"
    assert kept[1][attn] < 0.3 * kept[0][attn]
