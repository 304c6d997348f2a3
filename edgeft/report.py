"""`edgeft report RUN`: report.html (a self-contained page, no network) and report.png from the run's ledger.

Rows of one run are measured on different numbers of tokens (the host scores the run's held-out ids, 8,176
by default; a board's smoke test the first 128), and perplexity on 128 tokens is not perplexity on 8,176:
on one absolute axis the board's row dwarfs the others or is dwarfed by them. So no panel puts absolute
perplexities of different rows on one axis: each row is drawn as its change against its own reference on
the same ids (the F16 GGUF for a quant, the host for the board), in %, with the perplexity and the token
count written beside it. Every axis starts at zero (a change is drawn from zero, so its sign shows); sizes
are MiB (2^20 bytes), in the figures and in the page.

Panels, in this order (report.png holds them all; the page shows each as its own image):
  1. perplexity ledger (base → adapter → merged → each quant → on-device): change vs each row's reference
  2. task ledger, same rows: the task perplexity's change vs the row's reference, exact answers written on it
  3. size vs perplexity change per quant, with its gate
  4. size vs exact answers per quant
  5. KL divergence and top-1 agreement of each quant vs its reference
  6. the training loss curve
  7. decode tokens/s per target against the profile's bandwidth bound
  8. the GGUF frontier: size vs mean KL for every GGUF of the run, stock recipes and mixed ones (exact answers
     written beside each), the stock frontier as a line and the --budget as a cut
The page has the tables too: the ledger, the quants (size, perplexity, KL, top-1, task, gate), the library
versions of each step and the config of each step.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Callable

from .atomic import atomic_file
from .errors import EdgeftError
from .run import (COMPARE, DEPLOY, EXPORT_GGUF, EXPORT_GGUF_CHOICE, EXPORT_ONNX, FLEET_PREFIX, MANIFEST, SMOKE,
                  TRAIN, Run, fleet_step, last_entry)
from .tables import fleet_rows, ledger_rows, methods_columns, served_rows

MiB = 2**20
GREY, GREEN, RED, BLUE = "#999999", "#2b8a3e", "#c92a2a", "#1c7ed6"
QUANT_STEPS = (EXPORT_GGUF, EXPORT_ONNX)


def _color(status: str) -> str:
    return GREY if status == "ref" else (GREEN if status == "ok" else RED)


def _measured(manifest: dict) -> list[dict]:
    return [r for r in ledger_rows(manifest) if r["ppl"] is not None]


def _step(r: dict) -> str:
    """A row's step, marked when it was scored under the other BOS convention than the run's newest rows."""
    return r["step"] + ("" if r["comparable"] else " (BOS)" if r["bos"] else " (no BOS)")


def _quants(manifest: dict) -> list[dict]:
    """The exported artifacts with a measured perplexity, in ledger order."""
    return [e for e in manifest["steps"] if e["step"] in QUANT_STEPS and e.get("outputs")
            and (e.get("perplexity") or {}).get("ppl") is not None]


def _quant_label(e: dict) -> str:
    return f"{e['step'][7:]} {e['inputs'].get('quant', '')}"


def _size_mib(e: dict) -> float:
    return e["outputs"][0]["bytes"] / MiB


def _nothing(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _change_bars(ax, rows: list[dict], values: list[float], labels: list[str], measured: str) -> None:
    """One bar per ledger row, top to bottom. A reference's change is zero by definition: a grey mark at
    zero shows its row is there (where `measured` is)."""
    ax.barh(range(len(rows)), values, color=[_color(r["status"]) for r in rows])
    at = [i for i, r in enumerate(rows) if r["status"] == "ref" and r[measured] is not None]
    ax.plot([0] * len(at), at, "D", color=GREY, ms=4, zorder=3)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()


def _change_axis(ax, values: list[float], label: str) -> None:
    """A horizontal axis of changes in %, from zero (drawn), with room on the right for the written values."""
    low, high = min([0.0, *values]), max([0.0, *values])
    span = (high - low) or 1.0
    ax.set_xlim(low - 0.05 * span, high + 0.9 * span)
    ax.axvline(0, color="#333333", lw=0.8)
    ax.set_xlabel(label)


def _ledger(ax, manifest: dict) -> None:
    """Each row's perplexity change vs its own reference; rows on another token count are comparable so."""
    rows = _measured(manifest)
    if not rows:
        _nothing(ax, "no perplexity measured in this run")
        return
    values = [r["delta_pct"] or 0.0 for r in rows]
    _change_bars(ax, rows, values, [f"{_step(r)}\n{r['model'][:40]}" for r in rows], "ppl")
    for i, (r, v) in enumerate(zip(rows, values)):
        vs = "reference" if r["delta_pct"] is None else f"{r['delta_pct']:+.2f}%"
        on = f"{r['tokens']:,} tokens" if r["tokens"] else "? tokens"
        ax.text(max(v, 0), i, f" {r['ppl']:.3f} on {on} ({vs})", va="center", fontsize=7)
    _change_axis(ax, values, "perplexity change vs the row's own reference on the same ids (%)\n"
                             "grey: reference, green: ok, red: failed")
    ax.set_title("perplexity ledger")


