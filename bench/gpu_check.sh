#!/usr/bin/env bash
# One command for a GPU box: every GPU measurement edgeft needs, written to ONE JSON file (bench/gpu_check.py).
#   bench/gpu_check.sh --prep DIR               # here, with network: carried wheels + the default tokenizer
#   bench/gpu_check.sh OUT.json --assets DIR    # on the GPU box, no network needed; <= 9 minutes on one H100
#   bench/gpu_check.sh OUT.json --toy           # on CPU: every part at toy size (the harness, end to end)
# PYTHON picks the interpreter (default: python3, the one holding torch on the device machine).
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
