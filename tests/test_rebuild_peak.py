"""What backward holds of the tensors it rebuilds must not raise its peak.

A consumer's backward rebuilds its input from what the op before it kept,
and that rebuild can run a chain of cheap ops (a PVT MLP's fc2 rebuilds
GELU's output from the depthwise convolution's kept input, through the
convolution). The tensors of such a chain that later backwards use again
are held for them (:func:`torch_mesa.ops.recipes.rebuilt`); one held across
another op's backward sits beside that op's gradients. Each case here runs
one training step's backward in a fresh process twice, holding as the
library does and rebuilding every tensor each time it is used (the least
a backward can hold), and compares the two backwards' peaks, measured as
the resident set's high-water mark with every large allocation its own
mapping (so the resident set follows what is allocated, not what the
allocator kept). Same gradients, bit for bit, with fewer expansions (what
is held is used again); a peak at most half a hidden activation above
rebuilding every time (the rise a held hidden activation would cost is a
whole one: 24 MiB here, where the CPU's measurement moves by under 1 MiB
between runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

# (hidden activation: 1 x 64 x 64 tokens x 1536 channels, fp32: 24 MiB)
_TOKENS_SIDE, _WIDTH, _HIDDEN = 64, 96, 1536


class _Qkv(torch.nn.Module):
    """A norm whose output feeds three projections (Hugging Face's q, k, v)."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(_HIDDEN)
        self.q, self.k, self.v = (torch.nn.Linear(_HIDDEN, 64) for _ in range(3))

    def forward(self, x, feat_size):
        h = self.norm(x)
        return self.q(h) * self.k(h) + self.v(h)


def _model(kind: str) -> torch.nn.Module:
    from timm.layers import Mlp
    from timm.models.pvt_v2 import MlpWithDepthwiseConv

    if kind == "pvt mlp":
        return MlpWithDepthwiseConv(_WIDTH, _HIDDEN)
    if kind == "pvt mlp, extra relu":
        return MlpWithDepthwiseConv(_WIDTH, _HIDDEN, extra_relu=True)
    if kind == "vit mlp":
        return _FeatSize(Mlp(_WIDTH, _HIDDEN))
    if kind == "norm to q, k, v":
        return _Qkv()
    raise ValueError(kind)


class _FeatSize(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, feat_size):
        return self.inner(x)


def _child(kind: str, policy: str) -> None:
    from torch_mesa import compress_, quant
    from torch_mesa.measure import process_memory, reset_peak_rss
    from torch_mesa.ops import recipes

    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = _model(kind)
    compress_(m)
    if policy == "every time":
        recipes.rebuilt = lambda rebuild, tensors: rebuild(tensors)
    expansions = [0]
    real = quant.expand

    def counting(*a, **k):
        expansions[0] += 1
        return real(*a, **k)

    quant.expand = counting
    width = _HIDDEN if kind == "norm to q, k, v" else _WIDTH
    x = torch.randn(1, _TOKENS_SIDE * _TOKENS_SIDE, width) * (1 + 20 * (torch.rand(width) < 0.02))
    side = [_TOKENS_SIDE, _TOKENS_SIDE]
    for step in range(2):  # (the first compiles the quantizer)
        m.zero_grad(set_to_none=True)
        loss = m(x, side).square().mean()
        if step:
            reset_peak_rss()
            before = process_memory("VmRSS")
            reset = process_memory("VmHWM") - before  # (about 0 where the reset worked)
            expansions[0] = 0
        loss.backward()
    rise = process_memory("VmHWM") - before
    grads = hashlib.sha256(b"".join(p.grad.numpy().tobytes() for p in m.parameters())).hexdigest()
    print(json.dumps({"rise": rise, "reset": reset, "grads": grads, "expansions": expansions[0]}))


def _backward(kind: str, policy: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, kind, policy], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set from /proc")
@pytest.mark.parametrize("kind", ["pvt mlp", "pvt mlp, extra relu", "vit mlp", "norm to q, k, v"])
def test_what_backward_holds_raises_no_peak(kind):
    if kind != "norm to q, k, v":
        pytest.importorskip("timm")
    held = _backward(kind, "held")
    every = _backward(kind, "every time")
    hidden = _TOKENS_SIDE * _TOKENS_SIDE * _HIDDEN * 4
    if max(held["reset"], every["reset"]) > hidden / 8:
        pytest.skip("this kernel does not reset the resident set's high-water mark")
    assert held["grads"] == every["grads"]
    assert held["expansions"] < every["expansions"]  # (something was held and used again)
    assert held["rise"] <= every["rise"] + hidden / 2, (held["rise"] / 2**20, every["rise"] / 2**20)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
