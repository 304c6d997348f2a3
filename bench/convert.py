"""Our GGUF converter vs llama.cpp's convert_hf_to_gguf.py on the same model, in the same run.

    python bench/convert.py [--model smollm2-135m] [--outtype f16]

llama.cpp's script is taken from the llama-cpp-python sdist of the installed version (fetched once with pip
into $EDGEFT_HOME/src; it needs the sentencepiece package, installed beside it) and run as is. Each converter
runs in its own process; its wall time and peak RSS come from wait4(). Then the two GGUFs are compared tensor
by tensor (names, shapes, types, values) and key by key. Goal: equal tensors, <=0.8x time, <=0.5x peak RSS.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def measured(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd[:3])} failed:\n{err[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def sentencepiece_dir(home: Path) -> Path:
    target = home / "src" / "bench-pydeps"
    if not (target / "sentencepiece").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        "sentencepiece"], check=True)
    return target


def compare(ours: Path, theirs: Path) -> dict:
    from gguf import GGUFReader

    a, b = GGUFReader(ours), GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    diff_values = [n for n in ta.keys() & tb.keys()
                   if ta[n].tensor_type != tb[n].tensor_type or list(ta[n].shape) != list(tb[n].shape)
                   or not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))]

    def kv(reader):
        out = {}
        for k, f in reader.fields.items():
            if k.startswith("GGUF."):
                continue
            try:
                v = f.contents()
            except Exception:
                v = None
            out[k] = v
        return out

    ka, kb = kv(a), kv(b)
    return {"tensors_ours": len(ta), "tensors_theirs": len(tb), "only_ours": sorted(ta.keys() - tb.keys()),
            "only_theirs": sorted(tb.keys() - ta.keys()), "different": sorted(diff_values),
            "keys_only_ours": sorted(ka.keys() - kb.keys()), "keys_only_theirs": sorted(kb.keys() - ka.keys()),
            "keys_different": sorted(k for k in ka.keys() & kb.keys() if ka[k] != kb[k])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--outtype", default="f16", choices=["f16", "bf16", "f32"])
    a = ap.parse_args()
    from edgeft.llamacpp import vendored_source
    from edgeft.models import edgeft_home, resolve_model

    model = resolve_model(a.model)
    src = vendored_source()
    deps = sentencepiece_dir(edgeft_home())
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = Path(tmp) / "ours.gguf", Path(tmp) / "theirs.gguf"
        env = dict(os.environ, PYTHONPATH=str(deps), HF_HUB_OFFLINE="1")
        r_ours = measured([sys.executable, "-m", "edgeft.converters.hf_to_gguf", str(model), str(ours),
                           "--outtype", a.outtype], env=env)
        r_theirs = measured([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model), "--outtype", a.outtype,
                             "--outfile", str(theirs)], env=env, cwd=str(src))
        cmp = compare(ours, theirs)
    print(f"model {model} -> {a.outtype.upper()} GGUF")
    print(f"{'':22}{'seconds':>9}{'peak RSS MB':>13}")
    print(f"{'edgeft':22}{r_ours['seconds']:>9.1f}{r_ours['peak_rss_mb']:>13.0f}")
    print(f"{'convert_hf_to_gguf.py':22}{r_theirs['seconds']:>9.1f}{r_theirs['peak_rss_mb']:>13.0f}")
    print(f"time ratio {r_ours['seconds'] / r_theirs['seconds']:.2f}x (goal <= 0.8x)   "
          f"peak RSS ratio {r_ours['peak_rss_mb'] / r_theirs['peak_rss_mb']:.2f}x (goal <= 0.5x)")
    equal = not (cmp["only_ours"] or cmp["only_theirs"] or cmp["different"])
    print(f"tensors: {cmp['tensors_ours']} ours, {cmp['tensors_theirs']} theirs; "
          f"{'all equal (names, shapes, types, values)' if equal else 'DIFFER'}")
    for k in ("only_ours", "only_theirs", "different", "keys_only_ours", "keys_only_theirs", "keys_different"):
        if cmp[k]:
            print(f"  {k}: {', '.join(map(str, cmp[k][:12]))}{' ...' if len(cmp[k]) > 12 else ''}")


if __name__ == "__main__":
    main()
