"""edgeft export --format onnx: KV-cache graphs that match HF, weight-only quantization, and the README's
plain-onnxruntime example."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeft.cli import cli
from edgeft.onnx_runtime import OnnxLM

from .conftest import WINDOW, assert_one_line_error


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2"])
def test_tiny_models_export_and_match_hf_with_and_without_cache(which, request, tmp_path):
    folder = request.getfixturevalue(which)
    result = CliRunner().invoke(cli, ["export", "--format", "onnx", "--model", str(folder), "--quant", "fp32,int8",
                                      "--run", str(tmp_path / "r"), "--json", "--max-ppl-rise", "int8=100",
                                      "--max-task-ppl-rise", "100", "--max-exact-drop", "1", *WINDOW])
    # A random model's int8 is far from its fp32 (its gate is opened here: what is tested is the graph and
    # the cache); fp32's match with HF is gated as always.
    assert result.exit_code == 0, result.output
    steps = json.loads((tmp_path / "r" / "manifest.json").read_text())["steps"]
    fp32 = steps[0]
    assert fp32["status"] == "ok" and fp32["gate"]["value"] < 1e-3 and fp32["metrics"]["greedy_identical_to_hf"]

    lm = OnnxLM(tmp_path / "r" / "onnx" / "fp32" / "model.onnx")
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = AutoTokenizer.from_pretrained(folder)("In 1998, the cat sat on the mat", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(lm.logits(ids), want, atol=1e-4, rtol=1e-4)
    # the same logits token by token through the KV cache
    logits, past = lm.step(ids[:4], lm.empty_past(), 0)
    for i, t in enumerate(ids[4:], 4):
        logits, past = lm.step([t], past, i)
        np.testing.assert_allclose(logits[-1], want[i], atol=1e-4, rtol=1e-4)
    int8 = steps[1]
    assert int8["inputs"]["quant"] == "int8" and int8["outputs"][0]["bytes"] < fp32["outputs"][0]["bytes"]


def test_readme_example_runs_with_plain_onnxruntime(tiny_llama, tmp_path):
    """The README's example, extracted and run in a fresh interpreter that never imports edgeft."""
    result = CliRunner().invoke(cli, ["export", "--format", "onnx", "--model", str(tiny_llama), "--quant", "fp32",
                                      "--run", str(tmp_path / "r"), *WINDOW])
    assert result.exit_code == 0, result.output
    readme = (__import__("pathlib").Path(__file__).parents[1] / "README.md").read_text()
    example = re.search(r"```python\n(# onnx example.*?)```", readme, re.S).group(1)
    assert len(example.strip().splitlines()) <= 30
    script = tmp_path / "example.py"
    script.write_text(example)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "r" / "onnx" / "fp32")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_dict=True)["input_ids"]
    ours = OnnxLM(tmp_path / "r" / "onnx" / "fp32" / "model.onnx").generate(prompt, 32, {tok.eos_token_id})
    assert len(ours["ids"]) > 0 and out.stdout == tok.decode(ours["ids"]) + "\n"


@pytest.mark.slow
def test_default_model_fp32_int8_int4(default_model, tmp_path):
    result = CliRunner().invoke(cli, ["export", "--format", "onnx", "--model", "smollm2-135m", "--run",
                                      str(tmp_path / "r"), "--eval-budget", "2048", "--json"])
    assert result.exit_code == 0, result.output
    fp32, int8, int4 = json.loads(result.output.strip().splitlines()[-1])
    assert fp32["gate"]["value"] < 0.001 and fp32["metrics"]["greedy_identical_to_hf"]
    assert "Paris" in fp32["metrics"]["sample"]["answer"]
    assert int8["gate"]["passed"] and int8["metrics"]["quantization"]["algorithm"] == "rtn"
    # int4 is HQQ with the head at int8 by default. On this model its KL vs fp32 came out below int8's
    # round-to-nearest (0.00137 vs 0.00441, 2026-12-07), so the two are no longer ordered here; each is gated.
    assert int4["metrics"]["quantization"] == {**int4["metrics"]["quantization"], "algorithm": "hqq", "head": "int8"}
    assert int4["status"] == "ok" and int4["outputs"][0]["bytes"] < int8["outputs"][0]["bytes"]
    assert 0 < int4["metrics"]["kl_mean"] and 0 < int8["metrics"]["kl_mean"]


