"""BOS-aware perplexity: windows start with the model's BOS when its tokenizer adds one, in every backend, and
the figure is llama.cpp's own `llama-perplexity`'s when scored in that tool's chunking."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from edgeft.scoring import llama_perplexity_pieces, model_bos, score, score_pieces, text_pieces, windows

from .tiny_models import bpe_tokenizer, docs_text, spm_tokenizer, tiny_model


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory) -> Path:
    """A Llama 2 style SentencePiece tokenizer: it adds <s> (id 1) to every text, as Llama 2, Gemma and Llama 3
    tokenizers add theirs."""
    return spm_tokenizer(tmp_path_factory.mktemp("spm-llama2"), "llama2")


@pytest.fixture(scope="module")
def tiny_bos_llama(bos_tokenizer, tmp_path_factory) -> Path:
    return tiny_model("llama", tmp_path_factory.mktemp("tiny-bos-llama"), bos_tokenizer)


@pytest.mark.parametrize("n,window,stride", [(2, 2, 2), (10, 4, 4), (10, 4, 1), (1000, 512, 512), (1000, 512, 128),
                                             (511, 512, 512), (512, 512, 512), (7, 16, 16), (300, 128, 128)])
def test_bos_windows_score_every_id_once_within_the_window(n, window, stride):
    ids = list(range(1000, 1000 + n))
    pieces = text_pieces(ids, window, stride, bos=7)
    scored = []
    for p in pieces:
        assert p.ids[0] == 7 and len(p.ids) <= window  # the BOS takes one of the window's positions
        assert 0 not in p.targets  # BOS is context, never a target
        scored += [p.ids[t] for t in p.targets]
    assert scored == ids  # every id once, the first included (BOS is its context)
    assert len(pieces) == len(windows(n, window, stride, bos=True))


def test_without_bos_the_plan_is_unchanged():
    """A tokenizer that adds no BOS (the default model) scores exactly the windows it scored before."""
    ids = list(range(100, 1300))
    for window, stride in ((512, 512), (256, 128), (128, 128)):
        old = [(w.begin, w.end, w.score_from) for w in windows(len(ids), window, stride)]
        assert [(w.begin, w.end, w.score_from) for w in windows(len(ids), window, stride, bos=False)] == old
        pieces = text_pieces(ids, window, stride, None)
        assert [p.ids for p in pieces] == [ids[b:e] for b, e, _ in old]
        assert [p.targets for p in pieces] == [tuple(range(s - b, e - b)) for b, e, s in old]


def test_model_bos_follows_what_the_tokenizer_adds(bos_tokenizer, tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    assert model_bos(AutoTokenizer.from_pretrained(bos_tokenizer)) == 1
    llama3 = AutoTokenizer.from_pretrained(bpe_tokenizer(tmp_path / "llama3", "llama3"))
    assert model_bos(llama3) == llama3.convert_tokens_to_ids("<|begin_of_text|>")
    # SmolLM-style (the default model's kind): a BOS token may be named, but none is added
    assert model_bos(AutoTokenizer.from_pretrained(tiny_tokenizer)) is None


def test_llama_perplexity_chunking():
    """The tool's plan: BOS + ids cut in n_ctx chunks, each chunk's first token overwritten by BOS, the tokens
    after position n_ctx // 2 scored."""
    ids = list(range(10, 10 + 40))
    pieces = llama_perplexity_pieces(ids, 16, bos=1)
    assert len(pieces) == 41 // 16 == 2
    assert pieces[0].ids == [1] + ids[:15] and pieces[1].ids == [1] + ids[16:31]
    assert pieces[0].targets == tuple(range(9, 16))
    assert [p.ids for p in llama_perplexity_pieces(ids, 16, None)] == [ids[:16], ids[16:32]]


