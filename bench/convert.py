"""Our GGUF converter vs llama.cpp's convert_hf_to_gguf.py, family by family and at real sizes, in one run.

    python bench/convert.py                                    # every family, tiny (seconds each)
    python bench/convert.py --families none --shapes llama-3.2-1b,llama-3.2-3b,qwen2.5-3b
    python bench/convert.py --model smollm2-135m               # any model folder or embedded model

Tiny models come from tests/tiny_models.py (offline tokenizers, random weights). --shapes builds random-weight
checkpoints of published configs (edgeft.shapes: bf16, 5 GB safetensors shards as on the hub, the default model's
49152-token tokenizer in an embedding padded to the published vocab_size) once under $EDGEFT_HOME/shapes.
llama.cpp's script is the one vendored in the installed llama-cpp-python's sdist, run as is (see
edgeft.converters.compare for the one wrapper it gets: naming a BPE pre-tokenizer its hash table does not know).
Each converter runs in its own process; wall time and peak RSS come from wait4(). Then the two GGUFs are compared
tensor by tensor (names, shapes, types, values) and key by key. Goals: equal tensors, <= 0.8x time, <= 0.5x peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def our_pre_name(folder: Path) -> str | None:
    """The pre-tokenizer name our converter writes; llama.cpp's run is told it only if its hash table has none."""
    from edgeft.converters.gguf_vocab import effective_pre_tokenizer, gpt2_pre_name

    if (folder / "tokenizer.model").is_file() or not (folder / "tokenizer.json").is_file():
        return None
    config = json.loads((folder / "config.json").read_text())
    return gpt2_pre_name(effective_pre_tokenizer(folder, config, json.loads((folder / "tokenizer.json").read_text())))


def run_pair(name: str, folder: Path, outtype: str, keep: Path | None) -> dict:
    from edgeft.converters.compare import compare, key_differences, ours_convert, reference_convert, tensors_equal
    from edgeft.llamacpp import reference_tree

    with tempfile.TemporaryDirectory(dir=keep) as tmp:
        ours, theirs = Path(tmp) / "ours.gguf", Path(tmp) / "theirs.gguf"
        r_ours = ours_convert(folder, ours, outtype)
        r_theirs = reference_convert(reference_tree(), folder, theirs, outtype, our_pre_name(folder))
        cmp = compare(ours, theirs)
        size = ours.stat().st_size
    return {"name": name, "bytes": size, "ours": r_ours, "theirs": r_theirs, "equal": tensors_equal(cmp),
            "tensors": cmp["tensors_ours"], "keys": sorted(key_differences(cmp)), "cmp": cmp}


def tiny_folders(names: list[str], root: Path) -> list[tuple[str, Path]]:
    sys.path.insert(0, str(ROOT))
    from tests import tiny_models as tm

    out = []
    for name in names:
        folder = root / name
        if not (folder / "config.json").is_file():
            tm.tiny_model(name, folder, tm.tokenizer_for(name, root / "tokenizers"))
        out.append((f"{name} (tiny)", folder))
    return out


def shape_folders(shapes: list[str]) -> list[tuple[str, Path]]:
    from edgeft.models import DEFAULT_BASE, edgeft_home, resolve_model
    from edgeft.shapes import build_checkpoint

    tokenizer = resolve_model(DEFAULT_BASE)
    out = []
    for shape in shapes:
        folder = edgeft_home() / "shapes" / f"{shape}-bf16"
        print(f"building {shape} (random weights, bf16) in {folder} ...", flush=True)
        build_checkpoint(shape, tokenizer, folder, dtype="bfloat16", max_shard_size="5GB")
        out.append((shape, folder))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="all", help="tiny models to run: all, none, or a comma list of "
                                                       "tests/tiny_models.TINY keys")
    ap.add_argument("--shapes", default="", help="published shapes, comma list (edgeft.shapes.SHAPES)")
    ap.add_argument("--model", action="append", default=[], help="a model folder or embedded model name")
    ap.add_argument("--outtype", default="f16", choices=["f16", "bf16", "f32"])
    ap.add_argument("--keep", type=Path, help="write the GGUFs under this folder (default: a temp folder)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    a = ap.parse_args()

    folders: list[tuple[str, Path]] = []
    if a.families != "none":
        sys.path.insert(0, str(ROOT))
        from tests.tiny_models import TINY

        names = list(TINY) if a.families == "all" else a.families.split(",")
        folders += tiny_folders(names, Path(tempfile.mkdtemp(prefix="edgeft-bench-tiny-")))
    for m in a.model:
        from edgeft.models import resolve_model

        folders.append((m, resolve_model(m)))
    if a.shapes:
        folders += shape_folders([s for s in a.shapes.split(",") if s])

    rows = []
    head = (f"{'model':28}{'GGUF MB':>9}{'ours s':>8}{'llama.cpp s':>12}{'time':>7}{'ours MB':>9}{'llama.cpp MB':>13}"
            f"{'RSS':>7}  tensors")
    print(f"\n{a.outtype.upper()} GGUF, our converter vs llama.cpp's convert_hf_to_gguf.py (ratios: ours / theirs)")
    print(head)
    for name, folder in folders:
        r = run_pair(name, folder, a.outtype, a.keep)
        rows.append(r)
        o, t = r["ours"], r["theirs"]
        verdict = f"{'equal' if r['equal'] else 'DIFFER'} ({r['tensors']})"
        if r["keys"]:
            verdict += f"; keys differ: {', '.join(r['keys'][:6])}"
        print(f"{name:28}{r['bytes'] / 1e6:>9.1f}{o['seconds']:>8.1f}{t['seconds']:>12.1f}"
              f"{o['seconds'] / t['seconds']:>6.2f}x{o['peak_rss_mb']:>9.0f}{t['peak_rss_mb']:>13.0f}"
              f"{o['peak_rss_mb'] / t['peak_rss_mb']:>6.2f}x  {verdict}", flush=True)
        if not r["equal"]:
            for k in ("only_ours", "only_theirs", "different"):
                if r["cmp"][k]:
                    print(f"    {k}: {', '.join(r['cmp'][k][:8])}")
    if a.json:
        a.json.write_text(json.dumps([{k: ({kk: vv for kk, vv in v.items() if kk != "stderr"} if isinstance(v, dict) else v)
                                      for k, v in r.items() if k != "cmp"} for r in rows], indent=1,
                                     default=str))
    print("goals: equal tensors, time <= 0.8x, peak RSS <= 0.5x")


if __name__ == "__main__":
    main()
