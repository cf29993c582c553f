"""Real model families, built from config (random weights, nothing downloaded):
timm vision Transformers and Hugging Face transformers models.

For every model: forward output equal to the unconverted model's, every
parameter gradient with cosine >= 0.999 to the exact one at 8 bits,
state_dict keys unchanged, and no Linear/norm/activation/attention inside
the Transformer blocks left exact in the conversion report.
"""

import copy

import pytest
import torch

from torch_mesa import MesaConfig, compress_, measure, restore_, verify

from conftest import cosine

pytestmark = pytest.mark.usefixtures("reference_kernel")


def _check_model(plain, inputs, kwargs=None, *, blocks_prefix, loss=None, config=None):
    kwargs = kwargs or {}
    loss = loss or (lambda out: _logits(out).float().square().mean())
    conv = copy.deepcopy(plain)
    report = compress_(conv, config)
    assert set(conv.state_dict()) == set(plain.state_dict())
    inside = [s for s in report.skipped if s[0].startswith(blocks_prefix)]
    assert inside == [], f"left exact inside the blocks: {inside}"
    torch.manual_seed(0)
    out_p = plain(*inputs, **kwargs)
    torch.manual_seed(0)
    out_c = conv(*inputs, **kwargs)
    assert torch.equal(_logits(out_p), _logits(out_c))
    loss(out_p).backward()
    loss(out_c).backward()
    grads_c = dict(conv.named_parameters())
    exact = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    typical = torch.stack([g.norm() for g in exact.values()]).median()
    worst = (1.0, "")
    for n, g in exact.items():
        if g.norm() < 1e-6 * typical:
            # Mathematically zero (an attention key bias shifts every score
            # of a row alike, which softmax ignores): cosine is meaningless;
            # the converted gradient must be negligible too.
            assert grads_c[n].grad.norm() < 1e-3 * typical, n
            continue
        worst = min(worst, (cosine(grads_c[n].grad, g), n))
    assert worst[0] >= 0.999, worst
    return conv, report


def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise AssertionError(type(out))


# ------------------------------------------------------------------ timm
timm = pytest.importorskip("timm")

TIMM_MODELS = {
    "vit_small_patch16_224": dict(img_size=64, depth=2),
    "deit_small_patch16_224": dict(img_size=64, depth=2),
    "deit_base_patch16_224": dict(img_size=32, depth=1),
    "swin_tiny_patch4_window7_224": dict(img_size=56, depths=(1, 1, 1, 1), window_size=7),
}


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_timm_models(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **TIMM_MODELS[name])
    size = TIMM_MODELS[name]["img_size"]
    x = torch.randn(2, 3, size, size)
    prefix = "layers." if name.startswith("swin") else "blocks."
    conv, _ = _check_model(model, (x,), blocks_prefix=prefix)
    # q, k, v kept per head: the attention calls were routed
    assert conv._mesa_scope.routed > 0


def test_timm_vit_with_fused_attention_off():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, img_size=64, depth=2)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    x = torch.randn(2, 3, 64, 64)
    conv, _ = _check_model(model, (x,), blocks_prefix="blocks.")
    # the eager path: q @ k^T, softmax, attn @ v are routed and no N x N map
    # is kept: it keeps what the fused (SDPA) path keeps
    plain_bytes = measure(model, x).total_bytes
    conv_bytes = measure(conv, x).total_bytes
    assert conv_bytes < 0.3 * plain_bytes
    for m in conv.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    assert conv_bytes <= measure(conv, x).total_bytes * 1.01


# ----------------------------------------------------------- transformers
transformers = pytest.importorskip("transformers")


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=500,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _bert():
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=500, max_position_embeddings=64)
    return transformers.BertForMaskedLM(cfg)


def _vit():
    cfg = transformers.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=32, patch_size=8, num_labels=10)
    return transformers.ViTForImageClassification(cfg)


HF = {"gpt2": (_gpt2, "transformer.h."), "llama": (_llama, "model.layers."),
      "bert": (_bert, "bert.encoder.layer."), "vit": (_vit, "vit.encoder.layer.")}


