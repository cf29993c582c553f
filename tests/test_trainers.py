"""Settings and running estimates travel with checkpoints: save_pretrained /
from_pretrained, the transformers.Trainer callback and the Lightning
callback (tiny models, a few steps, CPU)."""

import warnings

import pytest
import torch

import torch_mesa
from torch_mesa import MesaConfig
from torch_mesa.checkpoint import CONFIG_NAME, RANGES_NAME, range_state_dict

transformers = pytest.importorskip("transformers")

RUNNING = MesaConfig(range_estimate="running", momentum=0.5)


def _llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def _ids(n=8, seq=16, seed=0):
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(seed))


def _step(model, ids):
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()


def _same_ranges(a, b):
    assert a.keys() == b.keys() and a
    for k in a:
        for f in ("lo", "span"):
            torch.testing.assert_close(a[k][f].cpu(), b[k][f].cpu(), rtol=0, atol=0)


def test_save_pretrained_and_from_pretrained(tmp_path):
    model = _llama()
    torch_mesa.compress_(model, RUNNING)
    _step(model, _ids())
    model.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / RANGES_NAME).is_file()
    assert torch_mesa.load_config(str(tmp_path)) == RUNNING
    # the weights load into the plain model, keys and values unchanged
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert not torch_mesa.is_compressed(plain)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    again = torch_mesa.from_pretrained(transformers.LlamaForCausalLM, str(tmp_path))
    assert torch_mesa.config_of(again) == RUNNING
    _same_ranges(range_state_dict(again), range_state_dict(model))
    # and it trains on from there like the original
    ids = _ids(seed=1)
    _step(model, ids)
    _step(again, ids)
    _same_ranges(range_state_dict(again), range_state_dict(model))
    # a plain model's directory converts nothing
    plain.save_pretrained(tmp_path / "plain")
    assert torch_mesa.reapply_(plain, str(tmp_path / "plain")) is None


def test_dynamic_ranges_write_no_range_file(tmp_path):
    model = _llama()
    torch_mesa.compress_(model, MesaConfig(bits=4))
    _step(model, _ids())
    model.save_pretrained(tmp_path)
    assert torch_mesa.load_config(str(tmp_path)) == MesaConfig(bits=4)
    assert not (tmp_path / RANGES_NAME).exists()


class _Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = _ids(n=16)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(model, out, steps, callbacks):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, save_steps=2, save_strategy="steps", per_device_train_batch_size=4,
        learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=callbacks)


def test_transformers_trainer_callback_saves_and_resumes(tmp_path):
    from torch_mesa.trainers import MesaTrainerCallback

    model = _llama()
    cb = MesaTrainerCallback(RUNNING)
    trainer = _trainer(model, tmp_path, 4, [cb])
    trainer.train()
    assert torch_mesa.config_of(model) == RUNNING and cb.report is not None
    assert cb.report.fused_losses == [""]
    ckpt = tmp_path / "checkpoint-4"
    assert torch_mesa.load_config(str(ckpt)) == RUNNING
    saved = torch.load(ckpt / RANGES_NAME, weights_only=True)
    _same_ranges(saved, range_state_dict(model))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)

    # resume in a fresh model with other settings given: the checkpoint's win
    seen = {}

    class Probe(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["config"] = torch_mesa.config_of(model)
            seen["ranges"] = range_state_dict(model)

    fresh = _llama(seed=1)
    trainer = _trainer(fresh, tmp_path, 6, [MesaTrainerCallback(MesaConfig(bits=4)), Probe()])
    with pytest.warns(UserWarning, match="other settings"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert seen["config"] == RUNNING
    _same_ranges(seen["ranges"], saved)
    assert torch_mesa.config_of(fresh) == RUNNING
    assert torch_mesa.load_config(str(tmp_path / "checkpoint-6")) == RUNNING


def test_transformers_trainer_resume_without_saved_config_warns(tmp_path):
    from torch_mesa.trainers import MesaTrainerCallback

    model = _llama()
    _trainer(model, tmp_path, 2, []).train()  # a plain run
    fresh = _llama(seed=1)
    trainer = _trainer(fresh, tmp_path, 3, [MesaTrainerCallback()])
    with pytest.warns(UserWarning, match="no torch-mesa config was found"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert torch_mesa.config_of(fresh) == MesaConfig()


def test_lightning_callback_saves_and_resumes(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from torch_mesa.trainers import MesaLightningCallback

    class LM(pl.LightningModule):
        def __init__(self, seed=0):
            super().__init__()
            self.model = _llama(seed)

        def training_step(self, batch, i):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def fit(module, steps, callback, ckpt=None):
        trainer = pl.Trainer(max_steps=steps, callbacks=[callback], default_root_dir=str(tmp_path), logger=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                             enable_checkpointing=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
            trainer.fit(module, torch.utils.data.DataLoader(_ids(n=16), batch_size=4), ckpt_path=ckpt)
        return trainer

    module = LM()
    cb = MesaLightningCallback(RUNNING)
    trainer = fit(module, 3, cb)
    assert torch_mesa.config_of(module) == RUNNING and cb.report is not None
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert MesaConfig.from_dict(checkpoint["torch_mesa"]["config"]) == RUNNING
    saved = checkpoint["torch_mesa"]["ranges"]
    _same_ranges(saved, range_state_dict(module))
    # the state_dict is the plain model's: it loads into an unconverted module
    LM(seed=2).load_state_dict(checkpoint["state_dict"])

    seen = {}
    fresh = LM(seed=1)
    orig = fresh.on_train_start

    def snapshot():
        seen["config"] = torch_mesa.config_of(fresh)
        seen["ranges"] = range_state_dict(fresh)
        orig()

    fresh.on_train_start = snapshot
    with pytest.warns(UserWarning, match="other settings"):
        fit(fresh, 5, MesaLightningCallback(MesaConfig(bits=4)), ckpt=str(path))
    assert seen["config"] == RUNNING
    _same_ranges(seen["ranges"], saved)
    assert torch_mesa.config_of(fresh) == RUNNING
