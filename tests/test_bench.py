"""bench/train_throughput.py (the TRL race) and bench/gpu_check.py (the one-command GPU check).

The fast tests cover the bookkeeping: alternation, repeats, medians and spreads, the deadline, one part's failure
leaving the others, the slimmed bitsandbytes wheel. The slow one runs the whole GPU check at toy size on CPU,
every part for real (TRL, edgeft train/merge/export through llama.cpp, a 2-process --shard run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tt = load("train_throughput")
gc = load("gpu_check")


def race_args(tmp_path, **kw) -> argparse.Namespace:
    base = tmp_path / "model"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text("{}")
    values = dict(base=str(base), shape=None, tokenizer=None, models_dir=None, data="demo", eval_split=0.1, seed=0,
                  steps=4, warmup=1, batch_size=2, max_seq_len=64, targets=tt.QKVO, base_quant="none",
                  compute_dtype="auto", trl_lora_dtype="fp32", trl_data="ids", attn="auto",
                  sides=["trl", "edgeft"], repeats=3, deadline_s=None, json=None)
    values.update(kw)
    return argparse.Namespace(**values)


def test_race_alternates_sides_repeats_each_and_reports_median_spread_and_ratios(tmp_path, monkeypatch):
    speeds = {"trl": iter([100.0, 120.0, 110.0]), "edgeft": iter([300.0, 200.0, 250.0])}
    calls = []

    def one(a, side, base, timeout):
        calls.append(side)
        return {"tokens_per_s": next(speeds[side]), "peak_mb": 1000.0 if side == "trl" else 500.0,
                "peak_reserved_mb": None, "first_step_s": 1.0, "memory": "peak RSS", "wall_s": 0.1}

    monkeypatch.setattr(tt, "run_one", one)
    saved = []
    blob = tt.measure_shape(race_args(tmp_path), None, ["trl", "edgeft"], saved.append, None)
    assert calls == ["trl", "edgeft"] * 3 == blob["order"]
    assert blob["complete"] and len(saved) == 7  # after every run, and once complete
    assert blob["sides"]["trl"]["tokens_per_s"] == {"median": 110.0, "min": 100.0, "max": 120.0, "n": 3}
    assert blob["sides"]["edgeft"]["tokens_per_s"] == {"median": 250.0, "min": 200.0, "max": 300.0, "n": 3}
    assert blob["ratios_vs_trl"] == {"edgeft": {"tokens_per_s": round(250 / 110, 3), "peak_mb": 0.5}}


def test_race_stops_at_its_deadline_and_keeps_what_it_measured(tmp_path, monkeypatch):
    def one(a, side, base, timeout):
        return {"failed": ["boom"], "wall_s": 1.0} if side == "edgeft" else \
            {"tokens_per_s": 10.0, "peak_mb": 1.0, "wall_s": 1.0}

    monkeypatch.setattr(tt, "run_one", one)
    import time

    blob = tt.measure_shape(race_args(tmp_path), None, ["trl", "edgeft"], lambda b: None, time.time() - 1)
    assert not blob["complete"] and blob["stopped"].startswith("deadline") and blob["order"] == []
    blob = tt.measure_shape(race_args(tmp_path, repeats=2), None, ["trl", "edgeft"], lambda b: None, None)
    assert blob["sides"]["edgeft"] == {"ok": 0, "failed": 2, "tokens_per_s": None, "peak_mb": None,
                                       "peak_reserved_mb": None, "first_step_s": None}
    assert blob["ratios_vs_trl"] == {}


def test_side_settings_are_parsed_and_coerced():
    assert tt.parse_side("edgeft:packing=off,compile=true") == ("edgeft", {"packing": "off", "compile": "true"})
    assert tt.coerce("false", True) is False and tt.coerce("8", 1) == 8 and tt.coerce("1e-4", 0.1) == 1e-4
    assert tt.coerce("null", None) is None and tt.coerce("bfd", "wrapped") == "bfd"
    with pytest.raises(SystemExit):
        tt.parse_side("peft")


def test_slim_bitsandbytes_wheel_keeps_cpu_and_one_cuda_library(tmp_path):
    src = tmp_path / "in" / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    src.parent.mkdir()
    libs = ["cpu", "cuda118", "cuda128", "cuda130", "rocm64"]
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("bitsandbytes/__init__.py", "")
        for lib in libs:
            z.writestr(f"bitsandbytes/libbitsandbytes_{lib}.so", b"\0" * 10)
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "".join(
            f"bitsandbytes/libbitsandbytes_{lib}.so,sha256=x,10\n" for lib in libs) + "bitsandbytes/__init__.py,,\n")
    (tmp_path / "out").mkdir()
    out = gc.slim_bnb(src, tmp_path / "out", "130")
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert names == {"bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so",
                     "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes-0.50.2.dist-info/RECORD"}
    assert "cuda118" not in record and "cuda130" in record and "__init__" in record
    with pytest.raises(SystemExit, match="cuda999"):
        gc.slim_bnb(src, tmp_path / "out", "999")


def test_a_failing_part_is_recorded_and_the_next_part_still_runs(tmp_path):
    a = argparse.Namespace(out=str(tmp_path / "check.json"), toy=True, budget=["env=5"], total_s=None,
                           work=str(tmp_path / "work"), parts=None)
    c = gc.Check(a)

    def broken(left):
        raise RuntimeError("no GPU here")

    c.part("env", broken)
    c.part("race_1b", lambda left: {"status": "ok", "left": left})
    blob = json.loads((tmp_path / "check.json").read_text())
    assert blob["parts"]["env"]["status"] == "failed" and "no GPU here" in blob["parts"]["env"]["error"]
    assert blob["parts"]["env"]["budget_s"] == 5
    assert blob["parts"]["race_1b"]["status"] == "ok" and blob["parts"]["race_1b"]["left"] <= gc.TOY_BUDGETS["race_1b"]


@pytest.mark.slow
def test_gpu_check_toy_runs_every_part_on_cpu_and_writes_one_json(tmp_path, tiny_tokenizer):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--toy", "--tokenizer",
                           str(tiny_tokenizer), "--work", str(tmp_path / "work"), "--repeats", "2"],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert out.is_file(), proc.stderr[-3000:]
    blob = json.loads(out.read_text())
    assert proc.returncode == 0, json.dumps({k: v.get("error") for k, v in blob["parts"].items()})
    assert blob["schema"] == gc.SCHEMA and blob["mode"] == "toy" and list(blob["parts"]) == list(gc.PARTS)
    reasons = set(gc.SKIP_REASONS.values())
    for name, part in blob["parts"].items():
        assert part["status"] == "ok" or (part["status"] == "skipped" and part["reason"] in reasons), (name, part)
        assert part["seconds"] <= part["budget_s"] + 30, name
    env_facts = blob["parts"]["env"]["result"]
    assert env_facts["torch"] and env_facts["trl"] and env_facts["cuda"] is False
    assert env_facts["edgeft_chooses"]["compute_dtype"] == "float32"  # on CPU
    for name in ("race_1b", "race_3b"):
        race = blob["parts"][name]["result"]
        assert race["order"] == ["trl", "edgeft"] * 2 and race["complete"]
        for side in ("trl", "edgeft"):
            s = race["sides"][side]
            assert s["ok"] == 2 and s["tokens_per_s"]["min"] <= s["tokens_per_s"]["median"] <= s["tokens_per_s"]["max"]
            assert s["peak_mb"]["n"] == 2
        assert race["ratios_vs_trl"]["edgeft"]["tokens_per_s"] > 0
        runs = race["runs"]
        # the same work: edgeft's 90% split on both sides, float32 LoRA weights on both, no padding on either
        assert {r["rows"] for side in runs.values() for r in side} == {180}
        assert all(r["lora_dtype"] == ["float32"] for side in runs.values() for r in side)
        assert all(r["lora_dtype_after_trl_init"] == ["bfloat16"] and r["padding_free"] for r in runs["trl"])
        assert all(r["packing"] and r["quant"] == "4bit" for r in runs["edgeft"])
    chain = blob["parts"]["chain"]
    assert chain["gate_limits_note"] and list(chain["steps"]) == ["train", "merge", "export"]
    for step, s in chain["steps"].items():
        assert s["status"] == "ok" or s["reason"] == gc.SKIP_REASONS["no_llama_cpp"], (step, s)
        if s["status"] == "ok":
            assert s["entries"] and all(g["passed"] for e in s["entries"] for g in e["gates"]), step
    assert blob["parts"]["shard"]["world_size"] == 2


def test_gpu_mode_on_a_box_without_a_gpu_records_why_each_gpu_part_is_skipped(tmp_path, tiny_tokenizer):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), str(out), "--tokenizer",
                           str(tiny_tokenizer), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300)
    blob = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stderr[-2000:]
    parts = blob["parts"]
    assert blob["mode"] == "gpu" and blob["budget_s"] == 540
    assert parts["setup"]["status"] == parts["env"]["status"] == "ok" and parts["env"]["result"]["cuda"] is False
    for name in ("race_1b", "race_3b", "chain", "shard"):
        assert parts[name] == {**parts[name], "status": "skipped", "reason": gc.SKIP_REASONS["no_cuda"]}, name
