"""`edgeft merge` and `edgeft export --format gguf` at the published sizes: wall time and peak RSS, every gate on.

    python bench/real_size.py                                   # llama-3.2-1b and llama-3.2-3b
    python bench/real_size.py --shapes llama-3.2-1b --eval-budget 1024 --keep /tmp/real

Each shape is the random-weight checkpoint bench/convert.py builds (edgeft.shapes: the published config, bf16,
5 GB safetensors shards as on the hub, cached under $EDGEFT_HOME/shapes). Its LoRA adapter (r 16 on q/k/v/o and
the MLP, random nonzero A and B; training one at 3B on 2 CPU cores would take longer than the whole benchmark)
is made with peft on a meta-device copy of the model, so nothing of the model's size is allocated, and saved
the way `edgeft train` saves one (adapter_config.json, adapter_model.safetensors, edgeft_adapter.json with the
base's fingerprint, the tokenizer). Then, each in its own process started by a bare launcher so that its peak
RSS is its own (edgeft.converters.compare.measured):
  edgeft merge --adapter A --model SHAPE                    fp16 output; gate: drift vs unmerged base+adapter
  edgeft export --format gguf --model MERGED --quant f16,q4_k_m
                                                            in a fresh run, so the HF reference is measured
                                                            now (not reused from the merge's ledger); gates:
                                                            tokenizer parity, F16 vs HF 0.1%, Q4_K_M rise
  with --budget q4_k_m (issue 27), also, in another fresh run from the same merged model:
  edgeft export --format gguf --model MERGED --quant f16,auto --budget q4_k_m
                                                            the per-tensor recipe's search (errors, probes,
                                                            allocation) and the stock recipes it is compared
                                                            with, every gate; its time and peak RSS are printed
                                                            as ratios to the stock export's above
  (--imatrix FILE gives both exports the same importance matrix; without it neither has one)
  (--keep DIR --reuse-merged takes the merged model a former run left in DIR; --skip-stock leaves out the stock
  GGUF export, e.g. to measure only the ONNX one)
  with --onnx fp32,int4 (issue 27), also, in another fresh run:
  edgeft export --format onnx --model MERGED --quant fp32,int4
                                                            its peak RSS against the fp32 graph's bytes
                                                            (goal: at most 2x, inside this machine's 24 GiB)
Only the held-out token budget is small (--eval-budget); no gate is switched off.
Goals (issue 12): merge peak under 2x the 16-bit model; merge and export each inside 16 GB at 3B.
Goals (issue 27): --budget at most 3x the stock export's time, peak RSS at most +20%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, r: int = 16, seed: int = 0) -> Path:
    """A random LoRA for `base` saved as `edgeft train` saves one (reused if already complete)."""
    import torch
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgeft.adapter import ADAPTER_META
    from edgeft.atomic import atomic_dir, write_json
    from edgeft.models import copy_tokenizer, fingerprint

    if (out / ADAPTER_META).is_file():
        return out
    with init_empty_weights():  # parameters on the meta device: peft only needs the module tree and shapes
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, base_model_name_or_path=str(base))
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    values = {}
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            # A as peft's init scales it (1/sqrt(fan-in)); B nonzero (peft starts it at zero, a no-op adapter):
            # the delta changes each weight by a few percent, enough for a wrong merge to show.
            std = p.shape[1] ** -0.5 if "lora_A" in name else 0.01
            values[name] = torch.randn(tuple(p.shape), generator=gen) * std
    with atomic_dir(out) as tmp:
        save_file(get_peft_model_state_dict(peft_model, state_dict=values), tmp / "adapter_model.safetensors",
                  metadata={"format": "pt"})
        peft_model.peft_config["default"].save_pretrained(tmp)
        copy_tokenizer(base, tmp)
        write_json(tmp / ADAPTER_META, {
            "base": str(base), "base_path": str(base), "base_fingerprint": fingerprint(base), "quant": "none",
            "compute_dtype": "float32", "device": "cpu", "target_modules": TARGETS, "lora_r": r,
            "lora_alpha": 2 * r, "steps": 0, "seed": seed, "note": "random LoRA made with peft by bench/real_size.py"})
    return out


def gates(run: Path) -> tuple[int, int]:
    """(gates passed, gates recorded) over the run's ledger."""
    from edgeft.run import Run

    records = [g for e in Run(run).steps() for g in (e.get("gates") or [])]
    return sum(g["passed"] for g in records), len(records)


def ledger_peak_mb(run: Path) -> float:
    """The highest peak RSS the run's ledger entries recorded. Each entry resets the process's high-water mark
    (/proc/self/clear_refs) when it starts, and the kernel reports that same mark as the exited process's
    ru_maxrss, so wait4's figure alone is only the last entry's peak."""
    from edgeft.run import Run

    return max((e.get("peak_rss_mb") or 0.0 for e in Run(run).steps()), default=0.0)


