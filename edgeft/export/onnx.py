"""`edgeft export --format onnx`: a KV-cache ONNX graph, weight-only int8/int4, gated like GGUF.

Export: torch.onnx.export (dynamo) of a thin wrapper that takes and returns the KV cache as flat tensors,
so the graph runs in plain onnxruntime. optimum-onnx is not used: its release pins transformers < 4.58.
A tied output head is untied first (the weight copied), so the quantizer sees it as its own MatMul.

Quantization: onnxruntime's MatMulNBits (weight-only; activations stay float). quantize_dynamic (int8
activations) is not offered: measured on the default model it raised perplexity 72%.

Ledger per artifact: perplexity with onnxruntime on the run's ids (fp32 must match HF within 0.1% and answer
the chat prompt exactly as HF does), Δ, KL and top-1 vs fp32, size, prefill/decode tokens/s, and a gate.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from ..atomic import atomic_dir
from ..config import to_dict
from ..errors import EdgeftError, GateFailed
from ..gates import HF_MATCH, ONNX_GATES, Gate, check, parse_gates
from ..ledger import artifact
from ..locks import writing_files
from ..models import copy_tokenizer, load_model
from ..onnx_runtime import REBUILD_CACHE_AT, OnnxLM, initializer_values, save_graph
from ..progress import activity, bar
from ..prompt import answer_ok, prompt_ids, prompt_text
from ..run import EXPORT_ONNX, TOKENS_FILE
from ..scoring import Comparison, compare, score
from .config import ExportResult, OnnxExportConfig
from .checks import record_quant_task, record_reference_task, task_gate_limits
from .source import hf_reference, load_inputs, resolve_source

ONNX_QUANTS = {"fp32": None, "int8": 8, "int4": 4}
# Beside the tokenizer: what a plain transformers/onnxruntime user needs to run the folder.
_MODEL_FILES = ("generation_config.json", "config.json")


def _wrapper(model):
    """The model as a module with flat KV tensors in and out (defined here so torch loads only to export)."""
    import torch
    from transformers import DynamicCache

    n_layers = model.config.num_hidden_layers

    class KVWrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.model.config)
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            presents = []
            for layer in out.past_key_values.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return KVWrapper()


@contextlib.contextmanager
def _tensor_attributes_kept(model):
    """Put every module's plain tensor attributes back as they were. torch.export traces with fake tensors, and a
    module that caches a tensor in a plain attribute during forward is left holding a fake one (transformers'
    longrope keeps `long_inv_freq` so): the model, used again after the export for HF's greedy answer, then
    computes garbage past the original context."""
    import torch

    saved = [(m, {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)}) for m in model.modules()]
    try:
        yield
    finally:
        for module, before in saved:
            for name, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor) and before.get(name) is not value:
                    if name in before:
                        setattr(module, name, before[name])
                    else:
                        delattr(module, name)


def rebuild_cache_at(config) -> int | None:
    """Where HF's generate recomputes the whole sequence rather than extend the cache (see
    onnx_runtime.REBUILD_CACHE_AT): the original context of a longrope model, past which it switches factors."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") != "longrope":
        return None
    # The attribute Phi-3's generate checks; the rope parameters' copy where a config has only that one.
    return getattr(config, "original_max_position_embeddings", None) or rope.get("original_max_position_embeddings")


def export_graph(model, folder: Path) -> Path:
    """Write model.onnx (external data beside it when over 2 GB) into `folder`, validated by onnx.checker."""
    import onnx
    import torch

    cfg = model.config
    n_layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if cfg.tie_word_embeddings:  # untie: the quantizer skips a head that shares the embedding's Gather weight
        model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
        cfg.tie_word_embeddings = False
    names_in = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    names_out = ["logits"] + [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    seq, past = 3, 2
    example = (torch.randint(0, cfg.vocab_size, (1, seq)), torch.ones(1, past + seq, dtype=torch.long),
               torch.arange(past, past + seq)[None], *[torch.zeros(1, kv_heads, past, head_dim)
                                                         for _ in range(2 * n_layers)])
    dyn = torch.export.Dim.DYNAMIC
    shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn}, tuple({0: dyn, 2: dyn} for _ in range(2 * n_layers)))
    path = folder / "model.onnx"
    with torch.no_grad(), _tensor_attributes_kept(model):
        program = torch.onnx.export(_wrapper(model.eval()).eval(), example, input_names=names_in, output_names=names_out,
                                    dynamic_shapes=shapes, dynamo=True, opset_version=20, verbose=False)
    rebuild = rebuild_cache_at(cfg)
    if rebuild is not None:
        program.model.metadata_props[REBUILD_CACHE_AT] = str(rebuild)
    big = sum(p.numel() * 4 for p in model.parameters()) > 1.8 * 2**30
    program.save(str(path), external_data=big)
    onnx.checker.check_model(str(path))
    graph = onnx.load(str(path), load_external_data=False).graph
    got_in, got_out = [i.name for i in graph.input], [o.name for o in graph.output]
    if got_in != names_in or got_out != names_out:
        raise EdgeftError(f"the exported graph has inputs {got_in[:4]}... outputs {got_out[:3]}...; expected "
                          f"{names_in[:4]}... {names_out[:3]}...")
    return path


