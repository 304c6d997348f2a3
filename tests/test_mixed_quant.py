"""--quant auto --budget: a per-tensor recipe chosen from the run's data, written by llama.cpp, gated and
compared with the stock recipes on the same ids (real llama.cpp, tiny models; the default model in slow)."""

import json
import shutil

import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from edgeft.cli import cli
from edgeft.merge import MergeConfig, merge

from .conftest import WINDOW, assert_one_line_error, needs_cross, train_tiny
from .test_smoke import assert_decided


def _export(*args):
    result = CliRunner().invoke(cli, ["export", *args, "--json", *WINDOW])
    return result, (json.loads(result.output.strip().splitlines()[-1]) if result.exit_code == 0 else None)


@pytest.fixture(scope="module")
def qwen2_run(tiny_qwen2, tmp_path_factory):
    """A merged fine-tune of the tiny Qwen2 (another family than the default model's Llama, untied head)."""
    run = train_tiny(tiny_qwen2, tmp_path_factory.mktemp("mixed") / "qwen2", lr=1e-2, max_steps=4).run
    merge(MergeConfig(adapter=str(run), dtype="float32", window=128, stride=128))
    return run


def test_budget_recipe_fits_and_is_what_llama_cpp_stored(qwen2_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(qwen2_run, run)
    result, entries = _export("--run", str(run), "--quant", "f16,auto", "--budget", "q4_k_m", "--max-ppl-rise", "100")
    assert result.exit_code == 0, result.output
    quants = [e["inputs"]["quant"] for e in entries[:-1]]
    assert quants[0] == "f16" and quants[1] == "q4_k_m" and quants[-1] == "mixed" and len(quants) == 4
    mixed, choice = entries[-2], entries[-1]
    info = mixed["metrics"]["mixed"]
    stock = next(e for e in entries if e["inputs"]["quant"] == "q4_k_m")
    assert info["budget_bytes"] == stock["outputs"][0]["bytes"] >= mixed["outputs"][0]["bytes"]
    assert info["stored_differently"] == {}
    (path,) = (run / "gguf").glob("*-MIXED.gguf")
    stored = {t.name: t.tensor_type.name.lower() for t in GGUFReader(path).tensors}
    assert all(stored[n] == t for n, t in info["recipe"].items())
    assert_header_names_bulk_type(path, info["recipe"])
    # the allocation's own gain: at Q4_K_M's bytes, less KL than stock Q4_K_M with the same imatrix and without
    same, plain = (next(r for r in info["stock"] if r["quant"] == "q4_k_m" and r["imatrix"] == imx)
                   for imx in (True, False))
    assert plain["gates_passed"] is None and same["gates_passed"]
    assert mixed["metrics"]["kl_mean"] <= 0.7 * same["kl_mean"] and mixed["metrics"]["kl_mean"] <= 0.5 * plain["kl_mean"]
    assert mixed["task"]["exact_match"] >= same["exact_match"] and mixed["status"] == "ok"
    # the choice ranks every candidate within the budget by the loss the recipe minimizes, measured alike
    weight = info["probe"]["task_weight"]
    rows = {r["quant"]: r for r in choice["metrics"]["candidates"]}
    assert rows["mixed"]["loss"] == pytest.approx(mixed["metrics"]["kl_mean"] + weight * mixed["task"]["kl_mean"])
    assert rows["q4_k_m"]["loss"] == pytest.approx(stock["metrics"]["kl_mean"] + weight * stock["task"]["kl_mean"])
    fitting = [r for r in rows.values() if r["fits"] and r["gate_passed"]]
    assert choice["metrics"]["chosen"] == min(fitting, key=lambda r: r["loss"])["quant"]
    assert choice["inputs"]["budget_bytes"] == info["budget_bytes"] and "least loss" in choice["note"]
    assert info["probe"]["task_items"] > 0 and info["predicted_loss"] > 0 and info["measured_loss"] > 0
    # the frontier panel of the report: every GGUF, the unguided comparison and the budget's cut
    from edgeft.report import figure

    frontier = figure(json.loads((run / "manifest.json").read_text())).axes[7]
    texts = " ".join(t.get_text() for t in frontier.texts)
    assert "mixed (KL" in texts and "q4_k_m (no imatrix)" in texts and "budget" in texts

    # ~15% under Q4_K_M's size: still within the budget, every gate (Q4's task gates included) passes
    under = int(stock["outputs"][0]["bytes"] * 0.85)
    result, entries = _export("--run", str(run), "--quant", "f16,auto", "--budget", str(under), "--max-ppl-rise", "100",
                              "--overwrite")
    assert result.exit_code == 0, result.output
    small = next(e for e in entries[:-1] if e["inputs"]["quant"] == "mixed")
    assert small["outputs"][0]["bytes"] <= under and small["status"] == "ok"
    assert [g["passed"] for g in small["gates"]] == [True] * len(small["gates"]) and len(small["gates"]) == 3
    assert_header_names_bulk_type(path, small["metrics"]["mixed"]["recipe"])


def assert_header_names_bulk_type(path, recipe):
    """The header's file type is the type most of the recipe's quantized bytes are in (before, q8_0 whatever was
    chosen: `show`, llama-cli and Ollama printed Q8_0 for a mostly 4-bit file)."""
    import llama_cpp

    from edgeft.llamacpp import FILE_TYPE_OF

    reader = GGUFReader(path)
    held = {}
    for t in reader.tensors:
        ty = t.tensor_type.name.lower()
        if t.name in recipe and ty in FILE_TYPE_OF:
            held[ty] = held.get(ty, 0) + int(t.n_bytes)
    bulk = max(held, key=held.get)
    assert int(reader.fields["general.file_type"].parts[-1][0]) == getattr(llama_cpp, FILE_TYPE_OF[bulk]), bulk


def test_budget_is_refused_in_one_line_before_any_work(tiny_llama, tmp_path):
    common = ["export", "--model", str(tiny_llama), "--run", str(tmp_path / "r")]
    for args, needle in ((["--quant", "f16,q4_0", "--budget", "1MiB"], "--quant auto"),
                         (["--quant", "auto", "--budget", "lots"], "--budget lots"),
                         (["--quant", "auto", "--budget", "40bpw"], "between 1.5 and 16"),
                         (["--quant", "auto", "--budget", "device"], "--device")):
        assert_one_line_error(CliRunner().invoke(cli, common + args), needle)
    assert not (tmp_path / "r" / "gguf").exists()


@pytest.mark.slow
@needs_cross
def test_mixed_gguf_served_by_llama_server_and_smoked_on_the_emulated_board(tiny_adapter_run, board, tmp_path):
    """The mixed GGUF needs no edgeft code to run: the board build's llama-server (aarch64, under qemu behind the
    loopback sshd) serves it and answers as the host's llama.cpp does, and `smoke --emulate` passes its gates."""
    import socket

    from edgeft.devices import serve
    from edgeft.devices.ssh import Remote
    from edgeft.llamacpp import LlamaCpp
    from edgeft.models import load_tokenizer
    from edgeft.task import read_task_set

    run = tmp_path / "run"
    shutil.copytree(tiny_adapter_run, run)
    merge(MergeConfig(adapter=str(run), dtype="float32", window=128, stride=128))
    result, _ = _export("--run", str(run), "--quant", "f16,auto", "--budget", "q4_k_m", "--max-ppl-rise", "100")
    assert result.exit_code == 0, result.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = str(tmp_path / "board")
    ssh = ["--host", "board", "--ssh-config", board.config, "--dest", dest]
    remote = Remote("board", board.config)
    try:
        deployed = CliRunner().invoke(cli, ["deploy", str(run), "--device", "rpi5", "--emulate", "--quant", "mixed",
                                            "--serve", "--serve-port", str(port), *ssh])
        assert deployed.exit_code == 0, deployed.output
        item = read_task_set(run, load_tokenizer(run / "merged")).items[0]
        (path,) = (run / "gguf").glob("*-MIXED.gguf")
        host = LlamaCpp(path, n_ctx=256)
        want = host.generate(item.prompt, 16)[0]
        host.close()
        with remote.tunnel(port) as local:
            got = serve.Client(local).complete(item.prompt, 16, [])["tokens"]
        assert got[:8] == want[:8]
    finally:
        serve.stop(remote, port)
    smoked = CliRunner().invoke(cli, ["smoke", str(run), "--device", "rpi5", "--emulate", "--quant", "mixed",
                                      *ssh, "--json"])
    entry = json.loads((run / "manifest.json").read_text())["steps"][-1]
    assert entry["step"] == "smoke" and entry["inputs"]["quant"] == "mixed" and entry["inputs"]["mode"] == "emulated"
    assert_decided(smoked, entry)  # the perplexity gate passed; a random tiny model's answer decides the exit


def _tensor(name, layer, kind, errors, nbytes):
    from edgeft.export.mixed import Tensor

    t = Tensor(name, 64, 64, max(nbytes.values()), layer, kind, list(errors))
    t.error, t.bytes = dict(errors), dict(nbytes)
    return t


def test_allocation_is_the_least_predicted_loss_within_the_bytes():
    """The greedy walk along each tensor's convex hull against every assignment of a small case, over budgets."""
    import itertools

    from edgeft.export.mixed import _pad, allocate

    types = {"q4_0": 320, "q5_0": 384, "q8_0": 544, "f16": 1024}
    errors = [{"q4_0": 9.0, "q5_0": 2.5, "q8_0": 0.2, "f16": 0.0}, {"q4_0": 4.0, "q5_0": 1.0, "q8_0": 0.1, "f16": 0.0},
              {"q4_0": 20.0, "q5_0": 6.0, "q8_0": 0.5, "f16": 0.0}]
    tensors = [_tensor(f"blk.{i}.w.weight", f"blk.{i}", "w", e, types) for i, e in enumerate(errors)]
    scales = {t.name: s for t, s in zip(tensors, (1.0, 3.0, 0.5))}
    for budget in range(960, 3 * 1024 + 1, 32):
        chosen = allocate(tensors, scales, budget)
        used = sum(_pad(t.bytes[chosen[t.name]]) for t in tensors)
        loss = sum(scales[t.name] * t.error[chosen[t.name]] for t in tensors)
        best = min(sum(scales[t.name] * t.error[c] for t, c in zip(tensors, combo))
                   for combo in itertools.product(types, repeat=3)
                   if sum(_pad(types[c]) for c in combo) <= budget)
        assert used <= budget
        # the hull walk is the Lagrangian solution: optimal at the hull's corners, within one step between them
        assert loss <= best + max(scales[t.name] * (t.error["q4_0"] - t.error["q5_0"]) for t in tensors)
    with pytest.raises(Exception, match="--budget"):
        allocate(tensors, scales, 900)


def test_layer_and_kind_scales_are_recovered_from_the_probes():
    """Probe results made from known per-layer and per-kind scales give those scales back (up to the shared
    factor), and a deep model's neighbouring layers share a probe."""
    from edgeft.export.mixed import BASE_TYPE, PROBE_TYPE, fit_scales, probes_for

    layer_scale = [4.0, 1.0, 0.5, 2.0]
    kind_scale = {"attn_v": 3.0, "attn_q": 0.2, "ffn_down": 1.0}
    tensors = [_tensor(f"blk.{i}.{k}.weight", f"blk.{i}", k, {PROBE_TYPE: 1.0 + i + len(k), BASE_TYPE: 0.1},
                       {PROBE_TYPE: 320, BASE_TYPE: 544}) for i in range(4) for k in kind_scale]
    probes = probes_for(tensors)
    truth = {t.name: layer_scale[int(t.layer[4])] * kind_scale[t.kind] for t in tensors}
    for p in probes:
        p.kl = 0.01 + sum(truth[n] * (next(t for t in tensors if t.name == n).error[PROBE_TYPE] - 0.1)
                          for n in p.tensors)
    got = fit_scales(tensors, probes, iterations=200)
    ratio = [got[t.name] / truth[t.name] for t in tensors]
    assert max(ratio) / min(ratio) < 1.01

    deep = [_tensor(f"blk.{i}.attn_v.weight", f"blk.{i}", "attn_v", {PROBE_TYPE: 1.0, BASE_TYPE: 0.1},
                    {PROBE_TYPE: 320, BASE_TYPE: 544}) for i in range(30)]
    names = [p.name for p in probes_for(deep)]
    assert names[:3] == ["base", "blk.0-1", "blk.2-3"] and len(names) == 1 + 15 + 1


def test_task_answers_weigh_as_much_as_the_held_out_text():
    """Task answers are near-certain, so the same damage raises their KL ~10x less than the text's; unweighted,
    the demo's mixed recipe came out 0.14x Q4_K_M's held-out KL but 6.5x its task KL. The weight is what the
    probes raised the text by over what they raised the task by, so both count alike in the recipe's loss."""
    from edgeft.export.mixed import Probe, task_weight

    probes = [Probe("base", [], kl=0.004, task_kl=0.0002), Probe("blk.0", ["a"], kl=0.014, task_kl=0.0007),
              Probe("attn_v", ["b"], kl=0.064, task_kl=0.0037), Probe("blk.1", ["c"], kl=0.003, task_kl=0.0001)]
    weight = task_weight(probes)
    assert weight == pytest.approx((0.010 + 0.060) / (0.0005 + 0.0035))
    for p in probes:
        p.task_weight = weight
    assert probes[1].loss == pytest.approx(0.014 + weight * 0.0007)
    assert task_weight([Probe("base", [], kl=0.01), Probe("blk.0", ["a"], kl=0.02)]) == 1.0  # no task: text only


def test_probe_kl_is_the_mean_kl_of_the_whole_rows():
    """The probe reference keeps float32 log-probabilities and sums KL over blocks of positions: the same mean KL
    (to float32's precision) as one float64 pass over every row, text and task apart."""
    import numpy as np

    from edgeft.export.mixed import ProbeReference
    from edgeft.scoring import Piece

    rng = np.random.default_rng(0)

    class Fixed:
        def __init__(self, table):
            self.table = table

        def logits(self, ids):
            return self.table[: len(ids)]

    ref, other = Fixed(rng.normal(0, 3, (300, 50))), Fixed(rng.normal(0, 3, (300, 50)))
    pieces = [Piece(list(range(300)), tuple(range(1, 300))), Piece(list(range(40)), tuple(range(20, 40)))]
    got = ProbeReference(ref, pieces).kl(other, 1)

    def whole(piece):
        at = np.asarray(piece.targets) - 1
        a, b = (x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in (ref.table[at], other.table[at]))
        return (np.exp(a) * (a - b)).sum() / len(at)

    assert got == pytest.approx((whole(pieces[0]), whole(pieces[1])), rel=1e-5)


def test_budget_choice_ranks_by_the_loss_the_recipe_minimizes(tiny_llama, tmp_path):
    """--quant auto --budget ranks the candidates within the budget by held-out KL + the probes' task weight ×
    task-answer KL, the loss the mixed recipe was chosen to minimize. The candidates are the demo fine-tune's
    measured rows (2026-12-07): ranked by held-out KL alone, the choice was the mixed file, whose task-answer KL
    was 7.9× stock Q4_K_M's; with no task, KL alone still decides."""
    from edgeft.export.config import GGUFExportConfig
    from edgeft.export.gguf import choose_for_device
    from edgeft.run import Run

    def entry(quant, size, kl, task_kl, weight=None):
        e = {"inputs": {"quant": quant}, "status": "ok", "outputs": [{"path": f"gguf/{quant}.gguf", "bytes": size}],
             "metrics": {"kl_mean": kl}, "gates": [{"passed": True}], "perplexity": {"ppl": 15.0}}
        if task_kl is not None:
            e["task"] = {"kl_mean": task_kl, "ppl": 1.02, "exact_match": 1.0}
        if weight is not None:
            e["metrics"]["mixed"] = {"probe": {"task_weight": weight}}
        return e

    budget = 105_453_920
    c = GGUFExportConfig(budget=str(budget), quant=["auto"])
    with_task = [entry("q4_k_m", budget, 0.0297, 0.0054), entry("q5_0", 105_163_616, 0.0405, 0.0051),
                 entry("mixed", 105_426_272, 0.00464, 0.0427, weight=16.1)]
    choice, failure = choose_for_device(Run(tmp_path / "a"), c, None, tiny_llama, with_task, budget)
    assert failure is None and choice["metrics"]["chosen"] == "q4_k_m"
    rows = {r["quant"]: r for r in choice["metrics"]["candidates"]}
    assert rows["mixed"]["loss"] == pytest.approx(0.00464 + 16.1 * 0.0427) and rows["mixed"]["kl_mean"] < 0.0297
    assert "16.1 × task-answer KL" in choice["note"]
    no_task = [entry("q4_k_m", budget, 0.0297, None), entry("mixed", 105_426_272, 0.00464, None, weight=16.1)]
    choice, failure = choose_for_device(Run(tmp_path / "b"), c, None, tiny_llama, no_task, budget)
    assert failure is None and choice["metrics"]["chosen"] == "mixed" and "least KL" in choice["note"]