def edgeft(args: list, env: dict, log: Path) -> dict:
    """One edgeft command measured (its output to `log`); a failure becomes a row with its last error line,
    not a lost table. Its peak RSS is the larger of wait4's and its ledger's (see ledger_peak_mb)."""
    from edgeft.converters.compare import measured

    try:
        result = measured([sys.executable, "-m", "edgeft", *map(str, args)], env=env, cwd=str(ROOT))
        log.write_text(result["stderr"])
        run = Path(args[args.index("--run") + 1])
        if (run / "manifest.json").is_file():
            result["peak_rss_mb"] = max(result["peak_rss_mb"], ledger_peak_mb(run))
        return result
    except RuntimeError as e:
        log.write_text(str(e))
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return {"seconds": float("nan"), "peak_rss_mb": float("nan"), "failed": lines[-1] if lines else str(e)}


def run_shape(shape: str, folder: Path, work: Path, a) -> dict:
    from edgeft.models import edgeft_home

    stamp = json.loads((folder / "edgeft_shape.json").read_text())
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    adapter = make_adapter(folder, edgeft_home() / "shapes" / f"{folder.name}-lora-r{a.rank}", a.rank)
    heldout = ["--eval-budget", a.eval_budget, "--window", a.window, "--stride", a.window]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    merge_run, export_run, budget_run = work / f"{shape}-merge", work / f"{shape}-export", work / f"{shape}-budget"
    onnx_run = work / f"{shape}-onnx"
    imatrix = ["--imatrix", a.imatrix] if a.imatrix else []
    reuse = a.reuse_merged and (merge_run / "merged" / "config.json").is_file()
    for d in (export_run, budget_run, onnx_run) if reuse else (merge_run, export_run, budget_run, onnx_run):
        shutil.rmtree(d, ignore_errors=True)
    if reuse:  # its row is what its ledger measured when it ran
        from edgeft.run import Run

        entry = Run(merge_run).last("merge") or {}
        merge = {"seconds": entry.get("wall_s", float("nan")), "peak_rss_mb": entry.get("peak_rss_mb", float("nan"))}
        print(f"{shape}: the merged model in {merge_run} (--reuse-merged)", flush=True)
    else:
        print(f"{shape}: edgeft merge ...", flush=True)
        merge = edgeft(["merge", "--adapter", adapter, "--model", folder, "--run", merge_run, *heldout], env,
                       work / f"{shape}-merge.log")
    export = {"seconds": float("nan"), "peak_rss_mb": float("nan"), "failed": "no merged model"}
    if a.skip_stock:
        export = {"seconds": float("nan"), "peak_rss_mb": float("nan"), "failed": "not run (--skip-stock)"}
    elif "failed" not in merge:
        print(f"{shape}: edgeft export --format gguf --quant f16,q4_k_m ...", flush=True)
        export = edgeft(["export", "--format", "gguf", "--model", merge_run / "merged", "--run", export_run,
                         "--quant", "f16,q4_k_m", *imatrix, *heldout], env, work / f"{shape}-export.log")
    budget = None
    if a.budget and "failed" not in merge:
        print(f"{shape}: edgeft export --format gguf --quant f16,auto --budget {a.budget} ...", flush=True)
        budget = edgeft(["export", "--format", "gguf", "--model", merge_run / "merged", "--run", budget_run,
                         "--quant", "f16,auto", "--budget", a.budget, *imatrix, *heldout], env,
                        work / f"{shape}-budget.log")
    onnx, graph_bytes = None, 0
    if a.onnx and "failed" not in merge:
        print(f"{shape}: edgeft export --format onnx --quant {a.onnx} ...", flush=True)
        onnx = edgeft(["export", "--format", "onnx", "--model", merge_run / "merged", "--run", onnx_run,
                       "--quant", a.onnx, *heldout], env, work / f"{shape}-onnx.log")
        graph_bytes = sum(f.stat().st_size for f in onnx_run.glob("onnx/fp32/*") if f.name.startswith("model"))
    return {"shape": shape, "params": stamp["params"], "bytes": size, "merge": merge, "export": export,
            "merge_gates": gates(merge_run), "export_gates": gates(export_run), "budget": budget,
            "budget_gates": gates(budget_run) if budget else None, "onnx": onnx, "onnx_graph_bytes": graph_bytes,
            "onnx_gates": gates(onnx_run) if onnx else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-3.2-1b,llama-3.2-3b", help="comma list (edgeft.shapes.SHAPES)")
    ap.add_argument("--eval-budget", type=int, default=1024, help="held-out tokens each check scores")
    ap.add_argument("--window", type=int, default=512, help="perplexity window (= stride)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of the adapter")
    ap.add_argument("--budget", default="", help="also export --quant f16,auto --budget THIS (e.g. q4_k_m)")
    ap.add_argument("--onnx", default="", help="also export --format onnx --quant THIS (e.g. fp32,int4)")
    ap.add_argument("--imatrix", default="", help="a calibration text FILE for both exports' importance matrix")
    ap.add_argument("--keep", type=Path, help="leave the runs (merged model, GGUFs, ledgers) here")
    ap.add_argument("--reuse-merged", action="store_true",
                    help="with --keep: the merged model a former run left there instead of a new merge")
    ap.add_argument("--skip-stock", action="store_true", help="no stock GGUF export (e.g. to measure only --onnx)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    a = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from bench.convert import shape_folders

    folders = shape_folders([s for s in a.shapes.split(",") if s])
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeft-real-size-") as tmp:
        work = a.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for shape, folder in folders:
            rows.append(run_shape(shape, folder, work, a))

    gb = 2**20 / 1e9  # peak RSS comes in MiB; GB are 10^9 bytes, as the 16-bit size (3.21 B params: 6.4 GB)
    print(f"\nmerge (fp16 out) and export --format gguf --quant f16,q4_k_m, {a.eval_budget} held-out tokens, "
          f"window {a.window}; peak RSS of each command")
    print(f"{'shape':16}{'params':>8}{'16-bit GB':>10}{'merge s':>9}{'merge GB':>10}{'ratio':>7}{'gates':>7}"
          f"{'export s':>10}{'export GB':>11}{'gates':>7}")
    for r in rows:
        m, e = r["merge"], r["export"]
        print(f"{r['shape']:16}{r['params'] / 1e9:>7.2f}B{r['bytes'] / 1e9:>10.2f}{m['seconds']:>9.0f}"
              f"{m['peak_rss_mb'] * gb:>10.2f}{m['peak_rss_mb'] * 2**20 / r['bytes']:>6.2f}x"
              f"{'%d/%d' % r['merge_gates']:>7}{e['seconds']:>10.0f}{e['peak_rss_mb'] * gb:>11.2f}"
              f"{'%d/%d' % r['export_gates']:>7}", flush=True)
        for step in ("merge", "export", "budget"):
            if r[step] and "failed" in r[step]:
                print(f"    {step} failed: {r[step]['failed']}")
    print("goals: merge peak < 2x the 16-bit size; merge and export peaks < 16 GB at 3B")
    if a.budget:
        print(f"\nexport --quant f16,auto --budget {a.budget} vs the stock export above (same merged model, same "
              f"held-out ids{', same imatrix' if a.imatrix else ', no imatrix'})")
        print(f"{'shape':16}{'budget s':>10}{'x stock':>9}{'budget GB':>11}{'x stock':>9}{'gates':>7}")
        for r in rows:
            b, e = r["budget"], r["export"]
            if b:
                print(f"{r['shape']:16}{b['seconds']:>10.0f}{b['seconds'] / e['seconds']:>8.2f}x"
                      f"{b['peak_rss_mb'] * gb:>11.2f}{b['peak_rss_mb'] / e['peak_rss_mb']:>8.2f}x"
                      f"{'%d/%d' % r['budget_gates']:>7}", flush=True)
        print("goals: at most 3x the stock export's time, peak RSS at most 1.2x")
    if a.onnx:
        print(f"\nexport --format onnx --quant {a.onnx}: peak RSS vs the fp32 graph's bytes")
        print(f"{'shape':16}{'onnx s':>9}{'peak GB':>9}{'graph GB':>10}{'ratio':>7}{'gates':>7}")
        for r in rows:
            o = r["onnx"]
            if o:
                print(f"{r['shape']:16}{o['seconds']:>9.0f}{o['peak_rss_mb'] * gb:>9.2f}{r['onnx_graph_bytes'] / 1e9:>10.2f}"
                      f"{o['peak_rss_mb'] * 2**20 / max(r['onnx_graph_bytes'], 1):>6.2f}x{'%d/%d' % r['onnx_gates']:>7}")
                if "failed" in o:
                    print(f"    onnx failed: {o['failed']}")
        print("goals: peak at most 2x the fp32 graph, inside 24 GiB")
    if a.json:
        a.json.write_text(json.dumps([{k: ({kk: vv for kk, vv in v.items() if kk != "stderr"}
                                           if isinstance(v, dict) else v) for k, v in r.items()} for r in rows],
                                     indent=1))


if __name__ == "__main__":
    main()
