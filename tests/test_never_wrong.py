"""Classes of input that once gave silently wrong results, each with several
variants: policies at every depth, the user's random state, running ranges
under both checkpointing modes, threads, frozen weights, and recipes whose
inputs change in place. (Masking styles of hand-written attention are in
test_sweep.py; softmax over masked scores in test_ops.py.)"""

import copy
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import torch_mesa
from torch_mesa import MesaConfig, compress_, measure, ops
from torch_mesa.ops.saving import OpFunction

from conftest import assert_grads_close, cosine

pytestmark = pytest.mark.usefixtures("reference_kernel")


class FunctionalMLP(nn.Module):
    """A layer that calls F.linear/F.gelu itself (routed, not converted)."""

    def __init__(self, dim=16):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4 * dim, dim) * dim**-0.5)
        self.w2 = nn.Parameter(torch.randn(dim, 4 * dim) * (4 * dim) ** -0.5)

    def forward(self, x):
        return F.linear(F.gelu(F.linear(x, self.w1)), self.w2)


class Net(nn.Module):
    def __init__(self, dim=16, drop=0.0):
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(drop),
                           nn.Linear(4 * dim, dim)) for _ in range(2)]
        )
        self.mixer = FunctionalMLP(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        x = x + self.mixer(x)
        return self.head(x)


def _net(drop=0.0):
    torch.manual_seed(0)
    return Net(drop=drop)


def _x(seed=1):
    return torch.randn(3, 11, 16, generator=torch.Generator().manual_seed(seed)) * 2


# ------------------------------------------------------------- policies
@pytest.mark.parametrize(
    "policy, exact_modules",
    [
        ({"head": None}, ["head"]),  # a converted leaf (its F.linear was routed before)
        ({"blocks.0": None}, ["blocks.0.0", "blocks.0.1", "blocks.0.2", "blocks.0.4"]),  # a container
        ({"mixer": None}, ["mixer"]),  # a module whose functional calls are routed
        ({"*.1": None}, ["blocks.1"]),  # a wildcard matching a block and a layer of each block
        ({"blocks.*": {"bits": 4}, "blocks.1": None, "blocks.1.4": {"bits": 8}}, ["blocks.1.0", "blocks.1.1"]),
    ],
)
def test_policy_none_holds_at_every_depth(policy, exact_modules):
    """A module kept exact by policy keeps exactly what the unconverted model
    keeps, for its layers and for the calls its modules make, and the report
    says so."""
    plain, x = _net(), _x()
    conv = copy.deepcopy(plain)
    report = compress_(conv, MesaConfig(bits=4, policy=policy))
    before, after = measure(plain, x).by_module, measure(conv, x).by_module
    for name in exact_modules:
        kept_plain = sum(n for k, n in before.items() if k == name or k.startswith(name + "."))
        kept_conv = sum(n for k, n in after.items() if k == name or k.startswith(name + "."))
        assert kept_plain > 0 and kept_conv == kept_plain, (name, kept_plain, kept_conv)
        assert "exact" in report.plan[name] or "routes no call" in report.plan[name], report.plan[name]
    # everything else is still converted
    assert sum(after.values()) < sum(before.values())


def test_filter_fn_holds_for_routed_calls():
    plain, x = _net(), _x()
    conv = copy.deepcopy(plain)
    report = compress_(conv, filter_fn=lambda m, name: name != "mixer")
    assert measure(conv, x).by_module["mixer"] == measure(plain, x).by_module["mixer"]
    assert "filter_fn" in report.plan["mixer"]


# ------------------------------------------------------ the random state
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_forward_and_random_state_identical_at_every_bit_width(bits, rounding):
    """Rounding noise never draws from PyTorch's generator: with dropout on,
    the converted forward equals the unconverted one bit for bit, and the
    generator is left where the unconverted model leaves it."""
    plain, x = _net(drop=0.3), _x()
    conv = copy.deepcopy(plain)
    compress_(conv, MesaConfig(bits=bits, rounding=rounding))
    for _ in range(2):  # a second step too: state carried across steps
        outs, states = [], []
        for m in (plain, conv):
            torch.manual_seed(5)
            out = m(x)
            states.append(torch.get_rng_state())
            out.square().mean().backward()
            outs.append(out)
        assert torch.equal(outs[0], outs[1])
        assert torch.equal(states[0], states[1])


@pytest.mark.parametrize("bits", [8, 4])
def test_reentrant_checkpoint_replays_the_same_dropout(bits):
    """Reentrant checkpointing restores the generator for its recompute: the
    recomputed dropout masks are the forward's, so gradients are those of
    the same forward."""
    plain = _net(drop=0.3)
    x = _x().requires_grad_()
    conv = copy.deepcopy(plain)
    compress_(conv, MesaConfig(bits=bits, rounding="stochastic"))

    def run(m, ckpt):
        torch.manual_seed(9)
        h = x
        for b in m.blocks:
            h = h + (checkpoint(b, h, use_reentrant=True) if ckpt else b(h))
        m.zero_grad(set_to_none=True)
        (m.head(h).square().mean()).backward()
        return [p.grad.clone() for p in m.blocks.parameters()]

    exact = run(plain, False)
    for got in (run(conv, True), run(conv, False)):
        for g, e in zip(got, exact):
            assert cosine(g, e) >= (0.999 if bits == 8 else 0.99)


# --------------------------------------------------- running range estimates
@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_running_ranges_update_once_per_step_under_checkpointing(mode):
    """The estimates after three steps are the same with and without
    activation checkpointing, in both of PyTorch's checkpointing modes."""
    base, x = _net(), _x()
    cfg = MesaConfig(range_estimate="running", momentum=0.5)
    estimates = []
    for ckpt in (False, True):
        m = copy.deepcopy(base)
        compress_(m, cfg)
        for step in range(3):
            h = _x(seed=10 + step).requires_grad_()
            for b in m.blocks:
                if ckpt:
                    h = h + checkpoint(b, h, use_reentrant=(mode == "reentrant"))
                else:
                    h = h + b(h)
            m.head(h).square().mean().backward()
        norm = m.blocks[1][0].mesa_states.slots["input"]  # the LayerNorm's input
        act = m.blocks[1][2].mesa_states.slots["input"]  # the GELU's input
        estimates.append([t.clone() for t in (norm.lo, norm.span, act.lo, act.span)])
    for a, b in zip(*estimates):
        assert torch.allclose(a, b)


# ---------------------------------------------------------------- threads
@pytest.mark.parametrize("threads", [2, 4])
def test_threads_share_one_converted_model(threads):
    """Threads running one converted model (as nn.DataParallel's replicas
    do) each route their own calls: no crash, and each thread's gradients are
    those it gets alone."""
    model = _net()
    compress_(model)
    params = list(model.parameters())
    inputs = [_x(seed=s).requires_grad_() for s in range(threads)]

    def grads_of(x):
        out = model(x)
        return torch.autograd.grad(out.square().mean(), [x] + params)

    alone = [grads_of(x) for x in inputs]
    results, errors = [None] * threads, []
    barrier = threading.Barrier(threads)

    def work(i):
        try:
            barrier.wait()
            for _ in range(3):
                results[i] = grads_of(inputs[i])
        except Exception as err:  # reported below
            errors.append(err)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors
    for got, want in zip(results, alone):
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    assert not model._mesa_scope.stack  # this thread's stack is empty again


# ---------------------------------------------------------- frozen weights
def test_frozen_layers_keep_nothing_no_gradient_needs():
    """With frozen weights and an input that needs a gradient, a Linear keeps
    nothing (PyTorch keeps nothing either); the converted model keeps less
    than the unconverted one, and the input's gradient is close."""
    plain, x = _net(), _x().requires_grad_()
    for p in plain.parameters():
        p.requires_grad_(False)
    conv = copy.deepcopy(plain)
    compress_(conv)
    kept_plain, kept_conv = measure(plain, x).by_module, measure(conv, x).by_module
    assert sum(kept_conv.values()) < 0.5 * sum(kept_plain.values())
    assert kept_conv.get("head", 0) == 0 and kept_conv.get("blocks.0.1", 0) == 0
    g_plain = torch.autograd.grad(plain(x).square().mean(), x)[0]
    g_conv = torch.autograd.grad(conv(x).square().mean(), x)[0]
    assert cosine(g_conv, g_plain) >= 0.999


@pytest.mark.parametrize("frozen", ["a", "b"])
@pytest.mark.parametrize("op", ["matmul", "mul", "einsum"])
def test_products_keep_only_the_operand_the_other_gradient_needs(op, frozen):
    mesa_fn, torch_fn = {
        "matmul": (ops.matmul, torch.matmul),
        "mul": (ops.mul, torch.mul),
        "einsum": (lambda a, b: ops.einsum("bhij,bhjk->bhik", a, b),
                   lambda a, b: torch.einsum("bhij,bhjk->bhik", a, b)),
    }[op]
    a = torch.randn(2, 3, 8, 8, requires_grad=frozen != "a")
    b = torch.randn(2, 3, 8, 8, requires_grad=frozen != "b")
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        out = mesa_fn(a, b)
    assert sum(t.numel() for t in packed if t.dtype == torch.uint8) == a.numel()  # one operand's codes
    assert not [t for t in packed if t.dtype == torch.float32 and t.numel() >= a.numel()]
    needs = [t for t in (a, b) if t.requires_grad]
    g = torch.randn_like(out)
    assert_grads_close(torch.autograd.grad(out, needs, g), torch.autograd.grad(torch_fn(a, b), needs, g),
                       min_db=30.0, what=op)


def test_lora_on_a_frozen_llama():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=32)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                     target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    torch.manual_seed(0)
    for n, p in lora.named_parameters():
        if "lora_B" in n:  # nonzero adapters, so every adapter gradient is informative
            torch.nn.init.normal_(p, std=0.02)
    lora.train()
    conv = copy.deepcopy(lora)
    compress_(conv)
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    kept = [measure(m, input_ids=ids).total_bytes for m in (lora, conv)]
    assert kept[1] < 0.5 * kept[0], kept
    for m in (lora, conv):
        m(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in conv.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    for n, p in lora.named_parameters():
        if p.requires_grad:
            assert cosine(grads[n], p.grad) >= 0.999, n


# ----------------------------------------------- recipes and in-place changes
@pytest.mark.parametrize("kind", ["bias", "minus", "view", "mask", "factor"])
def test_recipe_inputs_changed_in_place_are_not_rebuilt(kind):
    """An in-place change to a tensor a recipe holds (an addend, a subtrahend,
    the small tensor behind a broadcast view) between producer and consumer:
    the consumer keeps the scores as they are, and the gradient is that of
    what the forward computed. Where PyTorch itself keeps the tensor (a mask,
    a factor), it refuses the change loudly, converted as unconverted."""
    from torch_mesa.ops.recipes import kept_of

    def scores(q, k, extra, check):
        s = q @ k.transpose(-2, -1)
        if kind == "bias":
            s = s + extra
        elif kind == "minus":
            s = s - extra
        elif kind == "mask":
            s = s.masked_fill(extra, -5.0)
        elif kind == "factor":
            s = s * extra
        else:
            s = s + extra.expand(2, 2, 6, 6).reshape(2, 2, 6, 6)
        if check:
            assert kept_of(s) is not None  # the recipe was passed on
        return s

    class Attn(nn.Module):
        def forward(self, q, k, extra):
            s = scores(q, k, extra, True)
            with torch.no_grad():
                if extra.dtype == torch.bool:
                    extra.logical_not_()
                else:
                    extra.mul_(3.0)
            return F.softmax(s, -1)

    torch.manual_seed(0)
    extra = {
        "bias": torch.randn(1, 2, 6, 6),
        "minus": torch.randn(2, 2, 6, 1),
        "mask": torch.rand(1, 1, 6, 6) > 0.5,
        "factor": torch.tensor(0.3),
        "view": torch.randn(1, 1, 1, 6),
    }[kind]
    q = torch.randn(2, 2, 6, 8, requires_grad=True)
    k = torch.randn(2, 2, 6, 8, requires_grad=True)
    m = Attn()
    with pytest.warns(UserWarning, match="converted no layer"):
        compress_(m)
    saved = extra.clone()
    out = m(q, k, extra)
    g = torch.randn_like(out)
    if kind in ("mask", "factor"):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(out, [q, k], g)
        return
    got = torch.autograd.grad(out, [q, k], g)
    # the reference: what the forward computed, with the tensor as it was
    ref = F.softmax(scores(q, k, saved, False), -1)
    assert torch.equal(ref, out)
    assert_grads_close(got, torch.autograd.grad(ref, [q, k], g), min_db=30.0, what=kind)


# ------------------------------------------- layers shared between models
def test_a_layer_shared_with_an_unconverted_model_runs_exactly_there():
    """transformers keeps some activation modules at module level and shares
    one object between every model that uses it (XLM, Flaubert). Converting
    one model must not change another, and converting the second must work."""
    shared_act = nn.GELU()
    shared_norm = nn.LayerNorm(16)

    def build(seed):
        torch.manual_seed(seed)
        return nn.Sequential(shared_norm, nn.Linear(16, 64), shared_act, nn.Linear(64, 16))

    a, b = build(0), build(1)
    b_plain = copy.deepcopy(b)
    x = _x().requires_grad_()
    compress_(a)
    # b is untouched by a's conversion: exact forward and gradients, nothing compressed
    assert measure(b, x).total_bytes == measure(b_plain, x).total_bytes
    gb = torch.autograd.grad(b(x).square().mean(), x)[0]
    assert torch.equal(gb, torch.autograd.grad(b_plain(x).square().mean(), x)[0])
    # and b converts too (the shared layers are reported as converted with a)
    report = compress_(b)
    assert "another model" in report.plan["0"] and "another model" in report.plan["2"]
    assert measure(b, x).total_bytes < 0.5 * measure(b_plain, x).total_bytes


# ------------------------------------------------- modules with inplace=True
def _inplace_modules():
    """Every converted torch.nn module that takes ``inplace``, built with it on."""
    import inspect

    from torch_mesa.nn.modules import CONVERTIBLE

    found = {}
    for cls in CONVERTIBLE:
        if "inplace" in inspect.signature(cls.__init__).parameters:
            found[cls.__name__] = (lambda c=cls: c(0.2, inplace=True)) if cls is nn.Dropout \
                else (lambda c=cls: c(inplace=True))
    return found


_INPLACE = _inplace_modules()


class _ReadsItsInputAgain(nn.Module):
    """``y = act(h)`` with an in-place ``act``, then code that reads ``h``
    again (a residual of the pre-activation): it must see ``h`` overwritten,
    as with PyTorch's own module. ``shape``: ``h`` is a view of a larger
    tensor (a slice), or the activation feeds a Linear directly."""

    def __init__(self, act, pattern):
        super().__init__()
        self.fc1, self.act, self.fc2, self.pattern = nn.Linear(24, 48), act, nn.Linear(48, 24), pattern

    def forward(self, x):
        h = self.fc1(x)
        if self.pattern == "slice":
            y = self.act(h[..., :32])
            h = torch.cat([h[..., :32] * 2 - y, h[..., 32:]], -1)
        elif self.pattern == "reads input":
            y = self.act(h)
            h = h + 2 * y
        else:  # "consumer": the overwritten tensor goes straight to a Linear
            h = self.act(h)
        return self.fc2(h)


def test_inplace_modules_are_found():
    # (the test below must cover every such module; these two once ignored the flag)
    assert {"SiLU", "Dropout", "ReLU"} <= set(_INPLACE)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16 autocast"])
@pytest.mark.parametrize("pattern", ["reads input", "slice", "consumer"])
@pytest.mark.parametrize("name", sorted(_INPLACE))
def test_inplace_modules_overwrite_their_input_as_pytorch_does(name, pattern, amp):
    """A converted module with ``inplace=True`` overwrites its input like
    PyTorch's own: the same forward bit for bit (SiLU and Dropout once
    returned a new tensor and left the input as it was, so code that read
    the input again computed something else), and the unconverted model's
    gradients, with training and without autograd."""
    from conftest import with_outliers

    torch.manual_seed(3)
    ref = _ReadsItsInputAgain(_INPLACE[name](), pattern)
    conv = copy.deepcopy(ref)
    compress_(conv)
    x = with_outliers(4, 13, 24, seed=5, requires_grad=False) * 3
    outs, grads = [], []
    for m in (ref, conv):
        xi = x.clone().requires_grad_()
        torch.manual_seed(11)  # (Dropout: the same mask)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = m(xi)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
        grads.append(torch.autograd.grad(out, [xi, *m.parameters()], g))
        outs.append(out)
        with torch.no_grad():
            torch.manual_seed(11)
            outs.append(m(x.clone()))
    assert torch.equal(outs[0], outs[2]), f"{name}: the forward differs from the unconverted module's"
    assert torch.equal(outs[1], outs[3]), f"{name}: the forward without autograd differs"
    assert_grads_close(grads[1], grads[0], min_db=30.0, what=f"{name}, {pattern}")


def test_inplace_modules_that_run_exactly_say_so():
    """The in-place modules that run PyTorch's own op are listed as left
    exact, with the reason; the ones compressed in place are converted."""
    seq = nn.Sequential(*[_INPLACE[name]() for name in sorted(_INPLACE)])
    report = compress_(seq)
    exact = {kind for _, kind, reason in report.skipped if reason.startswith("inplace=True")}
    converted = {kind for _, kind, _ in report.converted}
    assert exact == {"Hardsigmoid", "Hardswish", "LeakyReLU", "ReLU6"}, report
    assert converted == {"Dropout", "ReLU", "SiLU"}, report


@pytest.mark.parametrize("name", sorted(_INPLACE))
def test_inplace_module_on_a_leaf_is_refused_as_pytorch_refuses_it(name):
    leaf = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        _INPLACE[name]()(leaf)
    seq = nn.Sequential(_INPLACE[name]())
    with warnings.catch_warnings():  # (the piecewise ones run exactly in place: nothing is converted)
        warnings.filterwarnings("ignore", message="torch-mesa: compress_ converted no layer")
        compress_(seq)
    assert type(seq[0]).__module__.startswith("torch_mesa")
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        seq(leaf)


@pytest.mark.parametrize("name", ["Dropout", "ReLU", "SiLU"])
def test_inplace_module_keeps_what_the_same_module_keeps_without_it(name):
    """Overwriting the input passes the output's rebuild on to it: the Linear
    that consumes the overwritten tensor keeps nothing of its own, so
    ``inplace=True`` costs no bytes (the lesser bug would have been a second
    copy of the activation). (The piecewise ones, ReLU6, Hardswish,
    Hardsigmoid and LeakyReLU, run PyTorch's own op in place: exact.)"""
    def kept(inplace):
        torch.manual_seed(3)
        act = _INPLACE[name]()
        act.inplace = inplace
        m = _ReadsItsInputAgain(act, "consumer")
        compress_(m)
        x = torch.randn(4, 13, 24, requires_grad=True)
        return measure(m, x).total_bytes

    assert kept(True) == kept(False)


# ------------------------------------------------- one value per row, kept
#
# A tensor of one value per row (a norm written out as x * rsqrt(mean(x^2) +
# eps), a gate per token) had one range over every row: a padding token's
# zero row gets 1 / sqrt(eps) = 1000 from the norm, and every other row's
# reciprocal fell to a few codes (Llama 4's key projection: gradient cosine
# 0.978 with padding tokens in the batch). Such tensors are kept exact now.

class _PerRow(nn.Module):
    """A Linear, then something that scales each row by one value of its own, then a Linear."""

    def __init__(self, kind, d=64):
        super().__init__()
        self.kind, self.inp, self.out = kind, nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.gate = nn.Linear(d, 1)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x):
        h = self.inp(x)
        if self.kind == "gate":  # a router's weight per token
            h = h * self.gate(x)
        elif self.kind == "in-place gate":  # kept by the SiLU, then overwritten by it
            h = h * self.act(self.gate(x))
        elif self.kind == "l2 over heads":  # (B, T, H, D/H), as Llama 4's query and key norm
            b, t, d = h.shape
            h = h.view(b, t, 4, d // 4)
            h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).view(b, t, d)
        else:  # RMS norm, as T5's and Llama's are written
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        return self.out(h)


