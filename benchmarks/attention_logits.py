"""Attention with very large logits: where the rerun from 8-bit q, k, v stops being faithful.

SDPA's backward reruns attention from q, k and v kept at 8 bits, so a score
carries an absolute error of about |q| |k| / 2^8, and a softmax turns an
absolute score error into a relative error of its probabilities. That is
harmless while scores span a few units and grows with them. This measures
the gradients of q, k, v (cosine to the exact ones, 8 bits, default
configuration) as the largest score grows, two ways: outlier channels in
both q and k (two channels f times the rest; a query channel f times larger
multiplies the key's error on that channel), and an attention sink (one key
f^1.5 times longer, aligned with the queries), for head dimensions 16 (not
rotated) and 64 (rotated).

    python benchmarks/attention_logits.py
"""

import torch
import torch.nn.functional as F

from torch_mesa import MesaConfig, ops

B, H, N = 2, 4, 128


def inputs(kind, d, f, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, d, generator=g) for _ in range(3))
    if kind == "outlier channels":
        q[..., :2] *= f
        k[..., :2] *= f
    else:  # a sink: one key along the queries' shared direction
        direction = torch.randn(d, generator=g)
        direction /= direction.norm()
        q = q + f * direction
        k[:, :, 0] = f * f**0.5 * direction * d**0.5 / 4
    return q, k, v


def cosine(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def main():
    torch.manual_seed(0)
    cfg = MesaConfig()
    print("| inputs | head dim | f | largest score | mean largest probability | q | k | v |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in ("outlier channels", "sink"):
        for d in (16, 64):
            for f in (1, 5, 10, 20, 40):
                q, k, v = inputs(kind, d, f)
                go = torch.randn(B, H, N, d, generator=torch.Generator().manual_seed(1))
                grads = []
                for fn in (F.scaled_dot_product_attention,
                           lambda *t: ops.scaled_dot_product_attention(*t, config=cfg)):
                    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                    grads.append(torch.autograd.grad(fn(*leaves), leaves, go))
                scores = q @ k.transpose(-1, -2) / d**0.5
                top = scores.softmax(-1).amax(-1).mean().item()
                cells = " | ".join(f"{cosine(a, b):.5f}" for a, b in zip(grads[1], grads[0]))
                print(f"| {kind} | {d} | {f} | {scores.abs().max().item():.0f} | {top:.3f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
