"""edgeft export --format gguf with real llama.cpp: exactness on tiny Llama and Qwen2 models, the fused
adapter, the GGUF adapter, refusals, and the default model quantized and gated."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeft.cli import cli

from edgeft.converters.hf_to_gguf import convert
from edgeft.llamacpp import LlamaCpp
from edgeft.merge import MergeConfig, merge

from .conftest import WINDOW, assert_one_line_error

@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2"])
def test_tiny_models_convert_and_score_the_same_in_llama_cpp(which, request, tmp_path):
    folder = request.getfixturevalue(which)
    gguf_path = tmp_path / "m.gguf"
    convert(folder, gguf_path, "f32")
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    cpp = LlamaCpp(gguf_path, n_ctx=128, threads=2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for prompt in ["The capital of France is", "def add(a, b):\n    return", "In 1998, 12 cats"]:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert cpp.tokenize(prompt) == ids
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0].numpy()
        got = cpp.logits(ids)
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)
        top2 = np.sort(want, -1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-2  # a random model has near-ties that float rounding may flip
        assert clear.sum() >= len(ids) // 2 and (got.argmax(-1) == want.argmax(-1))[clear].all()
    cpp.close()


def test_fused_adapter_equals_merge_then_convert_and_gguf_adapter_matches(tiny_llama, tiny_adapter_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_adapter_run, run)
    merge(MergeConfig(adapter=str(run), dtype="float32", window=128, stride=128))
    convert(run / "merged", tmp_path / "merged.gguf", "f32")
    result = CliRunner().invoke(cli, ["export", "--adapter", str(run), "--quant", "f32,q8_0", "--adapter-only",
                                      "--json", *WINDOW])
    assert result.exit_code == 0, result.output
    entries = json.loads(result.output.strip().splitlines()[-1])
    assert [e["inputs"]["quant"] for e in entries] == ["f32", "q8_0", "lora"]
    (fused_path,) = (run / "gguf").glob("*-fused-F32.gguf")
    fused = GGUFReader(fused_path)
    merged = GGUFReader(tmp_path / "merged.gguf")
    assert [t.name for t in fused.tensors] == [t.name for t in merged.tensors]
    for a, b in zip(fused.tensors, merged.tensors):
        np.testing.assert_allclose(a.data, b.data, atol=1e-6, err_msg=a.name)
    lora = entries[-1]
    assert lora["status"] == "ok" and lora["gate"]["value"] <= 0.005
    # the base in each quant made, with the adapter applied, gated like the fused quant (what deploy serves)
    served = lora["metrics"]["served_bases"]["q8_0"]
    assert (run / "gguf" / served["path"]).is_file() and served["path"].endswith("-base-Q8_0.gguf")
    assert lora["gates"][1]["metric"] == "Q8_0 base + LoRA vs fused reference" and lora["gates"][1]["passed"]
    (lora_path,) = (run / "gguf").glob("*-fused-LoRA-F16.gguf")
    names = [t.name for t in GGUFReader(lora_path).tensors]
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names


def tiny_gpt2(tokenizer_dir, out):
    """A 2-layer GPT-2 (an architecture our converter's registry lacks; llama.cpp's converts it) with the tiny
    tokenizer. n_ctx as the hub's gpt2 config.json carries it (llama.cpp reads it; transformers no longer writes it)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=1024, n_ctx=1024, vocab_size=len(tok),
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_refusals_leave_no_partial_gguf(tiny_llama, tmp_path):
    foo = tiny_gpt2(tiny_llama, tmp_path / "foo")  # an architecture neither converter knows
    config = json.loads((foo / "config.json").read_text())
    (foo / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"]}))
    out = tmp_path / "out"
    assert_one_line_error(CliRunner().invoke(cli, ["export", "--model", str(foo), "--out", str(out), "--run",
                                                   str(tmp_path / "r"), *WINDOW]),
                          "architecture FooForCausalLM is supported neither by edgeft's converter nor by llama.cpp's")
    for converter, needles in [("ours", ["FooForCausalLM is not supported by edgeft's converter", "--converter"]),
                               ("theirs", ["--converter theirs: use auto, ours, llamacpp"])]:
        assert_one_line_error(CliRunner().invoke(cli, ["export", "--model", str(foo), "--out", str(out), "--converter",
                                                       converter, "--run", str(tmp_path / "r"), *WINDOW]), *needles)

    no_tok = tmp_path / "no-tok"
    shutil.copytree(tiny_llama, no_tok)
    (no_tok / "tokenizer.json").unlink()
    (no_tok / "tokenizer_config.json").unlink()
    assert_one_line_error(CliRunner().invoke(cli, ["export", "--model", str(no_tok), "--out", str(out), *WINDOW]), "tokenizer")

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_llama, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert_one_line_error(CliRunner().invoke(cli, ["export", "--model", str(truncated), "--out", str(out),
                                       "--run", str(tmp_path / "r"), *WINDOW]), "truncated safetensors")
    assert not out.exists() or not list(out.glob("*.gguf*")) and not list(out.glob(".*"))

    args = ["export", "--model", str(tiny_llama), "--quant", "f16", "--out", str(out), "--run", str(tmp_path / "r"),
            *WINDOW]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert_one_line_error(CliRunner().invoke(cli, args), "already exists", "--overwrite")
    assert CliRunner().invoke(cli, args + ["--overwrite"]).exit_code == 0


def test_architecture_ours_lacks_is_converted_by_llama_cpp_with_the_same_gates(tiny_llama, tmp_path):
    """auto: GPT-2 is not in our registry, so llama.cpp's own convert_hf_to_gguf.py writes the F16 (with a notice);
    tokenizer parity, F16 = HF within 0.1% and the quant gate then apply as for ours, and the ledger names it."""
    gpt2 = tiny_gpt2(tiny_llama, tmp_path / "gpt2")
    result = CliRunner().invoke(cli, ["export", "--model", str(gpt2), "--quant", "f16,q8_0", "--run",
                                      str(tmp_path / "r"), "--json", *WINDOW])
    assert result.exit_code == 0, result.output
    assert "edgeft's converter has no GPT2LMHeadModel; converting with llama.cpp's convert_hf_to_gguf.py" \
        in result.output
    f16, q8 = json.loads(result.output.strip().splitlines()[-1])
    convert_metrics = f16["metrics"]["convert"]
    assert convert_metrics["converter"].startswith("llama.cpp convert_hf_to_gguf.py (llama-cpp-python ")
    assert convert_metrics["arch"] == "gpt2" and convert_metrics["tensors"] > 0
    assert f16["metrics"]["tokenizer_parity"]["equal"]
    assert f16["status"] == "ok" and f16["gate"]["passed"] and f16["gate"]["value"] < 0.001
    assert q8["status"] == "ok" and q8["gate"]["passed"]
    (f16_path,) = (tmp_path / "r" / "gguf").glob("*-F16.gguf")
    assert GGUFReader(f16_path).fields["general.architecture"].contents() == "gpt2"
    assert not list((tmp_path / "r" / "gguf").glob(".*"))  # written under a temporary name, renamed when whole


def test_llama_cpp_converter_writes_the_tensors_ours_does(tiny_llama, tiny_adapter_run, tmp_path):
    from edgeft.converters.compare import compare, tensors_equal

    written = {}
    for converter in ("ours", "llamacpp"):
        run = tmp_path / converter
        result = CliRunner().invoke(cli, ["export", "--model", str(tiny_llama), "--quant", "f16", "--converter",
                                          converter, "--run", str(run), "--json", *WINDOW])
        assert result.exit_code == 0, result.output
        (entry,) = json.loads(result.output.strip().splitlines()[-1])
        assert entry["status"] == "ok" and entry["metrics"]["tokenizer_parity"]["equal"]
        written[converter] = (entry["metrics"]["convert"]["converter"], next((run / "gguf").glob("*-F16.gguf")))
    assert written["ours"][0] == "edgeft" and written["llamacpp"][0].startswith("llama.cpp convert_hf_to_gguf.py")
    cmp = compare(written["ours"][1], written["llamacpp"][1])  # GGUFReader: names, shapes, types, bytes
    assert tensors_equal(cmp) and cmp["tensors_ours"] == cmp["tensors_theirs"] > 0, cmp

    # llama.cpp's script converts a plain folder: an adapter to fuse or write is refused, pointing at merge
    args = ["export", "--adapter", str(tiny_adapter_run), "--converter", "llamacpp", "--out", str(tmp_path / "a"),
            "--run", str(tmp_path / "adapter-run")]
    assert_one_line_error(CliRunner().invoke(cli, [*args, *WINDOW]), "--adapter with --converter llamacpp",
                          "edgeft merge")
    assert_one_line_error(CliRunner().invoke(cli, [*args, "--adapter-only", *WINDOW]), "--adapter --adapter-only")
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_default_model_f16_q8_q4km_gated_with_kl(default_model, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["export", "--model", "smollm2-135m", "--run", str(run), "--eval-budget", "2048",
                                      "--json"])
    assert result.exit_code == 0, result.output
    f16, q8, q4 = json.loads(result.output.strip().splitlines()[-1])
    assert f16["metrics"]["tokenizer_parity"]["equal"]
    assert f16["gate"]["passed"] and f16["gate"]["value"] < 0.001  # llama.cpp F16 within 0.1% of HF
    assert "Paris" in f16["metrics"]["sample"]["answer"] and f16["metrics"]["sample"]["stopped_at_eos"]
    for q in (q8, q4):
        assert q["status"] == "ok" and q["gate"]["passed"]
        assert 0 < q["metrics"]["kl_mean"] < 0.5 and q["metrics"]["top1_agreement"] > 0.8
        assert q["metrics"]["sample"]["ok"]
    assert q8["metrics"]["kl_mean"] < q4["metrics"]["kl_mean"]
    assert q8["outputs"][0]["bytes"] < f16["outputs"][0]["bytes"] * 0.6
    modelfile = (run / "gguf" / "smollm2-135m-Q8_0.Modelfile").read_text()
    assert modelfile.startswith("FROM ./smollm2-135m-Q8_0.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_quant_auto_picks_the_smallest_passing_quant_that_fits_the_board(tiny_llama, tmp_path):
    args = ["export", "--model", str(tiny_llama), "--quant", "auto", "--device", "rpi4", "--run", str(tmp_path / "r"),
            "--json", *WINDOW]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    entries = json.loads(result.output.strip().splitlines()[-1])
    choice = entries[-1]
    assert choice["step"] == "export-gguf-choice" and choice["status"] == "ok"
    rows = {r["quant"]: r for r in choice["metrics"]["candidates"]}
    assert set(rows) == {"q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"}
    passing = [q for q, r in rows.items() if r["fits"] and r["gate_passed"]]
    assert choice["metrics"]["chosen"] == min(passing, key=lambda q: rows[q]["bytes"])

    # a board too small for any of them: the choice fails, exit 3, and the ledger says why
    result = CliRunner().invoke(cli, args[:-len(WINDOW) - 1] + ["--device-ram-gb", "0.0001", "--overwrite", *WINDOW])
    assert result.exit_code == 3, result.output
    assert "fits rpi4" in result.output.strip().splitlines()[-1]


def test_imatrix_guides_quantization(tiny_llama, tmp_path):
    """An importance matrix from a calibration text changes what llama.cpp's Q4_K_M keeps; the ledger says so."""
    from edgeft.heldout import read_text

    calib = tmp_path / "calib.txt"
    calib.write_text(read_text(None)[0][-20000:])  # the end of the docs: far from the held-out ids at the start
    plain = tmp_path / "plain"
    guided = tmp_path / "guided"
    common = ["export", "--model", str(tiny_llama), "--quant", "f16,q4_0", "--max-ppl-rise", "10", *WINDOW]
    assert CliRunner().invoke(cli, common + ["--run", str(plain)]).exit_code == 0
    result = CliRunner().invoke(cli, common + ["--run", str(guided), "--imatrix", str(calib), "--imatrix-tokens",
                                               "1024", "--json"])
    assert result.exit_code == 0, result.output
    entry = json.loads(result.output.strip().splitlines()[-1])[-1]
    assert entry["metrics"]["imatrix"]["tensors"] == 14  # 7 projections x 2 layers (the head is tied)
    (a,) = (plain / "gguf").glob("*-Q4_0.gguf")
    (b,) = (guided / "gguf").glob("*-Q4_0.gguf")
    assert a.read_bytes() != b.read_bytes()
    assert_one_line_error(CliRunner().invoke(cli, common + ["--run", str(tmp_path / "x"), "--imatrix", "train"]),
                          "train_config.json")


def test_every_artifact_records_the_task_and_a_damaged_quant_fails_the_task_gate(tiny_adapter_run, tmp_path):
    """The task is measured on every GGUF with llama.cpp, as the HF model was measured with torch (the same
    definition: F32 equals HF). A Q2_K whose general perplexity passes a loose gate still fails its task gate,
    and the exit names the task gate."""
    run = tmp_path / "run"
    shutil.copytree(tiny_adapter_run, run)
    merge(MergeConfig(adapter=str(run), dtype="float32", window=128, stride=128))
    result = CliRunner().invoke(cli, ["export", "--run", str(run), "--quant", "f32,q2_k", "--max-ppl-rise", "100",
                                      "--max-task-ppl-rise", "0.001", "--json", *WINDOW])
    assert result.exit_code == 3, result.output
    line = result.output.strip().splitlines()[-1]
    assert "task perplexity rose" in line and "task gate" in line and "Q2_K: perplexity rose" not in line
    steps = json.loads((run / "manifest.json").read_text())["steps"]
    merged, f32, q2 = steps[-3], steps[-2], steps[-1]
    assert merged["step"] == "merge" and f32["inputs"]["quant"] == "f32" and q2["inputs"]["quant"] == "q2_k"
    assert merged["task"]["items"] == f32["task"]["items"] == q2["task"]["items"] > 0
    assert abs(f32["task"]["vs_merged"]["ppl_change"]) < 1e-3  # llama.cpp F32 = HF on the task too
    assert f32["task"]["reference"]["label"] == "hf" and q2["task"]["reference"]["label"] == "f32"
    assert q2["task"]["kl_mean"] > 0 and "exact_match" in q2["task"]
    general, task_rise = q2["gates"][0], q2["gates"][1]
    assert general["passed"] and not task_rise["passed"] and q2["status"] == "failed"


def test_quant_auto_skips_a_quant_that_fails_only_its_task_gate(tiny_adapter_run, tmp_path):
    """--quant auto weighs the task gates as much as the general one: the smallest quant, held to a task gate it
    cannot meet, is passed over for the next smallest that passes every gate, although its general perplexity
    passes."""
    run = tmp_path / "run"
    shutil.copytree(tiny_adapter_run, run)
    merge(MergeConfig(adapter=str(run), dtype="float32", window=128, stride=128))
    args = ["export", "--run", str(run), "--quant", "auto", "--device", "rpi4", "--max-ppl-rise", "100",
            "--max-exact-drop", "1", "--json", *WINDOW]
    result = CliRunner().invoke(cli, args + ["--max-task-ppl-rise", "q4_0=0.000001"])
    assert result.exit_code == 0, result.output
    choice = json.loads(result.output.strip().splitlines()[-1])[-1]
    rows = {r["quant"]: r for r in choice["metrics"]["candidates"]}
    assert min(rows, key=lambda q: rows[q]["bytes"]) == "q4_0"  # the one auto would take if it passed
    assert rows["q4_0"]["general_gate_passed"] and not rows["q4_0"]["task_gates_passed"]
    assert not rows["q4_0"]["gate_passed"] and rows["q4_0"]["task_ppl"] is not None
    chosen = choice["metrics"]["chosen"]
    assert chosen != "q4_0" and rows[chosen]["task_gates_passed"] and rows[chosen]["gate_passed"]
    assert chosen == min((q for q in rows if rows[q]["gate_passed"]), key=lambda q: rows[q]["bytes"])