INT4_ALGOS = ("hqq", "k_quant", "rtn", "gptq")


class _Rows:
    """The training rows as onnxruntime's calibration reader hands them to GPTQ: one row a batch, with an
    empty KV cache (the graph's past inputs, zero positions long)."""

    def __init__(self, rows: list[list[int]], past: dict):
        self.rows, self.past, self._next = rows, past, iter(rows)

    def get_next(self):
        import numpy as np

        row = next(self._next, None)
        if row is None:
            return None
        n = len(row)
        return {"input_ids": np.asarray([row], dtype=np.int64), "attention_mask": np.ones((1, n), dtype=np.int64),
                "position_ids": np.arange(n, dtype=np.int64)[None], **self.past}

    def __iter__(self):  # onnxruntime's CalibrationDataReader protocol: get_next until None, or iterate
        return iter(self.get_next, None)

    def __deepcopy__(self, memo):  # the quantizer copies its reader before each pass; start from the first row
        return _Rows(self.rows, self.past)


def _empty_past(graph) -> dict:
    import numpy as np

    past = {}
    for inp in graph.input:
        if inp.name.startswith("past_key_values."):
            dims = inp.type.tensor_type.shape.dim
            past[inp.name] = np.zeros((1, dims[1].dim_value, 0, dims[3].dim_value), dtype=np.float32)
    return past


def output_head(graph, ops: tuple[str, ...] = ("MatMul",)) -> list[str]:
    """The output head's MatMul: the one the `logits` output comes from. The dynamo exporter names nodes after
    the op (node_linear_14), not the module, so a name never says lm_head; the graph's wiring does."""
    producer = {out: n for n in graph.node for out in n.output}
    name, seen = "logits", 0
    while name in producer and seen < 8:  # through the casts/reshapes between the head and the output
        node = producer[name]
        if node.op_type in ops:
            return [node.name]
        name, seen = node.input[0], seen + 1
    return []



def embeddings(graph) -> list:
    """The token-embedding lookups: a Gather on axis 0 whose table is a 2-D initializer and whose indices are
    the graph's input_ids."""
    tables = {i.name: i for i in graph.initializer if len(i.dims) == 2}
    found = []
    for n in graph.node:
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if n.op_type == "Gather" and n.input[0] in tables and n.input[1] == "input_ids" and axis == 0:
            found.append(n)
    return found


