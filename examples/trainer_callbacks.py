"""torch-mesa in the trainers people use: one callback, checkpoints that resume.

    pip install 'torch-mesa[transformers]'            # and '[lightning]' for --trainer lightning
    python examples/trainer_callbacks.py --trainer hf [--steps 40]
    python examples/trainer_callbacks.py --trainer lightning

Trains a small Llama-style model (built from its config class, random
weights) on generated arithmetic sentences for ``--steps`` steps with a
checkpoint halfway, then starts a *new* process-like run from that checkpoint:
a fresh model, a callback handed other settings, and the run continues with
the settings (and running range estimates) the checkpoint was written with.
"""

import argparse
import os
import random
import tempfile
import warnings

import torch

import torch_mesa
from torch_mesa import MesaConfig

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
CONFIG = MesaConfig(range_estimate="running")  # running ranges: state that must travel with checkpoints


def data(seq_len: int, n: int = 64) -> torch.Tensor:
    rng = random.Random(0)
    text = "\n".join(f"{WORDS[a]} plus {WORDS[b]} is {WORDS[a + b]}."
                     for a, b in ((rng.randint(0, 9), rng.randint(0, 9)) for _ in range(2000)))
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    starts = torch.randint(0, len(ids) - seq_len, (n,), generator=torch.Generator().manual_seed(0))
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def build(seed: int = 0):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def with_hf(out: str, steps: int, seq: torch.Tensor) -> None:
    import transformers
    from torch_mesa.trainers import MesaTrainerCallback

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return len(seq)

        def __getitem__(self, i):
            return {"input_ids": seq[i], "labels": seq[i]}

    def trainer(model, max_steps, config):
        args = transformers.TrainingArguments(output_dir=out, max_steps=max_steps, save_steps=steps // 2,
                                              per_device_train_batch_size=8, learning_rate=2e-3, logging_steps=10,
                                              report_to=[], use_cpu=True, disable_tqdm=True)
        return transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                    callbacks=[MesaTrainerCallback(config)])

    model = build()
    trainer(model, steps // 2, CONFIG).train()
    ckpt = os.path.join(out, f"checkpoint-{steps // 2}")
    print(f"first run: {steps // 2} steps, converted with {torch_mesa.config_of(model)}")
    print(f"checkpoint {os.path.basename(ckpt)}: {sorted(os.listdir(ckpt))}")
    fresh = build(seed=1)
    t = trainer(fresh, steps, MesaConfig(bits=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.train(resume_from_checkpoint=ckpt)
    for w in caught:
        if "torch-mesa" in str(w.message):
            print("warning:", w.message)
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    print(f"resumed run: continued to step {t.state.global_step} with {torch_mesa.config_of(fresh)}")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def with_lightning(out: str, steps: int, seq: torch.Tensor) -> None:
    import pytorch_lightning as pl
    from torch_mesa.trainers import MesaLightningCallback

    class LM(pl.LightningModule):
        def __init__(self, seed=0):
            super().__init__()
            self.model = build(seed)
            self.losses = []

        def training_step(self, batch, i):
            loss = self.model(input_ids=batch, labels=batch).loss
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=2e-3)

    def fit(module, max_steps, config, ckpt=None):
        trainer = pl.Trainer(max_steps=max_steps, callbacks=[MesaLightningCallback(config)], default_root_dir=out,
                             logger=False, enable_progress_bar=False, enable_model_summary=False,
                             accelerator="cpu", enable_checkpointing=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, torch.utils.data.DataLoader(seq, batch_size=8), ckpt_path=ckpt)
        for w in caught:
            if "torch-mesa" in str(w.message):
                print("warning:", w.message)
        return trainer

    module = LM()
    trainer = fit(module, steps // 2, CONFIG)
    ckpt = os.path.join(out, "half.ckpt")
    trainer.save_checkpoint(ckpt)
    print(f"first run: {steps // 2} steps, converted with {torch_mesa.config_of(module)}")
    fresh = LM(seed=1)
    trainer = fit(fresh, steps, MesaConfig(bits=4), ckpt=ckpt)
    print(f"resumed run: continued to step {trainer.global_step} with {torch_mesa.config_of(fresh)}")
    print(f"loss {module.losses[0]:.3f} -> {fresh.losses[-1]:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainer", choices=["hf", "lightning"], default="hf")
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    seq = data(64)
    with tempfile.TemporaryDirectory() as out:
        (with_hf if args.trainer == "hf" else with_lightning)(out, args.steps, seq)


if __name__ == "__main__":
    main()
