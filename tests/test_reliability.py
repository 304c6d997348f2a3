"""The reliability matrix: what a careless or hostile user hands each command, through the real CLI on real
files, and for every case the exit code, one line naming the file and the fix, nothing half-written
(no temporaries, no partial artifacts) and nothing lost (the run's earlier ledger entries are still there).

Fuzzing of each reader lives beside its module (test_dataset, test_config, test_ledger, test_inputs)."""

from __future__ import annotations

import codecs
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeft.cli import cli

from .conftest import WINDOW, assert_one_line_error

WINDOW_FLAGS = list(WINDOW)
TRAIN = ["--batch-size", "4", "--max-steps", "2", "--eval-generate", "0", "--max-ppl-rise", "100", *WINDOW_FLAGS]


@dataclass
class Case:
    args: list[str]
    code: int
    needles: tuple[str, ...] = ()
    run: Path | None = None  # whose ledger must keep its entries
    absent: list[Path] = field(default_factory=list)  # what must not exist afterwards (no partial artifact)


def _chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def _data(tmp: Path, data: bytes) -> str:
    (tmp / "data.jsonl").write_bytes(data)
    return str(tmp / "data.jsonl")


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


# ----------------------------------------------------------------------------------------------- cases
def train_windows_jsonl(tmp, fx):
    row = json.dumps(_chat(("system", "Answer with a number."), ("user", "2+2?"), ("assistant", "4")))
    data = _data(tmp, codecs.BOM_UTF8 + (row + "\r\n").encode() * 8)
    return Case(["train", "--base", str(fx("tiny_llama")), "--data", data, "--run", str(tmp / "run"), *TRAIN], 0)


def _bad_train(data: bytes, *needles):
    def case(tmp, fx):
        return Case(["train", "--base", str(fx("tiny_llama")), "--data", _data(tmp, data), "--run", str(tmp / "run"),
                     *TRAIN], 2, ("data.jsonl:1", *needles), absent=[tmp / "run"])
    return case


def _damaged_adapter(command: str):
    def case(tmp, fx):
        run = _copy(fx("tiny_adapter_run"), tmp / "run")
        _truncate(run / "adapter" / "adapter_model.safetensors")
        if command == "merge":
            args = ["merge", "--adapter", str(run), *WINDOW_FLAGS, "--eval-generate", "0"]
        else:
            args = ["export", "--adapter", str(run), "--quant", "f16", *WINDOW_FLAGS]
        return Case(args, 2, ("adapter_model.safetensors", "truncated", "copy it again or train again"), run,
                    absent=[run / "merged", run / "gguf"])
    return case


def _damaged_model(command: str):
    def case(tmp, fx):
        model = _copy(fx("tiny_llama"), tmp / "model")
        _truncate(model / "model.safetensors")
        run = tmp / "run"
        if command == "eval":
            args = ["eval", "--model", str(model), "--run", str(run), *WINDOW_FLAGS]
        else:
            run = _copy(fx("tiny_adapter_run"), run)
            args = ["merge", "--adapter", str(run), "--base", str(model), "--force", *WINDOW_FLAGS,
                    "--eval-generate", "0"]
        return Case(args, 2, ("model.safetensors", "truncated", "copy or save it again"),
                    run if command == "merge" else None, absent=[run / "merged"])
    return case


def nan_model_eval(tmp, fx):
    """A model whose outputs are NaN: a failed gate with its reason (exit 3), null in the ledger."""
    import torch
    from safetensors.torch import load_file, save_file

    model = _copy(fx("tiny_llama"), tmp / "model")
    weights = load_file(model / "model.safetensors")
    name = next(k for k in weights if k.endswith("input_layernorm.weight"))
    weights[name][:] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert torch.isnan(load_file(model / "model.safetensors")[name]).all()
    return Case(["eval", "--model", str(model), "--run", str(tmp / "run"), *WINDOW_FLAGS], 3,
                ("perplexity", "is not a number"))


