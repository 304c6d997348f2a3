"""The mixed per-tensor GGUF recipe vs stock llama.cpp recipes at equal bytes, on a fine-tune's own data.

    python bench/frontier.py [--run RUN] [--family qwen2] [--under 0.15] [--eval-budget 2048]

RUN is a run that trained and merged (e.g. `edgeft train --data demo ... && edgeft merge`): its training rows
make the importance matrix, its held-out ids and task answers measure everything. --family builds a second
subject: a small random-init model of that family from tests/tiny_models.py (hidden 256, so llama.cpp's
k-quants apply natively), trained a few steps on the demo task and merged, the same way.

For each subject, in the same run (same ids, same imatrix), timed on this machine:
  stock   `export --quant f16,q4_k_m --imatrix train` (the stock export with its gates)
  mixed   `export --quant f16,auto --budget q4_k_m` (mixed recipe at Q4_K_M's bytes, plus the stock recipes it
          is compared with: Q4_K_M with and without the imatrix, the stock recipe nearest in bytes)
  under   `export --quant f16,auto --budget BYTES` at (1 - --under) × Q4_K_M's bytes
and prints, per GGUF: MiB, bytes vs Q4_K_M, mean KL vs F16 and its ratio to Q4_K_M (same imatrix / none),
held-out perplexity change, task exact answers, gates, and each export's time against the stock one's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tiny_run(family: str, work: Path, eval_budget: int) -> Path:
    """A small model of `family` trained a few steps on the demo task and merged: a run like RUN."""
    sys.path.insert(0, str(ROOT))
    from tests import tiny_models as tm

    from edgeft.data.demo_task import make_rows
    from edgeft.merge import MergeConfig, merge
    from edgeft.train import TrainConfig, train

    tok = tm.bpe_tokenizer(work / "tokenizer", "smollm", vocab_size=4096, chat_template=tm.CHATML_WITH_SYSTEM)
    model = tm.tiny_model(family, work / family, tok, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2)
    data = work / "demo.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(120)))
    run = work / f"run-{family}"
    common = dict(eval_budget=eval_budget, window=256, stride=256)
    train(TrainConfig(model=str(model), data=str(data), run=str(run), batch_size=8, max_steps=30, lr=3e-3,
                      eval_generate=0, max_ppl_rise=100.0, **common))
    merge(MergeConfig(adapter=str(run), dtype="float32", **common))
    return run


def timed_export(run: Path, out: Path, window: int, eval_budget: int, **settings) -> tuple[list[dict], float]:
    from edgeft.errors import GateFailed
    from edgeft.export import GGUFExportConfig, export

    start = time.perf_counter()
    config = GGUFExportConfig(format="gguf", run=str(run), out=str(out), eval_budget=eval_budget, window=window,
                              stride=window, imatrix="train", overwrite=True, **settings)
    try:
        entries = export(config).entries
    except GateFailed as e:  # the ledger has every entry; the table shows which gate failed
        print(f"  (a gate failed: {e})")
        entries = []
    seconds = time.perf_counter() - start
    if not entries:
        steps = json.loads((run / "manifest.json").read_text())["steps"]
        entries = [e for e in steps if e["step"].startswith("export-gguf") and
                   any(str(out.name) in o["path"] for o in e.get("outputs", []))]
    return entries, seconds


def rows_of(entries: list[dict]) -> list[dict]:
    rows = []
    for e in entries:
        q = e["inputs"].get("quant")
        if not q or q in ("f16", "bf16", "f32") or not e.get("outputs"):
            continue
        task = e.get("task") or {}
        rows.append({"quant": q, "imatrix": e["metrics"].get("imatrix") is not None, "bytes": e["outputs"][0]["bytes"],
                     "kl": e["metrics"]["kl_mean"], "ppl_rise": e["metrics"]["ppl_rise"],
                     "exact": task.get("exact_match"), "ok": e["status"] == "ok", "entry": e})
        for r in (e["metrics"].get("mixed") or {}).get("stock", []):
            if r.get("gates_passed") is None:  # measured only as a comparison (no file kept)
                rows.append({"quant": f"{r['quant']}", "imatrix": False, "bytes": r["bytes"], "kl": r["kl_mean"],
                             "ppl_rise": r["ppl_rise"], "exact": r.get("exact_match"), "ok": None, "entry": None})
    return rows


def subject(name: str, run: Path, work: Path, window: int, eval_budget: int, under: float) -> None:
    print(f"\n== {name}: {run}")
    stock, t_stock = timed_export(run, work / "stock", window, eval_budget, quant=["f16", "q4_k_m"])
    mixed, t_mixed = timed_export(run, work / "mixed", window, eval_budget, quant=["f16", "auto"], budget="q4_k_m")
    q4 = next(r for r in rows_of(mixed) if r["quant"] == "q4_k_m" and r["imatrix"])
    budget = int(q4["bytes"] * (1 - under))
    low, t_low = timed_export(run, work / "under", window, eval_budget, quant=["f16", "auto"], budget=str(budget))
    plain = next((r for r in rows_of(mixed) if r["quant"] == "q4_k_m" and not r["imatrix"]), None)
    print(f"{'export':8}{'gguf':16}{'MiB':>9}{'vs Q4_K_M':>10}{'mean KL':>10}{'/Q4KM imx':>10}{'/Q4KM':>8}"
          f"{'ppl Δ':>9}{'exact':>7}{'gates':>7}")
    for label, entries in (("stock", stock), ("mixed", mixed), ("under", low)):
        for r in rows_of(entries):
            tag = r["quant"] + ("" if r["imatrix"] or r["quant"] == "mixed" else " (no imx)")
            exact = "-" if r["exact"] is None else f"{100 * r['exact']:.0f}%"
            gates = "-" if r["ok"] is None else ("pass" if r["ok"] else "FAIL")
            print(f"{label:8}{tag:16}{r['bytes'] / 2**20:9.2f}{100 * (r['bytes'] / q4['bytes'] - 1):+9.2f}%"
                  f"{r['kl']:10.5f}{r['kl'] / q4['kl']:10.3f}{(r['kl'] / plain['kl']) if plain else float('nan'):8.3f}"
                  f"{100 * r['ppl_rise']:+8.2f}%{exact:>7}{gates:>7}")
    print(f"time: stock export {t_stock:.0f} s; --budget q4_k_m {t_mixed:.0f} s ({t_mixed / t_stock:.2f}×); "
          f"--budget {budget} {t_low:.0f} s ({t_low / t_stock:.2f}×)")
    for label, entries in (("mixed", mixed), ("under", low)):
        m = next((r["entry"] for r in rows_of(entries) if r["quant"] == "mixed"), None)
        if m:
            info = m["metrics"]["mixed"]
            print(f"{label}: types {info.get('types_chosen') or m['metrics']['tensor_types']}; predicted loss "
                  f"{info['predicted_loss']} vs measured {info['measured_loss']}; choice took {info['seconds']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="", help="a run that trained and merged (copied; the original is untouched)")
    ap.add_argument("--family", default="qwen2", help="second subject: a tests/tiny_models.py family ('' for none)")
    ap.add_argument("--eval-budget", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--under", type=float, default=0.15, help="the smaller budget: this fraction below Q4_K_M")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgeft-bench-frontier-"))
    if a.run:
        run = work / "run"
        shutil.copytree(a.run, run, ignore=shutil.ignore_patterns("gguf*", "onnx", "checkpoints"))
        subject("default model run", run, work / "default", a.window, a.eval_budget, a.under)
    if a.family:
        family_run = tiny_run(a.family, work / "family", a.eval_budget)
        subject(f"tiny {a.family}", family_run, work / "family-out", 256, a.eval_budget, a.under)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
