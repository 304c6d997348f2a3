"""ONNX fp32/int8/int4 vs the GGUF quants of the same model, in one table: size, perplexity, decode tokens/s.

    python bench/onnx_vs_gguf.py [--model smollm2-135m | --run RUN_WITH_MERGED] [--budget 2048]

Both exports go into one temporary run, so every perplexity is on the same token ids and windows. Decode
speed is measured the same way for both: greedy answer to the same chat prompt, tokens after the prompt
divided by the time after prefill, on this machine's CPU with all its cores.
"""

# Not named onnx.py (as the issue asked): run as a script, bench/ comes first on sys.path and a file
# named onnx.py would shadow the onnx package itself.
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--run", default="", help="a run with merged/ to use instead of --model")
    ap.add_argument("--budget", type=int, default=2048)
    a = ap.parse_args()

    from edgeft.export import GGUFExportConfig, OnnxExportConfig, export
    from edgeft.llamacpp import LlamaCpp
    from edgeft.models import load_tokenizer, resolve_model
    from edgeft.onnx_runtime import OnnxLM
    from edgeft.prompt import prompt_ids

    tmp = Path(tempfile.mkdtemp(prefix="edgeft-bench-onnx-"))
    model = str(Path(a.run) / "merged") if a.run else a.model
    common = dict(model=model, run=str(tmp / "run"), eval_budget=a.budget, max_ppl_rise="10")
    onnx = export(OnnxExportConfig(format="onnx", quant=["fp32", "int8", "int4"], **common))
    gguf = export(GGUFExportConfig(format="gguf", quant=["f16", "q8_0", "q4_k_m"], **common))
    tokenizer = load_tokenizer(resolve_model(model))
    prompt = prompt_ids(tokenizer)

    rows = []
    for e in onnx.entries + gguf.entries:
        fmt, q = e["step"].removeprefix("export-"), e["inputs"]["quant"]
        path = tmp / "run" / e["outputs"][0]["path"]
        if fmt == "onnx":
            lm = OnnxLM(path / "model.onnx")
            decode = lm.generate(prompt, 32, {tokenizer.eos_token_id})["decode_tokens_per_s"]
        else:
            lm = LlamaCpp(path, n_ctx=512)
            lm.generate(prompt, 4)  # warm-up
            start = time.perf_counter()
            ids, _ = lm.generate(prompt, 32)
            decode = len(ids) / (time.perf_counter() - start)
            lm.close()
        rows.append((fmt, q, e["outputs"][0]["bytes"] / 2**20, e["perplexity"]["ppl"], decode))
    base = rows[0][3]
    print(f"model {model}, {onnx.entries[0]['perplexity']['tokens']} scored tokens")
    print(f"{'format':8}{'quant':8}{'MiB':>9}{'perplexity':>12}{'vs ONNX fp32':>14}{'decode tok/s':>14}")
    for fmt, q, size, ppl, decode in rows:
        print(f"{fmt:8}{q:8}{size:>9.1f}{ppl:>12.4f}{100 * (ppl / base - 1):>+13.2f}%{decode or 0:>14.1f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
