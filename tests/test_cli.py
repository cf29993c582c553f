"""The command line end to end at tiny sizes; outputs checked for content."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from torch_mesa.tools import cli


def run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_demo_short_run(tmp_path, capsys):
    code, out, err = run(["demo", "--epochs", "4", "--no-peak", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert "bytes kept for backward" in out and "test accuracy" in out and "median step time" in out
    data = json.loads((tmp_path / "demo.json").read_text())
    base, mesa = data["runs"]
    assert base["name"] == "unconverted" and mesa["name"] == "torch-mesa 8-bit"
    # the table's numbers are the measured ones
    assert f"{base['test_accuracy']:.2%}" in out and f"{mesa['test_accuracy']:.2%}" in out
    assert mesa["kept_bytes"] < 0.4 * base["kept_bytes"]
    # four epochs of 23 steps already learn something (chance is 10%; 30 epochs reach ~95%)
    assert base["test_accuracy"] > 0.25 and abs(base["test_accuracy"] - mesa["test_accuracy"]) < 0.05
    png = (tmp_path / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert set(base["kept_by_block"]) >= {"blocks.0", "blocks.3"}


def test_demo_peak_memory_in_fresh_processes():
    from torch_mesa.tools.demo import _peak_child

    plain = _peak_child(None, 64, "cpu", 0)
    mesa = _peak_child(8, 64, "cpu", 0)
    assert plain > 0 and mesa > 0
    assert mesa < 0.7 * plain  # measured: about 0.3x for this small ViT


def test_report_table_json_csv(capsys):
    args = ["report", "vit:tiny", "--image-size", "64", "--batch-size", "4"]
    code, out, _ = run(args, capsys)
    assert code == 0
    assert "blocks.0" in out and "blocks.11" in out and "total" in out
    assert "converted:" in out and "Linear" in out
    code, out, _ = run(args + ["--format", "json"], capsys)
    data = json.loads(out)
    assert data["total_after"] < 0.3 * data["total_before"]
    row = next(r for r in data["rows"] if r["module"] == "blocks.0")
    assert 0 < row["after"] < 0.25 * row["before"]
    code, out, _ = run(args + ["--format", "csv", "--bits", "4", "--autocast", "bf16"], capsys)
    lines = out.splitlines()
    assert lines[0] == "module,before_bytes,after_bytes" and lines[-1].startswith("total,")


def test_report_callable_model(capsys):
    code, out, _ = run(["report", "torch_mesa.tools.models:vit_tiny", "--image-size", "32", "--batch-size", "1",
                        "--depth", "1"], capsys)
    assert code == 0 and "blocks" in out


@pytest.mark.parametrize(
    "argv,words",
    [
        (["report", "resnet50"], ["unknown model", "vit:small"]),
        (["report", "vit:huge"], ["vit:tiny"]),
        (["report", "vit:small", "--image-size", "100"], ["multiple of the patch size"]),
        (["report", "vit:tiny", "--batch-size", "0"], ["--batch-size"]),
        (["report", "vit:tiny", "--bits", "3"], ["bits=3"]),
        (["report", "no_such_module:fn"], ["cannot import"]),
        (["report", "missing/config.json"], ["no such config file"]),
        (["report", "hf:gpt2", "--size", "layers"], ["KEY=VALUE"]),
        (["demo", "--epochs", "0"], ["epochs=0"]),
        (["bench", "--configs", "mesa8"], ["baseline"]),
        (["bench", "--model", "vit:tiny", "--image-size", "32", "--labels"], ["--labels", "language models"]),
        (["bench", "--suite", "mesa", "--labels"], ["--labels", "Mesa's image models"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, words, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def test_missing_optional_dependency_names_the_extra(monkeypatch, capsys):
    # a None entry in sys.modules makes any import of that name fail
    monkeypatch.setitem(sys.modules, "timm", None)
    code, _, err = run(["report", "timm:vit_small_patch16_224"], capsys)
    assert code == 2 and "pip install 'torch-mesa[timm]'" in err
    monkeypatch.setitem(sys.modules, "transformers", None)
    code, _, err = run(["report", "hf:gpt2"], capsys)
    assert code == 2 and "pip install 'torch-mesa[transformers]'" in err
    monkeypatch.setitem(sys.modules, "sklearn", None)
    code, _, err = run(["demo", "--epochs", "1"], capsys)
    assert code == 2 and "pip install 'torch-mesa[demo]'" in err


def test_bench_tiny_writes_csv_and_docs(tmp_path, capsys):
    csv_path, md = tmp_path / "r.csv", tmp_path / "b.md"
    argv = ["bench", "--model", "vit:tiny", "--image-size", "32", "--batch-size", "2", "--repeats", "1",
            "--configs", "baseline,checkpoint,mesa8", "--csv", str(csv_path), "--docs", str(md)]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    text = md.read_text()
    for c in ("| baseline |", "| checkpoint |", "| mesa8 |", "torch-mesa bench --model vit:tiny"):
        assert c in text
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == ["baseline", "checkpoint", "mesa8"]
    assert rows[0]["torch"] == torch.__version__ and rows[0]["commit"]
    metrics = json.loads(rows[-1]["metrics"])
    assert metrics["blocks"] > 0 and metrics["peak"] > metrics["rise"] > 0 and metrics["worst_cos"] > 0.999
    # running again (one configuration, no peak: the section's key is the
    # model, device, autocast and batch) replaces the section instead of
    # appending a second one
    again = argv[:argv.index("--configs")] + ["--configs", "baseline", "--skip-peak", "--csv", str(csv_path),
                                              "--docs", str(md)]
    assert run(again, capsys)[0] == 0
    text = md.read_text()
    assert text.count("bench:vit:tiny|cpu|none|b2:start") == 1
    assert "| baseline |" in text and "| mesa8 |" not in text


def test_bench_labels_runs_the_models_own_loss(tmp_path, capsys, monkeypatch):
    """``--labels``: a causal LM's batch passes labels and the loss is the
    model's own, as Hugging Face's trainers run it; converted, that is the
    fused head and loss, which keeps no logits: fewer bytes than the same
    model scored from its logits outside. Its own section of the docs, and
    the peak child (a fresh process) gets the flag too."""
    pytest.importorskip("transformers")
    from pathlib import Path
    import os

    benchmarks = str(Path(__file__).resolve().parent.parent / "benchmarks")
    monkeypatch.setenv("MESA_GPU_QUICK", "1")  # (gpu.llama's small sizes)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([benchmarks, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(benchmarks)
    md = tmp_path / "b.md"
    rows = {}
    for labels in (False, True):
        csv_path = tmp_path / f"r{labels}.csv"
        argv = ["bench", "--model", "gpu:llama", "--seq-len", "64", "--batch-size", "2", "--repeats", "1",
                "--configs", "baseline,mesa8", "--csv", str(csv_path), "--docs", str(md)]
        code, out, err = run(argv + (["--labels"] if labels else ["--skip-peak"]), capsys)
        assert code == 0, err
        with csv_path.open() as f:
            rows[labels] = {r["config"]: json.loads(r["metrics"]) for r in csv.DictReader(f)}
    assert rows[True]["mesa8"]["total"] < rows[False]["mesa8"]["total"]
    assert rows[True]["mesa8"]["worst_cos"] > 0.999 and rows[True]["mesa8"]["rise"] > 0
    text = md.read_text()
    assert text.count("bench:gpu:llama|cpu|none|b2:start") == 1
    assert text.count("bench:gpu:llama|cpu|none|b2|labels:start") == 1
    assert "Loss: the model's own, from `labels`" in text


def test_bench_compiled_rows(tmp_path, capsys):
    """Compiled configurations beside the eager ones: the same bytes as their
    eager counterparts (the partitioner keeps what eager autograd keeps; with
    torch-mesa the ops run as in eager), fidelity measured on the compiled
    converted model."""
    csv_path, md = tmp_path / "r.csv", tmp_path / "b.md"
    argv = ["bench", "--model", "vit:tiny", "--image-size", "32", "--batch-size", "2", "--repeats", "1",
            "--configs", "baseline,mesa8,baseline+compile,mesa8+compile", "--compile-backend", "aot_eager",
            "--skip-peak", "--csv", str(csv_path), "--docs", str(md)]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    with csv_path.open() as f:
        rows = {r["config"]: json.loads(r["metrics"]) for r in csv.DictReader(f)}
    for eager, compiled in (("baseline", "baseline+compile"), ("mesa8", "mesa8+compile")):
        assert abs(rows[compiled]["total"] - rows[eager]["total"]) <= 0.05 * rows[eager]["total"]
        assert rows[compiled]["blocks"] is None  # no per-block split inside compiled code
    assert rows["mesa8+compile"]["worst_cos"] > 0.999
    assert "`+compile`: `torch.compile(model)` (aot_eager)" in md.read_text()


def test_bench_mesa_suite(tmp_path, capsys, monkeypatch):
    """The Mesa table's machinery on two tiny models (the real suite builds
    DeiT-B and runs for minutes: benchmarks, not tests; the peak-memory
    children are tested by test_bench_tiny_writes_csv_and_docs)."""
    from torch_mesa.tools import bench

    monkeypatch.setattr(bench, "MESA_SUITE", (("tiny", "vit:tiny", (100, 45)), ("tiny again", "vit:tiny", (10, 5))))
    md = tmp_path / "b.md"
    argv = ["bench", "--suite", "mesa", "--image-size", "32", "--batch-size", "2", "--skip-peak", "--docs", str(md)]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    text = md.read_text()
    assert "Mesa's results table, side by side" in text and "torch-mesa bench --suite mesa" in text
    rows = [line for line in text.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 2 and rows[0].endswith("| 0.450 |") and rows[1].endswith("| 0.500 |")
    assert 0 < float(rows[0].split("|")[4]) < 0.5  # bytes kept, converted / unconverted


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "torch_mesa", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "demo" in res.stdout and "report" in res.stdout


def test_report_hugging_face_family_and_config_json(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    sizes = ["--size", "n_layer=2", "--size", "n_embd=64", "--size", "n_head=4", "--size", "vocab_size=300"]
    code, out, err = run(["report", "hf:gpt2", "--seq-len", "64", "--batch-size", "2", "--depth", "3"] + sizes,
                         capsys)
    assert code == 0, err
    assert "transformer.h.0" in out and "transformer.h.1" in out and "Conv1D" in out
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    cfg.to_json_file(str(tmp_path / "config.json"))
    code, out, err = run(["report", str(tmp_path / "config.json"), "--seq-len", "32", "--format", "json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["converted"]["LlamaRMSNorm"] == 5 and data["total_after"] < data["total_before"]
    code, out, err = run(["report", "hf:gpt2", "--seq-len", "5000"] + sizes, capsys)
    assert code == 2 and "positions" in err
    code, out, err = run(["report", "hf:nosuchfamily"], capsys)
    assert code == 2 and "unknown Hugging Face model family" in err


def test_verify_exit_codes_and_report(capsys):
    """`torch-mesa verify`: 0 when every gradient reaches the bar, 1 when one
    does not, with the worst parameters, the per-op breakdown and the
    fallbacks in the output; JSON on request."""
    pytest.importorskip("transformers")
    sizes = ["--size", "num_hidden_layers=2", "--size", "hidden_size=64", "--size", "intermediate_size=128",
             "--size", "num_attention_heads=4", "--size", "vocab_size=300"]
    code, out, err = run(["verify", "hf:llama", "--seq-len", "32"] + sizes, capsys)
    assert code == 0, err
    assert "verify: OK" in out and "forward: identical" in out and "error by op kind" in out
    assert "model.layers.0" in out and "fallbacks: none" in out
    # an impossible bar fails, with exit code 1
    code, out, err = run(["verify", "hf:llama", "--seq-len", "32", "--threshold", "1.0000001", "--no-by-op",
                          "--format", "json"] + sizes, capsys)
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False and data["forward_equal"] is True
    assert data["kept_converted"] < 0.5 * data["kept_exact"]
    # bad input: one line, exit 2
    code, out, err = run(["verify", "nosuch:model"], capsys)
    assert code == 2 and "cannot import" in err
