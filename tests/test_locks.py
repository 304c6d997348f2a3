"""Two writers of one artifact: the second is refused in one line, and nothing of the first is overwritten."""

import subprocess
import sys
import time

from click.testing import CliRunner

from edgeft.cli import cli

from .conftest import WINDOW, assert_one_line_error


def _hold(run, artifact, command):
    """Another process writing `artifact` of `run` (as a train would), until killed."""
    code = ("import sys, time; from pathlib import Path; from edgeft.locks import writing\n"
            "with writing(Path(sys.argv[1]), sys.argv[2], sys.argv[3]):\n"
            "    print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run), artifact, command], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_train_into_a_run_being_trained_is_refused_and_overwrites_nothing(tiny_llama, tmp_path):
    run = tmp_path / "run"
    holder = _hold(run, "adapter", "train")
    try:
        (run / "train_log.csv").write_text("step,loss\n1,0.5\n")  # what the first train has written so far
        result = CliRunner().invoke(cli, ["train", "--model", str(tiny_llama), "--data", "demo", "--run", str(run),
                                          "--max-steps", "1", *WINDOW])
        assert_one_line_error(result, "adapter is being written by edgeft train (pid", "another --run")
        assert (run / "train_log.csv").read_text() == "step,loss\n1,0.5\n"
        assert not (run / "adapter").exists() and not (run / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # the lock goes with its process, however it ended: the run can be trained now
    start = time.monotonic()
    result = CliRunner().invoke(cli, ["train", "--model", str(tiny_llama), "--data", "demo", "--run", str(run),
                                      "--max-steps", "1", "--eval-generate", "0", "--max-ppl-rise", "100", *WINDOW])
    assert result.exit_code == 0, result.output
    assert time.monotonic() - start < 120
