"""edgeft train vs the tutorials' PEFT + TRL SFTTrainer script: tokens/s and peak memory, with ratios.

Same base, same data (the shipped demo set, rendered with the chat template, loss on the answers), same LoRA
(r 16, alpha 32, dropout 0.05, q/k/v/o by default), same batch, maximum length, steps and learning rate.
On a GPU both sides do QLoRA the way the tutorials do (NF4 + double quantization, bf16 compute, bf16
training); on CPU both train the float32 base. Each side runs in its own process. Tokens/s counts the
tokens of the training rows (no padding) over the steps after --warmup; peak memory is
torch.cuda.max_memory_allocated on a GPU (weights included), else the process's peak RSS, at the end of
the training steps.

    python bench/train_throughput.py                                      # the embedded default model
    python bench/train_throughput.py --shape llama-3.2-1b --tokenizer DIR  # a config-built Llama 3.2 1B
    python bench/train_throughput.py --shape llama-3.2-1b,llama-3.2-3b    # both GPU shapes in one command
    python bench/train_throughput.py --sides trl edgeft edgeft:packing=off,compile=true

A side named `edgeft:key=value,...` is edgeft train with those TrainConfig fields changed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

QKVO = "q_proj,k_proj,v_proj,o_proj"


class Meter:
    """Per-step (seconds, tokens) marks; tokens/s after the warm-up steps and the peak memory."""

    def __init__(self, warmup: int):
        self.warmup, self.marks, self.start = warmup, [], time.perf_counter()

    def mark(self, tokens: int) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter() - self.start, tokens))

    def result(self) -> dict:
        import torch

        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = float("nan")
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 1024
        w = min(self.warmup, len(self.marks) - 1)
        (t0, n0), (t1, n1) = (self.marks[w - 1] if w else (0.0, 0)), self.marks[-1]
        return {"steps": len(self.marks), "tokens": n1, "seconds": round(t1, 2), "steady_steps": len(self.marks) - w,
                "tokens_per_s": round((n1 - n0) / (t1 - t0), 1), "first_step_s": round(self.marks[0][0], 2),
                "peak_mb": round(peak, 1), "memory": "cuda max_memory_allocated" if torch.cuda.is_available()
                else "peak RSS"}


def run_trl(a, base: Path, out: Path, overrides: dict) -> dict:
    """What a tutorial does: datasets + SFTTrainer + peft_config (+ BitsAndBytesConfig on a GPU)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from edgeft.dataset import demo_data_path

    meter = Meter(a.warmup)  # from here, as edgeft's starts before it loads the model
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(base)
    if cuda:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, dtype=torch.bfloat16,
                                                     device_map={"": 0})
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(demo_data_path()), split="train")
    # Conversational prompt/completion, so TRL renders the rows with the chat template as edgeft does
    # (plain strings would be trained as raw text, a different and shorter task).
    dataset = dataset.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}],
                                     "completion": [{"role": "assistant", "content": r["completion"]}]})

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            meter.mark(state.num_input_tokens_seen)

    args = SFTConfig(output_dir=str(out), max_steps=a.steps, per_device_train_batch_size=a.batch_size,
                     learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=math.ceil(0.05 * a.steps),
                     max_length=a.max_seq_len, logging_steps=1, save_strategy="no", report_to=[],
                     bf16=cuda, use_cpu=not cuda, include_num_input_tokens_seen="non_padding", **overrides)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=a.targets.split(","),
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
                         callbacks=[Marks()])
    trainer.train()
    return {**meter.result(), "gradient_checkpointing": args.gradient_checkpointing}


def run_edgeft(a, base: Path, out: Path, overrides: dict) -> dict:
    from edgeft.config import to_dict
    from edgeft.train import TrainConfig, train

    meter = Meter(a.warmup)
    result = {}

    def at_step(step, loss, tokens):
        meter.mark(tokens)
        if step == a.steps:  # the end of training, before the after-training evaluation
            result.update(meter.result())

    cfg = TrainConfig(model=str(base), data="demo", run=str(out), max_steps=a.steps, batch_size=a.batch_size,
                      lr=2e-4, save_every=0, eval_budget=512, eval_generate=0, max_ppl_rise=1e9,
                      max_seq_len=a.max_seq_len, target_modules=a.targets.split(","))
    for key, value in overrides.items():
        setattr(cfg, key, type(getattr(cfg, key))(value) if not isinstance(getattr(cfg, key), bool)
                else value.lower() in ("1", "true", "on", "yes"))
    meter.start = time.perf_counter()
    m = train(cfg, on_step=at_step).entry["metrics"]
    hw = m["hardware"]
    return {**result, "gradient_checkpointing": hw["gradient_checkpointing"],
            "settings": {k: v for k, v in to_dict(cfg).items() if k in overrides}}


