"""train --eval-every / --select best: training that stops before it forgets, keeping the best adapter that
passes the forgetting gate."""

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from edgeft.cli import cli
from edgeft.errors import GateFailed

from .conftest import WINDOW, assert_one_line_error, train_tiny


@pytest.fixture(scope="module")
def looked_at_every_step(tiny_llama, tmp_path_factory):
    """8 steps at a high rate, evaluated after each, no gate in the way: the trajectory the test cuts."""
    run = tmp_path_factory.mktemp("select") / "every"
    result = train_tiny(tiny_llama, run, lr=0.05, max_steps=8, eval_every=1)
    return result.entry["metrics"]["evaluations"]


def test_every_evaluation_is_logged_in_the_csv_and_the_ledger(tiny_llama, tmp_path, looked_at_every_step):
    result = train_tiny(tiny_llama, tmp_path / "r", lr=0.05, max_steps=8, eval_every=3)
    evals = result.entry["metrics"]["evaluations"]
    assert [e["step"] for e in evals] == [3, 6, 8]  # every 3 steps, and the last
    assert evals == [looked_at_every_step[i - 1] for i in (3, 6, 8)]  # looking does not change the training
    rows = (tmp_path / "r" / "train_log.csv").read_text().splitlines()
    assert rows[0].endswith(",heldout_ppl,heldout_rise,task_ppl") and len(rows) == 9
    cells = [row.split(",") for row in rows[1:]]
    assert all(c[6:] == ["", "", ""] for i, c in enumerate(cells, 1) if i not in (3, 6, 8))
    assert float(cells[5][7]) == pytest.approx(evals[1]["heldout_rise"], rel=1e-4)
    assert result.entry["metrics"]["selected"]["rule"] == "last"


@pytest.mark.slow
def test_a_run_whose_last_step_forgets_too_much_keeps_its_best_earlier_adapter(tiny_llama, tmp_path,
                                                                              looked_at_every_step):
    rises = [e["heldout_rise"] for e in looked_at_every_step]
    earlier = min(rises[:-1])
    assert earlier < rises[-1], rises  # the trajectory this test needs: the last step is not the best
    gate = (earlier + rises[-1]) / 2

    # kept to the last step, the run fails its gate
    with pytest.raises(GateFailed):
        train_tiny(tiny_llama, tmp_path / "last", lr=0.05, max_steps=8, max_ppl_rise=gate)

    result = train_tiny(tiny_llama, tmp_path / "best", lr=0.05, max_steps=8, max_ppl_rise=gate, eval_every=1,
                        select="best", save_every=0)
    m = result.entry["metrics"]
    assert result.entry["status"] == "ok"
    seen = m["evaluations"]
    figures = lambda evals: [{k: v for k, v in e.items() if k != "within_gate"} for e in evals]  # noqa: E731
    assert figures(seen) == figures(looked_at_every_step[:len(seen)])  # the same training, looked at the same way
    within = [e for e in seen if e["heldout_rise"] <= gate]
    best = min(within, key=lambda e: e["task_ppl"])
    assert m["selected"]["step"] == best["step"] < 8 and m["selected"]["rule"] == "best"
    assert f"step {best['step']}" in m["selected"]["reason"] and "crossed the gate" in m["selected"]["reason"]
    # the kept adapter is the one measured after training: on these ids (all of them, 300) that step's rise
    entry = result.entry
    assert entry["perplexity"]["ppl"] / entry["reference"]["ppl"] - 1 == pytest.approx(best["heldout_rise"], abs=1e-6)
    if m["stopped_early_at"] is not None:  # the gate crossed twice after the best step: no need to go on
        assert m["stopped_early_at"] < 8 and len(m["loss_curve"]) == m["stopped_early_at"]


@pytest.mark.slow
def test_the_kept_adapter_is_that_steps_weights(tiny_llama, tmp_path, looked_at_every_step):
    from edgeft.checkpoint import load_state

    rises = [e["heldout_rise"] for e in looked_at_every_step]
    gate = (min(rises[:-1]) + rises[-1]) / 2
    best = train_tiny(tiny_llama, tmp_path / "best", lr=0.05, max_steps=8, max_ppl_rise=gate, eval_every=1,
                      select="best", save_every=0)
    step = best.entry["metrics"]["selected"]["step"]
    # the same training with a checkpoint after every step holds that step's adapter
    train_tiny(tiny_llama, tmp_path / "ckpt", lr=0.05, max_steps=8, max_ppl_rise=100.0, save_every=1,
               keep_checkpoints=8)
    at = load_state(tmp_path / "ckpt" / "checkpoints" / f"step-{step:06d}")["adapter"]
    saved = load_file(best.adapter / "adapter_model.safetensors")
    assert saved.keys() == at.keys() and all(torch.equal(saved[k], at[k]) for k in saved)
    last = load_file(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(saved[k], last[k]) for k in saved)


@pytest.mark.parametrize("args,needle", [
    (["--select", "best"], "add --eval-every N"),
    (["--select", "first"], "--select first: use last or best"),
    (["--eval-every", "-1"], "--eval-every: -1 is out of range"),
    (["--eval-every", "2", "--base-quant", "4bit"], "--eval-every on a 4-bit base runs on CUDA only"),
])
def test_select_and_eval_every_are_checked_in_one_line(tiny_llama, tmp_path, args, needle):
    result = CliRunner().invoke(cli, ["train", "--model", str(tiny_llama), "--data", "demo", "--run",
                                      str(tmp_path / "r"), "--max-steps", "2", *WINDOW, *args])
    assert_one_line_error(result, needle)
