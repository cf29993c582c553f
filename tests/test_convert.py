"""compress_ / restore_ on the reference ViT and on small hand-built models."""

import copy
import io

import pytest
import torch
from torch import nn

import torch_mesa
from torch_mesa import MesaConfig, compress_, restore_
from torch_mesa.tools.models import VisionTransformer
from torch_mesa.nn import MesaModule

from conftest import cosine

pytestmark = pytest.mark.usefixtures("reference_kernel")


def tiny_vit(fused_attn=True, drop=0.0):
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_classes=10, dim=48, depth=2, heads=3,
                             fused_attn=fused_attn, drop=drop)


def images(n=4):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _grads(model, x, g):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.backward(g)
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("fused_attn", [True, False])
def test_forward_identical_and_gradients_close(fused_attn):
    plain = tiny_vit(fused_attn)
    conv = copy.deepcopy(plain)
    report = compress_(conv)
    x = images()
    g = torch.randn(4, 10)
    out_p, grads_p = _grads(plain, x, g)
    out_c, grads_c = _grads(conv, x, g)
    assert torch.equal(out_p, out_c)
    worst = min((cosine(grads_c[n], grads_p[n]), n) for n in grads_p)
    assert worst[0] >= 0.999, worst
    # the functional attention calls were routed, not left exact
    assert conv._mesa_scope.routed > 0
    assert report.num_converted == sum(isinstance(m, MesaModule) for m in conv.modules())


def test_report_lists_converted_and_skipped_layers():
    model = tiny_vit()
    report = compress_(model)
    counts = report.counts()
    assert counts["Linear"] == 2 * 4 + 1 and counts["LayerNorm"] == 2 * 2 + 1 and counts["GELU"] == 2
    assert counts["Conv2d"] == 1  # the patch embedding
    assert not report.skipped
    text = str(report)
    assert "converted" in text and "Linear" in text and "Conv2d" in text
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Hardtanh())
    report = compress_(cnn)
    reasons = {name: why for name, _, why in report.skipped}
    assert reasons["1"].startswith("batch norms convert with MesaConfig(batch_norm=True) only")
    restore_(cnn)
    assert compress_(cnn, MesaConfig(batch_norm=True)).counts() == {"Conv2d": 1, "BatchNorm2d": 1}
    assert reasons["2"] == "no torch-mesa op for this layer type"


def test_state_dict_unchanged_and_checkpoints_load_both_ways():
    plain = tiny_vit()
    before = plain.state_dict()
    params_before = {n: p for n, p in plain.named_parameters()}
    compress_(plain)
    after = plain.state_dict()
    assert list(before) == list(after)
    for k in before:
        assert torch.equal(before[k], after[k])
    for n, p in plain.named_parameters():
        assert p is params_before[n]  # the same Parameter objects
    # a vanilla checkpoint loads into the converted model, strictly, and back
    other = tiny_vit()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    plain.load_state_dict(other.state_dict(), strict=True)
    fresh = VisionTransformer(image_size=32, patch_size=8, num_classes=10, dim=48, depth=2, heads=3)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    x = images()
    with torch.no_grad():
        assert torch.equal(fresh(x), plain(x))


def test_restore_undoes_everything():
    model = tiny_vit()
    classes = {n: type(m) for n, m in model.named_modules()}
    hooks = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}
    compress_(model)
    assert torch_mesa.is_compressed(model)
    n = restore_(model)
    assert n > 0 and not torch_mesa.is_compressed(model)
    assert {k: type(m) for k, m in model.named_modules()} == classes
    assert {k: (len(m._forward_pre_hooks), len(m._forward_hooks)) for k, m in model.named_modules()} == hooks
    for m in model.modules():
        assert not hasattr(m, "mesa_spec") and not hasattr(m, "_mesa_original_class")
    # and it can be converted again afterwards
    compress_(model, MesaConfig(bits=4))
    assert {m.mesa_spec.bits for m in model.modules() if isinstance(m, MesaModule)} == {4}


def test_wrong_use_gives_clear_errors():
    model = tiny_vit()
    with pytest.raises(ValueError, match="not converted"):
        restore_(model)
    compress_(model)
    with pytest.raises(ValueError, match="already converted"):
        compress_(model)
    with pytest.raises(TypeError, match="nn.Module"):
        compress_("model")
    with pytest.raises(TypeError, match="MesaConfig"):
        compress_(tiny_vit(), {"bits": 4})


