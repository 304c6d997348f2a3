"""Our own runner for edgeft's KV-cache ONNX graphs, on plain onnxruntime (no genai_config.json needed).

The graph (see export/onnx.py) takes input_ids, attention_mask, position_ids and past_key_values.N.key/value
[batch, kv_heads, past, head_dim], and returns logits and present.N.key/value. Perplexity windows are run
with an empty past, so the same ids in the same windows are scored as on every other backend.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

# Graph metadata key (written by export/onnx.py): the position at which HF's generate throws the KV cache away and
# recomputes the whole sequence. A longrope model (Phi-3.5, Phi-4-mini) rotates with its short factors until the
# sequence outgrows the original context and with its long ones after; keys cached under the short factors would no
# longer match, so Phi-3's generate rebuilds the cache at that token, and greedy decoding here must do the same to
# answer as HF does.
REBUILD_CACHE_AT = "edgeft.rebuild_cache_at"


def save_graph(model, folder: Path) -> Path:
    """Write `model` as FOLDER/model.onnx, its weights in model.onnx.data beside it when the graph is over
    protobuf's 2 GB limit (1.8 GB, leaving room for the rest of the proto)."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    path = Path(folder) / "model.onnx"
    ONNXModel(model).save_model_to_file(str(path), use_external_data_format=model.ByteSize() > 1.8 * 2**30)
    return path


def initializer_values(init, folder: Path, count: int | None = None) -> np.ndarray:
    """An initializer's values (all, shaped; or the first `count`, flat), read from the graph's data file in
    `folder` when it is stored there, without putting them into the graph's protobuf as onnx's own loader does:
    upb frees nothing put into a message until the whole message goes (see export/onnx.quantize_graph)."""
    from onnx import TensorProto, helper, numpy_helper

    if init.data_location != TensorProto.EXTERNAL:
        values = numpy_helper.to_array(init)
        return values if count is None else values.reshape(-1)[:count]
    where = {e.key: e.value for e in init.external_data}
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
    total = int(np.prod(init.dims)) if len(init.dims) else 1
    values = np.fromfile(Path(folder) / where["location"], dtype=dtype, count=total if count is None else count,
                         offset=int(where.get("offset", 0)))
    return values.reshape(tuple(init.dims)) if count is None else values


class OnnxLM:
    def __init__(self, path: Path, threads: int = 0):
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        shape = next(i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")).shape
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        rebuild = self.session.get_modelmeta().custom_metadata_map.get(REBUILD_CACHE_AT)
        self.rebuild_cache_at = int(rebuild) if rebuild else None

    def empty_past(self) -> dict:
        return {n: np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32) for n in self.past_names}

    def step(self, ids: list[int], past: dict, past_len: int) -> tuple[np.ndarray, dict]:
        """Run `ids` after `past_len` cached positions; returns (logits [len(ids), vocab], new past)."""
        n = len(ids)
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64),
                 "attention_mask": np.ones((1, past_len + n), dtype=np.int64),
                 "position_ids": np.arange(past_len, past_len + n, dtype=np.int64)[None], **past}
        out = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        present = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], out[1:])}
        return out[0][0], present

    def logits(self, window_ids: list[int]) -> np.ndarray:
        return self.step(list(window_ids), self.empty_past(), 0)[0]

    def generate(self, prompt_ids: list[int], max_new: int, eos_ids: set[int]) -> dict:
        """Greedy decoding with the KV cache; times prefill and decode separately."""
        t0 = time.perf_counter()
        logits, past = self.step(list(prompt_ids), self.empty_past(), 0)
        t1 = time.perf_counter()
        out: list[int] = []
        stopped = False
        for _ in range(max_new):
            nxt = int(logits[-1].argmax())
            if nxt in eos_ids:
                stopped = True
                break
            out.append(nxt)
            position = len(prompt_ids) + len(out) - 1
            if position == self.rebuild_cache_at:
                logits, past = self.step(list(prompt_ids) + out, self.empty_past(), 0)
            else:
                logits, past = self.step([nxt], past, position)
        t2 = time.perf_counter()
        return {"ids": out, "stopped_at_eos": stopped, "prefill_tokens_per_s": len(prompt_ids) / (t1 - t0),
                "decode_tokens_per_s": len(out) / (t2 - t1) if out else None}
