"""What the ledger and the artifacts say about a run: the tensor types a k-quant really stored (in the entry, not in
a warning line per tensor), an --eval-budget the run cannot use, GGUFs named after the base and the run, and the
adapter's base by its hub id."""

import json
import re
import shutil

from click.testing import CliRunner
from gguf import GGUFReader

from edgeft.cli import cli
from edgeft.merge import MergeConfig, merge
from edgeft.models import hub_id

from .conftest import WINDOW, train_tiny


def test_k_quant_fallbacks_are_counted_in_the_entry_and_ggufs_are_named_after_base_and_run(tiny_merged_task_run,
                                                                                           tiny_llama, tmp_path):
    run = tmp_path / "demo"
    shutil.copytree(tiny_merged_task_run, run)
    result = CliRunner().invoke(cli, ["export", "--run", str(run), "--quant", "f16,q8_0,q4_k_m", "--max-ppl-rise", "100",
                                      "--max-task-ppl-rise", "100", "--max-exact-drop", "1", "--json", *WINDOW])
    assert result.exit_code == 0, result.output
    # llama.cpp's per-tensor "falling back" lines do not reach the user: the entry says it once
    assert "falling back" not in result.output and "fallback quantization" not in result.output
    f16, q8, q4 = json.loads(result.stdout.strip().splitlines()[-1])

    stem = f"{tiny_llama.name}-demo"  # the run's base (from its merge entry), then the run
    assert sorted(p.name for p in (run / "gguf").glob("*.gguf")) == sorted(
        f"{stem}-{q}.gguf" for q in ("F16", "Q8_0", "Q4_K_M"))
    assert [e["outputs"][0]["path"] for e in (f16, q8, q4)] == [f"gguf/{stem}-{q}.gguf" for q in ("F16", "Q8_0", "Q4_K_M")]
    assert GGUFReader(run / "gguf" / f"{stem}-F16.gguf").fields["general.name"].contents() == stem
    assert (run / "gguf" / f"{stem}-Q4_K_M.Modelfile").read_text().startswith(f"FROM ./{stem}-Q4_K_M.gguf\n")

    reader = GGUFReader(run / "gguf" / f"{stem}-Q4_K_M.gguf")
    matrices = [t for t in reader.tensors if len(t.shape) == 2]
    types = q4["metrics"]["tensor_types"]
    assert sum(types.values()) == len(reader.tensors) and "q4_k" not in types and types["f32"] == len(
        reader.tensors) - len(matrices)
    # hidden 64, intermediate 128: no matrix row holds a 256-value k-quant block
    assert re.fullmatch(rf"Q4_K_M: {len(matrices)} of {len(reader.tensors)} tensors are q5_0/q8_0 \(rows of 64, 128 "
                        rf"not a multiple of 256\)", q4["note"]), q4["note"]
    assert set(q8["metrics"]["tensor_types"]) == {"q8_0", "f32"} and q8.get("note") is None
    assert "Q4_K_M:" in CliRunner().invoke(cli, ["show", str(run)]).output  # the ledger table's note column


def test_an_eval_budget_the_run_cannot_use_is_named(tiny_llama, tmp_path):
    args = ["eval", "--model", str(tiny_llama), "--run", str(tmp_path / "r"), "--window", "128", "--stride", "128"]
    first = CliRunner().invoke(cli, [*args, "--eval-budget", "300"])
    assert first.exit_code == 0 and "is not used" not in first.output, first.output
    again = CliRunner().invoke(cli, [*args, "--eval-budget", "500"])
    assert again.exit_code == 0, again.output
    note = next(line for line in again.output.splitlines() if "is not used" in line)
    assert note.startswith("note: --eval-budget 500 is not used: this run scores the 300 ids") and "budget 300" in note
    scored = re.findall(r"\((\d+) tokens, ", first.output + again.output)
    assert len(scored) == 2 and scored[0] == scored[1]  # the stored ids were scored both times
    default = CliRunner().invoke(cli, args)  # no budget asked for: nothing to say
    assert default.exit_code == 0 and "is not used" not in default.output


def test_adapter_names_its_base_by_hub_id_and_still_merges(tiny_llama, tmp_path):
    # a base from the hub cache: the folder is local, its hub id is in the path
    snapshot = tmp_path / "hub" / "models--edgeft-tests--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_llama, snapshot)
    run = train_tiny(snapshot, tmp_path / "run", max_steps=2).run
    meta = json.loads((run / "adapter" / "edgeft_adapter.json").read_text())
    assert meta["base_hub_id"] == "edgeft-tests/tiny-llama" and meta["base_path"] == str(snapshot)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "edgeft-tests/tiny-llama"  # not this machine's absolute path
    # edgeft finds the base through its metadata (path and fingerprint); peft loads the adapter onto it
    merged = merge(MergeConfig(adapter=str(run), dtype="float32", window=128, stride=128))
    assert merged.entries[-1]["status"] == "ok" and merged.entries[-1]["inputs"]["base_path"] == str(snapshot)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(snapshot), run / "adapter")
    assert hub_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct" and hub_id("org/name") == "org/name"
    assert hub_id(str(tiny_llama)) is None