def _task_ledger(ax, manifest: dict) -> None:
    """The task perplexity's change per row (same rows as the perplexity ledger), exact answers written."""
    rows = _measured(manifest)
    if not any(r["task_ppl"] is not None for r in rows):
        _nothing(ax, "no task data in this run\n(train on a dataset, or `edgeft eval --data FILE`)")
        return
    values = [r["task_delta_pct"] or 0.0 for r in rows]
    _change_bars(ax, rows, values, [_step(r) for r in rows], "task_ppl")
    for i, (r, v) in enumerate(zip(rows, values)):
        if r["task_ppl"] is None:
            ax.text(0, i, " not measured", va="center", fontsize=7, color="#777777")
            continue
        em = "" if r["exact_match"] is None else f", exact {100 * r['exact_match']:.0f}%"
        sub = f" [{r['task_items']} ex.]" if r.get("task_items") else ""
        vs = " (reference)" if r["status"] == "ref" else ("" if r["task_delta_pct"] is None else
                                                          f" ({r['task_delta_pct']:+.2f}%)")
        ax.text(max(v, 0), i, f" {r['task_ppl']:.4f}{vs}{em}{sub}", va="center", fontsize=7)
    _change_axis(ax, values, "task perplexity change vs the row's reference (%)")
    ax.set_title("task ledger (same rows)")


def _change(e: dict) -> float | None:
    """An entry's perplexity change vs its reference, in %."""
    ref = (e.get("reference") or {}).get("ppl")
    return 100 * (e["perplexity"]["ppl"] / ref - 1) if ref else None