def int8_embeddings(model, block_size: int, folder: Path | None = None) -> int:
    """Each token-embedding Gather becomes an 8-bit GatherBlockQuantized (onnxruntime's contrib op; its
    quantizer writes only 4-bit ones): symmetric blocks of `block_size` values along the hidden axis, one scale
    each, stored as uint8 around the op's default zero point 128. The fp32 table is the largest tensor of a
    small model's graph (113 MB of the default model's 230 MB int4 graph) and no MatMul quantizer touches it.
    A table kept in the data file is read from `folder`. Returns how many were replaced."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    done = 0
    for node in embeddings(graph):
        table = initializer_values(inits[node.input[0]], Path(folder or "."))
        rows, cols = table.shape
        if cols % block_size:
            continue
        q = np.empty((rows, cols), dtype=np.uint8)
        scales = np.empty((rows, cols // block_size), dtype=np.float32)
        for at in range(0, rows, 8192):  # in slices: a 128k-token table's float temporaries would be gigabytes
            blocks = table[at:at + 8192].astype(np.float32).reshape(-1, cols // block_size, block_size)
            s = np.abs(blocks).max(-1) / 127.0
            s[s == 0] = 1.0
            q[at:at + 8192] = (np.clip(np.rint(blocks / s[..., None]), -127, 127) + 128).reshape(-1, cols)
            scales[at:at + 8192] = s
        del table
        name = node.input[0]
        graph.initializer.remove(inits[name])
        graph.initializer.extend([numpy_helper.from_array(q, name + "_Q8"),
                                  numpy_helper.from_array(scales, name + "_scales")])
        at = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(at, helper.make_node("GatherBlockQuantized", [name + "_Q8", node.input[1], name + "_scales"],
                                               list(node.output), name=node.name + "_Q8", domain="com.microsoft",
                                               gather_axis=0, quantize_axis=1, block_size=block_size, bits=8))
        done += 1
    if done and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return done


def _quantizer(model, bits: int, algo: str, c: OnnxExportConfig, exclude: list[str], calibration=None):
    """onnxruntime's MatMulNBits quantizer for `algo`, run on `model`; returns the quantized proto."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import (GPTQWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig,
                                                                 KQuantWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    # The quantizer logs every node at INFO; the progress line and the ledger say what matters.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    # rtn is MatMulNBits' own default (round to nearest per block, what edgeft always used)
    # gptq's block_size is how many columns one GPTQ step updates (its own default); the quantization
    # blocks are the quantizer's block_size, as for the other algorithms
    config = {"hqq": lambda: HQQWeightOnlyQuantConfig(block_size=c.block_size, bits=bits),
              "k_quant": KQuantWeightOnlyQuantConfig,
              "gptq": lambda: GPTQWeightOnlyQuantConfig(calibration_data_reader=_Rows(calibration or [],
                                                                                      _empty_past(model.graph)),
                                                        block_size=128)}.get(algo, lambda: None)()
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=c.block_size, is_symmetric=c.symmetric,
                             accuracy_level=c.accuracy_level, nodes_to_exclude=exclude, algo_config=config)
    with contextlib.redirect_stdout(io.StringIO()):  # k_quant prints a progress bar on stdout (--json's)
        q.process()
    return q.model.model if hasattr(q.model, "model") else q.model  # k_quant hands back the bare proto