def test_every_onnx_artifact_records_the_task_against_the_merged_model(tiny_merged_task_run, tmp_path):
    """The task through onnxruntime, as through llama.cpp: fp32 equals HF on the task's answers, and each
    quant records task perplexity, exact answers and both task gates against fp32."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_merged_task_run, run)
    result = CliRunner().invoke(cli, ["export", "--format", "onnx", "--run", str(run), "--quant", "fp32,int8",
                                      "--max-ppl-rise", "100", "--max-task-ppl-rise", "100", "--max-exact-drop", "1",
                                      "--json", *WINDOW])
    assert result.exit_code == 0, result.output
    steps = json.loads((run / "manifest.json").read_text())["steps"]
    merged = next(s for s in steps if s["step"] == "merge")
    fp32, int8 = [s for s in steps if s["step"] == "export-onnx"]
    assert fp32["task"]["items"] == int8["task"]["items"] == merged["task"]["items"] > 0
    assert abs(fp32["task"]["vs_merged"]["ppl_change"]) < 1e-3  # onnxruntime fp32 = HF on the task too
    assert int8["task"]["reference"]["label"] == "fp32" and "exact_match" in int8["task"]
    metrics = [g["metric"] for g in int8["gates"]]
    assert metrics[1:] == ["task perplexity rise vs fp32", "exact-answer drop vs fp32"]


# hqq is the default and stays in the fast tier; the other two are the same path with another config (slow tier)
@pytest.mark.parametrize("algo", ["hqq", pytest.param("k_quant", marks=pytest.mark.slow),
                                  pytest.param("rtn", marks=pytest.mark.slow)])
def test_int4_algorithm_and_int8_head_are_what_the_graph_holds(tiny_llama, algo, tmp_path):
    """--int4-algo picks onnxruntime's weight algorithm; with the int8 head (default) the output head is an 8-bit
    MatMulNBits and every other projection a 4-bit one; the ledger says which."""
    import onnx

    from edgeft.export.onnx import output_head

    result = CliRunner().invoke(cli, ["export", "--format", "onnx", "--model", str(tiny_llama), "--quant", "fp32,int4",
                                      "--int4-algo", algo, "--run", str(tmp_path / "r"), "--json",
                                      "--max-ppl-rise", "100", "--max-task-ppl-rise", "100", "--max-exact-drop", "1",
                                      *WINDOW])
    assert result.exit_code == 0, result.output
    int4 = json.loads(result.output.strip().splitlines()[-1])[-1]
    assert int4["metrics"]["quantization"] == {"bits": 4, "block_size": 32, "algorithm": algo, "head": "int8",
                                               "embeddings": "int8"}
    graph = onnx.load(str(tmp_path / "r" / "onnx" / "int4" / "model.onnx"), load_external_data=False).graph
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"}
    heads = output_head(graph, ("MatMulNBits",))  # the node the logits come from
    assert len(heads) == 1 and bits[heads[0]] == 8
    assert len(bits) == 1 + 7 * 2 and all(b == 4 for n, b in bits.items() if n not in heads)
    assert not [n for n in graph.node if n.op_type == "MatMul" and "proj" in n.name]
    # the token embeddings: an 8-bit GatherBlockQuantized, no fp32 table left (it was the graph's largest tensor)
    (gather,) = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert next(a.i for a in gather.attribute if a.name == "bits") == 8 and gather.input[1] == "input_ids"
    assert not [n for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"]


def test_int8_embeddings_gather_what_the_fp32_table_held(tmp_path):
    """The 8-bit GatherBlockQuantized that replaces the embeddings' Gather returns, through onnxruntime, each
    looked-up row within half a quantization step of the fp32 table's (a wrong zero point, axis or block
    layout returns other rows or values)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgeft.export.onnx import int8_embeddings

    table = np.random.default_rng(0).normal(0, 0.05, (100, 64)).astype(np.float32)
    table[7, :32] = 0.0  # an all-zero block must not divide by zero
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed", "input_ids"], ["hidden"], name="node_embedding", axis=0)], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, None, 64])],
        [numpy_helper.from_array(table, "embed")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    assert int8_embeddings(model, 32) == 1
    assert [n.op_type for n in model.graph.node] == ["GatherBlockQuantized"]
    onnx.save(model, str(tmp_path / "m.onnx"))
    ids = np.array([[0, 7, 99, 42, 7]], dtype=np.int64)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input_ids": ids})[0]
    step = np.abs(table.reshape(100, 2, 32)).max(-1) / 127.0
    bound = np.repeat(step, 32, axis=1)[ids[0]] / 2 + 1e-7
    assert got.shape == (1, 5, 64) and np.all(np.abs(got[0] - table[ids[0]]) <= bound)
    assert np.all(got[0, 1, :32] == 0.0)


def test_gptq_int4_calibrates_on_the_runs_training_rows(tiny_merged_task_run, tmp_path):
    """--int4-algo gptq: onnxruntime's GPTQ, fed the run's training rows (with an empty KV cache) through the
    exported graph; the graph holds 4-bit MatMulNBits (the head 8-bit) and the ledger says what calibrated it.
    A run that trained nothing is refused in one line before any work."""
    import shutil

    import onnx

    run = tmp_path / "run"
    shutil.copytree(tiny_merged_task_run, run)
    result = CliRunner().invoke(cli, ["export", "--format", "onnx", "--run", str(run), "--quant", "fp32,int4",
                                      "--int4-algo", "gptq", "--gptq-tokens", "512", "--max-ppl-rise", "100",
                                      "--max-task-ppl-rise", "100", "--max-exact-drop", "1", "--json", *WINDOW])
    assert result.exit_code == 0, result.output
    int4 = json.loads(result.output.strip().splitlines()[-1])[-1]
    done = int4["metrics"]["quantization"]
    assert done["algorithm"] == "gptq" and done["head"] == "int8" and 0 < done["calibration"]["tokens"] <= 512
    assert done["calibration"]["rows"] >= 1
    graph = onnx.load(str(run / "onnx" / "int4" / "model.onnx"), load_external_data=False).graph
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits")
    assert bits == [4] * (len(bits) - 1) + [8] and len(bits) > 1
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in {i.name for i in graph.initializer}]

    no_training = tmp_path / "plain"
    refused = CliRunner().invoke(cli, ["export", "--format", "onnx", "--model", str(run / "merged"), "--run",
                                       str(no_training), "--quant", "int4", "--int4-algo", "gptq", *WINDOW])
    assert_one_line_error(refused, "--int4-algo gptq")
    assert not (no_training / "onnx").exists()


