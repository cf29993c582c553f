"""Memory stays flat from step to step: nothing a converted model runs keeps
tensors alive after the step that made them.

A saved-tensor pack hook that keeps the live tensor it is given keeps that
tensor's ``grad_fn``; for a tensor its own op saves (an output), that is a
reference cycle through C++ which Python's collector cannot see. It is broken
when backward releases the graph, never when the graph is dropped without a
backward. The converted attention ran its forward under such a hook in a
small graph it drops at once: every call left the projection's output, q, k,
v and the attention output alive, for good (found on a GPU as a peak far
above what the model keeps). ``measure`` and the compiled saving's hook for
uncompiled code had the same pattern.

Each case runs a few steps (a warm-up, then the measured steps) and counts
the bytes of every distinct storage of a tensor Python can reach
(``torch_mesa.measure.live_tensor_bytes``, as ``benchmarks/soak.py`` does):
a leak of even one tensor per step shows.
Variants: the attention op's kinds of call (masks, causal, grouped, dropout,
no heads) in fp32 and under bf16 autocast; models (timm ViT with attention
dropout, a Llama with the fused language-model loss); training steps and
forwards without a backward (a validation loss computed with gradients on);
``measure``; and ``torch_mesa.compile`` with code Dynamo leaves uncompiled inside a block.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_mesa
from torch_mesa import MesaConfig, compress_, ops
from torch_mesa.measure import live_tensor_bytes

from conftest import with_outliers
from test_ops import _dropout_case

CFG8 = MesaConfig(bits=8)


def _growth(step, warmup: int = 2, steps: int = 3) -> int:
    for _ in range(warmup):
        step()
    before = live_tensor_bytes()
    for _ in range(steps):
        step()
    return live_tensor_bytes() - before


_AMP = {"fp32": False, "bf16 autocast": True}
_VARIANTS = ["plain", "gqa", "bool mask, a row fully masked", "-inf float mask", "causal, scaled",
             "no heads (3-D)"]


@pytest.mark.parametrize("backward", [True, False], ids=["training", "forward only"])
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no dropout", "dropout"])
@pytest.mark.parametrize("amp", list(_AMP))
@pytest.mark.parametrize("variant", _VARIANTS)
def test_attention_keeps_nothing_after_its_step(variant, amp, dropout, backward):
    q0, k0, v0, kw = _dropout_case(variant)
    w = torch.randn(16, 16, requires_grad=True)

    def step():
        # q, k, v as views of one projection's output, as models make them
        x = torch.cat([q0, k0, v0], dim=-2) if q0.shape == k0.shape else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_AMP[amp]):
            if x is not None:
                q, k, v = F.linear(x.detach(), w).split(q0.shape[-2], dim=-2)
            else:
                q, k, v = (F.linear(t.detach(), w) for t in (q0, k0, v0))
            out = ops.scaled_dot_product_attention(q, k, v, dropout_p=dropout, config=CFG8, **kw)
        if backward:
            out.float().sum().backward()
            w.grad = None

    assert _growth(step) == 0


def _vit(dropout: float = 0.0):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                          drop_rate=dropout, attn_drop_rate=dropout)
    return m, (torch.randn(4, 3, 32, 32),), {}, lambda out: out.float().sum()


def _vit_dropout():
    return _vit(0.1)


def _llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    return transformers.LlamaForCausalLM(cfg), (), {"input_ids": ids, "labels": ids}, lambda out: out.loss


@pytest.mark.parametrize("backward", [True, False], ids=["training", "forward only"])
@pytest.mark.parametrize("amp", list(_AMP))
@pytest.mark.parametrize("build", [_vit, _vit_dropout, _llama], ids=["timm ViT", "timm ViT with dropout", "Llama"])
def test_converted_model_keeps_nothing_after_its_step(build, amp, backward):
    model, args, kwargs, loss_of = build()
    compress_(model, CFG8)
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_AMP[amp]):
            loss = loss_of(model(*args, **kwargs))
        if backward:
            loss.backward()
            model.zero_grad(set_to_none=True)

    assert _growth(step) == 0


@pytest.mark.parametrize("build", [_vit, _llama], ids=["timm ViT", "Llama"])
@pytest.mark.parametrize("converted", [False, True], ids=["unconverted", "converted"])
def test_measure_keeps_nothing_after_it_returns(converted, build):
    """``measure`` builds a graph it never runs backward through."""
    model, args, kwargs, loss_of = build()
    if converted:
        compress_(model, CFG8)
    assert _growth(lambda: torch_mesa.measure(model, *args, loss_fn=loss_of, **kwargs), warmup=1, steps=2) == 0


@torch._dynamo.disable
def _exp_uncompiled(h):
    return torch.exp(h.clamp(max=4.0))


class _BreakingBlock(nn.Module):
    """A block with code Dynamo leaves uncompiled inside the compiled call:
    it runs eagerly under the compiled saving's hook, and ``exp`` saves its
    output."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        return x + self.fc2(_exp_uncompiled(self.fc1(x)))


@pytest.mark.parametrize("backward", [True, False], ids=["training", "forward only"])
def test_compiled_model_with_a_graph_break_keeps_nothing_after_its_step(backward):
    torch.manual_seed(0)
    model = nn.Sequential(_BreakingBlock(), _BreakingBlock())
    compiled = torch_mesa.compile(model, CFG8, blocks=False)
    x = with_outliers(4, 16, 32, requires_grad=False)

    def step():
        out = compiled(x)
        if backward:
            out.float().sum().backward()
            model.zero_grad(set_to_none=True)

    assert _growth(step) == 0
