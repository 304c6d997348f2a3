"""edgeft train: data validation, target modules, LoRA gradients (4-bit too), exact resume, the gate, and a
real fine-tune of the default model on the demo task."""

import contextlib
import json
import os
import shutil
import signal

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from edgeft.cli import cli
from edgeft.train import TrainConfig, TrainingInterrupted, build_model, hardware, train

from .conftest import assert_one_line_error


def _jsonl(path, *lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


GOOD = json.dumps({"prompt": "2+2?", "completion": "4"})


@pytest.mark.parametrize("lines,needles", [
    ((GOOD, "{not json"), ["bad.jsonl:2", "not valid JSON"]),
    ((GOOD, json.dumps({"question": "x", "answer": "y"})), ["bad.jsonl:2", "neither 'messages'", "question"]),
    ((json.dumps({"messages": [{"role": "user", "content": "hi"}]}),), ["bad.jsonl:1", "no assistant turn"]),
    ((json.dumps({"prompt": "x"}),), ["bad.jsonl:1", "'completion'"]),
    ((), ["bad.jsonl", "no rows"]),
])
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, tiny_llama, lines, needles):
    data = _jsonl(tmp_path / "bad.jsonl", *lines)
    result = CliRunner().invoke(cli, ["train", "--base", str(tiny_llama), "--data", data, "--run",
                                      str(tmp_path / "run")])
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "run").exists()


def test_too_long_rows_refused_with_strict_and_truncated_without(tmp_path, tiny_llama):
    long_row = json.dumps({"prompt": "word " * 300, "completion": "ok"})
    data = _jsonl(tmp_path / "long.jsonl", GOOD, long_row)
    result = CliRunner().invoke(cli, ["train", "--base", str(tiny_llama), "--data", data, "--strict",
                                      "--max-seq-len", "128", "--run", str(tmp_path / "run")])
    assert_one_line_error(result, "long.jsonl:2", "max_seq_len 128")
    from edgeft.dataset import load_examples
    from edgeft.models import load_tokenizer

    # without --strict the row is cut, but its answer is then gone: still an error, naming the line
    with pytest.raises(Exception, match="long.jsonl:2: after truncation"):
        load_examples(data, load_tokenizer(tiny_llama), 128, strict=False)
    prompt_last = json.dumps({"text": "word " * 300})
    data = _jsonl(tmp_path / "long2.jsonl", GOOD, prompt_last)
    examples, truncated = load_examples(data, load_tokenizer(tiny_llama), 128, strict=False)
    assert truncated == 1 and len(examples[1].input_ids) == 128


def test_unknown_target_module_lists_the_valid_ones(tmp_path, tiny_llama):
    data = _jsonl(tmp_path / "d.jsonl", GOOD, GOOD)
    result = CliRunner().invoke(cli, ["train", "--base", str(tiny_llama), "--data", data, "--target-modules",
                                      "q_proj,qkv", "--run", str(tmp_path / "run")])
    assert_one_line_error(result, "qkv not found", "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")


def test_shard_in_one_process_is_refused_before_anything_loads(tmp_path, tiny_llama):
    data = _jsonl(tmp_path / "d.jsonl", GOOD, GOOD)
    result = CliRunner().invoke(cli, ["train", "--base", str(tiny_llama), "--data", data, "--shard", "--run",
                                      str(tmp_path / "run")])
    assert_one_line_error(result, "--shard", "launch several", "--num_processes")
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_demo_rows_mask_everything_but_the_answer(tiny_tokenizer):
    from edgeft.dataset import IGNORE, load_examples
    from edgeft.models import load_tokenizer
    from edgeft.dataset import demo_data_path

    tok = load_tokenizer(tiny_tokenizer)
    examples, _ = load_examples(demo_data_path(), tok, 1024, strict=True)
    e = examples[0]
    trained = tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE])
    assert trained == e.row["completion"] + "<|im_end|>\n"
    assert tok.decode(e.input_ids).startswith("<|im_start|>system")