def test_rows_without_a_template_start_with_the_bos_the_tokenizer_adds(bos_tokenizer, tiny_tokenizer):
    from transformers import AutoTokenizer

    from edgeft.dataset import IGNORE, render

    tok = AutoTokenizer.from_pretrained(bos_tokenizer)
    tok.chat_template = None

    def plain_ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    ids, labels = render(tok, {"text": "The with statement"})
    assert ids == [1] + plain_ids("The with statement") + [tok.eos_token_id]
    assert labels == [IGNORE] + ids[1:]  # BOS is context, never a target
    ids, labels = render(tok, {"prompt": "Say hi", "completion": "hi"})
    assert ids == [1] + plain_ids("Say hi\n") + plain_ids("hi") + [tok.eos_token_id]
    assert labels[:len(plain_ids("Say hi\n")) + 1] == [IGNORE] * (len(plain_ids("Say hi\n")) + 1)
    plain = AutoTokenizer.from_pretrained(tiny_tokenizer)
    plain.chat_template = None
    ids, labels = render(plain, {"text": "The with statement"})
    assert ids == plain("The with statement", add_special_tokens=False)["input_ids"] + [plain.eos_token_id]
    assert labels == ids


def test_task_prompts_without_a_template_start_with_bos(bos_tokenizer):
    from transformers import AutoTokenizer

    from edgeft.dataset import Example, render
    from edgeft.task import build_task_set

    tok = AutoTokenizer.from_pretrained(bos_tokenizer)
    tok.chat_template = None
    row = {"prompt": "What is 2+2?", "completion": "4"}
    task = build_task_set(tok, [Example(*render(tok, row), 1, row)], "test")
    assert task.items[0].prompt[0] == 1 and task.items[0].ids[0] == 1 and 0 not in task.items[0].targets


def test_eval_tokens_record_the_bos_and_an_older_run_gets_it(bos_tokenizer, tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from edgeft.heldout import eval_tokens
    from edgeft.run import TOKENS_FILE

    tok = AutoTokenizer.from_pretrained(bos_tokenizer)
    run = tmp_path / "run"
    run.mkdir()
    tokens = eval_tokens(tok, None, 300, run)
    assert tokens.bos == 1 and 1 not in tokens.ids[:1]
    stored = json.loads((run / TOKENS_FILE).read_text())
    assert stored["bos"] == 1
    del stored["bos"]  # a run from before BOS-aware scoring
    (run / TOKENS_FILE).write_text(json.dumps(stored))
    assert eval_tokens(tok, None, 300, run).bos == 1
    assert json.loads((run / TOKENS_FILE).read_text())["bos"] == 1
    # no BOS: an older run's file is read and left as it was
    plain, other = AutoTokenizer.from_pretrained(tiny_tokenizer), tmp_path / "other"
    other.mkdir()
    eval_tokens(plain, None, 300, other)
    old = json.loads((other / TOKENS_FILE).read_text())
    assert old["bos"] is None
    del old["bos"]
    (other / TOKENS_FILE).write_text(json.dumps(old))
    before = (other / TOKENS_FILE).read_bytes()
    assert eval_tokens(plain, None, 300, other).bos is None
    assert (other / TOKENS_FILE).read_bytes() == before


def _entry(step: str, ppl: float, ref: float | None = None, bos: bool | None = None) -> dict:
    conv = {} if bos is None else {"bos": bos}
    e = {"step": step, "status": "ok", "config": {}, "inputs": {}, "metrics": {}, "outputs": [],
         "perplexity": {"ppl": ppl, "tokens": 100, "model": step, **conv}}
    if ref is not None:
        e["reference"] = {"ppl": ref, "tokens": 100, "model": "base", "label": "base", **conv}
    return e


def test_show_and_report_mark_rows_scored_under_the_old_convention(tmp_path):
    from click.testing import CliRunner

    import io

    from rich.console import Console

    from edgeft.cli import cli, ledger_table
    from edgeft.tables import ledger_rows
    from edgeft.report import _ledger_table

    # A BOS model's run: train measured before BOS-aware scoring (no key), merge after it (bos: true).
    manifest = {"steps": [_entry("train", 40.0, ref=30.0), _entry("merge", 16.0, ref=15.0, bos=True),
                          _entry("eval", 15.5, bos=True)]}
    rows = ledger_rows(manifest)
    assert [(r["step"], r["bos"], r["comparable"]) for r in rows] == [
        ("train", False, False), ("train", False, False), ("merge", True, True), ("merge", True, True),
        ("eval", True, True)]
    assert rows[1]["reason"].startswith("not comparable: scored without the model's BOS")
    # Δ never reaches across the conventions: eval (no reference) is against the first BOS row, not train's base
    assert rows[4]["delta_pct"] == round(100 * (15.5 / 15.0 - 1), 2)
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"run": str(run), **manifest}))
    result = CliRunner().invoke(cli, ["show", str(run)])
    assert result.exit_code == 0 and "BOS" in result.output, result.output
    wide = Console(width=250, record=True, file=io.StringIO())
    wide.print(ledger_table(manifest, "ledger"))
    shown = wide.export_text()
    assert shown.count("train (no BOS)") == 2 and "merge (" not in shown and "eval (" not in shown
    assert "train (no BOS)" in _ledger_table(manifest)
    # The default model adds no BOS: its old entries (no key) and new ones (bos: false) are one convention.
    same = ledger_rows({"steps": [_entry("train", 15.2, ref=14.9), _entry("merge", 15.2, ref=15.2, bos=False)]})
    assert all(r["comparable"] for r in same) and not any(r["reason"] for r in same)


