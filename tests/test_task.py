"""The fine-tune's task, one definition for every backend: the stored task set, task perplexity, answers."""

import json
import math

import torch

from edgeft.batches import collate, loss_sum
from edgeft.dataset import IGNORE, load_examples
from edgeft.models import load_model, load_tokenizer
from edgeft.scoring import score_pieces, torch_logits_fn
from edgeft.task import (TaskSet, build_task_set, judge, judge_answers, read_task_set,
                         store_task_set)
from edgeft.dataset import demo_data_path


def _task(tiny_llama, n=6):
    tok = load_tokenizer(tiny_llama)
    examples = load_examples(demo_data_path(), tok, 1024, strict=True)[0][:n]
    return tok, examples, build_task_set(tok, examples, "demo rows")


def test_the_task_set_holds_the_trained_answer_positions_and_the_inference_prompt(tiny_llama, tmp_path):
    tok, examples, task = _task(tiny_llama)
    assert task.kind == "json" and len(task.items) == 6
    for e, item in zip(examples, task.items):
        assert item.ids == e.input_ids
        assert item.targets == [t for t in range(1, len(e.labels)) if e.labels[t] != IGNORE]
        assert tok.decode([e.input_ids[t] for t in item.targets]) == e.row["completion"] + "<|im_end|>\n"
        rendered = tok.apply_chat_template([{"role": "user", "content": e.row["prompt"]}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
        assert item.prompt == list(rendered) and item.expected == e.row["completion"]
    store_task_set(tmp_path, task)
    again = read_task_set(tmp_path, tok)
    assert isinstance(again, TaskSet) and again.items == task.items


def test_task_perplexity_is_the_training_loss_on_the_answers(tiny_llama):
    """The same number as the loss training minimises (labelled tokens, prompt as context)."""
    tok, examples, task = _task(tiny_llama)
    model = load_model(tiny_llama, "float32").eval()
    ppl = score_pieces(task.pieces(), torch_logits_fn(model))
    with torch.no_grad():
        total, n = loss_sum(model, collate(examples, tok.pad_token_id, "cpu"))
    assert ppl.tokens == n
    assert math.isclose(ppl.ppl, math.exp(float(total) / n), rel_tol=1e-5)


def test_json_answers_are_judged_as_json_with_field_accuracy():
    want = json.dumps({"who": "Chen", "where": "Graz", "when": 1962})
    assert judge('{"when": 1962, "who": "Chen",   "where": "Graz"}', want, "json") == (True, 1.0)
    exact, fields = judge('{"who": "Chen", "where": "Oslo", "when": 1962}', want, "json")
    assert not exact and math.isclose(fields, 2 / 3)
    assert judge("Chen, Graz, 1962", want, "json") == (False, 0.0)
    assert judge(" Paris ", "Paris", "text") == (True, None)


def test_answers_from_any_backend_are_judged_alike(tiny_llama):
    tok, _, task = _task(tiny_llama, n=3)
    right = tok(task.items[0].expected, add_special_tokens=False)["input_ids"]
    wrong = tok('{"who": "X", "where": "Graz", "when": 1}', add_special_tokens=False)["input_ids"]
    rate, fields, answered, samples = judge_answers(task, [right, wrong], tok)
    assert answered == 2 and rate == 0.5 and 0 < fields < 1
    assert samples[0]["ok"] and not samples[1]["ok"]