def quantize_graph(src: Path, dst_folder: Path, bits: int, c: OnnxExportConfig,
                   calibration: list[list[int]] | None = None) -> tuple[Path, dict]:
    """MatMulNBits weight-only quantization; returns the graph and what was done (for the ledger). int4 uses
    --int4-algo (HQQ by default: on the demo fine-tune's graph its held-out perplexity was -1.8% vs fp32, where
    round-to-nearest gave +24% and k_quant +21%; README), and with --int8-head the output head (the tied
    embeddings' copy) goes to int8: it is the largest single matrix and the one whose error reaches the logits
    directly.

    One projection at a time: each MatMul and its weight, read from the fp32 graph's data file, go through
    onnxruntime's quantizer as a graph of their own, and only what comes out joins the quantized graph, so the
    fp32 weights are never all in memory. Quantizing the loaded graph in place (the quantizer's way) held them
    all and their replacements too, since protobuf (upb) frees nothing removed from a message until the whole
    message goes: 10 GB for the 1B shape's 6 GB fp32 graph, alone. GPTQ runs the whole graph on its calibration
    rows, so it still gets the whole graph."""
    import onnx
    from onnx import helper, numpy_helper

    src = Path(src)
    done = {"bits": bits, "block_size": c.block_size, "algorithm": "rtn" if bits == 8 else c.int4_algo,
            "head": "fp32" if c.keep_lm_head else f"int{bits}"}
    if done["algorithm"] == "gptq":
        done["calibration"] = {"rows": len(calibration or []), "tokens": sum(map(len, calibration or []))}
    model = onnx.load(str(src), load_external_data=done["algorithm"] == "gptq")
    graph = model.graph
    heads = output_head(graph)
    head_bits = bits
    if bits == 4 and c.int8_head and heads and not c.keep_lm_head:
        head_bits, done["head"] = 8, "int8"
    if done["algorithm"] == "gptq":
        if head_bits != bits:  # the head alone in int8 first, then GPTQ over the rest
            model = _quantizer(model, 8, "rtn", c, [n.name for n in graph.node if n.op_type == "MatMul"
                                                    and n.name not in heads])
        model = _quantizer(model, bits, "gptq", c, heads if c.keep_lm_head else [], calibration)
        graph = model.graph
    else:
        inits = {i.name: i for i in graph.initializer}
        nodes, uses = [], {}
        for node in graph.node:
            for x in node.input:
                uses[x] = uses.get(x, 0) + 1
        for node in list(graph.node):
            weight = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else None
            if weight not in inits or len(inits[weight].dims) != 2 or (node.name in heads and c.keep_lm_head):
                nodes.append(node)
                continue
            nbits, algo = (head_bits, "rtn") if node.name in heads and head_bits != bits else \
                (bits, done["algorithm"] if bits == 4 else "rtn")
            one = helper.make_model(helper.make_graph(
                [node], "one", [helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None)],
                [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
                [numpy_helper.from_array(initializer_values(inits[weight], src.parent), weight)]),
                opset_imports=list(model.opset_import), ir_version=model.ir_version)
            one = _quantizer(one, nbits, algo, c, [])
            # Copied through bytes: a message taken from `one` by reference would keep all of `one` alive, and
            # with it the fp32 weight.
            nodes.extend(onnx.NodeProto.FromString(n.SerializeToString()) for n in one.graph.node)
            for init in one.graph.initializer:
                graph.initializer.add().ParseFromString(init.SerializeToString())
            uses[weight] -= 1
            del one
        kept = [i for i in graph.initializer if uses.get(i.name, 1) > 0]
        del graph.initializer[:], graph.node[:]
        graph.initializer.extend(kept)
        graph.node.extend(nodes)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    done["embeddings"] = "int8" if c.int8_embeddings and int8_embeddings(model, c.block_size, src.parent) else "fp32"
    for i, init in enumerate(graph.initializer):  # what is left in the data file (norms, an fp32 table) comes in
        if init.data_location == onnx.TensorProto.EXTERNAL:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(initializer_values(init, src.parent), init.name))
    return save_graph(model, dst_folder), done


def _mixed_int4(c: OnnxExportConfig, folders: dict, out_dir: Path, tmp: Path, source, tokens, task,
                calibration) -> dict:
    """--budget: the int4 graph with int4 or int8 chosen per projection (export/onnx_mixed.py), written into
    `tmp`; returns what was done for the ledger. The all-int8 graph is this export's int8 one when it made one."""
    import tempfile

    from . import onnx_mixed

    fp32 = folders["fp32"] / "model.onnx"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".mixed-") as work:
        work = Path(work)
        high = folders.get("int8", Path()) / "model.onnx"
        if not high.is_file():
            (work / "int8").mkdir()
            high = quantize_graph(fp32, work / "int8", 8, c)[0]
        (work / "int4").mkdir()
        low, done = quantize_graph(fp32, work / "int4", 4, c, calibration)
        model, info = onnx_mixed.choose(high, low, source.path, fp32, c.budget, tokens, task, c.window, c.stride,
                                        c.threads, work, bar)
        save_graph(model, tmp)
    done["mixed"] = info
    return done


def _answer(lm: OnnxLM, tokenizer, max_new: int) -> dict:
    out = lm.generate(list(prompt_ids(tokenizer)), max_new, _eos_ids(tokenizer))
    text = tokenizer.decode(out["ids"], skip_special_tokens=True)
    return {"prompt": prompt_text(), "answer": text, **out, "ok": answer_ok(text)}


def _eos_ids(tokenizer) -> set[int]:
    return {e for e in {tokenizer.eos_token_id} | set(_as_list(getattr(tokenizer, "eos_token_id", None)))
            if e is not None}


def _answer_fn(lm: OnnxLM, tokenizer):
    eos = _eos_ids(tokenizer)
    return lambda prompt, max_new: lm.generate(list(prompt), max_new, eos)["ids"]


def _as_list(x):
    return x if isinstance(x, list) else [x]


def _hf_greedy(model, prompt: list[int], max_new: int, pad_id: int, eos_id) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=pad_id)
    return [i for i in out[0, ids.shape[1]:].tolist() if i != eos_id]