def _per_row_case(case):
    torch.manual_seed(0)
    x = torch.randn(4, 24, 64)
    if case.endswith("padding rows"):
        x[1, :6] = 0  # a padding embedding of zeros: h = 0, its norm's reciprocal 1 / sqrt(eps)
    if case.endswith("one tiny row"):
        x[2, 3] *= 1e-4
    if case.endswith("one huge row"):
        x[0, 5] *= 1e3
    return _PerRow(case.split(",")[0]), x


@pytest.mark.parametrize("case", ["rms, padding rows", "rms, one tiny row", "l2 over heads, padding rows",
                                  "gate, one huge row", "gate, one tiny row", "in-place gate, plain",
                                  # (the huge row also set the first Linear's input's channel scales
                                  # before they were capped: its weight gradient at 0.9968)
                                  "in-place gate, one huge row", "rms, plain"])
def test_one_value_per_row_is_kept_exactly(case):
    model, x = _per_row_case(case)
    report = torch_mesa.verify(model, x, loss_fn=lambda y: (y - 1).square().mean(), by_op=False, remedy=False)
    assert report.ok, str(report)
    # the wide tensors are still kept in 8 bits (what stays large is the norm's
    # x.pow(2) and rsqrt, which run as PyTorch runs them and keep fp32)
    assert report.kept_converted < 0.7 * report.kept_exact, str(report)