def show_garbage(tmp, fx):
    (tmp / "manifest.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    return Case(["show", str(tmp)], 2, ("manifest.json", "not UTF-8"))


def show_list(tmp, fx):
    (tmp / "manifest.json").write_text("[]")
    return Case(["show", str(tmp)], 2, ("manifest.json", "JSON array, not an object"))


def config_float_for_int(tmp, fx):
    (tmp / "c.yaml").write_text("max_steps: 2.5\n")
    return Case(["train", "--config", str(tmp / "c.yaml"), "--data", "demo", "--base", str(fx("tiny_llama")),
                 "--run", str(tmp / "run")], 2, ("c.yaml", "max_steps", "2.5 is not a valid int"),
                absent=[tmp / "run"])


def deploy_host_option(tmp, fx):
    run = tmp / "run"
    run.mkdir()
    (run / "manifest.json").write_text('{"steps": []}')
    marker = tmp / "pwned"
    return Case(["deploy", str(run), "--device", "x86-64", "--host", f"-oProxyCommand=touch {marker}"], 2,
                ("--host", "not a host name", "may not start with '-'"), run, absent=[marker])


def export_bad_chat_template(tmp, fx):
    model = _copy(fx("tiny_llama"), tmp / "model")
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    return Case(["export", "--model", str(model), "--quant", "f16", "--run", str(tmp / "run"), *WINDOW_FLAGS], 2,
                ("model", "chat template does not parse", "fix chat_template"), absent=[])


def resume_planted_pickle(tmp, fx):
    run = _copy(fx("tiny_adapter_run"), tmp / "run")
    (run / "checkpoints").mkdir()
    marker = tmp / "pwned"
    code = f"import torch, os\nclass P:\n    def __reduce__(self):\n        return (os.system, ('touch {marker}',))\n" \
           f"torch.save({{'step': 2, 'p': P()}}, {str(run / 'checkpoints' / 'step-000002.pt')!r})\n"
    subprocess.run([sys.executable, "-c", code], check=True)
    config = json.loads((run / "train_config.json").read_text())
    return Case(["train", "--model", config["model"], "--data", config["data"], "--run", str(run), "--resume",
                 "--batch-size", "4", "--max-steps", "4", "--lr", "0.01", "--eval-budget", "300", "--window", "128",
                 "--stride", "128", "--eval-generate", "0", "--max-ppl-rise", "100"], 2,
                ("step-000002.pt", "old pickle checkpoint", "start without --resume"), run, absent=[marker])


def smoke_gguf_outside_the_run(tmp, fx):
    """A run folder from elsewhere whose ledger names a file outside it (with the right sha256)."""
    from edgeft.atomic import sha256_file

    secret = tmp / "secret.gguf"
    secret.write_bytes(b"GGUF not for the board")
    run = tmp / "run"
    run.mkdir()
    entry = {"step": "export-gguf", "status": "ok", "inputs": {"quant": "q8_0"}, "metrics": {},
             "config": {"window": 128, "stride": 128},
             "outputs": [{"path": "../secret.gguf", "bytes": secret.stat().st_size, "sha256": sha256_file(secret)}]}
    (run / "manifest.json").write_text(json.dumps({"steps": [entry]}))
    return Case(["smoke", str(run), "--local"], 2, ("manifest.json", "outside the run folder"), run)


MATRIX = {
    "train: JSONL from Windows (BOM, CRLF, system turn) trains": train_windows_jsonl,
    "train: invalid UTF-8": _bad_train(b'{"text": "caf\xe9"}\n', "not UTF-8 text"),
    "train: lone surrogate": _bad_train(b'{"text": "a\\ud800"}\n', "not valid Unicode"),
    "train: JSON nested 100,000 deep": _bad_train(b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested too deeply"),
    "train: only an assistant turn": _bad_train(json.dumps(_chat(("assistant", "hi"))).encode(),
                                                "assistant turn with no user turn"),
    "train: float for an integer setting": config_float_for_int,
    "train --resume: planted pickle checkpoint": resume_planted_pickle,
    "merge: truncated adapter safetensors": _damaged_adapter("merge"),
    "export --adapter: truncated adapter safetensors": _damaged_adapter("export"),
    "eval: truncated model.safetensors": _damaged_model("eval"),
    "merge --base: truncated model.safetensors": _damaged_model("merge"),
    "eval: a model whose perplexity is NaN": nan_model_eval,
    "export: a chat template that does not parse": export_bad_chat_template,
    "show: binary garbage manifest": show_garbage,
    "show: manifest that is a JSON list": show_list,
    "deploy: --host=-oProxyCommand=...": deploy_host_option,
    "smoke: a ledger naming a GGUF outside the run": smoke_gguf_outside_the_run,
}


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def _strict_json(path: Path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("name", list(MATRIX))
def test_matrix(name, tmp_path, request):
    case = MATRIX[name](tmp_path, request.getfixturevalue)
    before = _strict_json(case.run / "manifest.json")["steps"] if case.run else []
    result = CliRunner().invoke(cli, case.args)
    if case.code == 0:
        assert result.exit_code == 0, result.output
    else:
        assert_one_line_error(result, *case.needles, code=case.code)
    assert _temporaries(tmp_path) == []  # nothing half-written
    for path in case.absent:
        assert not path.exists(), path
    if case.run is not None:  # nothing lost: the run's ledger still holds every earlier entry, unchanged
        after = _strict_json(case.run / "manifest.json")["steps"]
        assert after[: len(before)] == before
    if not name.startswith("show"):  # (those hand over a broken manifest on purpose)
        for manifest in tmp_path.rglob("manifest.json"):
            _strict_json(manifest)  # never a bare NaN
    if name == "eval: a model whose perplexity is NaN":
        entry = _strict_json(tmp_path / "run" / "manifest.json")["steps"][-1]
        assert entry["status"] == "failed" and entry["perplexity"]["ppl"] is None
        assert entry["gate"]["passed"] is False and entry["non_finite"]["perplexity.ppl"] == "nan"


def test_a_killed_export_leaves_nothing_after_the_next_run(tiny_llama, tmp_path):
    """`export` SIGKILLed while writing its GGUF (no cleanup runs) left a .tmp-PID file beside the GGUFs
    forever, re-runs included; the re-run now removes it, and the ledger records what happened."""
    run = tmp_path / "run"
    args = ["export", "--model", str(tiny_llama), "--quant", "f16", "--run", str(run), *WINDOW_FLAGS]
    code = ("import os, signal, sys\nimport edgeft.converters.hf_to_gguf as h\nreal = h.convert\n"
            "def convert(*a, progress=None, **k):\n"
            "    def killing(done, *rest):\n"
            "        if done >= 3:\n            os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(*a, progress=killing, **k)\n"
            "h.convert = convert\nfrom edgeft.cli import cli\ncli(sys.argv[1:])\n")
    killed = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    assert killed.wait() == -9
    (left,) = _temporaries(run)
    assert left.name.endswith(f"-F16.gguf.tmp-{killed.pid}") and left.stat().st_size > 0
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert _temporaries(run) == []
    assert [e["status"] for e in _strict_json(run / "manifest.json")["steps"]] == ["ok"]


def test_a_full_disk_during_conversion_is_one_line_and_leaves_nothing(tiny_llama, tmp_path):
    """A real full filesystem (a small tmpfs as --out; needs root to mount, skipped otherwise)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        run = tmp_path / "run"
        result = CliRunner().invoke(cli, ["export", "--model", str(tiny_llama), "--quant", "f16", "--run", str(run),
                                          "--out", str(disk), *WINDOW_FLAGS])
        assert_one_line_error(result, "F16.gguf", "no space left on device", "write elsewhere")
        assert list(disk.iterdir()) == [] and _temporaries(tmp_path) == []
        (entry,) = _strict_json(run / "manifest.json")["steps"]  # the attempt is on the ledger, with its reason
        assert entry["status"] == "failed" and "no space left" in entry["reason"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)