def test_budget_chooses_int4_or_int8_per_projection_within_the_bytes(tiny_merged_task_run, tmp_path):
    """--budget with --format onnx: the int4 graph is the int8 graph's and the int4 graph's MatMulNBits put
    together, int4 or int8 per projection as the probes on the run's held-out ids and task decided, within the
    budget's bytes; the ledger names each projection by the model's own module and what it got."""
    import shutil

    import onnx

    run = tmp_path / "run"
    shutil.copytree(tiny_merged_task_run, run)
    gates = ["--max-ppl-rise", "100", "--max-task-ppl-rise", "100", "--max-exact-drop", "1", "--json", *WINDOW]
    plain = CliRunner().invoke(cli, ["export", "--format", "onnx", "--run", str(run), "--quant", "fp32,int8,int4",
                                     *gates])
    assert plain.exit_code == 0, plain.output
    size = {q: sum(f.stat().st_size for f in (run / "onnx" / q).glob("model.onnx*")) for q in ("int8", "int4")}
    budget = (size["int8"] + size["int4"]) // 2
    result = CliRunner().invoke(cli, ["export", "--format", "onnx", "--run", str(run), "--quant", "fp32,int8,int4",
                                      "--budget", str(budget), "--overwrite", *gates])
    assert result.exit_code == 0, result.output
    int4 = json.loads(result.output.strip().splitlines()[-1])[-1]
    info = int4["metrics"]["quantization"]["mixed"]
    got = sum(f.stat().st_size for f in (run / "onnx" / "int4").glob("model.onnx*"))
    assert info["budget_bytes"] == budget and size["int4"] < got <= budget
    recipe = info["recipe"]
    assert set(recipe.values()) == {"int4", "int8"} and all(".layers." in k for k in recipe)
    assert len(recipe) == 7 * 2  # every projection of the tiny model's two layers, found by its weights
    assert info["probe"]["task_items"] > 0 and len(info["probe"]["results"]) == 1 + 2 + 7
    graph = onnx.load(str(run / "onnx" / "int4" / "model.onnx"), load_external_data=False).graph
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"]
    assert bits.count(8) == info["types_chosen"]["int8"] + 1  # and the head
    assert bits.count(4) == info["types_chosen"]["int4"]

    refused = CliRunner().invoke(cli, ["export", "--format", "onnx", "--run", str(run), "--quant", "fp32,int8",
                                       "--budget", "1MiB", "--overwrite", *WINDOW])
    assert_one_line_error(refused, "--budget 1MiB", "int4")


