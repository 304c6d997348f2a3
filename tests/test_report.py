"""edgeft report: the task panels beside the perplexity ledger, a run without task data says so, rows on
different token counts drawn as changes vs their own reference, and a page of tables and separate figures."""

import json
import shutil

import pytest
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.report import figure
from edgeft.run import Run
from edgeft.tables import ledger_rows

from .conftest import WINDOW


def _texts(ax) -> str:
    return " ".join(t.get_text() for t in ax.texts)


def test_a_run_without_task_data_says_so_instead_of_empty_axes(tiny_export_run):
    manifest = json.loads((tiny_export_run / "manifest.json").read_text())
    fig = figure(manifest)
    task_ledger, size_vs_task = fig.axes[1], fig.axes[3]
    assert "no task data in this run" in _texts(task_ledger) and not task_ledger.axison
    assert "no task data for the exported artifacts" in _texts(size_vs_task)


def test_task_metrics_stand_beside_the_perplexity_of_every_row(tiny_merged_task_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_merged_task_run, run)
    result = CliRunner().invoke(cli, ["export", "--run", str(run), "--quant", "f16,q8_0", "--max-ppl-rise", "100",
                                      "--max-task-ppl-rise", "100", "--max-exact-drop", "1", *WINDOW])
    assert result.exit_code == 0, result.output
    manifest = json.loads((run / "manifest.json").read_text())
    rows = [r for r in ledger_rows(manifest) if r["ppl"] is not None]
    assert [r["step"] for r in rows][-2:] == ["export-gguf", "export-gguf"]
    assert all(r["task_ppl"] is not None for r in rows if r["step"] in ("merge", "export-gguf"))

    fig = figure(manifest)
    ledger, task_ledger, _, size_vs_task = fig.axes[:4]
    assert len(task_ledger.patches) == len(ledger.patches) == len(rows)  # one bar per row, same order
    labels = [t.get_text() for t in task_ledger.get_yticklabels()]
    assert labels == [r["step"] for r in rows]
    for r in rows:
        if r["task_ppl"] is not None:
            assert f"{r['task_ppl']:.4f}" in _texts(task_ledger)
    assert len(size_vs_task.collections) == 2  # F16 and Q8_0, size against exact answers

    page, png = (run / "report.html", run / "report.png")
    assert CliRunner().invoke(cli, ["report", str(run)]).exit_code == 0
    html = page.read_text()
    assert png.stat().st_size > 0
    q8 = rows[-1]
    assert f"<td>{q8['task_ppl']:.4f}</td>" in html and f"<td>{100 * q8['exact_match']:.0f}%</td>" in html