def test_llama4_with_padding_tokens():
    """The case found: Llama 4 (its query and key L2 norm written out) on a
    batch with padding tokens, whose embedding is zero."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Llama4TextConfig(hidden_size=256, intermediate_size=512, intermediate_size_mlp=512,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=64, vocab_size=100, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(cfg)
    ids = torch.randint(3, 100, (3, 32), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0  # left padding
    report = torch_mesa.verify(model, {"input_ids": ids, "attention_mask": mask},
                               loss_fn=lambda out: out.logits.float().square().mean(), by_op=False, remedy=False)
    assert report.ok, str(report)


class _SharedWeight(nn.Module):
    """One op of ``kind`` whose weight a plain PyTorch op outside the model
    uses again (a tied head, a weight shared across calls)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        shape = {"linear": (48, 48), "conv2d": (32, 32, 3, 3), "matmul": (48, 48)}[kind]
        self.w = nn.Parameter(torch.randn(shape) * shape[1] ** -0.5)

    def forward(self, x):
        return self.plain(x) if self.kind != "matmul" else x @ self.w

    def plain(self, x):
        if self.kind == "conv2d":
            return F.conv2d(x, self.w, padding=1)
        return F.linear(x, self.w) if self.kind == "linear" else torch.matmul(x, self.w)


@pytest.mark.parametrize("order", ["converted first", "plain first"])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "matmul"])
def test_a_weight_shared_with_plain_ops_under_autocast_gets_every_gradient(kind, order):
    """Under autocast, a weight used by a converted op and by a plain PyTorch
    op of the same autocast region gets the gradient of both, as without
    torch-mesa. (PyTorch 2.8's autocast handed the plain op the weight's cast
    that the converted op's forward had made without gradients: the plain
    op's share of the weight's gradient was silently missing.)"""
    shape = (2, 32, 12, 12) if kind == "conv2d" else (4, 24, 48)
    x, y = torch.randn(shape), torch.randn(shape)
    grads = {}
    for convert in (False, True):
        torch.manual_seed(0)
        m = _SharedWeight(kind)
        if convert:
            compress_(m, MesaConfig(bits=8))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = (m(x), m.plain(y)) if order == "converted first" else (m.plain(y), m(x))
        ours = outs[0 if order == "converted first" else 1].grad_fn
        assert issubclass(getattr(ours, "_forward_cls", type), OpFunction) == convert, ours  # (converted op ran)
        sum(o.float().square().mean() for o in outs).backward()
        grads[convert] = m.w.grad
    assert cosine(grads[True], grads[False]) >= 0.999
