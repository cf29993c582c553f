"""A converted training step reads no tensor's value on the host.

On a GPU, reading a value the device computed (``.item()``, ``bool(t)``,
``nonzero``, ``torch.equal``, a boolean-mask index) waits until every kernel
queued before it has run: the host stops queueing work, the GPU then idles
while the host catches up, and a step that ran ahead of its kernels becomes
one that waits on each such read. The ranges, seeds, running estimates and
checks that torch-mesa adds must stay on the device. This is tested on the
CPU, where nothing waits: every ATen call a step makes is recorded by the
profiler, and the calls that read a value back (or size an output by the
data) are counted; the converted step may make no more of them than the
unconverted one (the models' own code may make some).

Python's reads of a CPU tensor (``tolist``, ``item``, ``bool``) make no
ATen call there; a function mode counts those.

A tensor made from Python data on a GPU is a copy from the host, which
waits the same way: ATen's ``lift_fresh`` (``torch.tensor``) counts as a
read (the seed of stochastic rounding and the causal LM's probe were made
so, once per keep and once per step; they are filled on the device now).

One kind of call reads on purpose: the fused language-model loss of a
converted causal LM (:mod:`torch_mesa.integrations.causal_lm`) proves on
every call that the model changed its logits as its table says (a probe
compared with ``torch.equal``), and checks that the targets lie in the
vocabulary; it reads both once a step, in the forward, whatever the
numbers of tokens and vocabulary chunks (its backward read once per token
chunk and made a ``nonzero`` per block of logits before).

Variants: timm ViT (with and without dropout: the kept masks) and a Llama
with the fused language-model loss, at 8 bits with nearest rounding, 4 bits
(stochastic rounding, packed codes) and with running range estimates; at 8
bits also BERT with a padded sequence, GPT-2 (the fused loss too), a
ResNet-18 (ReLU masks, convolutions) and ``nn.MultiheadAttention`` with a
padding mask and dropout; each in fp32 and under bf16 autocast; a ViT
compiled by ``torch_mesa.compile``; the loss op alone over many blocks; and the probe itself, on a step that reads a value.
"""

import collections

import pytest
import torch
from torch.overrides import TorchFunctionMode

from torch_mesa import MesaConfig, compress_, ops

from test_memory_stays_flat import _llama, _vit, _vit_dropout

# ATen calls whose result depends on a tensor's values as the host sees
# them: each waits for the device on a GPU. And a tensor made from Python
# data (``torch.tensor(v, device=...)``, ATen's ``lift_fresh``): on a GPU a
# copy from the host, which waits for the queued kernels too.
_READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::nonzero_static",
          "aten::equal", "aten::allclose", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
          "aten::unique_consecutive", "aten::repeat_interleave", "aten::_assert_async", "aten::tolist",
          "aten::lift_fresh"}

_CONFIGS = {
    "8 bits": MesaConfig(bits=8),
    "4 bits, stochastic": MesaConfig(bits=4),
    "8 bits, running ranges": MesaConfig(bits=8, range_estimate="running"),
}


_T = torch.Tensor
_PYTHON_READS = {_T.tolist, _T.item, _T.__bool__, _T.__int__, _T.__float__, _T.__index__, _T.numpy, _T.cpu}


class _PythonReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _PYTHON_READS:
            self.counts[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def _reads(step) -> collections.Counter:
    """The calls of one ``step`` that read values on the host: ATen's (by
    the profiler) and Python's (by a function mode)."""
    python = _PythonReads()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, python:
        step()
    return collections.Counter(e.name for e in prof.events() if e.name in _READS) + python.counts


# The fused language-model loss's reads, once a step (module docstring).
_LM_LOSS_READS = collections.Counter({"aten::equal": 1, "tolist": 1})


def _training_step(model, args, kwargs, loss_of, amp):
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_of(model(*args, **kwargs))
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def _bert_padded():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=200, max_position_embeddings=64)
    ids = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # (a padded sequence)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return (transformers.BertForMaskedLM(cfg), (), {"input_ids": ids, "attention_mask": mask, "labels": labels},
            lambda out: out.loss)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=200, n_positions=64)
    ids = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(1))
    return transformers.GPT2LMHeadModel(cfg), (), {"input_ids": ids, "labels": ids}, lambda out: out.loss


def _resnet():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return (timm.create_model("resnet18", pretrained=False, num_classes=10), (torch.randn(2, 3, 32, 32),), {},
            lambda out: out.float().sum())