@pytest.mark.slow  # two exports (28 s); the fast tier's other exports run the same child without an adapter
def test_fused_adapter_export_is_base_plus_adapter(tiny_adapter_run, tiny_llama, tmp_path):
    """--adapter: the child process that exports the graph fuses the adapter into the base first, so the fp32
    graph scores as HF base+adapter does (through PEFT) and not as the base does."""
    runner = CliRunner()
    fused = runner.invoke(cli, ["export", "--format", "onnx", "--adapter", str(tiny_adapter_run / "adapter"),
                                "--model", str(tiny_llama), "--quant", "fp32", "--run", str(tmp_path / "r"), "--json",
                                *WINDOW])
    assert fused.exit_code == 0, fused.output
    (entry,) = json.loads(fused.output.strip().splitlines()[-1])
    assert entry["reference"]["source"] == "measured now (torch, PEFT)" and entry["gate"]["passed"]
    base = runner.invoke(cli, ["export", "--format", "onnx", "--model", str(tiny_llama), "--quant", "fp32",
                               "--run", str(tmp_path / "b"), "--json", *WINDOW])
    assert base.exit_code == 0, base.output
    base_ppl = json.loads(base.output.strip().splitlines()[-1])[0]["perplexity"]["ppl"]
    # the adapter moves perplexity (0.67% here) past twice the fp32 gate's 0.1%: a graph of the base alone would
    # have failed that gate against the PEFT reference
    assert abs(entry["perplexity"]["ppl"] / base_ppl - 1) > 2 * 0.001


