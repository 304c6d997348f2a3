"""The Ollama Modelfile written beside each GGUF, so `ollama create NAME -f FILE.Modelfile` works."""

from __future__ import annotations

import re
from pathlib import Path

from ..atomic import atomic_file


def modelfile(gguf_name: str, tokenizer) -> str:
    """The GGUF, its chat template in Ollama's Go template syntax, its stop tokens. Only templates edgeft
    recognises (ChatML, Llama 3) are translated; others keep Ollama's default."""
    template = tokenizer.chat_template or ""
    lines = [f"FROM ./{gguf_name}"]
    if "<|im_start|>" in template:
        system = re.search(r"<\|im_start\|>system\\n(.*?)<\|im_end\|>", template)
        lines += ['TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                  '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                  '<|im_start|>assistant\n"""']
        if system:
            lines.append(f'SYSTEM """{system.group(1)}"""')
        stops = ["<|im_end|>", "<|im_start|>"]
    elif "<|start_header_id|>" in template:
        lines += ['TEMPLATE """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
                  '{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"""']
        stops = ["<|eot_id|>", "<|end_of_text|>"]
    else:
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append("PARAMETER temperature 0.2")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, tokenizer) -> None:
    with atomic_file(gguf_path.with_suffix(".Modelfile")) as tmp:
        tmp.write_text(modelfile(gguf_path.name, tokenizer))
