"""Fine-tune a Llama-style model with LoRA adapters (peft) and torch-mesa.

    pip install 'torch-mesa[transformers,peft]'
    python examples/finetune_lora.py [--steps 100] [--vocab 32000]

Most people short of memory fine-tune adapters on a frozen base. There the
frozen layers keep nothing for their weights, the adapters' inputs are kept
once and compressed, and the head and loss never keep the logits. The script
builds a Llama-style model from its config class (random weights, nothing
downloaded; a real run would load a pretrained one the same way), wraps it
with peft LoRA, and compares one batch against the unconverted LoRA run:
the bytes kept for backward, and the adapters' gradients (cosine to the
exact ones). Then it trains the adapters on generated arithmetic sentences
(character tokens mapped into the vocabulary) and prints the loss.
"""

import argparse
import copy
import random

import torch
import torch.nn.functional as F

import torch_mesa
from torch_mesa.measure import measure_call

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def corpus(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(f"{WORDS[a]} plus {WORDS[b]} is {WORDS[a + b]}."
                     for a, b in ((rng.randint(0, 9), rng.randint(0, 9)) for _ in range(n)))


def build(vocab: int, width: int, layers: int, seq_len: int):
    import peft
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=width * 8 // 3,
                                   num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                                   num_key_value_heads=max(1, width // 128), max_position_embeddings=seq_len)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    lora = peft.get_peft_model(base, peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    # peft starts lora_B at zero; a few steps in they are not, and only then
    # do the lora_A gradients carry information to compare
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return lora


def adapter_grads(model, ids, amp):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--bf16", action="store_true", help="train under bf16 autocast")
    args = p.parse_args()

    text = corpus(4000)
    chars = sorted(set(text))
    stoi = {c: i + 3 for i, c in enumerate(chars)}  # character ids inside the model's vocabulary
    data = torch.tensor([stoi[c] for c in text])

    def batch(step):
        g = torch.Generator().manual_seed(step)
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size,), generator=g)
        return torch.stack([data[s:s + args.seq_len] for s in starts.tolist()])

    model = build(args.vocab, args.width, args.layers, args.seq_len)
    model.train()
    exact = copy.deepcopy(model)
    ids = batch(0)
    amp = torch.bfloat16 if args.bf16 else None
    run = lambda m: m(input_ids=ids, labels=ids).loss  # noqa: E731
    before = measure_call(exact, run, autocast_dtype=amp)
    report = torch_mesa.compress_(model)  # <- the one line
    after = measure_call(model, run, autocast_dtype=amp)
    print(report)
    print(f"\nkept for backward by one batch (LoRA run): {before.total_bytes / 2**20:.1f} MiB -> "
          f"{after.total_bytes / 2**20:.1f} MiB ({after.total_bytes / before.total_bytes:.2f}x)")
    want, got = adapter_grads(exact, ids, args.bf16), adapter_grads(model, ids, args.bf16)
    assert want.keys() == got.keys() and all("lora_" in n for n in want)
    cos = {n: F.cosine_similarity(got[n].double().flatten(), want[n].double().flatten(), 0).item() for n in want}
    worst = min(cos, key=cos.get)
    print(f"adapters' gradients vs the unconverted LoRA run: worst cosine {cos[worst]:.5f} ({worst})\n")
    del exact

    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=2e-3)
    for step in range(1, args.steps + 1):
        ids = batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
