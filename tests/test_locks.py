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


def test_a_merge_into_a_run_whose_merged_model_is_being_written_is_refused(tiny_adapter_run, copy_run):
    run = copy_run(tiny_adapter_run)
    before = (run / "manifest.json").read_text()
    holder = _hold(run, "merged", "merge")
    try:
        result = CliRunner().invoke(cli, ["merge", "--adapter", str(run), "--dtype", "float32", *WINDOW])
        assert_one_line_error(result, "merged is being written by edgeft merge (pid", "another --run")
        assert not (run / "merged").exists()
        assert (run / "manifest.json").read_text() == before  # no entry for a merge that did not happen
    finally:
        holder.kill()
        holder.wait()


def test_an_export_of_a_file_another_export_is_writing_is_refused(tiny_llama, tiny_export_run, copy_run):
    run = copy_run(tiny_export_run)
    q8 = next(run.rglob("*-Q8_0.gguf"))
    q8_bytes = q8.read_bytes()
    before = (run / "manifest.json").read_text()
    holder = _hold(run, str(q8.relative_to(run)), "export")
    try:
        result = CliRunner().invoke(cli, ["export", "--model", str(tiny_llama), "--run", str(run), "--quant", "q8_0",
                                          *WINDOW])
        assert_one_line_error(result, f"{q8.name} is being written by edgeft export (pid", "another --run")
        assert q8.read_bytes() == q8_bytes
        assert (run / "manifest.json").read_text() == before
    finally:
        holder.kill()
        holder.wait()