@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_lora_b_gets_nonzero_gradients(tiny_llama, quant):
    """The measured pitfall: a 4-bit base could train with all-zero LoRA-B gradients, silently."""
    from edgeft.dataset import Example
    from edgeft.batches import collate, loss_sum

    config = TrainConfig(data="demo", base_quant=quant)
    model, targets = build_model(tiny_llama, config, hardware(config))
    if quant == "4bit":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    model.train()
    ids = list(range(200, 264))
    loss, n = loss_sum(model, collate([Example(ids, ids, 1, {})], 0, "cpu"))
    (loss / n).backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert len(grads) == 2 * len(targets) and len(targets) == 7
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def _tiny_config(tiny_llama, tmp_path, run, **kw):  # the same settings as conftest.train_tiny
    data = str(tmp_path / "data.jsonl")
    from edgeft.data.demo_task import make_rows

    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(24)))
    base = dict(model=str(tiny_llama), data=data, run=str(tmp_path / run), batch_size=4, max_steps=6, save_every=2,
                eval_budget=300, window=128, stride=128, eval_generate=0, max_ppl_rise=100.0, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def _adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@contextlib.contextmanager
def _ctrl_c_after_optimizer_step(at: int, times: int = 1):
    """Real Ctrl-Cs (SIGINT to this process) delivered inside a training step: right after the optimizer
    updated the weights and before the schedule moved on, the worst place for a checkpoint to be taken."""
    count = 0

    def hook(optimizer, args, kwargs):
        nonlocal count
        count += 1
        if count == at:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _assert_same_adapter(a_run, b_run):
    a, b = _adapter(a_run), _adapter(b_run)
    assert a.keys() == b.keys() and len(a) == 28
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ctrl_c_mid_step_then_resume_gives_the_uninterrupted_adapter_bit_for_bit(tiny_llama, tmp_path):
    # Python's own handler, or SIG_IGN when the suite was started in the background by a shell
    before = signal.getsignal(signal.SIGINT)
    whole = train(_tiny_config(tiny_llama, tmp_path, "whole"))
    assert len(whole.entry["metrics"]["loss_curve"]) == 6

    cfg = _tiny_config(tiny_llama, tmp_path, "broken")
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3/6"), _ctrl_c_after_optimizer_step(3):
        train(cfg)  # Ctrl-C inside step 3: the step finishes and is saved
    assert sorted(p.name for p in (tmp_path / "broken" / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    cfg.resume = True
    # Ctrl-C twice inside step 5 (the 2nd optimizer step of this process): stops at once, saves nothing of it;
    # the step-4 checkpoint (save_every 2) remains.
    with pytest.raises(TrainingInterrupted, match="aborted during step 5/6 by a second Ctrl-C.*from step 4"), \
            _ctrl_c_after_optimizer_step(2, times=2):
        train(cfg)
    assert sorted(p.name for p in (tmp_path / "broken" / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    resumed = train(cfg)
    assert resumed.entry["inputs"]["resumed_from"] == "step-000004"
    _assert_same_adapter(whole.run, resumed.run)
    assert resumed.entry["metrics"]["loss_curve"] == whole.entry["metrics"]["loss_curve"]
    statuses = [s["status"] for s in json.loads((resumed.run / "manifest.json").read_text())["steps"]]
    assert statuses == ["failed", "failed", "ok"]
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C is handled as before train again

    cfg.lr = 5e-4  # a changed setting cannot continue the same training
    with pytest.raises(Exception, match="--resume: lr differ"):
        train(cfg)


def test_checkpoints_hold_no_pickle_and_a_planted_one_is_refused(tiny_llama, tmp_path):
    """A checkpoint is safetensors + JSON; an old-style pickle in the run folder is never unpickled, and a
    damaged checkpoint is a one-line error."""
    cfg = _tiny_config(tiny_llama, tmp_path, "run", max_steps=3)
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.json", "tensors.safetensors"]
    assert json.loads((ckpt / "state.json").read_text())["state"]["step"] == 2
    saved = shutil.copytree(ckpt, tmp_path / "saved")

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    shutil.rmtree(ckpt.parent)
    ckpt.parent.mkdir()
    torch.save({"step": 2, "x": Payload()}, ckpt.parent / "step-000002.pt")
    args = ["train", "--model", cfg.model, "--data", cfg.data, "--run", cfg.run, "--batch-size", "4", "--max-steps",
            "3", "--save-every", "2", "--eval-budget", "300", "--window", "128", "--stride", "128",
            "--eval-generate", "0", "--max-ppl-rise", "100", "--lr", "1e-3", "--resume"]
    assert_one_line_error(CliRunner().invoke(cli, args), "step-000002.pt", "old pickle checkpoint")
    assert not marker.exists()

    (ckpt.parent / "step-000002.pt").unlink()
    shutil.copytree(saved, ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    state["state"]["adapter"] = {"$tensor": "t999999"}
    (ckpt / "state.json").write_text(json.dumps(state))
    assert_one_line_error(CliRunner().invoke(cli, args), "step-000002/state.json", "checkpoint is damaged")
    (ckpt / "tensors.safetensors").write_bytes((ckpt / "tensors.safetensors").read_bytes()[:1000])
    assert_one_line_error(CliRunner().invoke(cli, args), "tensors.safetensors", "truncated")


def test_adapter_loads_in_plain_peft_and_gate_failure_exits_3(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _tiny_config(tiny_llama, tmp_path, "gate", max_steps=2, max_ppl_rise=-0.99)
    args = ["train", "--model", cfg.model, "--data", cfg.data, "--run", cfg.run, "--batch-size", "4", "--max-steps",
            "2", "--eval-budget", "300", "--window", "128", "--stride", "128", "--eval-generate", "0",
            "--max-ppl-rise", "-0.99"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 3, result.output
    assert "held-out perplexity rose" in result.output.strip().splitlines()[-1]
    run = tmp_path / "gate"
    entry = json.loads((run / "manifest.json").read_text())["steps"][-1]
    assert entry["status"] == "failed" and entry["gate"]["passed"] is False
    assert (run / "adapter" / "adapter_config.json").is_file()  # kept for inspection
    meta = json.loads((run / "adapter" / "edgeft_adapter.json").read_text())
    assert meta["base_fingerprint"]["architecture"] == "LlamaForCausalLM"

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = PeftModel.from_pretrained(base, run / "adapter")
    saved = _adapter(run)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved) == 28
    for k, v in saved.items():
        match = [lk for lk in loaded if lk.replace(".default", "") == k]
        assert match and torch.equal(loaded[match[0]], v)


@pytest.mark.slow
def test_demo_finetune_learns_the_format(default_model, tmp_path):
    """The acceptance run: the shipped demo set on the default model, on CPU, in a couple of minutes."""
    from edgeft.data.demo_task import check

    result = CliRunner().invoke(cli, ["train", "--data", "demo", "--run", str(tmp_path / "demo"), "--max-steps", "15",
                                      "--lr", "1e-3", "--eval-budget", "1024", "--eval-generate", "8", "--json"])
    assert result.exit_code == 0, result.output
    entry = json.loads(result.output.strip().splitlines()[-1])
    m = entry["metrics"]
    assert m["loss_curve"][-1] < m["loss_curve"][0] / 3
    assert m["eval_loss_after"] < m["eval_loss_before"] / 3
    assert m["exact_match_before"] <= 0.25 and m["exact_match_after"] >= 0.75
    assert all(check(s["got"], s["expected"])[0] for s in m["exact_match_samples"] if s["ok"])
    assert entry["task"]["exact_match"] == m["exact_match_after"] and entry["task"]["field_accuracy"] >= 0.75
    assert 0 < m["trainable_pct"] < 5 and m["tokens_per_s"] > 0
    assert entry["reference"]["ppl"] > 1 and entry["perplexity"]["ppl"] > 1 and entry["gate"]["passed"]


def _launch(nproc: int, run, base, data, *extra) -> None:
    """edgeft train in `nproc` processes through accelerate's launcher: gloo on CPU, as on a GPU box with NCCL."""
    import subprocess
    import sys

    args = ["train", "--base", str(base), "--data", str(data), "--run", str(run), "--max-steps", "6",
            "--save-every", "2", "--lora-dropout", "0", "--eval-budget", "300", "--window", "128", "--stride",
            "128", "--eval-generate", "0", "--max-ppl-rise", "100", "--lr", "1e-3", *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "edgeft", *args]
    else:  # --multi_gpu is accelerate's name for "several local processes"; with no GPU they use gloo
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "0", "-m", "edgeft", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_train_the_same_adapter_as_one_with_the_same_global_batch(tiny_llama, tmp_path):
    from edgeft.data.demo_task import make_rows

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(40)))
    _launch(1, tmp_path / "one", tiny_llama, data, "--batch-size", "8")
    _launch(2, tmp_path / "two", tiny_llama, data, "--batch-size", "4")
    one, two = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 28
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-6, rtol=1e-4), k
    assert max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k) > 1e-3  # it did train
    m1, m2 = (json.loads((tmp_path / r / "manifest.json").read_text())["steps"] for r in ("one", "two"))
    assert len(m2) == 1, "only the main process writes the ledger"
    e1, e2 = m1[-1]["metrics"], m2[-1]["metrics"]
    assert (e1["world_size"], e2["world_size"]) == (1, 2) and e1["rows_per_step"] == e2["rows_per_step"] == 8
    assert e1["train_tokens"] == e2["train_tokens"]
    assert e2["tokens_per_s_per_device"] == pytest.approx(e2["tokens_per_s"] / 2, rel=1e-3)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    # resume in two processes from the step-4 checkpoint: the same adapter again
    import shutil

    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "adapter")
    _launch(2, tmp_path / "resumed", tiny_llama, data, "--batch-size", "4", "--resume")
    resumed = _adapter(tmp_path / "resumed")
    for k in two:
        assert torch.equal(two[k], resumed[k]), k
    # a different number of processes would be a different data order: refused
    result = CliRunner().invoke(cli, ["train", "--base", str(tiny_llama), "--data", str(data), "--run",
                                      str(tmp_path / "resumed"), "--max-steps", "6", "--save-every", "2",
                                      "--lora-dropout", "0", "--eval-budget", "300", "--window", "128", "--stride",
                                      "128", "--eval-generate", "0", "--max-ppl-rise", "100", "--lr", "1e-3",
                                      "--batch-size", "4", "--resume"])
    assert_one_line_error(result, "--resume: world_size differ")

    # --shard (FSDP2: the base and the adapter split across the two processes): the same adapter again, the
    # evaluation run by both in step (answers too), one ledger entry; and a sharded run resumes bit for bit
    _launch(2, tmp_path / "shard", tiny_llama, data, "--batch-size", "4", "--shard", "--eval-generate", "2")
    sharded = _adapter(tmp_path / "shard")
    assert sharded.keys() == one.keys()
    for k in one:
        assert torch.allclose(one[k], sharded[k], atol=1e-6, rtol=1e-4), k
    (entry,) = json.loads((tmp_path / "shard" / "manifest.json").read_text())["steps"]
    assert entry["metrics"]["hardware"]["shard"] and entry["metrics"]["world_size"] == 2
    assert entry["metrics"]["exact_match_n"] == 2 and entry["perplexity"]["ppl"] > 1
    shutil.copytree(tmp_path / "shard", tmp_path / "shard-resumed")
    shutil.rmtree(tmp_path / "shard-resumed" / "adapter")
    _launch(2, tmp_path / "shard-resumed", tiny_llama, data, "--batch-size", "4", "--shard", "--eval-generate", "2",
            "--resume")
    resumed = _adapter(tmp_path / "shard-resumed")
    for k in sharded:
        assert torch.equal(sharded[k], resumed[k]), k


def test_train_stores_the_task_set_and_records_the_task_before_and_after(tiny_adapter_run):
    from edgeft.run import TASK_FILE

    entry = json.loads((tiny_adapter_run / "manifest.json").read_text())["steps"][0]
    task = json.loads((tiny_adapter_run / TASK_FILE).read_text())
    held_out = entry["inputs"]["eval_rows"]
    assert len(task["items"]) == held_out > 0 and task["kind"] == "json"
    assert entry["task"]["items"] == held_out and entry["task"]["reference"]["label"] == "base"
    assert entry["task"]["ppl"] > 1 and entry["task"]["reference"]["ppl"] > 1
    assert abs(entry["metrics"]["eval_loss_after"] - __import__("math").log(entry["task"]["ppl"])) < 1e-9
