"""On a CUDA device: what the CPU suite cannot show.

The quantizer compiled to Triton against the eager reference; every op's
forward against PyTorch's CUDA kernels and its gradients against the exact
ones (the bars of test_ops); attention dropout, whose mask the CUDA kernels
draw inside themselves, so the backward must replay the forward's random
state; whole models converted, compiled and briefly trained on the GPU.

Skipped as one module without a CUDA device (CI has none);
``benchmarks/gpu.py`` runs it on a GPU machine: ``pytest -m gpu tests/test_cuda.py``.
``MESA_TEST_DEVICE=cpu`` runs it on the CPU instead: a dry run of the
module itself (the CPU suite covers what it checks there).
"""

import copy
import functools
import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.device(os.environ.get("MESA_TEST_DEVICE", "cuda"))
if CUDA.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import torch_mesa  # noqa: E402
from torch_mesa import MesaConfig, compiled, ops  # noqa: E402
from torch_mesa.quant import fused  # noqa: E402

from conftest import cosine, sqnr_db, with_outliers  # noqa: E402
from test_fidelity import _briefly_trained_lm  # noqa: E402
from test_ops import CASES, CFG8, _check, _dropout_case, _dropout_grads  # noqa: E402
from test_quant import _round_trip  # noqa: E402

pytestmark = pytest.mark.gpu


def _cuda(t):
    return t.detach().to(CUDA).requires_grad_(t.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,axes,group_size,rows", [
    (bits, axes, group_size, None) for bits in (8, 2) for axes, group_size in (((3,), 1), ((1, 3), 1), ((3,), None),
                                                                               ((2,), 5))
] + [(8, (3,), 1, "row"), (8, (3,), 1, "scaled")])
def test_triton_quantizer_equals_reference_bit_for_bit(dtype, bits, axes, group_size, rows):
    """The Triton quantizer against the eager reference on the same device:
    the layouts and row modes the ops use (row modes at 8 bits alone; 4 bits
    runs the packing code 2 bits runs).

    On the CPU, Inductor's C++ computes every range, code and expanded value
    bit for bit as the reference does. Triton on the GPU contracts products
    and sums into fused multiply-adds and divides approximately (PyTorch
    2.11, H200: 14 of 20 layouts differed in some bits), so a range can move
    by an ulp and a value on a rounding boundary get the neighbouring code.
    Both are then valid quantizations of ``x``: the test asks the Triton
    one for the reference's accuracy, within 0.05 dB over the tensor, and
    for the same expanded value (beyond rounding of the arithmetic) at all
    but 0.5% of the elements: a value on a boundary is rare, an error in
    the arithmetic is not."""
    x = with_outliers(3, 7, 197, 65, dtype=dtype, requires_grad=False).to(CUDA)
    a, ya = _round_trip(x, bits, axes, group_size, rows=rows)
    b, yb = _round_trip(x, bits, axes, group_size, rows=rows, impl=fused)
    if CUDA.type == "cpu":
        for u, v in zip(a, b):
            assert torch.equal(u, v)
        assert torch.equal(ya, yb)
        return
    for u, v in zip(a, b):
        assert u.shape == v.shape and u.dtype == v.dtype
    assert sqnr_db(yb.float(), x.float()) >= sqnr_db(ya.float(), x.float()) - 0.05
    # a neighbouring code moves a value by a whole step (at least 1/255 of
    # its range at 8 bits); an ulp of a range moves it by about 1e-7 of it
    # (fp32) and a bf16 value that rounds the other way is as rare as a
    # boundary: 1e-4 of the largest value lies between
    moved = (ya.float() - yb.float()).abs() > 1e-4 * x.float().abs().amax()
    assert moved.float().mean().item() <= 0.005, moved.float().mean().item()


