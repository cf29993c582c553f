"""Gradient fidelity on realistic activations, not only at initialisation.

Trained models have sharp attention, outlier channels, tokens whose norms
differ by orders of magnitude, massive activations and many exact zeros. Two
levels: tiny models trained briefly inside the test (then every parameter's
gradient against the exact one on the trained weights), and ops on
constructed activations with each of those properties. Bar: cosine >= 0.999
per gradient at 8 bits, the project's fidelity target.
"""

import functools
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from torch_mesa import MesaConfig, ops, verify

from conftest import cosine

pytestmark = pytest.mark.usefixtures("reference_kernel")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention
    yield
    torch.set_num_threads(before)


# ------------------------------------------------- briefly trained models
def _arithmetic_text(n=3000):
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
             "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
    g = torch.Generator().manual_seed(0)
    pairs = torch.randint(0, 10, (n, 2), generator=g).tolist()
    return "\n".join(f"{words[a]} plus {words[b]} is {words[a + b]}." for a, b in pairs)


def _lm(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=40, n_positions=64, n_embd=64, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    return model


def _train_briefly(model, batches, loss_fn, steps=80, lr=1e-2):
    """A short, aggressive training run: enough for sharp attention and
    uneven channels to appear."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        loss = loss_fn(model, batches(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


def _briefly_trained_lm(kind, device="cpu"):
    """A character-level language model of ``kind`` trained briefly on the
    arithmetic text on ``device``; returns it, a held-out batch and its loss."""
    text = _arithmetic_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], device=device)

    def batch(step):
        starts = torch.randint(0, len(data) - 49, (8,), generator=torch.Generator().manual_seed(step))
        return torch.stack([data[s:s + 48] for s in starts.tolist()])

    def loss_fn(model, ids):
        return model(input_ids=ids, labels=ids).loss

    model = _lm(kind).to(device)
    first = loss_fn(model, batch(0)).item()
    last = _train_briefly(model, batch, loss_fn)
    assert last < 0.6 * first  # it did learn
    ids = batch(10**6)
    return model, lambda m: loss_fn(m, ids)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_briefly_trained_language_model(kind):
    model, loss = _briefly_trained_lm(kind)
    report = verify(model, loss, by_op=False)
    assert report.forward_equal
    assert report.ok, str(report)


def test_briefly_trained_vit_on_digits():
    pytest.importorskip("sklearn")
    from torch_mesa.tools.demo import build_model

    model = build_model(seed=0)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    report, _ = _trained_on_digits(model, batch_size=64, steps=120)
    assert report.ok, str(report)


def _trained_on_digits(model, *, batch_size, steps, **verify_kw):
    """Train ``model`` briefly on the digits; verify on a held-out batch.
    Returns the report and a function re-verifying with other arguments."""
    from torch_mesa.tools.demo import load_digits

    (x, y), _ = load_digits()

    def batch(step):
        idx = torch.randint(0, len(y), (batch_size,), generator=torch.Generator().manual_seed(step))
        return x[idx], y[idx]

    def loss_fn(model, b):
        return F.cross_entropy(model(b[0]), b[1])

    first = loss_fn(model, batch(0)).item()
    last = _train_briefly(model, batch, loss_fn, steps=steps, lr=3e-3)
    assert last < 0.6 * first  # it did learn
    b = batch(10**6)

    def check(**kw):
        return verify(model, lambda m: loss_fn(m, b), by_op=False, **kw)

    return check(**verify_kw), check


class _ConvHybrid(torch.nn.Module):
    """The conv layers of Mesa's model set in one small net for 8 x 8 digits:
    a conv stem with batch norm and SiLU, a ConvNeXt block (depthwise 7x7,
    channels-last LayerNorm, MLP) and a PVT-v2 MLP (Linear, depthwise 3x3
    on the token grid, GELU, Linear)."""

    def __init__(self, c=64):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.SiLU())
        self.dw7, self.ln1 = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.LayerNorm(c)
        self.mlp1 = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.ln2, self.fc1 = nn.LayerNorm(c), nn.Linear(c, 2 * c)
        self.dw3, self.act, self.fc2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c), nn.GELU(), \
            nn.Linear(2 * c, c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.mlp1(self.ln1(self.dw7(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        u = self.fc1(self.ln2(t)).transpose(1, 2).reshape(b, 2 * c, h, w)
        t = t + self.fc2(self.act(self.dw3(u).flatten(2).transpose(1, 2)))
        return self.head(t.mean(1))


def test_briefly_trained_conv_hybrid_on_digits(monkeypatch):
    """Convolutions, batch norm and depthwise keep-once on trained feature
    maps: every gradient within the bar, and the PVT-v2 GELU keeps nothing
    of its own (its input is rebuilt from the depthwise convolution's)."""
    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    report, check = _trained_on_digits(_ConvHybrid(), batch_size=32, steps=100)
    assert report.forward_equal
    assert report.ok, str(report)
    # with no convolution taken as cheap, the GELU keeps its own copy of the
    # hidden map: 2c = 128 codes per position, 32 x 64 positions
    monkeypatch.setattr(sys.modules["torch_mesa.ops.conv"], "_CHEAP_MACS", 0)
    apart = check()
    assert apart.ok, str(apart)
    assert report.kept_converted <= apart.kept_converted - 32 * 64 * 128, (report.kept_converted,
                                                                           apart.kept_converted)


# ------------------------------------------- constructed activations, per op
CFG = MesaConfig()
B, H, N, D = 2, 4, 96, 64


def _attention(kind, seed=0):
    """q, k, v (B, H, N, D) with one property of trained attention each."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, N, D, generator=g)
    q = torch.randn(B, H, N, D, generator=g)
    v = torch.randn(B, H, N, D, generator=g)
    if kind == "sharp":  # each query points hard at one earlier key: entropy ~0.1
        target = torch.randint(0, N, (B, H, N, 1), generator=g).clamp(max=torch.arange(N).view(1, 1, N, 1))
        q = 12 * torch.gather(k, 2, target.expand(-1, -1, -1, D)) / math.sqrt(D) + q
    elif kind == "outlier_channels":  # a few rotary channel pairs 10x the rest, in q and k
        idx = torch.tensor([3, 3 + D // 2, 17, 17 + D // 2])
        q[..., idx] *= 10
        k[..., idx] *= 10
    elif kind == "key_offset":  # keys share a large offset (softmax ignores it)
        k = k + 4 * torch.randn(1, H, 1, D, generator=g)
    elif kind == "zeros":  # padded tokens: exact zeros in q, k, v
        for t in (q, k, v):
            t[1, :, -20:] = 0
    elif kind == "token_norms":  # token norms varying 10x (softer attention)
        q = q * torch.exp(0.8 * torch.randn(B, 1, N, 1, generator=g)) / 2
        k = k * torch.exp(0.8 * torch.randn(B, 1, N, 1, generator=g)) / 2
    return q, k, v


@pytest.mark.parametrize("kind", ["sharp", "outlier_channels", "key_offset", "zeros", "token_norms"])
def test_attention_on_trained_like_inputs(kind):
    q, k, v = _attention(kind)
    go = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(9))
    grads = []
    for fn in (F.scaled_dot_product_attention,
               lambda *t, **kw: ops.scaled_dot_product_attention(*t, config=CFG, **kw)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        grads.append(torch.autograd.grad(fn(*leaves, is_causal=True), leaves, go))
    for name, got, exact in zip("qkv", grads[1], grads[0]):
        assert cosine(got, exact) >= 0.999, (kind, name, cosine(got, exact))


def _mlp_input(kind, seed=0, n=128, c=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, c, generator=g)
    if kind == "outlier_channels":
        x[..., torch.randperm(c, generator=g)[:4]] *= 20
    elif kind == "massive":  # a few tokens 300x in two channels (Sun et al.)
        ch = torch.randperm(c, generator=g)[:2]
        x[:, ::31, ch] = 300.0
    elif kind == "token_norms":
        x = x * torch.exp(torch.randn(B, n, 1, generator=g))
    elif kind == "zeros":
        x = torch.relu(x)
        x[1, -30:] = 0
    elif kind == "residual":  # a large residual stream with a shared offset per channel
        x = 30 * x + 100 * torch.randn(1, 1, c, generator=g)
    return x


@pytest.mark.parametrize("kind", ["outlier_channels", "massive", "token_norms", "zeros", "residual"])
@pytest.mark.parametrize("chain", ["swiglu", "rmsnorm_linear", "gelu_mlp"])
def test_mlp_chains_on_trained_like_inputs(chain, kind):
    x = _mlp_input(kind)
    c = x.shape[-1]
    g = torch.Generator().manual_seed(5)
    w1 = torch.randn(c, c, generator=g) / math.sqrt(c)
    w2 = torch.randn(64, c, generator=g) / math.sqrt(c)
    nw = 1 + 0.1 * torch.randn(c, generator=g)
    go = torch.randn(B, x.shape[1], 64, generator=g)

    def run(exact, x, w1, w2, nw):
        if chain == "swiglu":
            up = F.linear(x, w1) if exact else ops.linear(x, w1, config=CFG)
            h = F.silu(x) * up if exact else ops.gated(x, up, config=CFG)
        elif chain == "rmsnorm_linear":
            h = F.rms_norm(x, (c,), nw) if exact else ops.rms_norm(x, (c,), nw, config=CFG)
            h = F.linear(h, w1) if exact else ops.linear(h, w1, config=CFG)
        else:
            h = F.linear(x, w1) if exact else ops.linear(x, w1, config=CFG)
            h = F.gelu(h) if exact else ops.gelu(h, config=CFG)
        return F.linear(h, w2) if exact else ops.linear(h, w2, config=CFG)

    results = []
    for exact in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2, nw)]
        out = run(exact, *leaves)
        results.append(torch.autograd.grad(out, leaves, go, allow_unused=True))
    for name, got, want in zip(("x", "w1", "w2", "norm weight"), results[1], results[0]):
        if want is None:
            continue
        assert cosine(got, want) >= 0.999, (chain, kind, name, cosine(got, want))


# ------------------------------------- tokens far larger than the rest
#
# A channel's scale was its largest magnitude over the batch, so a few tokens
# thousands of times the others (massive activations, on start and delimiter
# tokens of trained language models) set it alone, and every other token's
# value in those channels rounded to 0: the weight gradient's columns kept
# only the large tokens' share. Where those tokens' own output gradients are
# small, as an attention sink's are, that was most of the gradient (Linear
# weight SQNR 6 dB with one token 1000x at 512 channels). The variants:
# where the large values sit (every channel of one token, two channels of
# several, one position of a feature map), the op that keeps them, the
# width, the dtype; and a token far *smaller* than the rest as a control.

def _sink_batch(kind, c, seed=0):
    """(x, large) for a (B, N, c) input with tokens far larger than the rest
    (``large``: their mask), or one far smaller (the control)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 128, c, generator=g)
    large = torch.zeros(B, 128, dtype=torch.bool)
    if kind == "one token 1000x":
        large[0, 5] = True
        x[large] *= 1000
    elif kind == "two channels at 300":  # start token and every 31st (Sun et al.)
        large[:, ::31] = True
        ch = torch.randperm(c, generator=g)[:2]
        x[:, ::31, ch] = 300.0
    elif kind == "one token 1000x smaller":
        x[0, 5] /= 1000
    return x, large


def _columns_close(got, want, what):
    """Every input channel's column of a weight gradient (input channels last), not only the whole."""
    col = F.cosine_similarity(got.double(), want.double(), dim=0)
    assert col.min() >= 0.99, (what, "worst column", col.min().item(), int(col.argmin()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c", [64, 512])
@pytest.mark.parametrize("chain", ["linear", "swiglu"])
@pytest.mark.parametrize("kind", ["one token 1000x", "two channels at 300", "one token 1000x smaller"])
def test_tokens_far_larger_than_the_rest(kind, chain, c, dtype):
    x, large = _sink_batch(kind, c)
    g = torch.Generator().manual_seed(5)
    w1 = torch.randn(c, c, generator=g) / math.sqrt(c)
    w2 = torch.randn(64, c, generator=g) / math.sqrt(c)
    go = torch.randn(B, x.shape[1], 64, generator=g)
    go[large] *= 1e-3  # the large tokens' own gradients are small, as an attention sink's are
    x, w1, w2 = (t.to(dtype).float() for t in (x, w1, w2))  # (the same values in every run)

    def run(converted, x, w1, w2):
        linear = functools.partial(ops.linear, config=CFG) if converted else F.linear
        h = x
        if chain == "swiglu":  # the down projection's input: massive where gate and up are
            h = ops.gated(x, linear(x, w1), config=CFG) if converted else F.silu(x) * linear(x, w1)
        return linear(h, w2)

    results = []
    for converted, run_dtype in ((False, torch.float32), (False, dtype), (True, dtype)):
        leaves = [t.to(run_dtype).requires_grad_() for t in (x, w1, w2)]
        out = run(converted, *leaves).float()
        results.append([None if t is None else t.float()
                        for t in torch.autograd.grad(out, leaves, go, allow_unused=True)])
    for i, name in enumerate(("x", "w1", "w2")):
        want, plain, got = (r[i] for r in results)
        if want is None:
            continue
        # bar: cosine 0.999 to the fp32 gradient; in bf16, within 0.001 of
        # what the unconverted bf16 computation reaches (as verify judges)
        bar = 0.999 if dtype == torch.float32 else cosine(plain, want) - 0.001
        assert cosine(got, want) >= bar, (kind, chain, name, cosine(got, want), bar)
        if name != "x" and dtype == torch.float32:
            _columns_close(got, want, (kind, chain, name))


@pytest.mark.parametrize("c", [64, 256])
@pytest.mark.parametrize("kind", ["one position 1000x", "one position 1000x smaller"])
def test_feature_map_positions_far_larger_than_the_rest(kind, c):
    """The same in a convolution's channels-first input (kept as its
    channels-last view: per channel, then each position scaled)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, c, 16, 16, generator=g)
    x[0, :, 3, 3] *= 1000 if kind == "one position 1000x" else 1e-3
    w = torch.randn(64, c, 3, 3, generator=g) / (3 * math.sqrt(c))
    go = torch.randn(4, 64, 16, 16, generator=g)
    go[0, :, 2:5, 2:5] *= 1e-3  # the outputs the large position reaches
    grads = []
    for exact in (True, False):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = F.conv2d(xs, ws, padding=1) if exact else ops.conv(xs, ws, None, 1, 1, config=CFG)
        grads.append(torch.autograd.grad(out, (xs, ws), go))
    for name, got, want in zip(("x", "weight"), grads[1], grads[0]):
        assert cosine(got, want) >= 0.999, (kind, name, cosine(got, want))
    _columns_close(*(g[1].permute(0, 2, 3, 1).reshape(-1, c) for g in (grads[1], grads[0])), kind)


@pytest.mark.parametrize("value", [
    300.0, 1000.0,
    # the limit: a channel's scale is capped at 8x its mean magnitude, and
    # here the start tokens alone (1 row in 256, 3000 against the other
    # rows' mean magnitude of about 0.03 there) raise that mean 400-fold
    pytest.param(3000.0, marks=pytest.mark.xfail(strict=True, reason="massive values beyond the cap's reach")),
])
def test_llama_with_massive_activations_at_the_start_token(value):
    """A Llama whose first down projection makes the start token massive in
    two channels, as trained language models do (Sun et al.): the values
    enter the down projection's input, the residual stream then carries
    them, and every later norm divides that token's gradient by its huge
    norm. Before the channel scale was capped, the other 255 tokens' values
    in those two channels rounded to 0 (down projection weight 0.9985). The
    model is benchmarks/massive.py's, which reports the same cases."""
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("massive", ROOT / "benchmarks" / "massive.py")
    massive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(massive)
    name, cos, ok = massive.llama_worst(value)
    assert ok, (value, name, cos)