def _size_vs_ppl(ax, manifest: dict) -> None:
    quants = _quants(manifest)
    if not quants:
        _nothing(ax, "no exported artifacts in this run")
        return
    changes = [_change(e) or 0.0 for e in quants]
    reach = max([1.0, *(3 * abs(c) for c in changes)])  # a gate far above every change is written, not drawn
    for e, change in zip(quants, changes):
        size = _size_mib(e)
        ax.scatter(size, change, color=_color(e["status"]), zorder=3)
        gate = e.get("gate") or {}
        limit = 100 * gate["max"] if str(gate.get("metric", "")).startswith("perplexity rise") and \
            isinstance(gate.get("max"), (int, float)) else None
        note = "" if limit is None or limit <= reach else f", gate +{limit:,.0f}% off this axis"
        ax.annotate(f"{_quant_label(e)} ({e['perplexity']['ppl']:.3f}{note})", (size, change), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
        if limit is not None and not note:
            ax.plot([size * 0.93, size * 1.07], [limit] * 2, color=RED, lw=1)
    ax.axhline(0, color="#333333", lw=0.8)
    ax.set_xlim(left=0)
    ax.set_xlabel("artifact size (MiB)")
    ax.set_ylabel("perplexity change vs its reference (%)")
    ax.set_title("size vs perplexity per quant (red tick: its gate)")


def _size_vs_task(ax, manifest: dict) -> None:
    points = [e for e in _quants(manifest) if (e.get("task") or {}).get("exact_match") is not None]
    if not points:
        _nothing(ax, "no task data for the exported artifacts")
        return
    for e in points:
        size, em = _size_mib(e), 100 * e["task"]["exact_match"]
        ax.scatter(size, em, color=_color(e["status"]), zorder=3, clip_on=False)
        ax.annotate(_quant_label(e), (size, em), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlim(left=0)
    ax.set_ylim(0, 105)
    ax.set_xlabel("artifact size (MiB)")
    ax.set_ylabel("exact answers on held-out prompts (%)")
    ax.set_title("size vs task quality per quant")


def _kl_top1(ax, manifest: dict) -> None:
    quants = [e for e in _quants(manifest) if e["metrics"].get("kl_mean") is not None]
    if not quants:
        _nothing(ax, "no KL / top-1 in this run\n(measured for each quant against its unquantized reference)")
        return
    from matplotlib.ticker import FormatStrFormatter

    kl = [e["metrics"]["kl_mean"] for e in quants]
    ax.barh(range(len(quants)), kl, height=0.5, color=[_color(e["status"]) for e in quants])
    pad = max(0.0, (4 - len(quants)) / 2)  # a lone quant's bar stays a bar, not a block
    ax.set_ylim(-0.5 - pad, len(quants) - 0.5 + pad)
    ax.set_yticks(range(len(quants)), [_quant_label(e) for e in quants], fontsize=7)
    ax.invert_yaxis()
    for i, e in enumerate(quants):
        top1 = e["metrics"].get("top1_agreement")
        ax.text(kl[i], i, f" KL {kl[i]:.4g}" + ("" if top1 is None else f", top-1 {100 * top1:.1f}%"),
                va="center", fontsize=7)
    ax.set_xlim(0, max(kl) * 1.6 or 1)
    ax.xaxis.set_major_formatter(FormatStrFormatter("%.2g"))  # no offset text: it lands on the label
    ax.set_xlabel("mean KL divergence from the reference's next-token distribution (top-1 agreement written)")
    ax.set_title("KL and top-1 per quant")


def _loss(ax, manifest: dict) -> None:
    train = last_entry(manifest["steps"], TRAIN, status=None, where=lambda e: bool(e["metrics"].get("loss_curve")))
    if not train:
        _nothing(ax, "no training step in this run")
        return
    curve = [math.nan if x is None else x for x in train["metrics"]["loss_curve"]]  # a non-finite loss is null
    ax.plot(range(1, len(curve) + 1), curve, marker="o", ms=3)
    ax.set_xlim(0, len(curve) + 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title("training loss")


def _speed(ax, manifest: dict) -> None:
    smokes = [e for e in manifest["steps"] if e["step"] == "smoke" and e["metrics"].get("bench")]
    if not smokes:
        _nothing(ax, "no smoke step in this run")
        return
    speeds = [e["metrics"]["bench"]["tg_tokens_per_s"] for e in smokes]
    top = max(speeds) * 1.3 or 1
    for i, (e, tg) in enumerate(zip(smokes, speeds)):
        bound = e["metrics"].get("decode_bound_tokens_per_s")
        ax.bar(i, tg, color=BLUE)
        ax.text(i, tg, f"{tg:.1f}", ha="center", va="bottom", fontsize=8)
        if bound and bound <= 3 * top:
            top = max(top, bound * 1.1)
            ax.plot([i - 0.4, i + 0.4], [bound, bound], color=RED)
            ax.text(i, bound, f"bound {bound:.0f}", fontsize=7, ha="center", va="bottom")
        elif bound:  # far above: drawing it would flatten the bars; say where it is instead
            ax.text(i, tg * 1.12 or 0.1, f"bound {bound:,.0f} tok/s\n(off this axis)", fontsize=7, ha="center",
                    va="bottom", color=RED)
    ax.set_ylim(0, top)
    ax.set_xticks(range(len(smokes)), [f"{e['inputs'].get('device')}\n{e['inputs'].get('mode')}\n"
                                       f"{e['inputs'].get('quant')}" for e in smokes], fontsize=7)
    ax.set_ylabel("decode tokens/s")
    ax.set_title("tokens/s per target vs its bandwidth bound (emulated: qemu speed)")


def _gguf_points(manifest: dict) -> list[dict]:
    """Every quantized GGUF of the run with its KL measured (the newest entry per file), and the comparisons a
    mixed recipe's entry measured without keeping a file (stock Q4_K_M without the importance matrix)."""
    newest: dict[str, dict] = {}
    for e in manifest["steps"]:
        if e["step"] == EXPORT_GGUF and e.get("outputs") and e["metrics"].get("kl_mean") is not None:
            newest[e["outputs"][0]["path"]] = e
    points = [{"label": e["inputs"].get("quant", "?"), "mib": _size_mib(e), "kl": e["metrics"]["kl_mean"],
               "exact": (e.get("task") or {}).get("exact_match"), "mixed": "mixed" in e["metrics"],
               "status": e["status"], "kept": True} for e in newest.values()]
    for e in newest.values():
        for r in (e["metrics"].get("mixed") or {}).get("stock", []):
            if not r.get("imatrix") and r.get("gates_passed") is None:
                points.append({"label": f"{r['quant']} (no imatrix)", "mib": r["bytes"] / MiB, "kl": r["kl_mean"],
                               "exact": r.get("exact_match"), "mixed": False, "status": "ref", "kept": False})
    return points


def _frontier(ax, manifest: dict) -> None:
    points = [p for p in _gguf_points(manifest) if p["kl"] and p["kl"] > 0]
    if not points:
        _nothing(ax, "no quantized GGUF with KL in this run")
        return
    for p in points:
        marker = "*" if p["mixed"] else ("o" if p["kept"] else "x")
        ax.scatter(p["mib"], p["kl"], marker=marker, s=120 if p["mixed"] else 40, zorder=3,
                   color=BLUE if p["mixed"] else _color(p["status"]))
        exact = "" if p["exact"] is None else f", exact {100 * p['exact']:.0f}%"
        ax.annotate(f"{p['label']} (KL {p['kl']:.3g}{exact})", (p["mib"], p["kl"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    # the stock frontier: stock GGUFs none of which is both smaller and better
    stock = sorted((p for p in points if not p["mixed"] and p["kept"]), key=lambda p: p["mib"])
    line, best = [], float("inf")
    for p in stock:
        if p["kl"] < best:
            line.append(p)
            best = p["kl"]
    if len(line) > 1:
        ax.plot([p["mib"] for p in line], [p["kl"] for p in line], color=GREY, lw=1, zorder=2)
    choice = last_entry(manifest["steps"], EXPORT_GGUF_CHOICE, status=None,
                        where=lambda e: bool(e["inputs"].get("budget_bytes")))
    if choice:
        cut = choice["inputs"]["budget_bytes"] / MiB
        ax.axvline(cut, color=RED, lw=1, ls="--")
        ax.text(cut, ax.get_ylim()[1], f" budget {cut:.1f} MiB ({choice['inputs'].get('budget')})", color=RED,
                fontsize=7, va="top")
    ax.set_yscale("log")
    ax.set_xlabel("GGUF size (MiB)")
    ax.set_ylabel("mean KL vs the unquantized GGUF (log)")
    ax.set_title("GGUF frontier: stock recipes (line: none smaller and better), mixed (star); exact answers written")


# (file name, caption, draw): the order of report.png's panels and of the page's images.
PANELS: list[tuple[str, str, Callable]] = [
    ("perplexity", "Perplexity ledger: each row's change vs its own reference", _ledger),
    ("task", "Task ledger: the held-out answers, same rows", _task_ledger),
    ("size-perplexity", "Size vs perplexity change per quant", _size_vs_ppl),
    ("size-task", "Size vs exact answers per quant", _size_vs_task),
    ("kl-top1", "KL divergence and top-1 agreement per quant", _kl_top1),
    ("loss", "Training loss", _loss),
    ("speed", "Decode speed per target vs its bandwidth bound", _speed),
    ("frontier", "GGUF frontier: size vs mean KL (exact answers written) for every GGUF of the run", _frontier),
]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(manifest: dict):
    """Every panel in one matplotlib figure (report.png), in PANELS order (see the module docstring)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(27, 10))
    for ax, (_, _, draw) in zip(axes.flat, PANELS):
        draw(ax, manifest)
    for ax in list(axes.flat)[len(PANELS):]:
        fig.delaxes(ax)
    fig.tight_layout()
    return fig


def panel_figures(manifest: dict) -> list[tuple[str, str, object]]:
    """(name, caption, figure) for each panel on its own, sized for the page."""
    plt = pyplot()
    rows = max(len(_measured(manifest)), len(_quants(manifest)), 4)
    out = []
    for name, caption, draw in PANELS:
        tall = name in ("perplexity", "task", "kl-top1")
        fig, ax = plt.subplots(figsize=(10, 1.5 + 0.45 * rows if tall else 5))
        draw(ax, manifest)
        fig.tight_layout()
        out.append((name, caption, fig))
    return out


def png_bytes(fig, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ the page
def _table(headers: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _fmt(value, spec: str, suffix: str = "", scale: float = 1.0) -> str:
    return "" if value is None else f"{value * scale if scale != 1 else value:{spec}}{suffix}"


def _ledger_table(manifest: dict) -> str:
    rows = [[_step(r), r["model"], r["status"], _fmt(r["ppl"], ".4f"), _fmt(r["delta_pct"], "+.2f", "%"),


             _fmt(r["tokens"], ","), _fmt(r["task_ppl"], ".4f"), _fmt(r["task_delta_pct"], "+.2f", "%"),
             _fmt(r["exact_match"], ".0f", "%", 100), _fmt(r["bytes"], ".1f", " MiB", 1 / MiB),
             _fmt(r["wall_s"], ".1f", " s"), _fmt(r["peak_rss_mb"], ".0f", " MiB"), r["reason"]]
            for r in ledger_rows(manifest)]
    return _table(["step", "model", "status", "perplexity", "Δ vs reference", "tokens", "task ppl", "task Δ",
                   "exact answers", "size", "wall", "peak RSS", "note"], rows, "ledger")


def _quant_table(manifest: dict) -> str:
    rows = []
    for e in _quants(manifest):
        ref, m, task, gate = e.get("reference") or {}, e["metrics"], e.get("task") or {}, e.get("gate") or {}
        ppl = e["perplexity"]["ppl"]
        rows.append([
            _quant_label(e), Path(e["outputs"][0]["path"]).name, _fmt(_size_mib(e), ".1f", " MiB"), _fmt(ppl, ".4f"),
            f"{ref.get('label') or ''} {_fmt(ref.get('ppl'), '.4f')}".strip(),
            _fmt(_change(e), "+.2f", "%"),
            _fmt(m.get("kl_mean"), ".4g"), _fmt(m.get("top1_agreement"), ".1f", "%", 100),
            _fmt(task.get("ppl"), ".4f"), _fmt(task.get("exact_match"), ".0f", "%", 100),
            "" if not gate else f"{gate.get('metric')}: {gate.get('value')} (max {gate.get('max')})",
            e["status"], e.get("reason") or e.get("note") or ""])
    if not rows:
        return "<p>No exported artifacts in this run.</p>"
    return _table(["artifact", "file", "size", "perplexity", "reference", "Δ vs reference", "KL (mean)", "top-1",
                   "task ppl", "exact answers", "gate", "status", "note"], rows, "quants")


def _boards_table(manifest: dict) -> str:
    """The last fleet entry of each step (deploy, smoke) as one table, and the served adapters' checks."""
    out = []
    for step in (fleet_step(DEPLOY), fleet_step(SMOKE)):
        e = last_entry(manifest["steps"], step, status=None)
        if e is None:
            continue
        rows = [[r["board"], r["device"], r["model"], r["adapters"] or "", _fmt(r["tokens_per_s"], ".1f"),
                 _fmt(r["ppl_change"], "+.2f", "%", 100),
                 ("pass" if r["passed"] else "FAIL") + (" (earlier run)" if r.get("skipped") else ""),
                 r.get("error") or ""] for r in fleet_rows(e)]
        out.append(f"<h3>{html.escape(step.removeprefix(FLEET_PREFIX))} on {len(rows)} boards</h3>" + _table(
            ["board", "device", "model", "adapters", "tok/s", "ppl Δ", "result", "error"], rows, "fleet"))
    served = served_rows([e for e in manifest["steps"] if e["step"] == SMOKE and "served_answers" in e["metrics"]])
    if served:
        rows = [[s["board"], s["adapter"], s["id"], _fmt(s["ppl"], ".4f"), _fmt(s["host_ppl"], ".4f"),
                 _fmt(s["exact_match"], ".0f", "%", 100), _fmt(s["host_exact_match"], ".0f", "%", 100),
                 f"{s['identical_to_host']}/{s['items']}", _fmt(s["switch_cost_ms"], "+.0f", " ms"),
                 _fmt(s["rss_ratio"], ".0f", "%", 100), s["status"]] for s in served]
        out.append("<h3>served adapters</h3>" + _table(
            ["board", "adapter", "id", "ppl (board, base + LoRA)", "ppl (host, fused)", "exact (board)",
             "exact (host)", "same answers", "switch cost", "RSS vs separate servers", "status"], rows, "served"))
    return "".join(out) or "<p>No fleet or served-adapter steps in this run.</p>"


def _methods_table(manifest: dict) -> str:
    e = last_entry(manifest["steps"], COMPARE, status=None)
    if e is None:
        return ""
    headers, rows = methods_columns(e["metrics"]["rows"])
    width = max(len(r) for r in rows)
    return "<h2>PEFT methods compared</h2>" + _table(headers + [""] * (width - len(headers)), rows, "compare")


def _step_names(manifest: dict) -> list[str]:
    return [f"#{i} {e['step']}" for i, e in enumerate(manifest["steps"], 1)]


def _versions_table(manifest: dict) -> str:
    steps = manifest["steps"]
    libraries = list(dict.fromkeys(k for e in steps for k in (e.get("versions") or {})))
    if not libraries:
        return "<p>No library versions recorded.</p>"
    rows = [[lib, *[(e.get("versions") or {}).get(lib) or "" for e in steps]] for lib in libraries]
    return _table(["library", *_step_names(manifest)], rows, "versions")


def _setting(value) -> str:
    """A config value as a person reads it: a list of names as one line, a mapping as JSON, null as nothing."""
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return ", ".join(map(str, value))
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else str(value)


def _config_tables(manifest: dict) -> str:
    out = []
    for name, e in zip(_step_names(manifest), manifest["steps"]):
        config = e.get("config") or {}
        table = _table(["setting", "value"], [[k, _setting(v)] for k, v in config.items()], "config") if config \
            else "<p>none recorded</p>"
        out.append(f"<details><summary>{html.escape(name)} ({html.escape(e['status'])})</summary>{table}</details>")
    return "".join(out)


def page(manifest: dict, title: str) -> str:
    """The report as an HTML page: each panel its own image, and the tables."""
    images = "".join(
        f'<figure id="{name}"><img alt="{html.escape(caption)}" src="data:image/png;base64,'
        f'{base64.b64encode(png_bytes(fig, 100)).decode()}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        for name, caption, fig in panel_figures(manifest))
    counts = sorted({r["tokens"] for r in _measured(manifest) if r["tokens"]}, reverse=True)
    tokens = " or ".join(f"{n:,}" for n in counts) or "no"
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>edgeft report: {html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;font-size:13px;
margin:0.5em 0 1.5em}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}th{{background:#f1f3f5}}
figure{{display:inline-block;margin:0 1em 1em 0;vertical-align:top}}img{{max-width:100%}}
figcaption{{font-size:13px;color:#555}}details{{margin:0.3em 0}}</style></head><body>
<h1>edgeft run {html.escape(title)}</h1>
<p>Rows are measured on {tokens} tokens of the run's held-out ids (a board's smoke test scores fewer than the
host; the tokens column says which). Perplexities on different token counts are not comparable, so each row is
compared with its own reference on the same ids (Δ, in %), and the figures draw that change. Axes start at zero.
Sizes are MiB (2<sup>20</sup> bytes).</p>
<h2>Figures</h2>{images}
<h2>Ledger</h2>{_ledger_table(manifest)}
<h2>Exported artifacts</h2>{_quant_table(manifest)}
<h2>Boards</h2>{_boards_table(manifest)}
{_methods_table(manifest)}
<h2>Library versions of each step</h2>{_versions_table(manifest)}
<h2>Config of each step</h2>{_config_tables(manifest)}
</body></html>"""


def report(run_dir: str | Path) -> tuple[Path, Path]:
    run = Run(run_dir)
    if not run.is_run():
        raise EdgeftError(f"{run_dir}: no {MANIFEST}; pass a run folder written by edgeft")
    manifest = run.manifest()
    page_path, png = run.report_files
    data = png_bytes(figure(manifest), 110)
    with atomic_file(png) as tmp:
        tmp.write_bytes(data)
    text = page(manifest, run.path.name)
    with atomic_file(page_path) as tmp:
        tmp.write_text(text)
    return page_path, png