@pytest.mark.parametrize("kernel", ["compiled", "reference"])
@pytest.mark.parametrize("name", list(CASES))
def test_op_on_cuda(name, kernel, monkeypatch):
    """Forward identical to PyTorch's CUDA op; gradients >= 30 dB against
    the exact fp32 ones (test_ops' bar)."""
    monkeypatch.setenv("TORCH_MESA_KERNEL", kernel)
    mesa_fn, torch_fn, inputs = CASES[name]
    _check(mesa_fn, torch_fn, [_cuda(t) for t in inputs], what=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["linear", "layer_norm", "rms_norm", "gelu", "swiglu", "softmax", "matmul", "sdpa",
                                  "sdpa_causal"])
def test_op_on_cuda_low_precision(name, dtype):
    """In bf16 and fp16 (the GPU's flash kernels run here): within 6 dB of
    PyTorch's own low-precision gradient where that is below 30 dB."""
    mesa_fn, torch_fn, inputs = CASES[name]
    _check(mesa_fn, torch_fn, [_cuda(t) for t in inputs], dtype=dtype, what=f"{name}/{dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "gqa", "bool mask, a row fully masked", "-inf float mask",
                                     "causal, scaled", "no heads (3-D)", "long sequence"])
def test_sdpa_dropout_same_mask_in_backward_on_cuda(variant, dtype):
    """The CUDA kernels draw the dropout mask inside themselves; the
    converted op reruns attention in backward from the replayed random
    state. The same forward as PyTorch's from the same seed, and gradients
    within 6 dB of what the same codes give without dropout (a wrong mask
    gives about 0 dB)."""
    q, k, v, kw = _dropout_case(variant)
    g = torch.randn(q.shape[:-1] + v.shape[-1:])
    mesa_fn = functools.partial(ops.scaled_dot_product_attention, config=CFG8)
    on = dict(device=CUDA, dtype=dtype)
    want, exact, _ = _dropout_grads(F.scaled_dot_product_attention, (q, k, v), g, 0.3, kw, **on)
    if not all(t.isfinite().all() for t in [want] + exact):
        pytest.skip("PyTorch's own kernel gives non-finite values here (a fully masked row): nothing to compare")
    out, mesa, _ = _dropout_grads(mesa_fn, (q, k, v), g, 0.3, kw, **on)
    assert torch.equal(out, want)
    _, mesa0, _ = _dropout_grads(mesa_fn, (q, k, v), g, 0.0, kw, **on)
    _, exact0, _ = _dropout_grads(F.scaled_dot_product_attention, (q, k, v), g, 0.0, kw, **on)
    for i in range(3):
        # 6 dB under the figure without dropout: with dropout the gradient is
        # another function (a random part of the map, rescaled), and on the
        # GPU (H200, GQA, bf16) it measured 3.5 dB under the figure without;
        # a wrong mask lands near 0 dB, far below either bar
        bar = min(30.0, sqnr_db(mesa0[i], exact0[i]) - 6.0)
        assert sqnr_db(mesa[i], exact[i]) >= bar, (variant, i, sqnr_db(mesa[i], exact[i]), bar)