def _with_board_row(run_dir, tmp_path):
    """A copy of a real run with a smoke entry appended, shaped as `edgeft smoke --emulate` writes it (made by
    hand: qemu is too slow for this tier): the board scores the first 128 ids, where the host's perplexity is
    three times its perplexity on all of them, and the board is 0.8% above the host on those 128."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    q8 = Run(run).last("export-gguf", status=None, where=lambda e: e["inputs"]["quant"] == "q8_0")
    host = 3 * q8["perplexity"]["ppl"]
    gguf = q8["outputs"][0]["path"].split("/")[-1]
    Run(run)._append({  # as it stands: Run.record would time it and measure this process's memory
        "step": "smoke", "status": "ok", "started": q8["started"], "wall_s": 41.5, "peak_rss_mb": 300.0,
        "inputs": {"gguf": gguf, "quant": "q8_0", "device": "rpi5", "mode": "emulated", "host": None, "tokens": 128,
                   "eval_tokens": "eval_tokens.json"},
        "outputs": [],
        "perplexity": {"ppl": host * 1.008, "tokens": 128, "model": f"{gguf} on rpi5 (emulated)", "backend": "board"},
        "reference": {"ppl": host, "tokens": 128, "model": f"{gguf} on host", "label": "host"},
        "metrics": {"bench": {"tg_tokens_per_s": 3.2, "model_bytes": q8["outputs"][0]["bytes"]},
                    "decode_bound_tokens_per_s": 2400.0},
        "config": {"run": str(run), "device": "rpi5", "emulate": True, "max_tokens": 0}, "versions": q8["versions"],
        "gate": {"metric": "board vs host perplexity change beyond 3 standard errors", "max": 0.02, "value": 0.0,
                 "passed": True}})
    return run


def test_rows_on_128_and_on_all_tokens_are_drawn_as_changes_vs_their_own_reference(tiny_export_run, tmp_path):
    manifest = Run(_with_board_row(tiny_export_run, tmp_path)).manifest()
    rows = [r for r in ledger_rows(manifest) if r["ppl"] is not None]
    assert {r["tokens"] for r in rows} == {128, rows[0]["tokens"]} and rows[0]["tokens"] > 128
    assert max(r["ppl"] for r in rows) > 2.5 * min(r["ppl"] for r in rows)  # absolute values would dwarf each other
    fig = figure(manifest)
    ledger, size_vs_ppl = fig.axes[0], fig.axes[2]
    speed = next(ax for ax in fig.axes if ax.get_title().startswith("tokens/s per target"))
    kl = next((ax for ax in fig.axes if ax.get_title() == "KL and top-1 per quant"), None)
    # the bars are each row's change vs its own reference, in %: the board +0.8% vs the host, references 0
    assert [p.get_width() for p in ledger.patches] == pytest.approx([r["delta_pct"] or 0 for r in rows])
    assert ledger.patches[-1].get_width() == pytest.approx(0.8, abs=0.01) and "(%)" in ledger.get_xlabel()
    assert "128 tokens" in _texts(ledger) and f"{rows[0]['tokens']:,} tokens" in _texts(ledger)
    low, high = ledger.get_xlim()
    assert low <= 0 <= high and high < 10  # from zero, and not stretched by a perplexity
    # sizes in MiB from zero; the bound 750x the emulated speed is written, not drawn flattening the bar
    assert "MiB" in size_vs_ppl.get_xlabel() and size_vs_ppl.get_xlim()[0] == 0
    assert speed.get_ylim()[0] == 0 and "off this axis" in _texts(speed)
    q8 = next(e for e in manifest["steps"] if e["step"] == "export-gguf" and e["inputs"]["quant"] == "q8_0")
    assert f"KL {q8['metrics']['kl_mean']:.4g}, top-1 {100 * q8['metrics']['top1_agreement']:.1f}%" in _texts(kl)


def test_the_page_has_an_image_per_figure_and_the_ledger_quants_versions_and_config_as_tables(tiny_export_run,
                                                                                                tmp_path):
    import re

    run = _with_board_row(tiny_export_run, tmp_path)
    assert CliRunner().invoke(cli, ["report", str(run)]).exit_code == 0
    page = (run / "report.html").read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    panels = len(figure(Run(run).manifest()).axes)  # report.png's panels
    assert len(images) == panels == len(set(images)) and panels >= 7  # each figure its own picture
    tables = re.findall(r'<table class="(\w+)">(.*?)</table>', page, re.S)
    assert [name for name, _ in tables[:4]] == ["ledger", "quants", "versions", "config"]
    manifest = Run(run).manifest()
    quants = dict(tables)["quants"]
    for e in (e for e in manifest["steps"] if e["step"] == "export-gguf"):
        row = next(r for r in quants.split("<tr>") if f"<td>gguf {e['inputs']['quant']}</td>" in r)
        size = f"<td>{e['outputs'][0]['bytes'] / 2**20:.1f} MiB</td>"
        assert size in row and f"<td>{e['perplexity']['ppl']:.4f}</td>" in row
        m = e["metrics"]
        if m.get("kl_mean") is not None:  # the quant vs F16: KL and top-1 in their own cells
            assert f"<td>{m['kl_mean']:.4g}</td><td>{100 * m['top1_agreement']:.1f}%</td>" in row
    assert any(e["metrics"].get("kl_mean") is not None for e in manifest["steps"])
    versions = dict(tables)["versions"]
    assert f"<td>transformers</td><td>{manifest['steps'][0]['versions']['transformers']}</td>" in versions
    export = manifest["steps"][0]
    assert f"<td>quant</td><td>{', '.join(export['config']['quant'])}</td>" in page  # the export step's own config
    assert "MiB" in page and not re.search(r"\bMB\b", page)  # one unit for sizes
