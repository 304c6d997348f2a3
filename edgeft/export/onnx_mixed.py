"""`export --format onnx --quant int4 --budget SIZE`: int4 or int8 per projection, chosen on this run's data so
that the int4 graph fits SIZE and loses the least. The graph is still onnxruntime's MatMulNBits throughout (each
node 4-bit or 8-bit), so any onnxruntime runs it with no edgeft code.

The choice is the GGUF recipe's (export/mixed.py), on onnxruntime's own quantized weights:
  1. the whole graph is quantized twice, all int8 and all int4 (--int4-algo), the head and embeddings as usual;
     a graph with some projections in int4 and the rest in int8 is those two graphs' nodes put together, so a
     probe costs no quantization.
  2. sensitivity: a probe puts one part of the model (a layer, or one kind of projection across the layers) in
     int4 and the rest in int8, and measures the mean KL vs the fp32 graph on the first held-out ids plus,
     weighted alike, on the task's answers; a scale per layer times a scale per kind is fitted to them. A
     projection's share of its part's KL rise is taken as its share of the part's weights (int4's error on a
     matrix grows with its size; a layer and kind hold one projection, so only the layer/kind split is fitted).
  3. allocation: the least predicted loss within the budget's bytes (export/mixed.allocate).
Projections are named after the model's own modules (model.layers.7.mlp.down_proj): the exported graph names
its MatMuls after the op, so each is matched to the module whose weights it holds.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

from ..errors import EdgeftError
from ..onnx_runtime import initializer_values
from .mixed import (PROBE_TOKENS, ProbeReference, Tensor, allocate, fit_scales, parse_budget, predicted,
                    probe_pieces, probes_for, weigh_task)

LOW, HIGH = "int4", "int8"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:\w+\.)*?(\w+)\.weight$")


def budget_bytes(spec: str, values: int) -> int:
    """--budget for the int4 graph's files: bytes, or bits per value of the graph (`values`: the fp32 graph's
    bytes / 4, scales and all); a stock GGUF recipe's size or 'device' means nothing here."""
    budget = parse_budget(spec)
    if budget.kind == "bytes":
        return int(budget.value)
    if budget.kind == "bpw":
        return int(budget.value * values / 8)
    raise EdgeftError(f"--budget {spec}: for onnx give a size (bytes, MiB, GiB) or bits per weight ('5bpw')")