def parse_side(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    if name not in ("trl", "edgeft"):
        sys.exit(f"--sides: {spec}: a side is trl or edgeft, optionally followed by :key=value,...")
    return name, dict(kv.split("=", 1) for kv in rest.split(",") if kv)


def resolve_base(a, shape: str | None) -> Path:
    from edgeft.models import resolve_model

    if not shape:
        return resolve_model(a.base)
    from edgeft.models import edgeft_home
    from edgeft.shapes import build_checkpoint

    tokenizer = a.tokenizer or resolve_model("smollm2-135m")
    return build_checkpoint(shape, tokenizer, Path(a.models_dir or edgeft_home() / "shapes") / shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m", help="model name or HF folder (ignored with --shape)")
    ap.add_argument("--shape", help="build a random-weight checkpoint of a published shape (edgeft.shapes); "
                                    "several, comma-separated, are measured one after the other")
    ap.add_argument("--tokenizer", help="tokenizer folder for --shape (default: the default model's)")
    ap.add_argument("--models-dir", help="where --shape checkpoints are kept (default: $EDGEFT_HOME/shapes)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of tokens/s")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--targets", default=QKVO, help="LoRA target modules, comma-separated")
    ap.add_argument("--sides", nargs="+", default=["trl", "edgeft"], help="trl, edgeft, edgeft:key=value,...")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # child process
    ap.add_argument("--base-path", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        name, overrides = parse_side(a.side)
        with tempfile.TemporaryDirectory() as tmp:
            fn = run_trl if name == "trl" else run_edgeft
            print("RESULT " + json.dumps(fn(a, Path(a.base_path), Path(tmp) / "out", overrides)), flush=True)
        return
    sides = a.sides
    for side in sides:
        parse_side(side)
    blobs = [measure_shape(a, shape, sides) for shape in (a.shape.split(",") if a.shape else [None])]
    if a.json:
        Path(a.json).write_text(json.dumps(blobs[0] if len(blobs) == 1 else blobs, indent=1) + "\n")


def measure_shape(a, shape: str | None, sides: list[str]) -> dict:
    """Every side on one base, each in its own process; prints the table, returns the results."""
    base = resolve_base(a, shape)
    results = {}
    for side in sides:
        print(f"running {side} ({a.steps} steps, batch {a.batch_size}) on {base} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--side", side, "--base-path", str(base), "--steps", str(a.steps),
               "--warmup", str(a.warmup), "--batch-size", str(a.batch_size), "--max-seq-len", str(a.max_seq_len),
               "--targets", a.targets]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}", file=sys.stderr, flush=True)
            results[side] = {"failed": proc.stderr.strip().splitlines()[-1:] or ["no output"]}
            continue
        results[side] = json.loads(line[-1][7:])
    return report(results, base, a, shape)


def report(results: dict, base: Path, a, shape: str | None) -> dict:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"\n{base.name}: {a.steps} steps, batch {a.batch_size}, max length {a.max_seq_len}, LoRA r16 on "
          f"{a.targets}; tokens/s over steps {a.warmup + 1}-{a.steps}; device {device}")
    ref = results.get("trl") if "failed" not in results.get("trl", {"failed": 1}) else None
    mem = next((r["memory"] for r in results.values() if "memory" in r), "")
    print(f"{'side':44}{'tok/s':>9}{'peak MB':>10}{'to step 1 s':>12}  ckpt   vs TRL: tok/s  memory  ({mem})")
    for name, r in results.items():
        if "failed" in r:
            print(f"{name:44}  failed: {r['failed'][0][:100]}")
            continue
        ratio = (f"{r['tokens_per_s'] / ref['tokens_per_s']:12.2f}x {r['peak_mb'] / ref['peak_mb']:7.2f}x"
                 if ref else "")
        print(f"{name:44}{r['tokens_per_s']:>9.0f}{r['peak_mb']:>10.0f}{r['first_step_s']:>12.1f}  "
              f"{str(r['gradient_checkpointing'])[0]:5}{ratio}")
    blob = {"base": str(base), "shape": shape, "device": device, "steps": a.steps, "warmup": a.warmup,
            "batch_size": a.batch_size, "max_seq_len": a.max_seq_len, "targets": a.targets, "results": results}
    print("RESULTS " + json.dumps(blob))
    return blob


if __name__ == "__main__":
    main()
