"""`edgeft export`: a merged model (or base + adapter, fused while converting) to deployable artifacts.

One base config (what every format shares) and one per format; `export(config)` runs the format's exporter.
  config.py     the configs, FORMATS (each format as data), ExportResult, load_export_config
  source.py     what is exported (merged model, model folder, or base + adapter) and its HF reference score
  gguf.py       our converter or llama.cpp's, llama.cpp quantization, parity/perplexity/KL gates, --quant auto
  onnx.py       KV-cache ONNX graph, MatMulNBits int8/int4, the same gates on onnxruntime
  modelfile.py  the Ollama Modelfile beside each GGUF
"""

from __future__ import annotations

from .config import FORMATS, ExportConfig, ExportResult, Format, GGUFExportConfig, OnnxExportConfig, load_export_config

__all__ = ["FORMATS", "ExportConfig", "ExportResult", "Format", "GGUFExportConfig", "OnnxExportConfig", "export",
           "load_export_config"]


def export(config: ExportConfig) -> ExportResult:
    config = config.checked("task_answers")  # --checks quick: no held-out prompt answered, and the entries say so
    # The format whose config this is; a plain ExportConfig is the default format's.
    fmt = next((f for f in FORMATS.values() if isinstance(config, f.config)), FORMATS["gguf"])
    return fmt(config)
