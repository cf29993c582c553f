"""Safe to leave running: composition with PyTorch's training machinery,
mixed precision, checkpoints, faults and bad input."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from torch_mesa import MesaConfig, compress_
from torch_mesa.tools.models import VisionTransformer

from conftest import cosine, sqnr_db

pytestmark = pytest.mark.usefixtures("reference_kernel")


def tiny(drop=0.0, fused_attn=True):
    torch.manual_seed(0)
    return VisionTransformer(image_size=16, patch_size=4, num_classes=10, dim=32, depth=2, heads=2,
                             drop=drop, fused_attn=fused_attn)


def data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def grads(model, x, y, **backward_kw):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward(**backward_kw)
    return [p.grad.clone() for p in model.parameters()]


def assert_close_grads(a, b, bar=0.999):
    for u, v in zip(a, b):
        assert cosine(u, v) >= bar


# ------------------------------------------------------- mixed precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_unconverted_under_the_same_regime(dtype):
    plain, x_y = tiny(), data()
    conv = copy.deepcopy(plain)
    compress_(conv)
    exact = grads(plain, *x_y)  # fp32 reference
    out = {}
    for name, m in (("plain", plain), ("conv", conv)):
        with torch.autocast("cpu", dtype=dtype):
            logits = m(x_y[0])
        out[name] = logits
        m.zero_grad(set_to_none=True)
        F.cross_entropy(logits.float(), x_y[1]).backward()
    assert torch.equal(out["plain"], out["conv"])
    for e, p, c in zip(exact, [p.grad for p in plain.parameters()], [p.grad for p in conv.parameters()]):
        # within 6 dB of the low-precision run's own error against fp32
        assert sqnr_db(c, e) >= min(30.0, sqnr_db(p, e) - 6.0)


def test_fp16_autocast_with_grad_scaler_trains_like_unconverted():
    plain = tiny()
    conv = copy.deepcopy(plain)
    compress_(conv)
    losses = {}
    for name, m in (("plain", plain), ("conv", conv)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        losses[name] = []
        for step in range(5):
            x, y = data(seed=step)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(m(x).float(), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses[name].append(loss.item())
    for a, b in zip(losses["plain"], losses["conv"]):
        assert abs(a - b) < 0.02 * abs(a)


def test_model_cast_to_bf16():
    plain = tiny().to(torch.bfloat16)
    conv = copy.deepcopy(plain)
    compress_(conv)
    x, y = data()
    x = x.to(torch.bfloat16)
    assert torch.equal(plain(x), conv(x))
    g_plain, g_conv = grads(plain, x, y), grads(conv, x, y)
    for p, c in zip(g_plain, g_conv):
        assert p.dtype == c.dtype == torch.bfloat16
    assert_close_grads(g_plain, g_conv, bar=0.99)  # bf16 gradients carry ~8 bits themselves


# ------------------------------------------------------------- composition
@pytest.mark.parametrize("reentrant", [False, True])
def test_torch_checkpoint_composes(reentrant):
    plain = tiny()
    conv = copy.deepcopy(plain)
    compress_(conv)
    blocks = list(conv.blocks)

    def forward(x):
        x = conv.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([conv.cls_token.expand(x.shape[0], -1, -1), x], 1) + conv.pos_embed
        for b in blocks:
            x = checkpoint(b, x, use_reentrant=reentrant)
        return conv.head(conv.norm(x)[:, 0])

    x, y = data()
    exact = grads(plain, x, y)
    conv.zero_grad(set_to_none=True)
    F.cross_entropy(forward(x), y).backward()
    assert_close_grads(exact, [p.grad for p in conv.parameters()])


def test_retain_graph_gives_the_same_gradients_twice():
    conv = tiny()
    compress_(conv)
    x, y = data()
    loss = F.cross_entropy(conv(x), y)
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in conv.parameters()]
    conv.zero_grad()
    loss.backward()
    for a, b in zip(first, [p.grad for p in conv.parameters()]):
        assert torch.equal(a, b)


def test_save_on_cpu_offloads_the_compressed_tensors():
    conv = tiny()
    compress_(conv)
    x, y = data()
    ref = grads(conv, x, y)
    seen = []

    def pack(t):
        seen.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(conv(x), y)
    with torch.autograd.graph.save_on_cpu(pin_memory=False):
        conv.zero_grad()
        F.cross_entropy(conv(x), y).backward()
    for a, b in zip(ref, [p.grad for p in conv.parameters()]):
        assert torch.equal(a, b)
    assert seen.count(torch.uint8) >= 10  # what an offloading hook sees are the codes
    del loss


def test_double_backward_is_refused_clearly():
    conv = tiny()
    compress_(conv)
    x, y = data()
    loss = F.cross_entropy(conv(x), y)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, list(conv.parameters()), create_graph=True)


# ---------------------------------------------------------------- checkpoints
def test_state_dict_resume_continues_exactly():
    def train(model, opt, steps, start):
        for s in range(start, start + steps):
            x, y = data(seed=s)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    model = tiny()
    compress_(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, opt, 3, 0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 2, 3)

    resumed = tiny()  # a plain model: the checkpoint is a plain one
    compress_(resumed)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    buf.seek(0)
    state = torch.load(buf)
    resumed.load_state_dict(state["model"], strict=True)
    opt2.load_state_dict(state["opt"])
    train(resumed, opt2, 2, 3)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ faults
def test_nan_in_activations_reaches_the_gradients_like_exact_training():
    for config in (MesaConfig(), MesaConfig(range_estimate="running")):
        plain = tiny()
        conv = copy.deepcopy(plain)
        compress_(conv, config)
        x, y = data()
        grads(conv, x, y)  # a clean step first (running estimates start)
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        g_plain, g_conv = grads(plain, bad, y), grads(conv, bad, y)
        for p, c in zip(g_plain, g_conv):
            assert torch.isnan(p).any() == torch.isnan(c).any()
        # and the next clean step is clean again (no poisoned estimates)
        after = grads(conv, x, y)
        assert all(torch.isfinite(g).all() for g in after)
        assert_close_grads(grads(plain, x, y), after)


def test_grad_scaler_skips_an_overflowing_step_as_it_would_unconverted():
    conv = tiny()
    compress_(conv)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in conv.parameters()]
    x, y = data()
    x[0, 0, 0, 0] = float("inf")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(conv(x).float(), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**10  # overflow seen: scale reduced
    for a, b in zip(before, conv.parameters()):
        assert torch.equal(a, b)  # step skipped


def test_zero_size_batch():
    plain = tiny()
    conv = copy.deepcopy(plain)
    compress_(conv)
    x = torch.randn(0, 3, 16, 16)
    out = conv(x)
    assert out.shape == (0, 10) and torch.equal(out, plain(x))
    out.sum().backward()
    assert all(p.grad is None or torch.equal(p.grad, torch.zeros_like(p)) for p in conv.parameters())


@pytest.mark.parametrize("value", [1e30, 1e-30, 0.0, 3.0])
def test_extreme_and_constant_activations(value):
    lin = torch.nn.Linear(7, 5)
    compress_(lin)
    x = torch.full((3, 11, 7), value, requires_grad=True)
    x.data[0, 0, 0] = value * 1.5
    out = lin(x)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, lin.weight), g)
    ref_gw = g.reshape(-1, 5).t() @ x.detach().reshape(-1, 7)
    assert torch.isfinite(gw).all()
    assert sqnr_db(gw, ref_gw) > 30 or torch.equal(gw, ref_gw)


def test_group_size_larger_than_channels_and_ragged_groups():
    for gs in (1, 3, 64, None):
        lin = torch.nn.Linear(10, 4)
        compress_(lin, MesaConfig(group_size=gs))
        x = torch.randn(6, 10, requires_grad=True)
        (gw,) = torch.autograd.grad(lin(x).sum(), lin.weight)
        ref = torch.ones(6, 4).t() @ x.detach()
        assert sqnr_db(gw, ref) > 30
