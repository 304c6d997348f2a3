"""Logs that work in a file: plain progress lines when stderr is not a terminal, RUN/train_log.csv, and
TensorBoard event files with --report-to tensorboard (issue 15, item 3)."""

import csv
import json
import re

import pytest
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.progress import bar
from edgeft.trainlog import CSV_FILE, TENSORBOARD_DIR

from .conftest import WINDOW, train_tiny


def test_a_bar_prints_plain_lines_when_stderr_is_not_a_terminal(capsys):
    """Under a test runner, as in `> log 2>&1`, stderr is not a terminal: about ten lines, then the end."""
    with bar("work", 40) as update:
        for i in range(1, 41):
            update(i, info=f"item {i}")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("  ")[0] for line in lines] == [f"work: {4 * k}/40 ({10 * k}%)" for k in range(1, 11)]
    assert lines[0].startswith("work: 4/40 (10%)  item 4  elapsed 0:00:00  eta 0:00:")
    assert "eta" not in lines[-1]  # done: nothing left to estimate

    with bar("unknown total") as update:  # a total that only the updates tell, and work cut short
        update(1, 7)
        update(2, 7)
    assert capsys.readouterr().err.splitlines()[-1].startswith("unknown total: 2/7 (29%)")


def _rows(run):
    with open(run / CSV_FILE, newline="") as f:
        return list(csv.DictReader(f))


def _scalars(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / TENSORBOARD_DIR))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_train_logs_plain_step_lines_a_csv_row_per_step_and_tensorboard(tiny_llama, tmp_path):
    from edgeft.data.demo_task import make_rows

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(24)))
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--model", str(tiny_llama), "--data", str(data), "--run", str(run),
                                      "--batch-size", "4", "--max-steps", "6", "--lr", "1e-3", "--eval-generate", "0",
                                      "--max-ppl-rise", "100", "--report-to", "tensorboard", *WINDOW])
    assert result.exit_code == 0, result.output
    entry = json.loads((run / "manifest.json").read_text())["steps"][-1]
    curve = entry["metrics"]["loss_curve"]

    # one plain line per step (6 steps: a tenth of the run is one step), in order, with what a log needs
    pattern = re.compile(r"^train: step (\d)/6 \(\d+%\)  loss (\d\.\d{4})  lr (\S+)  [\d,]+ tok/s  "
                         r"elapsed \d:\d\d:\d\d(  eta \d:\d\d:\d\d)?$")
    lines = [m for m in map(pattern.match, result.output.splitlines()) if m]
    assert [int(m.group(1)) for m in lines] == [1, 2, 3, 4, 5, 6], result.output
    assert [float(m.group(2)) for m in lines] == [round(v, 4) for v in curve]
    assert all(m.group(4) for m in lines[:-1]) and not lines[-1].group(4)  # an ETA until the end

    # the CSV: one row per optimizer step, the loss the ledger has, the schedule's lr, growing counts
    rows = _rows(run)
    assert list(rows[0]) == ["step", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s", "heldout_ppl",
                             "heldout_rise", "task_ppl"]
    assert all(r["heldout_ppl"] == r["task_ppl"] == "" for r in rows)  # filled only on --eval-every steps
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [float(r["loss"]) for r in rows] == pytest.approx(curve, rel=1e-5)
    lrs = [float(r["lr"]) for r in rows]  # cosine after one warmup step: the peak at step 2, then down
    assert lrs[1] == pytest.approx(1e-3) and lrs[1:] == sorted(lrs[1:], reverse=True) and lrs[-1] > 0
    tokens = [int(r["tokens"]) for r in rows]
    assert tokens == sorted(tokens) and tokens[-1] == entry["metrics"]["train_tokens"]
    assert all(float(r["tokens_per_s"]) > 0 and float(r["elapsed_s"]) > 0 for r in rows)

    # TensorBoard: the event file reads back with every step's loss and lr
    assert any(p.name.startswith("events.out.tfevents.") for p in (run / TENSORBOARD_DIR).iterdir())
    loss = _scalars(run, "train/loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in loss] == pytest.approx(curve, rel=1e-6)
    assert [v for _, v in _scalars(run, "train/learning_rate")] == pytest.approx(lrs, rel=1e-5)


def test_a_resumed_run_continues_the_csv_and_tensorboard_without_duplicate_steps(tiny_llama, tmp_path, capsys):
    """A crash leaves the log ahead of the last checkpoint (and maybe a cut line); resuming from the checkpoint
    trains those steps again: each step keeps exactly one row, and the values are the uninterrupted run's."""
    first = train_tiny(tiny_llama, tmp_path / "run", report_to=["tensorboard"])  # checkpoints at steps 2 and 4
    whole = _rows(first.run)
    with open(first.run / CSV_FILE, "a") as f:
        f.write("7,0.12")  # a line cut by a power loss
    capsys.readouterr()

    resumed = train_tiny(tiny_llama, tmp_path / "run", report_to=["tensorboard"], resume=True)
    assert resumed.entry["inputs"]["resumed_from"] == "step-000004"
    rows = _rows(resumed.run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r["loss"], r["lr"], r["tokens"]) for r in rows] == \
        [(r["step"], r["loss"], r["lr"], r["tokens"]) for r in whole]
    assert [s for s, _ in _scalars(resumed.run, "train/loss")] == [1, 2, 3, 4, 5, 6]
    steps = re.findall(r"^train: step (\d)/6", capsys.readouterr().err, re.M)
    assert steps == ["5", "6"]  # the resumed part only, its ETA from its own pace

    fresh = train_tiny(tiny_llama, tmp_path / "run", max_steps=2)  # training the run again starts new logs
    assert [int(r["step"]) for r in _rows(fresh.run)] == [1, 2]
    assert not (fresh.run / TENSORBOARD_DIR).exists()  # the earlier training's curves are not this adapter's


def test_report_to_is_checked_before_any_model_is_loaded(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--data", "demo", "--model", "/nowhere", "--report-to", "wandb",
                                      "--run", str(tmp_path / "r")])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == \
        "error: --report-to wandb: use tensorboard or none"


def test_a_log_written_before_the_evaluation_columns_is_continued_with_them(tiny_llama, tmp_path):
    first = train_tiny(tiny_llama, tmp_path / "run")  # checkpoints at steps 2 and 4
    log = first.run / CSV_FILE
    old = [",".join(line.split(",")[:6]) for line in log.read_text().splitlines()]  # the six columns of before
    log.write_text("\n".join(old) + "\n")
    resumed = train_tiny(tiny_llama, tmp_path / "run", resume=True)
    rows = _rows(resumed.run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(len(r) == 9 and None not in r.values() for r in rows)


def test_a_wait_with_nothing_to_count_prints_lines_while_it_lasts(capsys):
    """No silent minutes in a log: the emulated smoke's board commands, quantization and ONNX export."""
    import time as _time

    from edgeft.progress import activity

    with activity("smoke on emulated rpi5: perplexity on 1024 ids", every=0.1):
        _time.sleep(0.45)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "smoke on emulated rpi5: perplexity on 1024 ids ..."
    beats = [line for line in lines if "elapsed 0:00:00" in line]
    assert len(beats) >= 3 and lines[-1].startswith("smoke on emulated rpi5: perplexity on 1024 ids: done in")
    with pytest.raises(ValueError):
        with activity("x", every=10):
            raise ValueError
    assert capsys.readouterr().err.splitlines()[-1].startswith("x: stopped in")