class _MHA(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True, dropout=0.1)
        self.norm, self.fc = torch.nn.LayerNorm(32), torch.nn.Linear(32, 32)

    def forward(self, x, pad):
        h = self.norm(x)
        return x + self.fc(self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0])


def _mha():
    torch.manual_seed(0)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 7:] = True
    return _MHA(), (torch.randn(3, 10, 32), pad), {}, lambda out: out.float().sum()


# builder, whether the model is a causal LM with the fused loss (its reads: _LM_LOSS_READS)
_MODELS = {"timm ViT": (_vit, False), "timm ViT with dropout": (_vit_dropout, False), "Llama": (_llama, True)}
_MORE_MODELS = {"BERT, padded": (_bert_padded, False), "GPT-2": (_gpt2, True), "ResNet-18": (_resnet, False),
                "nn.MultiheadAttention, padded": (_mha, False)}


@pytest.mark.parametrize("config,model", [(c, m) for c in _CONFIGS for m in _MODELS] +
                         [("8 bits", m) for m in _MORE_MODELS])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16 autocast"])
def test_a_converted_step_reads_no_value_on_the_host(model, amp, config):
    build, lm_loss = {**_MODELS, **_MORE_MODELS}[model]
    counts = {}
    for converted in (False, True):
        model, args, kwargs, loss_of = build()
        if converted:
            compress_(model, _CONFIGS[config])
        model.train()
        step = _training_step(model, args, kwargs, loss_of, amp)
        with _PythonReads():  # (the first steps compile, under the mode the counted step runs in)
            for _ in range(2):
                step()
        counts[converted] = _reads(step)
    extra = counts[True] - counts[False]
    if lm_loss:
        assert extra == _LM_LOSS_READS, f"the fused loss reads {dict(extra)}"
        extra -= _LM_LOSS_READS
    assert not extra, f"reads added by the conversion: {dict(extra)} (unconverted: {dict(counts[False])})"


def test_a_compiled_converted_step_reads_no_more_than_the_compiled_model():
    """``torch_mesa.compile`` (by block) against ``torch.compile`` of the
    same model: the compiled saving adds no read (PyTorch's compiled code
    reads a few values of its own, on the CPU; the same for both)."""
    import torch_mesa

    counts = {}
    for converted in (False, True):
        model, args, kwargs, loss_of = _vit()
        compiled = torch_mesa.compile(model, _CONFIGS["8 bits"]) if converted else torch.compile(model)
        step = _training_step(compiled, args, kwargs, loss_of, False)
        with _PythonReads():  # (Dynamo guards on the mode stack: compiled under the mode the counted step runs in)
            for _ in range(2):
                step()
        counts[converted] = _reads(step)
    extra = counts[True] - counts[False]
    assert not extra, f"reads added by the compiled saving: {dict(extra)} (torch.compile: {dict(counts[False])})"


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16 autocast"])
def test_the_loss_op_reads_once_whatever_its_number_of_blocks(amp, smoothing):
    """Forward and backward of the loss over 7 token chunks by 4 vocabulary
    chunks, with ignored targets filling whole chunks: one read (the
    targets' check and which chunks have targets), in the forward. Before,
    backward read once per token chunk (7) and made a ``nonzero`` per block
    of a chunk with targets (5 x 4)."""
    torch.manual_seed(0)
    x = torch.randn(2, 26, 24, requires_grad=True)
    w = torch.randn(60, 24, requires_grad=True)
    target = torch.randint(0, 60, (2, 26))
    target[0, :20] = -100

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = ops.linear_cross_entropy(x, w, target, label_smoothing=smoothing, token_chunk=8, vocab_chunk=16)
        loss.backward()

    with _PythonReads():
        step()
    assert _reads(step) == collections.Counter({"tolist": 1})


def test_the_probe_sees_a_value_read():
    """The probe counts the reads that a step adds (so the test above can fail)."""
    model, args, kwargs, loss_of = _vit()
    compress_(model, _CONFIGS["8 bits"])

    def reading(out):
        loss = loss_of(out)
        if bool(loss > 0) and float(loss.detach().abs().max()) >= 0:  # two reads
            return loss * 1
        return loss

    plain = _training_step(model, args, kwargs, loss_of, False)
    probed = _training_step(model, args, kwargs, reading, False)
    plain()
    extra = _reads(probed) - _reads(plain)
    assert sum(extra.values()) >= 2, dict(extra)