def test_policy_keeps_matching_layers_exact_and_warns_on_unmatched_patterns():
    model = tiny_vit()
    cfg = MesaConfig(policy={"head": None, "blocks.0.*": {"bits": 4}, "decoder.*": None})
    with pytest.warns(UserWarning, match="decoder"):
        report = compress_(model, cfg)
    assert type(model.head) is nn.Linear
    assert ("head", "Linear", "kept exact by policy") in report.skipped
    assert model.blocks[0].mlp.fc1.mesa_spec.bits == 4
    assert model.blocks[1].mlp.fc1.mesa_spec.bits == 8
    assert report.unmatched_patterns == ["decoder.*"]


def test_filter_fn_excludes_modules_and_their_functional_calls():
    model = tiny_vit(fused_attn=True)
    report = compress_(model, filter_fn=lambda m, name: not name.startswith("blocks.1"))
    assert type(model.blocks[1].attn.qkv) is nn.Linear
    assert isinstance(model.blocks[0].attn.qkv, MesaModule)
    assert any(n == "blocks.1.attn.qkv" for n, _, _ in report.skipped)
    model(images()).sum().backward()
    assert model._mesa_scope.routed == 1  # blocks.0's SDPA only


def test_converting_nothing_warns():
    with pytest.warns(UserWarning, match="converted no layer"):
        report = compress_(nn.Sequential(nn.BatchNorm2d(4), nn.Hardtanh(), nn.Identity()))
    assert report.num_converted == 0


def test_no_grad_costs_nothing_extra(monkeypatch):
    from torch_mesa.ops import recipes as _saved

    model = tiny_vit()
    compress_(model)
    calls = []
    monkeypatch.setattr(_saved.quant, "compress", lambda *a, **k: calls.append(1))
    x = images()
    with torch.no_grad():
        model(x)
    with torch.inference_mode():
        model(x)
    model.eval()
    assert calls == []
    assert model._mesa_scope.routed == 0


def test_deepcopy_and_pickle_of_a_converted_model():
    model = tiny_vit()
    compress_(model)
    x = images()
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    g = torch.randn(4, 10)
    ref = _grads(model, x, g)[1]
    for other in (twin, loaded):
        assert torch.equal(other(x), model(x))
        grads = _grads(other, x, g)[1]
        for n in ref:
            assert torch.equal(grads[n], ref[n]), n
        assert other._mesa_scope is not model._mesa_scope
        assert other._mesa_scope.routed > 0


def test_standard_layers_keep_their_settings():
    model = nn.Sequential(
        nn.LayerNorm(16, eps=1e-3, elementwise_affine=True, bias=False),
        nn.Linear(16, 32, bias=False),
        nn.GELU(approximate="tanh"),
        nn.Dropout(0.0),
        nn.Linear(32, 16),
        nn.SiLU(),
        nn.RMSNorm(16, eps=1e-4),
        nn.Softmax(dim=-1),
    )
    plain = copy.deepcopy(model)
    compress_(model)
    assert model[0].eps == 1e-3 and model[0].bias is None and model[2].approximate == "tanh"
    assert model[6].eps == 1e-4 and model[7].dim == -1
    assert isinstance(model[1], nn.Linear) and isinstance(model[1], MesaModule)
    x = torch.randn(3, 5, 16, requires_grad=True)
    assert torch.equal(model(x), plain(x))
    g = torch.randn(3, 5, 16)
    (gx,) = torch.autograd.grad(model(x), x, g)
    (rx,) = torch.autograd.grad(plain(x), x, g)
    assert cosine(gx, rx) > 0.999
    assert "mesa=8bit" in repr(model)


def test_import_and_conversion_never_import_optional_families():
    import subprocess
    import sys

    code = (
        "import sys, torch_mesa\n"
        "from torch_mesa.tools.models import vit_tiny\n"
        "torch_mesa.compress_(vit_tiny(image_size=32))\n"
        "heavy = [m for m in ('timm', 'transformers', 'matplotlib', 'sklearn') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert not torch.cuda.is_initialized() if (torch := sys.modules['torch']) else True\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
