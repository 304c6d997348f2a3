"""Format converters (HF safetensors -> GGUF, ONNX), shipped as `edgeft.converters`."""
