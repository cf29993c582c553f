"""Why the attention backward reruns the forward: gradients from kept q, k, v, with and without the rerun.

The scaled-dot-product backward needs the attention output ``out`` and the row log-sum-exp
``lse``. torch-mesa keeps q, k and v (8 bits, per head and channel, q and k rotated) and reruns the
forward from them in backward, which costs one more attention forward per step (the largest
single item of the converted step's extra time: benchmarks/step_profile.py). The alternative
that costs no forward: the backward kernel given the kept q, k, v, the output as the next
projection keeps it anyway (8 bits per channel, token-scaled), and the exact ``lse`` (4 bytes per
head and token). It mixes statistics of the exact forward with kept operands: the rows of the
rebuilt probabilities no longer sum to 1, and ``rowsum(dO * out)`` no longer matches them, an
error the keys' common component multiplies.

Inputs: attention with what trained models have (a few outlier channels in q and k, a large
component shared by all keys of a head, sharper softmax), several variants. Printed: the cosine
of each gradient (dq, dk, dv) to the exact one, for both ways.

    python benchmarks/attention_backward_study.py
"""

import sys

import torch
import torch.nn.functional as F

from torch_mesa import MesaConfig
from torch_mesa.ops import recipes

VARIANTS = {
    "outlier channels": dict(),
    "+ shared key component x10": dict(key_mean=10.0),
    "+ sharper softmax (x3)": dict(sharp=3.0),
    "both": dict(sharp=3.0, key_mean=10.0),
    "small queries (x0.2)": dict(q_scale=0.2),
    "64 tokens, sharp x4, key component x20": dict(tokens=64, sharp=4.0, key_mean=20.0),
}


def _kept(x, spec, **kw):
    recipe = recipes.quantized(x.detach(), spec, op="attention", **kw)
    return recipe.rebuild(recipe.tensors)


def _cos(a, b) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def study(batch=8, heads=6, tokens=197, dim=64, key_mean=3.0, q_scale=1.0, sharp=1.0, seed=0):
    spec = MesaConfig().resolve("attn")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tokens, dim, generator=g) * q_scale
    k = torch.randn(batch, heads, tokens, dim, generator=g) + key_mean * torch.randn(1, heads, 1, dim, generator=g)
    q[..., :2] *= 8
    k[..., :2] *= 8
    q = q * sharp
    v = torch.randn(batch, heads, tokens, dim, generator=g)
    v[..., 5] *= 10
    grad_out = torch.randn(batch, heads, tokens, dim, generator=g)

    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*leaves)[:2]
    exact = torch.autograd.grad(out, leaves, grad_out)

    qk = _kept(q, spec, heads=True, rotate=-1)
    kk = _kept(k, spec, heads=True, rotate=-1)
    vk = _kept(v, spec, heads=True)
    rerun_leaves = tuple(t.clone().requires_grad_() for t in (qk, kk, vk))
    rerun = torch.autograd.grad(F.scaled_dot_product_attention(*rerun_leaves), rerun_leaves, grad_out)

    # the output as the projection after attention keeps it: (B, N, C), per channel
    flat = out.detach().transpose(1, 2).reshape(batch, tokens, heads * dim)
    out_kept = _kept(flat, spec).reshape(batch, tokens, heads, dim).transpose(1, 2)
    no_rerun = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, qk, kk, vk, out_kept, lse.detach(), 0.0, False)[:3]
    return [_cos(a, e) for a, e in zip(rerun, exact)], [_cos(b, e) for b, e in zip(no_rerun, exact)]


def main() -> int:
    print("| inputs | rerun the forward: dq / dk / dv | kept output, exact lse: dq / dk / dv |")
    print("|---|---|---|")
    for name, kw in VARIANTS.items():
        rerun, no_rerun = study(**kw)
        print(f"| {name} | {' / '.join(f'{c:.4f}' for c in rerun)} | {' / '.join(f'{c:.4f}' for c in no_rerun)} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