def projections(graph, folder: Path, source: Path) -> dict[str, str]:
    """MatMul node name -> the model's module weight it multiplies by (only projections inside the layers: the
    head and embeddings are decided by --int8-head/--int8-embeddings). Matched by value: the graph holds each
    weight transposed, as float32, so its first row's leading values are the module's first column's. `graph`
    is loaded without its external data (a 1B model's is gigabytes); only those leading values are read, from
    `folder`'s data file."""
    from safetensors import safe_open

    inits = {i.name: i for i in graph.initializer}
    folder = Path(folder)
    wanted: dict[tuple, str] = {}
    for file in sorted(Path(source).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if not _LAYER.search(key):
                    continue
                piece = f.get_slice(key)
                shape = piece.get_shape()
                if len(shape) != 2:
                    continue
                head = piece[:8, 0:1].float().numpy().reshape(-1)
                wanted[(shape[1], shape[0], head.tobytes())] = key
    found = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        if len(init.dims) != 2:
            continue
        cols, rows = int(init.dims[0]), int(init.dims[1])
        key = wanted.get((cols, rows, initializer_values(init, folder, min(8, rows)).tobytes()))
        if key:
            found[node.name] = key
    return found


def _tensors(names: dict[str, str], low_graph, high_graph) -> list[Tensor]:
    """One Tensor per projection: its bytes in each graph, its error taken as its weight count (see 2.)."""
    sizes = []
    for graph, suffix in ((low_graph, "_Q4"), (high_graph, "_Q8")):
        inits = {i.name: len(i.raw_data) or i.ByteSize() for i in graph.initializer}
        sizes.append({n.name.removesuffix(suffix): sum(inits.get(x, 0) for x in n.input[1:]) for n in graph.node
                      if n.op_type == "MatMulNBits"})
    high_nodes = {n.name: n for n in high_graph.node}
    out = []
    for node, key in names.items():
        m = _LAYER.search(key)
        shape = {a.name: a.i for a in high_nodes[node + "_Q8"].attribute}
        k, n = shape["K"], shape["N"]
        t = Tensor(node, n, k, sizes[1][node], f"blk.{m.group(1)}", m.group(2), [LOW, HIGH])
        t.bytes = {LOW: sizes[0][node], HIGH: sizes[1][node]}
        t.error = {LOW: float(n * k), HIGH: 0.0}
        out.append(t)
    return out


def combine(high_model, low_model, low_nodes: set[str]):
    """A copy of the all-int8 model with the named projections' nodes (and their weights) taken from the
    all-int4 one."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(high_model)
    graph = model.graph
    low = {n.name.removesuffix("_Q4"): n for n in low_model.graph.node if n.op_type == "MatMulNBits"}
    low_inits = {i.name: i for i in low_model.graph.initializer}
    drop: set[str] = set()
    taken = []
    for i, node in enumerate(graph.node):
        base = node.name.removesuffix("_Q8")
        if node.op_type == "MatMulNBits" and base in low_nodes:
            drop.update(node.input[1:])
            graph.node[i].CopyFrom(low[base])
            taken += [low_inits[x] for x in low[base].input[1:] if x in low_inits]
    # the two graphs name a projection's scales alike (val_84_scales): the int8 ones go before the int4 ones come
    kept = [i for i in graph.initializer if i.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept + taken)
    return model


def choose(high_path: Path, low_path: Path, source: Path, ref_path: Path, budget: str, tokens, task, window: int,
           stride: int, threads: int, work: Path, progress_bar) -> tuple[object, dict]:
    """Steps 1-3 above; returns the chosen model (int8 graph with the int4 projections put in) and what decided
    it, for the ledger. The fp32 graph (`ref_path`) is open only while its log-probs are taken."""
    import onnx

    from ..onnx_runtime import OnnxLM, save_graph

    start = time.perf_counter()
    high, low = onnx.load(str(high_path)), onnx.load(str(low_path))
    names = projections(onnx.load(str(ref_path), load_external_data=False).graph, Path(ref_path).parent, source)
    if not names:
        raise EdgeftError(f"--budget: no projection of {source} was found in the exported graph by its weights; "
                          f"export the merged model (edgeft merge) to choose per projection")
    tensors = _tensors(names, low.graph, high.graph)
    fp32_size, low_size, high_size = (sum(f.stat().st_size for f in Path(p).parent.glob("model.onnx*"))
                                      for p in (ref_path, low_path, high_path))
    target = budget_bytes(budget, fp32_size // 4)
    fixed = low_size - sum(t.bytes[LOW] for t in tensors)
    if target < low_size:
        raise EdgeftError(f"--budget {budget}: {target / 2**20:.1f} MiB is less than the all-int4 graph "
                          f"({low_size / 2**20:.1f} MiB); give at least that")
    pieces, split = probe_pieces(tokens, task, window, stride)
    probes = probes_for(tensors)
    reference = ProbeReference(OnnxLM(ref_path, threads), pieces)
    with progress_bar(f"sensitivity: {len(probes)} probes ({LOW} in one part, {HIGH} elsewhere)") as update:
        for i, probe in enumerate(probes):
            began = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=work, prefix=".probe-") as tmp:
                model = OnnxLM(save_graph(combine(high, low, set(probe.tensors)), Path(tmp)), threads)
                probe.kl, probe.task_kl = reference.kl(model, split)
                del model
            probe.seconds = round(time.perf_counter() - began, 2)
            update(i + 1, len(probes))
    weight = weigh_task(probes)
    scales = fit_scales(tensors, probes, low=LOW, high=HIGH)
    types = allocate(tensors, scales, target - fixed)
    chosen = {t.name for t in tensors if types[t.name] == LOW}
    info = {
        "budget": budget, "budget_bytes": target, "all_int4_bytes": low_size, "all_int8_bytes": high_size,
        "predicted_bytes": fixed + sum(t.bytes[types[t.name]] for t in tensors),
        "predicted_loss": float(f"{predicted(tensors, scales, types, probes[0].loss, HIGH):.4g}"),
        "recipe": {names[t.name]: types[t.name] for t in tensors},
        "types_chosen": {ty: sum(1 for v in types.values() if v == ty) for ty in (LOW, HIGH)},
        "probe": {"low": LOW, "high": HIGH, "held_out_ids": min(PROBE_TOKENS, len(tokens.ids)),
                  "task_items": len(pieces) - split, "task_weight": float(f"{weight:.4g}"),
                  "loss": "mean KL vs the fp32 graph on the held-out ids + task_weight × mean KL on the task answers",
                  "results": [{"part": p.name, "projections": len(p.tensors), "kl": float(f"{p.kl:.4g}"),
                               "task_kl": float(f"{p.task_kl:.4g}"), "seconds": p.seconds} for p in probes]},
        "seconds": round(time.perf_counter() - start, 1),
    }
    return combine(high, low, chosen), info
