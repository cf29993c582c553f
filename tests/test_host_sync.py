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

One kind of call reads on purpose: the fused language-model loss of a
converted causal LM (:mod:`torch_mesa.integrations.causal_lm`) proves on
every call that the model changed its logits as its table says (a probe
compared with ``torch.equal``), and checks that the targets lie in the
vocabulary; it reads both once a step, in the forward, whatever the
numbers of tokens and vocabulary chunks (its backward read once per token
chunk and made a ``nonzero`` per block of logits before).

Variants: timm ViT (with and without dropout: the kept masks), a Llama with
the fused language-model loss, fp32 and bf16 autocast, 8 bits with
nearest rounding, 4 bits (stochastic rounding, packed codes) and running
range estimates; the loss op alone over many blocks; and the probe itself,
on a step that reads a value.
"""

import collections

import pytest
import torch
from torch.overrides import TorchFunctionMode

from torch_mesa import MesaConfig, compress_, ops

from test_memory_stays_flat import _llama, _vit, _vit_dropout

# ATen calls whose result depends on a tensor's values as the host sees
# them: each waits for the device on a GPU.
_READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::nonzero_static",
          "aten::equal", "aten::allclose", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
          "aten::unique_consecutive", "aten::repeat_interleave", "aten::_assert_async", "aten::tolist"}

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


@pytest.mark.parametrize("config", list(_CONFIGS))
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16 autocast"])
@pytest.mark.parametrize("build", [_vit, _vit_dropout, _llama], ids=["timm ViT", "timm ViT with dropout", "Llama"])
def test_a_converted_step_reads_no_value_on_the_host(build, amp, config):
    counts = {}
    for converted in (False, True):
        model, args, kwargs, loss_of = build()
        if converted:
            compress_(model, _CONFIGS[config])
        model.train()
        step = _training_step(model, args, kwargs, loss_of, amp)
        for _ in range(2):  # (the first steps compile the quantizer and start the running ranges)
            step()
        counts[converted] = _reads(step)
    extra = counts[True] - counts[False]
    if build is _llama:
        assert extra == _LM_LOSS_READS, f"the fused loss reads {dict(extra)}"
        extra -= _LM_LOSS_READS
    assert not extra, f"reads added by the conversion: {dict(extra)} (unconverted: {dict(counts[False])})"


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
