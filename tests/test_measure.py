"""measure(): bytes kept for backward, checked against hand-counted layouts."""

import copy

import pytest
import torch
from torch import nn

import torch_mesa
from torch_mesa import MesaConfig, compress_, measure
from torch_mesa.tools.models import VisionTransformer

pytestmark = pytest.mark.usefixtures("reference_kernel")


def test_plain_linear_keeps_its_input_only():
    lin = nn.Linear(64, 32)
    x = torch.randn(5, 7, 64)
    r = measure(lin, x)
    assert r.total_bytes == x.numel() * 4  # the weight is a parameter: excluded
    assert r.by_module == {"<root>": x.numel() * 4}


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_converted_linear_keeps_codes_and_per_channel_ranges(bits):
    lin = nn.Linear(64, 32)
    x = torch.randn(5, 7, 64)
    compress_(lin, MesaConfig(bits=bits))
    r = measure(lin, x)
    codes = -(-x.numel() * bits // 8)
    ranges = 2 * 64 * 4  # lo and scale, fp32, one per channel
    token_scale = 5 * 7 * 2 + 64 * 4  # bf16 per token, fp32 per channel
    assert r.total_bytes == codes + ranges + token_scale
    plain = nn.Linear(64, 32)
    compress_(plain, MesaConfig(bits=bits, token_scale=False))
    assert measure(plain, x).total_bytes == codes + ranges


def test_layernorm_then_linear_is_kept_once():
    model = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    x = torch.randn(4, 9, 64)
    compress_(model)
    r = measure(model, x)
    tokens = 4 * 9
    ln = tokens * 64 + 2 * 64 * 4 + 2 * tokens * 4  # codes, ranges, row centre/width
    gelu = tokens * 128 + 2 * 128 * 4 + tokens * 2 + 128 * 4  # codes, ranges, token scale (bf16), channel scale
    assert r.by_module == {"0": ln, "2": gelu}  # the Linears keep nothing new
    assert r.total_bytes == ln + gelu


def test_per_module_attribution_and_loss():
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_classes=10, dim=48, depth=2, heads=3)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 2])
    r = measure(model, x, loss_fn=lambda out: nn.functional.cross_entropy(out, y))
    assert "blocks.0.attn" in r.by_module and "blocks.1.mlp.fc1" in r.by_module
    assert r.by_module.get("<loss>", 0) > 0
    assert sum(r.by_depth(1).values()) == r.total_bytes
    assert "total" in r.table() and "blocks.0" in str(r)


def test_ratios_on_the_reference_vit():
    torch.manual_seed(0)
    model = VisionTransformer(image_size=64, patch_size=8, num_classes=10, dim=96, depth=2, heads=3)
    x = torch.randn(2, 3, 64, 64)
    base = measure(model, x)
    base_bf16 = measure(model, x, autocast_dtype=torch.bfloat16)
    assert base_bf16.total_bytes < base.total_bytes
    conv = copy.deepcopy(model)
    compress_(conv)
    mesa = measure(conv, x)
    mesa_bf16 = measure(conv, x, autocast_dtype=torch.bfloat16)
    blocks = lambda r: sum(v for k, v in r.by_module.items() if k.startswith("blocks."))
    # the per-block accounting of DESIGN.md: ~10C of ~64C (fp32), ~38C (bf16)
    assert blocks(mesa) / blocks(base) < 0.20
    assert blocks(mesa_bf16) / blocks(base_bf16) < 0.35
    four = copy.deepcopy(model)
    compress_(four, MesaConfig(bits=4))
    assert blocks(measure(four, x)) / blocks(base) < 0.12


def test_measure_rejects_non_modules():
    with pytest.raises(TypeError):
        measure(lambda x: x, torch.randn(2))
    assert torch_mesa.measure is measure