def _model(name):
    """``(model on the device, its inputs)``: a DeiT-S or a two-layer Llama."""
    torch.manual_seed(0)
    if name == "deit_small":
        timm = pytest.importorskip("timm")
        vit = timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=10)
        return vit.to(CUDA), torch.randn(8, 3, 224, 224).to(CUDA)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512)
    llama = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 1000, (2, 512), generator=torch.Generator().manual_seed(1)).to(CUDA)
    return llama.to(CUDA), {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16 autocast"])
@pytest.mark.parametrize("name", ["deit_small", "llama"])
def test_verify_on_cuda(name, amp):
    """``torch_mesa.verify`` on the GPU: forward identical, every gradient
    within the 8-bit bar, fewer bytes kept."""
    model, inputs = _model(name)
    report = torch_mesa.verify(model, inputs, autocast_dtype=amp, by_op=False)
    assert report.forward_equal, str(report)
    assert report.ok, str(report)
    assert report.kept_converted < 0.5 * report.kept_exact, str(report)


@pytest.mark.parametrize("how", ["torch.compile", "torch_mesa.compile, by block", "torch_mesa.compile, whole"])
def test_compiled_on_cuda(how):
    """Converted and compiled with Inductor (Triton kernels, the quantizer
    fused into them for torch_mesa.compile): the loss within compiled
    rounding of the exact model's, gradients within cosine 0.999, fewer bytes
    kept than the compiled unconverted model."""
    model, inputs = _model("llama")
    model.train()
    plain = copy.deepcopy(model)
    torch._dynamo.reset()
    if how == "torch.compile":
        converted = copy.deepcopy(model)
        torch_mesa.compress_(converted)
        run = torch.compile(converted)
    else:
        run = torch_mesa.compile(copy.deepcopy(model), MesaConfig(bits=8), blocks=how.endswith("by block"))
    outs = {}
    for key, m in (("plain", plain), ("compiled", run)):
        torch.manual_seed(0)
        outs[key] = m(**inputs)
        outs[key].loss.backward()
    # (the converted model computes the loss without its logits: compare losses)
    torch.testing.assert_close(outs["compiled"].loss, outs["plain"].loss, rtol=1e-5, atol=0)
    got = {n.replace("_orig_mod.", ""): p.grad for n, p in run.named_parameters() if p.grad is not None}
    worst = min((cosine(got[n], p.grad), n) for n, p in plain.named_parameters() if p.grad is not None)
    assert worst[0] >= 0.999, worst
    kept = {k: torch_mesa.measure(m, **inputs).total_bytes for k, m in (("plain", torch.compile(plain)),
                                                                        ("compiled", run))}
    assert kept["compiled"] < 0.6 * kept["plain"], kept
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_briefly_trained_language_model_on_cuda(kind):
    """Trained on the GPU until attention is sharp and channels uneven
    (test_fidelity's run), then verified there, fp32 and bf16 autocast."""
    model, loss = _briefly_trained_lm(kind, CUDA)
    for amp in (None, torch.bfloat16):
        report = torch_mesa.verify(model, loss, by_op=False, autocast_dtype=amp)
        assert report.forward_equal and report.ok, str(report)


def test_compiled_saving_keeps_quantized_values_on_cuda():
    """The plan of torch_mesa.compile on the GPU quantizes what it does on
    the CPU (the rules do not depend on the device)."""
    model, inputs = _model("llama")
    run = torch_mesa.compile(model, MesaConfig(bits=8), blocks=True)
    run(**inputs).loss.backward()
    plan = compiled.saving_of(run).plan()
    assert sum(e.kept == "8 bits" for e in plan) >= 3, torch_mesa.plan(run)


@pytest.mark.parametrize("config", ["8 bits", "4 bits, stochastic"])
@pytest.mark.parametrize("model", ["timm ViT with dropout", "Llama", "GPT-2"])
def test_a_converted_step_waits_for_the_gpu_no_more_than_the_unconverted(model, config):
    """What tests/test_host_sync.py counts on the CPU, seen by CUDA itself:
    ``torch.cuda.set_sync_debug_mode("warn")`` warns at every call that
    waits for the device (a read, a copy from pageable host memory). The
    converted step may wait no more often than the unconverted one, less
    the fused loss's two reads a step (the probe's comparison and the
    targets' check) for causal LMs."""
    if CUDA.type != "cuda":
        pytest.skip("synchronisation is a CUDA matter")
    import warnings

    from test_host_sync import _CONFIGS, _MODELS, _MORE_MODELS, _training_step

    build, lm_loss = {**_MODELS, **_MORE_MODELS}[model]
    waits = {}
    for converted in (False, True):
        m, args, kwargs, loss_of = build()
        m = m.to(CUDA)
        args = tuple(a.to(CUDA) for a in args)
        kwargs = {k: v.to(CUDA) for k, v in kwargs.items()}
        if converted:
            torch_mesa.compress_(m, _CONFIGS[config])
        m.train()
        step = _training_step(m, args, kwargs, loss_of, False)
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        waits[converted] = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    allowed = 2 if lm_loss else 0
    assert len(waits[True]) <= len(waits[False]) + allowed, waits
