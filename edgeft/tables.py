"""The ledger as tables: the rows and cells that `edgeft show`, `edgeft compare` and the report all render.

One definition per table, so the terminal and the HTML page cannot disagree about a number.
  ledger_rows      one row per measured model of a run's chain (show, the report's ledger and plots)
  methods_columns  the PEFT comparison's headers and cells (compare, the report's methods table)
  served_rows      one row per adapter a board serves, from the served smoke's entries (smoke, the report)
  fleet_rows       the boards of a fleet entry (deploy/smoke --hosts, the report)
"""

from __future__ import annotations


def ledger_rows(manifest: dict) -> list[dict]:
    """One row per measured model, in the order a person reads the chain. A step that compares against a
    reference (train: the base without the adapter) gets the reference's row first; Δ is against the
    step's reference, else against the run's first perplexity. Task columns (the fine-tune's held-out
    answers: their perplexity and the exact-answer rate) come from the entry's `task`, when the run has one.

    Each row says whether its windows started with the model's BOS (`bos`; an entry from before edgeft scored
    with BOS has no such key and was scored without). Where a run holds both (a BOS model's run continued after
    the change), the rows scored otherwise than its newest are marked `comparable: False` with a note, and Δ
    never reaches across the two: a run's first perplexity is kept per convention."""
    rows = []
    first_ppl: dict[bool, float] = {}
    for entry in manifest.get("steps", []):
        ref = entry.get("reference")
        task = entry.get("task") or {}
        measured = entry.get("perplexity") or {}
        bos = _bos(measured if measured.get("ppl") is not None else ref or {})
        # A reference already on the ledger (the F16 GGUF that every quant compares with) is not repeated.
        if ref and ref.get("ppl") is not None and not any(r["ppl"] == ref["ppl"] and r["bos"] == _bos(ref)
                                                          for r in rows):
            rows.append(_row(entry, ref, task.get("reference") or {}, status="ref", delta_to=None))
            first_ppl.setdefault(_bos(ref), ref["ppl"])
        ppl = measured.get("ppl")
        delta_to = ref["ppl"] if ref and "ppl" in ref and _bos(ref) == bos else first_ppl.get(bos)
        rows.append(_row(entry, measured, task, status=entry["status"], delta_to=delta_to))
        if ppl is not None:
            first_ppl.setdefault(bos, ppl)
    newest = next((r["bos"] for r in reversed(rows) if r["ppl"] is not None), False)
    for r in rows:
        r["comparable"] = r["ppl"] is None or r["bos"] == newest
        if not r["comparable"]:
            r["reason"] = (f"not comparable: scored {'with' if r['bos'] else 'without'} the model's BOS, the newer "
                           f"rows {'with' if newest else 'without'}" + (f"; {r['reason']}" if r["reason"] else ""))
    return rows


def _bos(measured: dict) -> bool:
    """Whether a ledger perplexity was scored with BOS windows (see scoring.py); older entries: without."""
    return bool(measured.get("bos", False))


def _row(entry: dict, measured: dict, task: dict, status: str, delta_to: float | None) -> dict:
    ppl = measured.get("ppl")
    own = status != "ref"  # sizes, times and notes belong to the step's own row
    return {
        "step": entry["step"],
        "checks": (entry.get("config") or {}).get("checks") or "full",  # quick: part of the ids, no answers
        "model": measured.get("model") or "",
        "status": status,
        "ppl": ppl,
        "bos": _bos(measured),
        "delta_pct"
: None if ppl is None or not delta_to else round(100 * (ppl / delta_to - 1), 2),
        "tokens": measured.get("tokens"),
        "task_ppl": task.get("ppl"),
        "task_delta_pct": None if task.get("ppl_change") is None or not own else round(100 * task["ppl_change"], 2),
        "exact_match": task.get("exact_match"),
        "task_items": task.get("items") if own else None,
        "bytes": (sum(o.get("bytes", 0) for o in entry.get("outputs", [])) or None) if own else None,
        "wall_s": entry.get("wall_s") if own else None,
        "peak_rss_mb": entry.get("peak_rss_mb") if own else None,
        "reason": (entry.get("reason") or entry.get("note") or task.get("note") or "") if own else "",
    }

def methods_columns(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The comparison as headers and text cells: one table for the CLI, the report and the README."""
    quants = list(dict.fromkeys(q for r in rows for q in r["quants"]))

    def pct(x):
        return "" if x is None else f"{100 * x:.0f}%"

    def ppl(x):
        return "" if x is None else f"{x:.4f}"

    headers = ["method", "trainable params", "adapter MB", "train s", "peak RAM MiB", "forgetting",
               "merged ppl", "merged exact"]
    for q in quants:
        headers += [f"{q.upper()} ppl", f"{q.upper()} exact"]
    out = []
    for r in rows:
        merged = r["merged"] or {}
        cells = [r["method"], "" if r["trainable_params"] is None else f"{r['trainable_params']:,}",
                 "" if r["adapter_mb"] is None else f"{r['adapter_mb']:.2f}",
                 "" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}",
                 "" if r["peak_ram_mb"] is None else f"{r['peak_ram_mb']:.0f}",
                 "" if r["forgetting"] is None else f"{100 * r['forgetting']:+.2f}%",
                 ppl(merged.get("ppl")), pct(merged.get("exact_match"))]
        for q in quants:
            m = r["quants"].get(q) or {}
            cells += [ppl(m.get("ppl")) + ("" if m.get("status") in (None, "ok") else " (failed)"),
                      pct(m.get("exact_match"))]
        out.append(cells + ([f"failed: {r['error'][:80]}"] if r["error"] else []))
    return headers, out


def served_rows(entries: list[dict]) -> list[dict]:
    """One row per served adapter's smoke entry: perplexity on the board (base + LoRA) and on the host (fused),
    the answers through the server, switching cost and memory."""
    rows = []
    for e in entries:
        a = e["metrics"].get("served_answers") or {}
        p, r = e.get("perplexity") or {}, e.get("reference") or {}
        rows.append({
            "board": e["inputs"].get("host"), "adapter": e["inputs"].get("lora"), "id": e["inputs"].get("adapter_id"),
            "ppl": p.get("ppl"), "host_ppl": r.get("ppl"), "answered": bool(a), "exact_match": a.get("exact_match"),
            "host_exact_match": a.get("host_exact_match"), "identical_to_host": a.get("identical_to_host"),
            "items": a.get("items"), "tokens_per_s": a.get("decode_tokens_per_s"),
            "switch_cost_ms": (e["metrics"].get("switching") or {}).get("switch_cost_ms"),
            "rss_ratio": (e["metrics"].get("memory") or {}).get("ratio"), "status": e["status"]})
    return rows


def fleet_rows(entry: dict) -> list[dict]:
    """The boards of a fleet entry, as fleet.py measured them (one dict per board)."""
    return entry["metrics"].get("boards", [])
