"""The fine-tune's own task, measured the same way on every backend: task perplexity and exact answers.

The task set is the held-out split of the training data (or a task file given to `edgeft eval --data`),
tokenized once with the model's tokenizer and stored in the run (task_tokens.json) beside the held-out
text's ids, so that torch, llama.cpp, onnxruntime and the board all score exactly the same ids:
  - task perplexity: the perplexity of the answers' tokens (the positions training put a loss on), each
    example one piece with its prompt as context (scoring.score_pieces, the one definition);
  - exact answers: a greedy answer to each example's prompt (the conversation before its last answer,
    rendered with the model's own chat template and the generation prompt, sent to every backend as ids:
    no backend guesses the template), compared with the expected answer. Where every expected answer is
    a JSON object, answers are compared as JSON and the share of correct fields is recorded too.
The ids start with the BOS the model is prompted with: the template's own, or for rows rendered without a
template the one the tokenizer adds (dataset.render), so no backend adds another.

"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .atomic import write_json
from .dataset import IGNORE, Example, as_messages, tools_of
from .errors import EdgeftError
from .run import Run
from .scoring import PerplexityResult, Piece, score_pieces

MAX_NEW_TOKENS = 64  # no held-out answer is longer in practice; a longer one is cut (and so not exact)


@dataclass
class TaskItem:
    ids: list[int]  # the example as trained: prompt and answer(s)
    targets: list[int]  # positions in ids whose token carries a loss (the answers)
    prompt: list[int]  # the generation prompt of the last answer ([] for plain-text rows)
    expected: str  # the last answer's text
    # The conversation before the last answer (and its tools), for backends that take a chat rather than ids:
    # a server's /v1/chat/completions renders it with the template inside the GGUF. None in older task files.
    messages: list[dict] | None = None
    tools: list[dict] | None = None

    def piece(self) -> Piece:
        return Piece(self.ids, tuple(self.targets))


@dataclass
class TaskSet:
    items: list[TaskItem]
    source: str
    tokenizer_sha256: str
    kind: str  # "json": every expected answer is a JSON object (compared as JSON); "text": compared as text

    def pieces(self, limit: int | None = None) -> list[Piece]:
        return [i.piece() for i in self.items[:limit]]

    @property
    def longest(self) -> int:
        """The context a backend needs: the longest example, or prompt + answer budget."""
        return max([len(i.ids) for i in self.items] + [len(i.prompt) + MAX_NEW_TOKENS for i in self.items])

    def to_json(self) -> dict:
        return {"source": self.source, "tokenizer_sha256": self.tokenizer_sha256, "kind": self.kind,
                "items": [asdict(i) for i in self.items]}

    @classmethod
    def from_json(cls, d: dict) -> "TaskSet":
        def chat(i: dict, key: str):  # optional, and a run folder can come from anywhere: only lists of objects
            value = i.get(key)
            return value if isinstance(value, list) and all(isinstance(m, dict) for m in value) else None

        return cls(items=[TaskItem(i["ids"], i["targets"], i["prompt"], i["expected"], chat(i, "messages"),
                                   chat(i, "tools")) for i in d["items"]],
                   source=d["source"],
                   tokenizer_sha256=d["tokenizer_sha256"], kind=d["kind"])

    @classmethod
    def read(cls, path: Path) -> "TaskSet":
        """A run's stored task set, checked: every backend will index its vocabulary with these ids."""
        from .inputs import read_json, token_ids

        fix = "restore it, or use a new --run"
        d = read_json(path, fix)
        items = d.get("items")
        if not (isinstance(items, list) and all(isinstance(i, dict) and all(token_ids(i.get(k)) for k in
                                                                            ("ids", "targets", "prompt"))
                                                and isinstance(i.get("expected"), str)
                                                and all(0 < t < len(i["ids"]) for t in i["targets"]) for i in items)
                and all(isinstance(d.get(k), str) for k in ("source", "tokenizer_sha256", "kind"))):
            raise EdgeftError(f"{path}: not an edgeft task file (items of ids, targets, prompt, expected); {fix}")
        return cls.from_json(d)


def _as_json_object(text: str):
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _prompt_ids(tokenizer, example: Example, messages: list[dict] | None) -> tuple[list[int], str]:
    """The generation prompt of the last answer and its text; `messages`: the example's row as a chat."""
    if not _answerable(messages):
        return [], ""  # no text answer to compare (a last turn that calls a tool is scored by perplexity only)
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                            return_dict=True, tools=tools_of(example.row))["input_ids"]
    else:  # no template: training joined prompt and answer plainly; the prompt is everything before the answer
        first = next(i for i, lab in enumerate(example.labels) if lab != IGNORE)
        ids = example.input_ids[:first]
    return list(ids), messages[-1]["content"]


