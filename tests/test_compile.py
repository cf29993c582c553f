"""torch.compile of converted models: whole-model and regional (per block).

Each converted op runs as Python (``ops.saving.OpFunction``): in a compiled
model it is one graph break, and the code between converted ops compiles.
Against the same converted model run eagerly: forward equal to the
unconverted model's (the converted ops' forwards are PyTorch's own; the
compiled code around them may round differently, so within 1e-5 of the
output's scale), every gradient within cosine 0.999 of the exact one, and the
same bytes kept as eager (within 5%, the issue's bar; measured equal).

Compiling costs seconds per model on CPU: the backend is ``aot_eager``
(Dynamo and AOTAutograd, no code generation), one case runs Inductor.
"""

import copy

import pytest
import torch

from torch_mesa import compress_, measure

from test_sweep import HF, _cosine, _hf_inputs, _hf_model, _loss, _one_thread, _timm_model  # noqa: F401

pytestmark = pytest.mark.usefixtures("reference_kernel")


def _check(plain, args=(), kwargs=None, *, mode, backend="aot_eager"):
    kwargs = kwargs or {}
    plain.train()
    eager = copy.deepcopy(plain)
    compress_(eager)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    if mode == "whole":
        run = torch.compile(compiled, backend=backend)
    else:  # regional: each block compiled in place, as with FSDP2
        blocks = [m for m in compiled.modules() if type(m).__name__.endswith(("Block", "Layer", "DecoderLayer"))]
        assert blocks, "no blocks found"
        for b in blocks:
            b.compile(backend=backend)
        run = compiled
    outs, kept = {}, {}
    for name, m in (("plain", plain), ("eager", eager), ("compiled", run)):
        torch.manual_seed(0)
        kept[name] = measure(m, *args, **kwargs).total_bytes
        torch.manual_seed(0)
        outs[name] = m(*args, **kwargs)
        _loss(outs[name]).backward()
    main = {k: _loss.__globals__["_main"](v) for k, v in outs.items()}
    scale = main["plain"].abs().max().item()
    assert torch.equal(main["eager"], main["plain"])
    torch.testing.assert_close(main["compiled"], main["plain"], rtol=0, atol=1e-5 * scale)
    worst = min((_cosine(c.grad, p.grad), n) for (n, p), c in zip(plain.named_parameters(), compiled.parameters())
                if p.grad is not None and p.grad.norm() > 1e-6 * scale)
    assert worst[0] >= 0.999, worst
    assert abs(kept["compiled"] - kept["eager"]) <= 0.05 * kept["eager"], kept
    assert kept["compiled"] < kept["plain"], kept


@pytest.mark.parametrize("case,mode", [("vit", "whole"), ("vit-eager", "regional"), ("pvt_v2", "regional"),
                                       ("resnet18", "whole")])
def test_timm_compiles(case, mode):
    model, x = _timm_model(case)
    _check(model, (x,), mode=mode)


@pytest.mark.parametrize("case,mode", [("llama-sdpa", "whole"), ("gpt2-eager", "regional"),
                                       ("bert-eager", "regional")])
def test_hugging_face_compiles(case, mode):
    pytest.importorskip("transformers")
    model_type, overrides, head, attn = HF[case]
    model = _hf_model(model_type, overrides, head, attn)
    _check(model, kwargs=_hf_inputs(head), mode=mode)


def test_inductor_compiles_a_converted_vit():
    """The default backend, code generation included (C++ on CPU)."""
    model, x = _timm_model("vit")
    _check(model, (x,), mode="whole", backend="inductor")


def test_fused_lm_loss_under_compile():
    """A causal LM called with labels: the fused head and loss run inside the
    compiled model, the loss equal to the unconverted model's (1e-5, the
    fused loss's tolerance) and every gradient within the bar."""
    pytest.importorskip("transformers")
    model_type, overrides, head, attn = HF["llama-sdpa"]
    plain = _hf_model(model_type, overrides, head, attn).train()
    kwargs = dict(_hf_inputs(head))
    kwargs["labels"] = kwargs["input_ids"]
    conv = copy.deepcopy(plain)
    report = compress_(conv)
    assert report.fused_losses
    torch._dynamo.reset()
    run = torch.compile(conv, backend="aot_eager")
    losses = []
    for m in (plain, run):
        out = m(**kwargs)
        out.loss.backward()
        losses.append(out.loss.detach())
    assert out.logits is None  # the fused path ran
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    for (n, p), q in zip(plain.named_parameters(), conv.parameters()):
        assert _cosine(q.grad, p.grad) >= 0.999, n


@pytest.mark.parametrize("mode", ["whole", "regional"])
def test_measure_reports_compiled_models(mode):
    """measure() of a compiled model gives the eager model's total (its
    hooks would recompile it): a whole compiled model under "<root>", the
    regionally compiled blocks under the module holding them."""
    model, x = _timm_model("vit")
    compress_(model)
    eager = measure(model, x)
    compiled = copy.deepcopy(model)
    torch._dynamo.reset()
    if mode == "whole":
        compiled = torch.compile(compiled, backend="aot_eager")
    else:
        for b in compiled.blocks:
            b.compile(backend="aot_eager")
    for _ in range(2):  # measuring twice must not recompile into an error
        report = measure(compiled, x)
    assert abs(report.total_bytes - eager.total_bytes) <= 0.05 * eager.total_bytes
    if mode == "whole":
        assert set(report.by_module) == {"<root>"}
    else:
        assert report.by_module["blocks"] > 0.5 * report.total_bytes
        assert not any(k.startswith("blocks.") for k in report.by_module)


def _graphs_of_a_compiled_step(depth):
    from torch._dynamo.utils import counters

    from torch_mesa.tools.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=8, in_chans=3, num_classes=4, dim=32, depth=depth, heads=2)
    compress_(model)
    torch._dynamo.reset()
    counters.clear()
    run = torch.compile(model, backend="aot_eager")
    for _ in range(2):
        run(torch.randn(2, 3, 16, 16)).sum().backward()
    return counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())


def test_blocks_share_compiled_code():
    """Every block of a compiled converted model runs the same compiled code:
    the routing and the converted layers are never traced (their Python
    state, module names among it, would be guarded on), so the graph count
    does not grow with depth, and no block is left to run uncompiled past
    Dynamo's recompile limit of 8."""
    shallow, deep = _graphs_of_a_compiled_step(2), _graphs_of_a_compiled_step(12)
    assert deep == shallow, (shallow, deep)
    assert deep[1] == 0