def _export_child(model_path: str, adapter_path: str | None, folder: str, prompt: list[int], max_new: int,
                  pad_id: int, eos_id) -> list[int]:
    """In a child process: the fp32 model exported into `folder`, and HF's greedy answer to `prompt` after it.
    torch.onnx.export keeps the ONNX graph it built alive after it returns (onnxscript's rewrite rules hold the
    last graph they matched), and that graph holds the model's torch weights: 6.2 GB of the 1B shape's stayed
    in the process for the rest of the export. The child's exit gives them back."""
    import os

    os.dup2(2, 1)  # the exporter prints on stdout, which is --json's in the parent
    model = load_model(Path(model_path), "float32")
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    export_graph(model, Path(folder))
    return _hf_greedy(model, prompt, max_new, pad_id, eos_id)


def _export_fp32(source, tokenizer, folder: Path, max_new: int) -> list[int]:
    """_export_child in a spawned process (fork would copy this one's state, locks included); its errors are
    raised here."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pad = tokenizer.pad_token_id or tokenizer.eos_token_id  # as generate was given it before the child
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_export_child, str(source.path), str(source.adapter.path) if source.loras else None,
                           str(folder), list(prompt_ids(tokenizer)), max_new, pad, tokenizer.eos_token_id).result()


def export_onnx(config: OnnxExportConfig) -> ExportResult:
    with contextlib.ExitStack() as held:  # the locks of the folders this export writes, held to its end
        return _export_onnx(config, held)


def _export_onnx(config: OnnxExportConfig, held: contextlib.ExitStack) -> ExportResult:
    c = config
    quants = [q.lower() for q in c.quant] or ["fp32", "int8", "int4"]
    bad = [q for q in quants if q not in ONNX_QUANTS]
    if bad:
        raise EdgeftError(f"--quant {bad[0]}: for onnx use fp32, int8, int4")
    if "fp32" not in quants:
        quants.insert(0, "fp32")  # the reference every quant is compared with
    if c.int4_algo not in INT4_ALGOS:
        raise EdgeftError(f"--int4-algo {c.int4_algo}: use {', '.join(INT4_ALGOS)}")
    if c.block_size < 16 or c.block_size & (c.block_size - 1):
        raise EdgeftError(f"--block-size {c.block_size}: use a power of two >= 16 (32, 64, 128)")
    made = [q for q in quants if q != "fp32"]
    if c.budget:
        from .onnx_mixed import budget_bytes

        if "int4" not in made:
            raise EdgeftError(f"--budget {c.budget}: with --format onnx it chooses int4 or int8 per projection of "
                              f"the int4 graph; add int4 to --quant")
        budget_bytes(c.budget, 1)  # its form, checked before any work
    gates = parse_gates(c.max_ppl_rise, ONNX_GATES, made)
    task_limits = task_gate_limits(c, made)
    source = resolve_source(c)
    run, label = source.run, source.label
    out_dir = Path(c.out) if c.out else run.export_dir("onnx")
    folders = {q: out_dir / f"{q}" for q in quants}
    writing_files(held, run.path, folders.values(), "export")
    tokenizer, tokens, task = load_inputs(c, source, folders.values())
    calibration = None
    if "int4" in made and c.int4_algo == "gptq":  # read before any work: a run with no training fails now
        from ..imatrix import calibration_ids
        from ..train import training_rows

        calibration = calibration_ids("train", tokenizer, c.gptq_tokens, lambda: training_rows(
            run.path, tokenizer, "--int4-algo gptq", "GPTQ calibrates on the run's training rows: use --int4-algo "
            "hqq, or export a run that trained"))
    inputs = source.inputs(TOKENS_FILE, format="onnx")
    entries: list[dict] = []

    with run.record(EXPORT_ONNX, to_dict(c), {**inputs, "quant": "fp32"}) as entry:
        with activity("torch.onnx.export (dynamo) of the KV-cache graph; minutes for a 100M+ model"):
            with atomic_dir(folders["fp32"]) as tmp:
                reference_ids = _export_fp32(source, tokenizer, tmp, c.generate_tokens)
                copy_tokenizer(source.path, tmp, also=_MODEL_FILES)
        hf = hf_reference(source, tokens, task, tokenizer, c.window, c.stride, c.task_answers)
        ref = OnnxLM(folders["fp32"] / "model.onnx", c.threads)
        with bar("onnxruntime perplexity fp32") as update:
            got = score(tokens.ids, ref.logits, window=c.window, stride=c.stride, backend="onnxruntime",
                        progress=update, bos=tokens.bos)
        sample = _answer(ref, tokenizer, c.generate_tokens)
        vs_hf = Comparison(measured=got, reference=hf.ppl)
        same_answer = sample["ids"] == reference_ids
        entry["outputs"].append(artifact(folders["fp32"], run.path))
        vs_hf.record(entry, f"ONNX fp32 ({label})", f"HF {label}", "hf", tokens.source, source=hf.how)
        entry["metrics"].update({"sample": sample, "greedy_identical_to_hf": same_answer,
                                 "prefill_tokens_per_s": sample["prefill_tokens_per_s"],
                                 "decode_tokens_per_s": sample["decode_tokens_per_s"]})
        ref_task = record_reference_task(entry, task, ref, _answer_fn(ref, tokenizer), tokenizer, "onnxruntime", c,
                                         f"ONNX fp32 ({label})", hf.task) if task else None
        entries.append(entry)
        check(entry, Gate("ONNX fp32 vs HF perplexity, greedy answer identical", vs_hf.change, HF_MATCH,
                          f"ONNX fp32 perplexity {got.ppl:.4f} vs HF {hf.ppl.ppl:.4f} ({100 * vs_hf.change:+.3f}%, "
                          f"limit {100 * HF_MATCH:.1f}%){'' if same_answer else '; greedy answer differs from HF'}: "
                          f"the export is wrong", absolute=True, also=same_answer))

    failures = []
    for q in made:
        # The quantizer gets the sessions' memory (the fp32 one is 4.7 GB at the 1B shape); they reopen after it.
        ref = lm = None
        try:
            with run.record(EXPORT_ONNX, to_dict(c), {**inputs, "quant": q, "from": "fp32"}) as entry:
                with activity(f"MatMulNBits {ONNX_QUANTS[q]}-bit, block {c.block_size}"):
                    with atomic_dir(folders[q]) as tmp:
                        if q == "int4" and c.budget:
                            done = _mixed_int4(c, folders, out_dir, tmp, source, tokens, task, calibration)
                        else:
                            done = quantize_graph(folders["fp32"] / "model.onnx", tmp, ONNX_QUANTS[q], c,
                                                  calibration)[1]
                        copy_tokenizer(source.path, tmp, also=_MODEL_FILES)
                ref = OnnxLM(folders["fp32"] / "model.onnx", c.threads)
                lm = OnnxLM(folders[q] / "model.onnx", c.threads)
                with bar(f"onnxruntime {q} vs fp32") as update:
                    cmp = compare(ref, lm, tokens.ids, c.window, c.stride, progress=update,
                                  backends=("onnxruntime", "onnxruntime"), bos=tokens.bos)
                sample = _answer(lm, tokenizer, c.generate_tokens)
                entry["outputs"].append(artifact(folders[q], run.path))
                cmp.record(entry, f"ONNX {q} ({label})", "ONNX fp32", "fp32", tokens.source)
                entry["metrics"].update({"ppl_rise": round(cmp.change, 6), "sample": sample,
                                         "prefill_tokens_per_s": sample["prefill_tokens_per_s"],
                                         "decode_tokens_per_s": sample["decode_tokens_per_s"],
                                         "block_size": c.block_size, "symmetric": c.symmetric,
                                         "accuracy_level": c.accuracy_level, "lm_head_fp32": c.keep_lm_head,
                                         "quantization": done})
                task_gates = record_quant_task(entry, task, ref, lm, _answer_fn(lm, tokenizer), tokenizer,
                                               "onnxruntime", c, f"ONNX {q} ({label})", ref_task, "fp32", hf.task, q,
                                               task_limits) if task else []
                entries.append(entry)
                check(entry, Gate("perplexity rise vs fp32", cmp.change, gates[q],
                                  f"ONNX {q}: perplexity rose {100 * cmp.change:.1f}% vs fp32 "
                                  f"(limit {100 * gates[q]:.0f}%)"), *task_gates)
        except GateFailed as e:
            failures.append(str(e))
    if failures:
        raise GateFailed("; ".join(failures))
    return ExportResult(run=run.path, artifacts={q: folders[q] for q in quants}, entries=entries)