def _hf_inputs(name):
    g = torch.Generator().manual_seed(0)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    ids = torch.randint(0, 500, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0  # padding in the second sequence
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(HF))
def test_hf_models(name, attn):
    build, prefix = HF[name]
    torch.manual_seed(0)
    model = build()
    model.set_attn_implementation(attn) if hasattr(model, "set_attn_implementation") else None
    model.config._attn_implementation = attn
    model.train()
    conv, report = _check_model(model, (), _hf_inputs(name), blocks_prefix=prefix)
    assert conv._mesa_scope.routed > 0
    kinds = report.counts()
    if name == "gpt2":
        assert kinds.get("Conv1D", 0) == 4 * 2 and kinds.get("NewGELUActivation", 0) == 2
    if name == "llama":
        assert kinds.get("LlamaRMSNorm", 0) == 2 * 2 + 1


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_hf_eager_attention_keeps_no_map(name):
    """Scaling, masking and casting the scores pass the recipe on: eager
    attention keeps what SDPA keeps (q, k, v), under autocast too."""
    build, _ = HF[name]
    torch.manual_seed(0)
    model = build()
    model.train()
    compress_(model)
    inputs = _hf_inputs(name)
    kept = {}
    for attn in ("eager", "sdpa"):
        model.config._attn_implementation = attn
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attn)
        for amp in (None, torch.bfloat16):
            kept[attn, amp] = measure(model, autocast_dtype=amp, **inputs).total_bytes
    # Eager attention adds its mask to the scores; the recipe keeps that
    # mask (batch x 1 x N x N, shared by all layers) as it is.
    mask = inputs["input_ids"].shape[0] * inputs["input_ids"].shape[1] ** 2 * 4 if "input_ids" in inputs else 0
    for amp in (None, torch.bfloat16):
        assert kept["eager", amp] <= 1.01 * kept["sdpa", amp] + mask, kept


def test_hf_save_pretrained_round_trip_and_generate(tmp_path):
    torch.manual_seed(0)
    plain = _llama()
    conv = copy.deepcopy(plain)
    compress_(conv)
    conv.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    for (k, a), (k2, b) in zip(plain.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    conv.load_state_dict(loaded.state_dict(), strict=True)
    ids = torch.randint(0, 500, (1, 8))
    plain.eval()
    conv.eval()
    routed = conv._mesa_scope.routed
    with torch.no_grad():
        a = plain.generate(ids, max_new_tokens=6, do_sample=False)
        b = conv.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
    assert conv._mesa_scope.routed == routed  # no_grad: nothing routed, nothing kept
    assert restore_(conv) > 0


def _enable_checkpointing(model, reentrant):
    # renamed in recent transformers; the old name still works with a warning
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gradient_checkpointing_composes(reentrant):
    torch.manual_seed(0)
    plain = _llama()
    plain.train()
    conv = copy.deepcopy(plain)
    compress_(conv)
    inputs = _hf_inputs("llama")
    without = measure(conv, **inputs).total_bytes
    _enable_checkpointing(conv, reentrant)
    assert measure(conv, **inputs).total_bytes < 0.8 * without  # checkpointing is really on
    plain(**inputs).logits.square().mean().backward()
    conv(**inputs).logits.square().mean().backward()
    for (n, p), q in zip(plain.named_parameters(), conv.parameters()):
        assert cosine(q.grad, p.grad) >= 0.999, n


def test_running_ranges_update_once_per_step_under_checkpointing():
    torch.manual_seed(0)
    base = _llama()
    base.train()
    cfg = MesaConfig(range_estimate="running")
    inputs = _hf_inputs("llama")
    estimates = []
    for ckpt in (False, True):
        m = copy.deepcopy(base)
        compress_(m, cfg)
        if ckpt:
            _enable_checkpointing(m, False)
        for _ in range(2):
            m(**inputs).logits.square().mean().backward()
        norm = m.model.layers[0].input_layernorm
        estimates.append(norm.mesa_states.slots["input"].span.clone())
    assert torch.equal(estimates[0], estimates[1])


def test_swin_shift_mask_is_kept_as_its_small_parts():
    """Swin adds its relative position bias to a shift mask broadcast over
    batch and heads; the SDPA op keeps the bias and the small mask, never the
    batch-sized sum."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10,
                              img_size=56, depths=(2, 2, 2, 2), window_size=7)
    compress_(model)
    big = []

    def pack(t):
        if t.dim() >= 3 and t.shape[-1] == t.shape[-2] == 49 and t.is_floating_point() and t.shape[0] > 1:
            big.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(torch.randn(4, 3, 56, 56))
    assert big == []
    out.sum().backward()  # and the kept parts rebuild the mask correctly
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_full_depth_swin_t_bias_tables_with_shifted_windows():
    """Swin-T at its real widths and depths (2, 2, 6, 2), with shifted
    windows: every parameter, the relative position bias tables included,
    within cosine 0.999 of the exact gradient at 8 bits."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, img_size=128,
                              window_size=4, drop_path_rate=0.0)
    shifts = [b.shift_size for b in model.modules() if type(b).__name__ == "SwinTransformerBlock"]
    assert len(shifts) == 12 and sum(1 for s in shifts if s not in (0, (0, 0))) >= 5
    x = torch.randn(2, 3, 128, 128)
    y = torch.tensor([1, 7])
    report = verify(model, lambda m: torch.nn.functional.cross_entropy(m(x), y), by_op=False)
    tables = [p for p in report.params if "relative_position_bias_table" in p.name]
    assert len(tables) == 12 and all(p.cosine >= 0.999 for p in tables), tables
    assert report.ok, str(report)