def test_torch_scores_bos_windows_as_transformers_scores_a_bos_prompt(tiny_bos_llama):
    """One window with BOS: the perplexity of the ids is transformers' loss on the tokenized text, BOS and
    all (its labels at the BOS are never predicted)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeft.scoring import torch_logits_fn

    tok = AutoTokenizer.from_pretrained(tiny_bos_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_bos_llama, dtype="float32").eval()
    text = docs_text()[:400]
    with_bos = tok(text)["input_ids"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert with_bos == [1] + ids
    result = score(ids, torch_logits_fn(model), window=len(ids) + 1, stride=len(ids) + 1, bos=model_bos(tok))
    with torch.no_grad():
        loss = model(torch.tensor([with_bos]), labels=torch.tensor([with_bos])).loss.item()
    assert result.tokens == len(ids) and result.windows == 1 and result.bos
    assert result.ppl == pytest.approx(math.exp(loss), rel=1e-5)


# --------------------------------------------------------------------------------- llama.cpp's own tool
N_CTX = 64  # small chunks: position 0 (BOS or not) weighs more in each scored token's context


def _llama_perplexity(tool: Path, gguf: Path, text: Path) -> float:
    proc = subprocess.run([str(tool), "-m", str(gguf), "-f", str(text), "-c", str(N_CTX), "-b", str(N_CTX),
                           "-t", "2", "--seed", "0"], capture_output=True, text=True, timeout=600)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr)
    assert proc.returncode == 0 and found, (proc.stdout + proc.stderr)[-2000:]
    return float(found.group(1))


def _board_perplexity(board: Path, gguf: Path, ids: list[int], window: int, tmp: Path) -> dict:
    (tmp / "ids.txt").write_text(" ".join(map(str, ids)))
    proc = subprocess.run([str(board), "perplexity", str(gguf), str(tmp / "ids.txt"), str(window), str(window), "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["adds BOS", "adds none"])
def test_scoring_reproduces_llama_perplexity_and_every_backend_agrees(which, tiny_bos_llama, tiny_llama, tmp_path):
    """llama.cpp's llama-perplexity (built from the vendored source, x86-64-native, cached in EDGEFT_HOME/builds:
    a cold build takes minutes) on a GGUF written by edgeft's converter, against our scoring in the tool's
    chunking through torch and through llama.cpp: within 0.1%, for a tokenizer that adds BOS and one that does
    not. Then our own plan (BOS windows) through torch, the llama.cpp binding and edgeft-board agree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeft.devices.build import tools
    from edgeft.converters.hf_to_gguf import convert
    from edgeft.errors import EdgeftError
    from edgeft.devices.target import board_perplexity
    from edgeft.llamacpp import LlamaCpp
    from edgeft.scoring import torch_logits_fn

    folder = tiny_bos_llama if which == "adds BOS" else tiny_llama
    tok = AutoTokenizer.from_pretrained(folder)
    bos = model_bos(tok)
    assert (bos is not None) == (which == "adds BOS")
    gguf = tmp_path / "model-f32.gguf"
    convert(folder, gguf, "f32")
    text = tmp_path / "text.txt"
    text.write_text(docs_text()[:6000], encoding="utf-8")
    ids = tok(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    assert len(ids) >= 2 * N_CTX + 1

    bin_dir = tools("x86-64-native", ("llama-perplexity", "edgeft-board"))
    reference = _llama_perplexity(bin_dir / "llama-perplexity", gguf, text)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    cpp = LlamaCpp(gguf, n_ctx=max(N_CTX, 128), threads=2, trusted=True)
    try:
        assert cpp.bos == bos  # the GGUF's add_bos_token, as the tool and the board read it
        assert cpp.tokenize(text.read_text(encoding="utf-8")) == ids  # the tool scores the same ids
        pieces = llama_perplexity_pieces(ids, N_CTX, bos)
        on_torch = score_pieces(pieces, torch_logits_fn(model))
        on_cpp = score_pieces(pieces, cpp.logits, backend="llama.cpp")
        figures = {"llama-perplexity": reference, "torch": on_torch.ppl, "llama.cpp": on_cpp.ppl}
        print(f"\n{which}: {figures}")
        for name, value in figures.items():
            assert value == pytest.approx(reference, rel=1e-3), (name, figures)
        if bos is not None:
            # The check can fail: the same chunking without the BOS is far off the tool's figure.
            without = score_pieces(llama_perplexity_pieces(ids, N_CTX, None), cpp.logits).ppl
            assert abs(without / reference - 1) > 5e-3, (without, reference)

        # Our own plan: windows of N_CTX positions, BOS first when the tokenizer adds it.
        own_torch = score(ids, torch_logits_fn(model), window=N_CTX, stride=N_CTX, bos=bos)
        own_cpp = score(ids, cpp.logits, window=N_CTX, stride=N_CTX, bos=bos, backend="llama.cpp", per_token=True)
    finally:
        cpp.close()
    board = _board_perplexity(bin_dir / "edgeft-board", gguf, ids, N_CTX, tmp_path)
    print(f"own plan: torch {own_torch.ppl} llama.cpp {own_cpp.ppl} edgeft-board {board['ppl']} "
          f"({own_torch.tokens} tokens, {own_torch.windows} windows)")
    assert board["bos"] == (-1 if bos is None else bos)
    assert board["tokens"] == own_cpp.tokens == own_torch.tokens == (len(ids) if bos is not None else
                                                                     len(ids) - own_torch.windows)
    assert own_cpp.ppl == pytest.approx(own_torch.ppl, rel=1e-3)
    assert board["ppl"] == pytest.approx(own_cpp.ppl, rel=1e-3)
    # smoke reads the board's output against the host's: the same convention, or one line naming it
    assert board_perplexity(board, own_cpp, "board").bos == (bos is not None)
    with pytest.raises(EdgeftError, match="BOS"):
        board_perplexity({**board, "bos": -1 if bos is not None else 0}, own_cpp, "board")


def test_export_of_a_bos_model_scores_with_bos_and_records_it(tiny_bos_llama, tmp_path):
    """The whole export on a BOS-adding model: the GGUF says add_bos like the tokenizer, F16 within 0.1% of HF
    with BOS windows on both, and every perplexity in the ledger says bos: true."""
    from click.testing import CliRunner

    from edgeft.cli import cli
    from edgeft.run import TOKENS_FILE

    from .conftest import WINDOW

    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["export", "--model", str(tiny_bos_llama), "--quant", "f16", "--run", str(run),
                                      *WINDOW])
    assert result.exit_code == 0, result.output
    tokens = json.loads((run / TOKENS_FILE).read_text())
    assert tokens["bos"] == 1 and tokens["ids"][0] != 1
    entry = json.loads((run / "manifest.json").read_text())["steps"][-1]
    assert entry["metrics"]["tokenizer_parity"]["bos"] == {"hf": 1, "gguf": 1}
    assert entry["perplexity"]["bos"] is True and entry["reference"]["bos"] is True
    assert entry["perplexity"]["tokens"] == len(tokens["ids"])  # BOS windows score every id


def test_the_sample_prompt_of_a_base_model_is_its_training_rows_prompt(bos_tokenizer, tiny_tokenizer):
    """Without a chat template, the fixed prompt every artifact and board is asked is rendered as train rendered
    the rows: the tokenizer's BOS (when it adds one), then the prompt turn and a newline."""
    from transformers import AutoTokenizer

    from edgeft.dataset import IGNORE, render
    from edgeft.prompt import CHAT_PROMPT, prompt_ids

    for folder in (bos_tokenizer, tiny_tokenizer):
        tok = AutoTokenizer.from_pretrained(folder)
        tok.chat_template = None
        ids, labels = render(tok, {"prompt": CHAT_PROMPT[-1]["content"], "completion": "Paris"})
        trained_prompt = ids[:labels.index(next(x for x in labels if x != IGNORE))]
        assert prompt_ids(tok) == trained_prompt
