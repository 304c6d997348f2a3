"""edgeft train vs a plain PEFT + TRL script written the way the tutorials write it.

Same base (the embedded default), same data (the shipped demo set), same LoRA (r16, alpha 32, dropout 0.05,
all attention and MLP projections), same batch, same number of steps, same learning rate. Each side runs in
its own process; it reports tokens/s over its training steps and its peak RSS up to the end of training.

    python bench/train_throughput.py [--steps 10] [--batch-size 8]

Prints the ratio to TRL of tokens/s (higher is better) and of peak RSS (lower is better), for edgeft's
defaults and for edgeft with gradient checkpointing (TRL's default), which trades time for memory.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_trl(steps: int, batch: int, out: Path) -> dict:
    """What a tutorial does: datasets + SFTTrainer + peft_config; only what CPU needs changed (bf16 off)."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from edgeft.models import resolve_model
    from edgeft.train import demo_data_path

    base = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
    dataset = load_dataset("json", data_files=str(demo_data_path()), split="train")
    # Conversational prompt/completion, so TRL renders the rows with the chat template as edgeft does
    # (plain strings would be trained as raw text, a different and shorter task).
    dataset = dataset.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}],
                                     "completion": [{"role": "assistant", "content": r["completion"]}]})
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=2e-4,
                     lr_scheduler_type="cosine", warmup_steps=math.ceil(0.05 * steps), max_length=1024, logging_steps=1,
                     save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                     include_num_input_tokens_seen="non_padding")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = trainer.state.num_input_tokens_seen
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_rss_mb": peak_rss_mb(),
            "gradient_checkpointing": args.gradient_checkpointing}


def run_edgeft(steps: int, batch: int, out: Path, checkpointing: str = "auto") -> dict:
    from edgeft.train import TrainConfig, train

    peak = {}

    def at_step(step, loss):
        if step == steps:
            peak["mb"] = peak_rss_mb()  # end of training, before the after-training evaluation

    cfg = TrainConfig(data="demo", run=str(out), max_steps=steps, batch_size=batch, lr=2e-4, save_every=0,
                      eval_budget=600, eval_generate=0, max_ppl_rise=10.0, target_modules=TARGETS,
                      gradient_checkpointing=checkpointing)
    m = train(cfg, on_step=at_step).entry["metrics"]
    return {"tokens": m["train_tokens"], "seconds": m["train_seconds"], "tokens_per_s": m["tokens_per_s"],
            "peak_rss_mb": peak["mb"], "gradient_checkpointing": m["hardware"]["gradient_checkpointing"]}


SIDES = {
    "trl": run_trl,
    "edgeft": run_edgeft,  # its defaults: no gradient checkpointing on CPU
    "edgeft-checkpointing": lambda steps, batch, out: run_edgeft(steps, batch, out, "on"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)  # child process
    a = ap.parse_args()
    if a.side:
        with tempfile.TemporaryDirectory() as tmp:
            print("RESULT " + json.dumps(SIDES[a.side](a.steps, a.batch_size, Path(tmp) / "out")))
        return
    results = {}
    for side in SIDES:
        print(f"running {side} ({a.steps} steps, batch {a.batch_size}) ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--side", side, "--steps", str(a.steps), "--batch-size",
                               str(a.batch_size)], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
        results[side] = json.loads(line[-1][7:])
    t = results["trl"]
    print(f"{'':22}{'tokens':>8}{'seconds':>10}{'tok/s':>9}{'peak RSS MB':>13}  grad ckpt  vs TRL: tok/s  RSS")
    for name, r in results.items():
        print(f"{name:22}{r['tokens']:>8}{r['seconds']:>10.1f}{r['tokens_per_s']:>9.1f}{r['peak_rss_mb']:>13.0f}"
              f"  {str(r['gradient_checkpointing']):9}  {r['tokens_per_s'] / t['tokens_per_s']:10.2f}x"
              f" {r['peak_rss_mb'] / t['peak_rss_mb']:5.2f}x")
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
