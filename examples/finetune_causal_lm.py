"""Train a Hugging Face causal language model with torch-mesa, nothing downloaded.

    pip install 'torch-mesa[transformers]'
    python examples/finetune_causal_lm.py [--steps 200] [--model gpt2|llama]

The corpus is generated here: sentences of small-number arithmetic in words
("seven plus two is nine."), tokenised by characters, so no tokenizer or
dataset is fetched. The model is built from its config class with random
weights (a small GPT-2 or Llama), converted with one line, and trained; the
script prints the bytes a batch keeps for backward before and after, and the
loss as it falls.
"""

import argparse
import random

import torch

import torch_mesa

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def corpus(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        lines.append(f"{WORDS[a]} plus {WORDS[b]} is {WORDS[a + b]}.")
    return "\n".join(lines)


def build(kind: str, vocab: int, seq_len: int):
    import transformers

    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=128, n_layer=4, n_head=4)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len)
    return transformers.LlamaForCausalLM(cfg)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bits", type=int, default=8)
    args = p.parse_args()

    text = corpus(4000)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text])
    torch.manual_seed(0)
    model = build(args.model, len(chars), args.seq_len)
    model.train()

    def batch(step):
        g = torch.Generator().manual_seed(step)
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size,), generator=g)
        return torch.stack([data[s:s + args.seq_len] for s in starts])

    ids = batch(0)
    before = torch_mesa.measure(model, input_ids=ids, labels=ids, loss_fn=lambda out: out.loss)
    report = torch_mesa.compress_(model, torch_mesa.MesaConfig(bits=args.bits))  # <- the one line
    after = torch_mesa.measure(model, input_ids=ids, labels=ids, loss_fn=lambda out: out.loss)
    print(report)
    print(f"\nkept for backward by one batch: {before.total_bytes / 2**20:.1f} MiB -> "
          f"{after.total_bytes / 2**20:.1f} MiB ({after.total_bytes / before.total_bytes:.2f}x)\n")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, args.steps + 1):
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")

    model.eval()
    prompt = torch.tensor([[stoi[c] for c in "three plus four is "]])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    print("sample:", "".join(chars[i] for i in out[0].tolist()))


if __name__ == "__main__":
    main()
