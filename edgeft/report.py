"""`edgeft report RUN`: report.png and a self-contained report.html (no network) from the run's ledger.

Six panels: the perplexity ledger across steps (base → adapter → merged → each quant → on-device) and, beside
it in the same row order, the task ledger (the fine-tune's held-out answers: task perplexity and exact-answer
rate); artifact size vs perplexity for each quant with its gate drawn, and size vs exact answers; the
training loss curve; decode tokens/s per target against the profile's bandwidth bound.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from .atomic import atomic_file
from .errors import EdgeftError
from .ledger import Run, ledger_rows


def _figure(manifest: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ledger_rows(manifest) if r["ppl"] is not None]
    fig, axes = plt.subplots(2, 3, figsize=(20, 9.5))
    ax = axes[0][0]
    base_tokens = rows[0]["tokens"] if rows else None
    labels = [f"{r['step']}\n{r['model'][:40]}" + (f" [{r['tokens']} tok]" if r["tokens"] != base_tokens else "")
              for r in rows]
    colors = ["#999999" if r["status"] == "ref" else ("#2b8a3e" if r["status"] == "ok" else "#c92a2a") for r in rows]
    ax.barh(range(len(rows)), [r["ppl"] for r in rows], color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    for i, r in enumerate(rows):
        ax.text(r["ppl"], i, f" {r['ppl']:.3f}" + (f" ({r['delta_pct']:+.2f}%)" if r["delta_pct"] is not None else ""),
                va="center", fontsize=7)
    if rows:
        low, high = min(r["ppl"] for r in rows), max(r["ppl"] for r in rows)
        ax.set_xlim(low * 0.9, high * 1.12)  # the differences are the point, not the distance from zero
    ax.set_xlabel("perplexity on the run's held-out ids (grey: reference, green: ok, red: failed)")
    ax.set_title("perplexity ledger")

    _task_ledger(axes[0][1], rows)

    ax = axes[0][2]
    quants = [e for e in manifest["steps"] if e["step"] in ("export-gguf", "export-onnx") and e.get("perplexity")
              and e.get("outputs")]
    for e in quants:
        size = e["outputs"][0]["bytes"] / 2**20
        ppl = e["perplexity"]["ppl"]
        ok = e["status"] == "ok"
        ax.scatter(size, ppl, color="#2b8a3e" if ok else "#c92a2a", zorder=3)
        ax.annotate(f"{e['step'][7:]} {e['inputs']['quant']}", (size, ppl), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
        gate = e.get("gate") or {}
        ref = (e.get("reference") or {}).get("ppl")
        if ref and gate.get("metric", "").startswith("perplexity rise"):
            ax.plot([size * 0.93, size * 1.07], [ref * (1 + gate["max"])] * 2, color="#c92a2a", lw=1)
    ax.set_xlabel("artifact size (MiB)")
    ax.set_ylabel("perplexity")
    ax.set_title("size vs perplexity per quant (red tick: its gate)")

    _size_vs_task(axes[1][0], quants)

    ax = axes[1][1]
    train = next((e for e in reversed(manifest["steps"]) if e["step"] == "train" and e["metrics"].get("loss_curve")),
                 None)
    if not train:
        ax.text(0.5, 0.5, "no training step in this run", ha="center", va="center", transform=ax.transAxes)
    if train:
        curve = train["metrics"]["loss_curve"]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", ms=3)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (answer tokens)")
    ax.set_title("training loss")

    ax = axes[1][2]
    smokes = [e for e in manifest["steps"] if e["step"] == "smoke" and e["metrics"].get("bench")]
    if not smokes:
        ax.text(0.5, 0.5, "no smoke step in this run", ha="center", va="center", transform=ax.transAxes)
    for i, e in enumerate(smokes):
        tg = e["metrics"]["bench"]["tg_tokens_per_s"]
        bound = e["metrics"].get("decode_bound_tokens_per_s")
        ax.bar(i, tg, color="#1c7ed6")
        if bound:
            ax.plot([i - 0.4, i + 0.4], [bound, bound], color="#c92a2a")
            ax.text(i, bound, f"bound {bound:.0f}", fontsize=7, ha="center", va="bottom")
        ax.text(i, tg, f"{tg:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(smokes)), [f"{e['inputs']['device']}\n{e['inputs']['mode']}\n{e['inputs']['quant']}"
                                       for e in smokes], fontsize=7)
    if any(e["metrics"].get("decode_bound_tokens_per_s") for e in smokes):
        ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("tokens/s per target vs its bandwidth bound (emulated: qemu speed)")
    fig.tight_layout()
    return fig


def _task_ledger(ax, rows: list[dict]) -> None:
    """Task perplexity per row (same order as the perplexity ledger), the exact-answer rate written on it."""
    if not any(r["task_ppl"] is not None for r in rows):
        ax.text(0.5, 0.5, "no task data in this run\n(train on a dataset, or `edgeft eval --data FILE`)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    colors = ["#999999" if r["status"] == "ref" else ("#2b8a3e" if r["status"] == "ok" else "#c92a2a") for r in rows]
    values = [r["task_ppl"] or 0 for r in rows]
    ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)), [f"{r['step']}" for r in rows], fontsize=7)
    ax.invert_yaxis()
    for i, r in enumerate(rows):
        if r["task_ppl"] is None:
            ax.text(0, i, " not measured", va="center", fontsize=7, color="#777777")
            continue
        em = "" if r["exact_match"] is None else f", exact {100 * r['exact_match']:.0f}%"
        sub = f" [{r['task_items']} ex.]" if r.get("task_items") else ""
        ax.text(r["task_ppl"], i, f" {r['task_ppl']:.4f}{em}{sub}", va="center", fontsize=7)
    measured = [v for v in values if v]
    ax.set_xlim(min(measured) * 0.98, max(measured) * 1.08)  # the differences are the point, not zero
    ax.set_xlabel("task perplexity of the held-out answers (axis does not start at 0)")
    ax.set_title("task ledger (same rows)")


def _size_vs_task(ax, quants: list[dict]) -> None:
    points = [e for e in quants if (e.get("task") or {}).get("exact_match") is not None]
    if not points:
        ax.text(0.5, 0.5, "no task data for the exported artifacts", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    for e in points:
        size, em = e["outputs"][0]["bytes"] / 2**20, 100 * e["task"]["exact_match"]
        ax.scatter(size, em, color="#2b8a3e" if e["status"] == "ok" else "#c92a2a", zorder=3)
        ax.annotate(f"{e['step'][7:]} {e['inputs']['quant']}", (size, em), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_ylim(-5, 105)
    ax.set_xlabel("artifact size (MiB)")
    ax.set_ylabel("exact answers on held-out prompts (%)")
    ax.set_title("size vs task quality per quant")


def report(run_dir: str | Path) -> tuple[Path, Path]:
    run = Run(run_dir)
    if not run.manifest_path.is_file():
        raise EdgeftError(f"{run_dir}: no manifest.json; pass a run folder written by edgeft")
    manifest = run.manifest()
    fig = _figure(manifest)
    png = run.path / "report.png"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    with atomic_file(png) as tmp:
        tmp.write_bytes(buf.getvalue())
    rows = ledger_rows(manifest)
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            r["step"], r["model"], r["status"], "" if r["ppl"] is None else f"{r['ppl']:.4f}",
            "" if r["delta_pct"] is None else f"{r['delta_pct']:+.2f}%", r["tokens"] or "",
            "" if r["task_ppl"] is None else f"{r['task_ppl']:.4f}",
            "" if r["exact_match"] is None else f"{100 * r['exact_match']:.0f}%",
            "" if not r["bytes"] else f"{r['bytes'] / 1e6:.1f} MB", "" if r["wall_s"] is None else f"{r['wall_s']:.1f} s",
            r["reason"])) + "</tr>" for r in rows)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>edgeft report: {html.escape(str(run.path))}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 8px}}th{{background:#f1f3f5}}</style></head><body>
<h1>edgeft run {html.escape(run.path.name)}</h1>
<p>Every perplexity below is on the same {rows[0]['tokens'] if rows and rows[0]['tokens'] else ''} held-out token ids,
in the same windows. Δ is against the row's reference.</p>
<img alt="report" style="max-width:100%" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">
<table><tr><th>step</th><th>model</th><th>status</th><th>perplexity</th><th>Δ</th><th>tokens</th>
<th>task ppl</th><th>exact answers</th><th>size</th>
<th>wall</th><th>note</th></tr>{cells}</table></body></html>"""
    page_path = run.path / "report.html"
    with atomic_file(page_path) as tmp:
        tmp.write_text(page)
    return page_path, png