def _answerable(messages: list[dict] | None) -> bool:
    return bool(messages) and messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")


def build_task_set(tokenizer, examples: list[Example], source: str) -> TaskSet | None:
    from .heldout import tokenizer_sha256

    if not examples:
        return None
    items = []
    for e in examples:
        messages = as_messages(e.row)
        prompt, expected = _prompt_ids(tokenizer, e, messages)
        targets = [t for t in range(1, len(e.input_ids)) if e.labels[t] != IGNORE]
        chat = prompt and tokenizer.chat_template and _answerable(messages)
        items.append(TaskItem(ids=list(e.input_ids), targets=targets, prompt=prompt, expected=expected,
                              messages=messages[:-1] if chat else None, tools=tools_of(e.row) if chat else None))
    answers = [i.expected for i in items if i.prompt]
    kind = "json" if answers and all(_as_json_object(a) is not None for a in answers) else "text"
    return TaskSet(items=items, source=source, tokenizer_sha256=tokenizer_sha256(tokenizer), kind=kind)


def read_task_set(run_dir: Path | None, tokenizer=None) -> TaskSet | None:
    """The run's task set, or None when the run has none (no training data, no --data)."""
    path = Run(run_dir).task_set if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    task = TaskSet.read(path)
    if tokenizer is not None:
        from .heldout import tokenizer_sha256

        if task.tokenizer_sha256 != tokenizer_sha256(tokenizer):
            raise EdgeftError(f"{path}: this run's task ids were made with another tokenizer; use a new --run for a "
                              f"model with a different tokenizer")
    return task


def store_task_set(run_dir: Path, task: TaskSet) -> TaskSet:
    write_json(Run(run_dir).task_set, task.to_json())
    return task


# --------------------------------------------------------------------------------------------- answers
def judge(got: str, expected: str, kind: str) -> tuple[bool, float | None]:
    """(exact, share of correct fields or None). JSON answers are compared as JSON: whitespace and key order
    do not matter, a missing or wrong field does."""
    if kind != "json":
        return got.strip() == expected.strip(), None
    want, have = _as_json_object(expected), _as_json_object(got)
    if have is None:
        return False, 0.0
    fields = sum(have.get(k) == v for k, v in want.items()) / max(len(want), 1)
    return have == want, fields


def answer_budget(tokenizer, expected: str) -> int:
    """New tokens to generate: an answer that has not ended well past the expected one's length cannot
    equal it (a rambling model would otherwise cost the whole budget per prompt)."""
    return min(MAX_NEW_TOKENS, 2 * len(tokenizer(expected, add_special_tokens=False)["input_ids"]) + 8)


@dataclass
class TaskScore:
    ppl: PerplexityResult | None
    exact_match: float | None
    field_accuracy: float | None
    answered: int
    samples: list[dict] = field(default_factory=list)
    items: int = 0  # examples scored (fewer than the set's when a subset was asked for)
    of: int = 0  # examples in the task set

    def entry(self, model: str, source: str) -> dict:
        """The ledger form."""
        out = {"model": model, "source": source, "items": self.items, "of": self.of,
               "exact_match": self.exact_match, "field_accuracy": self.field_accuracy, "answered": self.answered,
               "samples": self.samples}
        if self.ppl is not None:
            out.update(ppl=self.ppl.ppl, nll_sum=self.ppl.nll_sum, tokens=self.ppl.tokens, backend=self.ppl.backend)
        return out

    @classmethod
    def from_entry(cls, entry: dict) -> "TaskScore":
        """Back from the ledger form (a reused measurement, see reuse.py)."""
        return cls(ppl=PerplexityResult.from_entry(entry) if entry.get("ppl") is not None else None,
                   exact_match=entry.get("exact_match"), field_accuracy=entry.get("field_accuracy"),
                   answered=entry.get("answered", 0), samples=list(entry.get("samples") or []),
                   items=entry.get("items", 0), of=entry.get("of", 0))

    @property
    def loss(self) -> float | None:
        """Mean NLL per answer token: the task eval loss."""
        return math.log(self.ppl.ppl) if self.ppl else None

    def record(self, entry: dict, model: str, source: str, reference: dict | None = None,
               reference_label: str = "") -> dict:
        """Write the task result into a ledger entry, with its changes against the step's reference (a
        task entry, e.g. the unquantized GGUF's for a quant) when there is one."""
        out = self.entry(model, source)
        if reference:
            out["reference"] = {"label": reference_label, **{k: reference.get(k) for k in (
                "model", "ppl", "exact_match", "field_accuracy", "items")}}
            out.update(changes(out, reference))
        entry["task"] = out
        return out


