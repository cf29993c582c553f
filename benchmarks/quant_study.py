"""Quantizer layouts on realistic activation patterns: op-level gradient SQNR.

The study behind the quantizer's defaults (docs/design.md, "Training quality:
the study"). Two op chains, 8 bits, against exact fp32 gradients:

* SwiGLU into a down projection (``down(silu(gate) * up)``): gradients of the
  down projection's weight, of gate and of up, on patterns that trained
  language models show: Gaussian (``plain``), a few outlier channels 20x the
  rest (``chan``), massive activations (a few tokens 300x in two channels,
  the same channels in gate and up: ``massive``), token norms varying 30x
  (``tokscale``), and their combinations;
* a norm into a Linear (``linear(rms_norm(x))``) on the same patterns.

Compared: per-channel ranges (``token_scale=False``), the default
(per-channel ranges after a channel scale and a token scale), and stochastic
rounding.

    python benchmarks/quant_study.py
"""

import math

import torch
import torch.nn.functional as F

from torch_mesa import MesaConfig, ops

B, N, C = 4, 128, 256


def sqnr(a, e):
    noise = (a.double() - e.double()).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(e.double().pow(2).sum().item() / noise)


def pattern(kind, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g)
    if "chan" in kind:
        x[..., torch.randperm(C, generator=torch.Generator().manual_seed(99))[: C // 64]] *= 20
    if "massive" in kind:
        ch = torch.randperm(C, generator=torch.Generator().manual_seed(98))[:2]
        for t in [0] + list(range(7, N, 31)):
            x[:, t, ch] = 300.0
    if "tokscale" in kind:
        x = x * torch.exp(torch.randn(B, N, 1, generator=g) * 1.2)
    return x


def swiglu_grads(gate, up, w, go, cfg):
    gate, up, w = (t.clone().requires_grad_() for t in (gate, up, w))
    if cfg is None:
        out = F.linear(F.silu(gate) * up, w)
    else:
        out = ops.linear(ops.gated(gate, up, config=cfg), w, config=cfg)
    return torch.autograd.grad(out, [w, gate, up], go)


def norm_grads(x, nw, w, go, cfg):
    x, nw, w = (t.clone().requires_grad_() for t in (x, nw, w))
    if cfg is None:
        out = F.linear(F.rms_norm(x, (C,), nw), w)
    else:
        out = ops.linear(ops.rms_norm(x, (C,), nw, config=cfg), w, config=cfg)
    return torch.autograd.grad(out, [x, nw, w], go)


LAYOUTS = {
    "per channel": MesaConfig(token_scale=False),
    "default (channel, then token scale)": MesaConfig(),
    "stochastic, per channel": MesaConfig(token_scale=False, rounding="stochastic"),
}
PATTERNS = ["plain", "chan", "massive", "tokscale", "chan+massive+tokscale"]


def attention_inputs(sharp, tokscale, seed=4):
    """q, k, v (B, H, N, D) with sharp attention: each query points at one
    earlier key (``sharp`` sets how hard), keys with a shared offset and, with
    ``tokscale``, token norms varying 10x."""
    g = torch.Generator().manual_seed(seed)
    H, D = 4, 64
    k = torch.randn(B, H, N, D, generator=g) + 0.5
    target = torch.randint(0, N, (B, H, N, 1), generator=g).clamp(max=torch.arange(N).view(1, 1, N, 1))
    q = sharp * torch.gather(k, 2, target.expand(-1, -1, -1, D)) / math.sqrt(D) + torch.randn(B, H, N, D, generator=g)
    if tokscale:
        q = q * torch.exp(torch.randn(B, 1, N, 1, generator=g) * 0.8)
        k = k * torch.exp(torch.randn(B, 1, N, 1, generator=g) * 0.8)
    v = torch.randn(B, H, N, D, generator=g)
    return q, k, v


def sdpa_grads(q, k, v, go, cfg):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    if cfg is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = ops.scaled_dot_product_attention(q, k, v, is_causal=True, config=cfg)
    return torch.autograd.grad(out, [q, k, v], go)


def row(label, grads_fn, *inputs):
    """One table row: SQNR (dB) of each gradient ``grads_fn`` returns, per
    layout, against the exact gradients (``cfg=None``)."""
    exact = grads_fn(*inputs, None)
    cells = [" / ".join(f"{sqnr(a, e):5.1f}" for a, e in zip(grads_fn(*inputs, cfg), exact))
             for cfg in LAYOUTS.values()]
    return f"{label:24s}" + "".join(f"{c:>38s}" for c in cells)


def main():
    torch.manual_seed(0)
    w = torch.randn(64, C) / 16
    go = torch.randn(B, N, 64)
    print("SwiGLU -> down projection: SQNR (dB) of the gradients of down weight / gate / up")
    print(f"{'pattern':24s}" + "".join(f"{k:>38s}" for k in LAYOUTS))
    for kind in PATTERNS:
        gate = pattern(kind, 1)
        up = torch.where(gate.abs() > 100, 150 * torch.sign(gate), pattern(kind.replace("massive", ""), 2) * 0.5)
        print(row(kind, swiglu_grads, gate, up, w, go))
    print("\nRMSNorm -> Linear: SQNR (dB) of the gradients of x / norm weight / Linear weight")
    nw = 1 + 0.1 * torch.randn(C)
    for kind in PATTERNS:
        x = pattern(kind, 3)
        print(row(kind, norm_grads, x, nw, w, go))
    print("\nCausal SDPA, 4 heads of 64: SQNR (dB) of the gradients of q / k / v")
    for sharp, tokscale in ((4.0, False), (12.0, False), (12.0, True)):
        q, k, v = attention_inputs(sharp, tokscale)
        p = torch.softmax((q @ k.transpose(-2, -1)) / 8 + torch.full((N, N), float("-inf")).triu(1), -1)
        entropy = -(p.clamp_min(1e-12).log() * p).sum(-1).mean().item()
        go = torch.randn_like(q)
        print(row(f"entropy {entropy:.2f}{' tokscale' if tokscale else ''}", sdpa_grads, q, k, v, go))


if __name__ == "__main__":
    main()