def _chain_graph(folder, layers: int, k: int, n: int, vocab: int):
    """A graph shaped like an exported model's, saved with its weights in model.onnx.data: input_ids through an
    embedding Gather, `layers` MatMuls (k x n, then n x k, ...) and an output head MatMul to `logits`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.05, (vocab, k)).astype(np.float32), "embed")]
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["h0"], name="node_embedding", axis=0)]
    dims = k
    for i in range(layers):
        out_dims = n if dims == k else k
        inits.append(numpy_helper.from_array(rng.normal(0, 0.05, (dims, out_dims)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"], name=f"node_linear_{i}"))
        dims = out_dims
    inits.append(numpy_helper.from_array(rng.normal(0, 0.05, (dims, vocab)).astype(np.float32), "head"))
    nodes.append(helper.make_node("MatMul", [f"h{layers}", "head"], ["logits"], name="node_linear_head"))
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, vocab])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    return folder / "model.onnx"


@pytest.mark.parametrize("bits,algo", [(8, "rtn"), (4, "hqq"), (4, "k_quant")])
def test_quantizing_one_projection_at_a_time_writes_what_onnxruntime_writes_for_the_whole_graph(bits, algo, tmp_path):
    """quantize_graph hands onnxruntime's quantizer one MatMul at a time (so a big graph's fp32 weights are never
    all in memory); the graph it writes holds exactly the nodes and weights that the quantizer run over the whole
    loaded graph writes: the head in int8 first, then the rest."""
    import onnx
    from onnx import numpy_helper

    from edgeft.export.config import OnnxExportConfig
    from edgeft.export.onnx import _quantizer, int8_embeddings, quantize_graph

    src = _chain_graph(tmp_path / "fp32", 3, 64, 128, 96)
    c = OnnxExportConfig(int4_algo=algo)
    (tmp_path / "ours").mkdir()
    got = onnx.load(str(quantize_graph(src, tmp_path / "ours", bits, c)[0]))
    whole = onnx.load(str(src))
    if bits == 4:
        whole = _quantizer(whole, 8, "rtn", c, [f"node_linear_{i}" for i in range(3)])
    whole = _quantizer(whole, bits, algo if bits == 4 else "rtn", c, [])
    int8_embeddings(whole, c.block_size)

    def nodes(m):
        return [(n.op_type, n.name, list(n.input), list(n.output), sorted(str(a) for a in n.attribute))
                for n in m.graph.node]

    def weights(m):
        return {i.name: numpy_helper.to_array(i).tobytes() for i in m.graph.initializer}

    assert nodes(got) == nodes(whole)
    assert [n.op_type for n in got.graph.node] == ["GatherBlockQuantized"] + ["MatMulNBits"] * 4
    assert weights(got) == weights(whole)


def test_quantizing_a_graph_never_holds_all_its_fp32_weights(tmp_path):
    """The quantizer's own way (load the graph, quantize it in place) held every fp32 weight plus its
    replacement until the end: the 1B shape's export was OOM-killed at 18.6 GB for a 6 GB fp32 graph. quantize_graph
    reads one weight at a time from the data file: its peak, above what the process held before, stays under the
    fp32 weights' bytes (512 MiB here), which loading the graph whole would alone reach. (Measured: 948 MiB the
    old way, 373 MiB now.)"""
    src = _chain_graph(tmp_path / "fp32", 62, 1024, 2048, 2048)
    fp32_bytes = (tmp_path / "fp32" / "model.onnx.data").stat().st_size
    (tmp_path / "q").mkdir()
    code = ("import sys, pathlib\n"
            "from edgeft.export.config import OnnxExportConfig\n"
            "from edgeft.export.onnx import quantize_graph\n"
            "import onnx, onnxruntime.quantization.matmul_nbits_quantizer\n"
            "from edgeft.ledger import current_rss_mb, read_peak_rss_mb, reset_peak_memory\n"
            "before = current_rss_mb(); reset_peak_memory()\n"
            "c = OnnxExportConfig(int4_algo='rtn')\n"
            "quantize_graph(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), 4, c)\n"
            "print(read_peak_rss_mb() - before)\n")
    out = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "q")], capture_output=True, text=True,
                         check=True)
    rise_mb = float(out.stdout.strip().splitlines()[-1])
    assert 0 < rise_mb * 2**20 < fp32_bytes, (rise_mb, fp32_bytes / 2**20)