def changes(now: dict, reference: dict) -> dict:
    """Task perplexity change (relative) and exact-match change (absolute, in rate) vs a reference entry."""
    out = {"ppl_change": None, "exact_match_change": None}
    if now.get("ppl") and reference.get("ppl"):
        out["ppl_change"] = round(now["ppl"] / reference["ppl"] - 1, 6)
    if now.get("exact_match") is not None and reference.get("exact_match") is not None:
        out["exact_match_change"] = round(now["exact_match"] - reference["exact_match"], 6)
    return out


def prompts(task: TaskSet, limit: int | None = None) -> list[TaskItem]:
    """The examples that have a prompt to answer (chat rows), the first `limit` of them."""
    return [i for i in task.items if i.prompt][:limit]


def judge_answers(task: TaskSet, outputs: list[list[int]], tokenizer
                  ) -> tuple[float | None, float | None, int, list[dict]]:
    """(exact-match rate, field accuracy, answered, a few samples) for greedy answers (new ids) to the first
    len(outputs) prompts, however they were generated."""
    pairs = prompts(task, len(outputs))
    if not pairs:
        return None, None, 0, []
    hits, fields, samples = 0, [], []
    for item, ids in zip(pairs, outputs):
        got = tokenizer.decode(ids, skip_special_tokens=True)
        exact, share = judge(got, item.expected, task.kind)
        hits += exact
        if share is not None:
            fields.append(share)
        if len(samples) < 3:
            samples.append({"expected": item.expected, "got": got, "ok": exact})
    return hits / len(pairs), (sum(fields) / len(fields) if fields else None), len(pairs), samples


def answers(task: TaskSet, generate: Callable[[list[int], int], list[int]], tokenizer, limit: int,
            progress: Callable[[int, int], None] | None = None) -> tuple[float | None, float | None, int, list[dict]]:
    """judge_answers on greedy answers to the first `limit` prompts; `generate(prompt_ids, max_new)` returns
    the new ids, stopping at end of generation. `progress(done, total)` after each answer."""
    items = prompts(task, limit)
    outputs = []
    for item in items:
        outputs.append(generate(item.prompt, answer_budget(tokenizer, item.expected)))
        if progress:
            progress(len(outputs), len(items))
    return judge_answers(task, outputs, tokenizer)


def score_task(task: TaskSet, logits_fn, generate, tokenizer, backend: str, *, answer_limit: int = 20,
               limit: int | None = None, progress=None) -> TaskScore:
    """Task perplexity over the (first `limit`) examples and exact answers to the first `answer_limit`
    prompts, through any backend."""
    pieces = task.pieces(limit)
    ppl = score_pieces(pieces, logits_fn, backend=backend, progress=progress) if pieces else None
    rate, fields, answered, samples = answers(task, generate, tokenizer, min(answer_limit, len(pieces)))
    return TaskScore(ppl=ppl, exact_match=rate, field_accuracy=fields, answered=answered, samples=samples,
                     items=len(pieces), of=len(task.items))


def torch_generate(model, tokenizer) -> Callable[[list[int], int], list[int]]:
    """Greedy new ids from a transformers model (any device), stopping at its end-of-generation tokens."""
    import torch

    device = next(model.parameters()).device

    @torch.inference_mode()
    def generate(prompt: list[int], max_new: int) -> list[int]:
        ids = torch.tensor([prompt], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        new = out[0, len(prompt):].tolist()
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        return [i for i in new if i not in eos]

    return generate


def score_torch(model, task: TaskSet, tokenizer, label: str, answer_limit: int = 20) -> TaskScore:
    """The task through a loaded transformers model, with a progress bar."""
    from .progress import bar
    from .scoring import torch_logits_fn

    with bar(f"task {label}") as update:
        return score_task(task, torch_logits_fn(model), torch_generate(model, tokenizer), tokenizer, "torch",
                          answer_limit=answer_limit, progress=update)
