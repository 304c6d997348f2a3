"""`edgeft chat`: a GGUF through llama.cpp and a model folder through transformers, one answer or a conversation,
each turn rendered with the HF chat template and sent as ids; what a run means; one-line refusals."""

import json
import shutil

from click.testing import CliRunner
from transformers import AutoTokenizer

from edgeft.chat import ChatConfig, chat
from edgeft.cli import cli

from .conftest import assert_one_line_error


def turns(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.strip().splitlines()]


def hf_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def test_chat_gguf_answers_one_prompt_with_the_hf_template(tiny_export_run, tiny_llama):
    (gguf,) = (tiny_export_run / "gguf").glob("*-F16.gguf")  # its tokenizer: found through the run's ledger
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    args = ["chat", str(gguf), "--prompt", "What is the capital of France?", "--max-tokens", "12"]
    (turn,) = turns(CliRunner().invoke(cli, [*args, "--json"]))
    # the template's default system prompt is in the ids llama.cpp was given: no template guessed from the GGUF
    assert turn["prompt_ids"] == hf_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])
    assert "You are a small test model." in tok.decode(turn["prompt_ids"])
    assert 1 <= turn["answer_tokens"] <= 12 and turn["answer"] == tok.decode(turn["answer_ids"],
                                                                              skip_special_tokens=True)
    plain = CliRunner().invoke(cli, args)
    assert plain.exit_code == 0 and plain.stdout == turn["answer"] + "\n"  # one answer, greedy: the same one


def test_chat_conversation_keeps_the_history_on_llama_cpp(tiny_export_run, tiny_llama):
    """A RUN with --quant: that GGUF. Lines from stdin are turns until /exit; turn 2's ids hold turn 1."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    result = CliRunner().invoke(cli, ["chat", str(tiny_export_run), "--quant", "q8_0", "--max-tokens", "8", "--json"],
                                input="Name a prime number.\n\nAnd a larger one?\n/exit\nnever asked\n")
    first, second = turns(result)
    assert [first["user"], second["user"]] == ["Name a prime number.", "And a larger one?"]
    history = [{"role": "user", "content": first["user"]}, {"role": "assistant", "content": first["answer"]},
               {"role": "user", "content": second["user"]}]
    assert second["prompt_ids"] == hf_ids(tok, history)
    asked = len(tok.apply_chat_template(history[:1], return_dict=True)["input_ids"])
    assert second["prompt_ids"][:asked] == first["prompt_ids"][:asked]  # turn 1 as it was sent, then its answer
    assert first["answer"] in tok.decode(second["prompt_ids"]) and "never asked" not in result.output
    library = chat(ChatConfig(model=str(tiny_export_run), quant="q8_0", prompt="Name a prime number.", max_tokens=8))
    assert library.backend == "llama.cpp" and library.model.name.endswith("-Q8_0.gguf")
    assert library.turns[0].answer_ids == first["answer_ids"]


def test_chat_model_folder_and_adapter_run_through_transformers(tiny_llama, tiny_adapter_run):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    result = CliRunner().invoke(cli, ["chat", str(tiny_llama), "--system", "Be brief.", "--max-tokens", "6", "--json"],
                                input="Hi there\nWhat now?\n")
    first, second = turns(result)
    assert first["answer_tokens"] >= 1 and second["answer_tokens"] >= 1
    system = [{"role": "system", "content": "Be brief."}]
    assert first["prompt_ids"] == hf_ids(tok, [*system, {"role": "user", "content": "Hi there"}])
    assert second["prompt_ids"] == hf_ids(tok, [*system, {"role": "user", "content": "Hi there"},
                                                {"role": "assistant", "content": first["answer"]},
                                                {"role": "user", "content": "What now?"}])
    assert "You are a small test model." not in tok.decode(second["prompt_ids"])  # --system replaces the default
    # a run trained but not merged: its base with the adapter applied
    trained = chat(ChatConfig(model=str(tiny_adapter_run), prompt="Hi there", max_tokens=6))
    assert trained.backend == "transformers" and trained.model == tiny_llama
    assert trained.turns[0].prompt_ids == hf_ids(tok, [{"role": "user", "content": "Hi there"}])


def test_chat_refuses_what_it_cannot_talk_to(tmp_path, tiny_llama, tiny_export_run):
    run = CliRunner()
    assert_one_line_error(run.invoke(cli, ["chat", str(tmp_path / "nowhere"), "--prompt", "hi"]), "no such run")
    assert_one_line_error(run.invoke(cli, ["chat", str(tmp_path / "x.gguf"), "--prompt", "hi"]), "no such GGUF")
    assert_one_line_error(run.invoke(cli, ["chat", str(tiny_llama), "--quant", "q8_0", "--prompt", "hi"]),
                          "--quant", "not a run folder")
    assert_one_line_error(run.invoke(cli, ["chat", str(tiny_export_run), "--quant", "q2_k", "--prompt", "hi"]),
                          "--quant q2_k", "have: f16, q8_0")
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"edgeft_version": "0", "created": "now", "steps": []}))
    assert_one_line_error(run.invoke(cli, ["chat", str(empty), "--prompt", "hi"]), "nothing to chat with")
    lone = tmp_path / "lone.gguf"
    shutil.copy(next((tiny_export_run / "gguf").glob("*-F16.gguf")), lone)
    assert_one_line_error(run.invoke(cli, ["chat", str(lone), "--prompt", "hi"]), "--tokenizer")
    assert_one_line_error(run.invoke(cli, ["chat", str(tiny_llama), "--max-tokens", "0", "--prompt", "hi"]),
                          "--max-tokens 0")
