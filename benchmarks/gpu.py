"""Everything only a GPU shows, in one run: for a session lent a GPU machine.

1. The CUDA tests (``tests/test_cuda.py``, skipped without a GPU): the
   quantizer compiled to Triton against the eager reference bit for bit,
   every op against PyTorch's CUDA kernels, attention dropout's replayed
   mask, models verified, compiled and briefly trained on the GPU.
2. DeiT-B, batch 128, 224 x 224, bf16 autocast: unconverted, checkpointed
   and torch-mesa 8-bit, eager: bytes kept, peak memory of a training step
   (``max_memory_allocated``) and throughput, side by side
   (``torch-mesa bench``; the original Mesa reported 0.49x peak memory at
   about -29% throughput).
3. Where DeiT-B's eager step spends its time, unconverted against
   converted (``benchmarks/step_profile.py``: the kernels' time by kind, the
   time the GPU waits for the host, the busiest kernels; in the log).
4. A Llama-style model (hidden 2048, 8 layers, 32 heads, 4 key-value heads,
   vocabulary 32000) at sequence length 4096, batch 2, bf16 autocast: the same rows.
5. DeiT-B compiled: ``torch.compile`` of the unconverted model beside
   ``torch_mesa.compile`` by block (the quantizer inside the graphs).
6. Mesa's results table at its batch 128 (``torch-mesa bench --suite mesa``).

Each stage runs in its own process under a share of ``--budget`` seconds, so
a slow stage costs its own figures and not the rest; the log, the tests'
report and the tables are written to ``--out`` (default ``$OUT`` or
``gpu-out``) as they come. Copy the tables into docs/benchmarks.md.

    python benchmarks/gpu.py                       # on the GPU machine
    python benchmarks/gpu.py --quick --device cpu  # a dry run of every stage, small sizes, on the CPU
"""

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def llama(seq_len: int = 4096):
    """The Llama-style model of stage 3, built on the GPU where there is one
    (random initialisation of half a billion parameters on the CPU takes
    seconds per build, and the benchmark builds it once per measurement)."""
    import transformers

    quick = os.environ.get("MESA_GPU_QUICK") == "1"
    sizes = (dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000) if quick else
             dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32,
                  num_key_value_heads=4, vocab_size=32000))
    cfg = transformers.LlamaConfig(**sizes, max_position_embeddings=max(seq_len, 4096))
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return transformers.LlamaForCausalLM(cfg)


class Run:
    """The stages of one run under one time budget, logged to ``out/log.txt``."""

    MIN_STAGE = 20.0  # seconds: a stage that would get less is skipped

    def __init__(self, out: Path, budget: float):
        self.out, self.start, self.budget = out, time.monotonic(), budget
        self.log = (out / "log.txt").open("a")
        self.stages = []

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def stage(self, name: str, cmd, share: float, env=None) -> int:
        """Run ``cmd`` for at most ``share`` (a fraction) of the time left; its
        output goes to the log as it comes."""
        limit = max(0.0, share * self.left())
        if limit < self.MIN_STAGE:
            self.say(f"\n## {name}: skipped, {self.left():.0f} s left")
            self.stages.append({"stage": name, "rc": None, "seconds": 0, "skipped": True})
            return -1
        self.say(f"\n## {name} (at most {limit:.0f} s)\n$ {' '.join(map(str, cmd))}")
        t = time.monotonic()
        proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
                                start_new_session=True)
        reader = threading.Thread(target=lambda: [self.say(line.rstrip("\n")) for line in proc.stdout])
        reader.start()
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self.say(f"  stopped at its limit ({limit:.0f} s)")
        try:  # the stage's process group, whatever of it is left (compile workers holding the pipe)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reader.join()
        rc = proc.wait()
        seconds = round(time.monotonic() - t, 1)
        self.stages.append({"stage": name, "rc": rc, "seconds": seconds})
        self.say(f"  rc {rc}, {seconds} s")
        return rc


def bench(args, docs, *options):
    """``torch-mesa bench`` under bf16 autocast, its table written to ``md/DOCS.md``
    (one file per stage: two runs of one model would share a section)."""
    return [sys.executable, "-m", "torch_mesa", "bench", "--device", args.device, "--amp", "bf16",
            "--docs", args.out / "md" / f"{docs}.md", *options]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget", type=float, default=540.0,
                   help="seconds for all stages together (each gets a share of what the earlier ones left)")
    p.add_argument("--quick", action="store_true", help="small batches and models (DeiT-Ti), few repeats")
    args = p.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to do here (every CPU check runs in the test suite)")
        return 2
    run = Run(args.out, args.budget)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{platform.machine()} CPU"
    run.say(f"# {device}, torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} cores")
    (args.out / "md").mkdir(exist_ok=True)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HERE), os.environ.get("PYTHONPATH", "")])}
    if args.quick:
        env["MESA_GPU_QUICK"] = "1"
    if args.device != "cuda":
        env["MESA_TEST_DEVICE"] = args.device
    big = "4" if args.quick else "128"
    repeats = "2" if args.quick else "10"
    workers = str(min(6, max(1, (os.cpu_count() or 2) // 2)))
    deit = ("--model", "timm:deit_tiny_patch16_224" if args.quick else "timm:deit_base_patch16_224",
            "--batch-size", big, "--repeats", repeats, "--csv", args.out / "results.csv")
    stages = [  # (name, command, weight: its share of the time left is its weight over the weights left)
        ("CUDA tests", [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_cuda.py", "-p", "no:cacheprovider",
                        "-n", workers, "--dist", "load", "-rfEs", "-v", f"--junitxml={args.out / 'tests.xml'}"], 0.3),
        ("DeiT-B, eager", bench(args, "deit-eager", *deit, "--configs", "baseline,checkpoint,mesa8"), 0.17),
        ("Where DeiT-B's eager step spends its time",
         [sys.executable, str(HERE / "step_profile.py"), "--device", args.device, "--mode", "eager", "--amp", "bf16",
          "--model", deit[1], "--batch-size", big, "--repeats", "3" if args.quick else "5",
          "--profile-steps", "1" if args.quick else "3"], 0.1),
        ("Llama-style, sequence 4096, eager",
         bench(args, "llama-eager", "--model", "gpu:llama", "--batch-size", "2", "--repeats", repeats, "--seq-len",
               "256" if args.quick else "4096", "--csv", args.out / "results.csv", "--labels",
               "--configs", "baseline,checkpoint,mesa8"), 0.17),
        ("DeiT-B, compiled", bench(args, "deit-compiled", *deit, "--configs",
                                   "baseline,baseline+compile,native8+blocks"), 0.28),
        ("Mesa's results table", bench(args, "mesa-suite", "--suite", "mesa", "--batch-size", big), 0.08),
    ]
    for i, (name, cmd, weight) in enumerate(stages):
        run.stage(name, cmd, weight / sum(w for _, _, w in stages[i:]), env=env)
    summary = {"device": device, "torch": torch.__version__, "stages": run.stages}
    (args.out / "gpu.json").write_text(json.dumps(summary, indent=1))
    run.say(json.dumps(summary, indent=1))
    return 0 if all(s["rc"] == 0 for s in run.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
