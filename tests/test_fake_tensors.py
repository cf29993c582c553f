"""Converted models under a ``FakeTensorMode`` and on the meta device, where
tensors have shapes but no data (tools that trace a model or estimate its
memory run it so). The compiled quantizer's kernels read raw pointers: given
fake tensors, the process crashed (segmentation fault), so each variant runs
in a subprocess of its own, with the compiled kernels on (the default). Checks
that forward and backward complete and give what the unconverted model gives
under the same mode: output shape and dtype, and a gradient of each
parameter's shape."""

import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.nn.functional as F
    import torch_mesa
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch_mesa.tools import demo

    model, where = sys.argv[1], sys.argv[2]
    amp = len(sys.argv) > 3

    def build():
        if model == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel
            return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64,
                                              bos_token_id=0, eos_token_id=0))
        return demo.build_model()

    def step(m):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            if model == "gpt2":
                ids = torch.randint(0, 100, (2, 16), device=device)
                out = m(ids, labels=ids)
                loss, result = out.loss, out.logits
            else:
                result = m(torch.randn(8, 1, 8, 8, device=device))
                loss = F.cross_entropy(result, torch.randint(0, 10, (8,), device=device))
        loss.backward()
        return result, {n: p.grad for n, p in m.named_parameters()}

    device = "meta" if where == "meta" else "cpu"
    with (FakeTensorMode() if where == "fake" else torch.device("meta")):
        plain, converted = build(), build()  # (a deep copy of a fake tensor belongs to another fake mode)
        torch_mesa.compress_(converted)
        want, want_grads = step(plain)
        got, got_grads = step(converted)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    for name, g in want_grads.items():
        h = got_grads[name]
        assert (g is None) == (h is None) and (g is None or g.shape == h.shape), name
    assert type(got).__name__ == ("FakeTensor" if where == "fake" else "Tensor") and got.device.type == device
    print("ok")
""")


@pytest.mark.parametrize("model,where,amp", [
    ("vit", "fake", False), ("vit", "fake", True), ("vit", "meta", False), ("gpt2", "fake", True),
], ids=["vit-fake", "vit-fake-bf16", "vit-meta", "gpt2-fake-bf16"])
def test_converted_models_run_without_data(model, where, amp):
    env = {k: v for k, v in os.environ.items() if k != "TORCH_MESA_KERNEL"}  # (the compiled kernels)
    args = [sys.executable, "-c", _SCRIPT, model, where] + (["amp"] if amp else [])
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), (res.returncode, res.stderr[-3000:])
