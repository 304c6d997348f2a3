"""The shipped tasks: the dates task's file is what its generator makes, its checker tells right from wrong, and
`--data dates` trains on it with answers judged as text (the demo task's are judged as JSON)."""

from __future__ import annotations

import json

import pytest

from edgeft.data import date_task
from edgeft.dataset import load_examples
from edgeft.task import build_task_set, judge
from edgeft.dataset import DEMO_DATA, demo_data_path, shipped_data_path
from edgeft.train import TrainConfig, data_path

DATES = shipped_data_path("dates")


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_shipped_dates_file_is_what_the_generator_makes():
    """Regenerable: `python -m edgeft.data.date_task` would write the same file."""
    assert DATES.name == "dates.jsonl" and DATES.parent == demo_data_path().parent
    assert DATES.read_text() == "".join(json.dumps(r) + "\n" for r in date_task.make_rows())
    rows = _rows(DATES)
    assert len(rows) == 200 and all(set(r) == {"prompt", "completion"} for r in rows)
    # varied: every template and spelling shows up, and few dates repeat
    sentences = [r["prompt"].split("\n", 1)[1] for r in rows]
    assert all(any(s.startswith(t.split("{date}")[0]) for s in sentences) for t in date_task.TEMPLATES)
    assert len({r["completion"] for r in rows}) > 190
    assert date_task.make_rows(5, seed=1) != date_task.make_rows(5) == date_task.make_rows(5)


def test_each_spelling_reads_as_its_date():
    import datetime

    d = datetime.date(1998, 3, 3)
    assert [s(d) for s in date_task.SPELLINGS] == [
        "the third of March, 1998", "March 3, 1998", "3 March 1998", "March 3rd, 1998", "the 3rd of March 1998",
        "Tuesday, March 3, 1998"]
    assert [date_task._ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "31st"]


def test_every_shipped_answer_passes_its_check_and_wrong_ones_do_not():
    for r in _rows(DATES):
        assert date_task.check(r["completion"], r["completion"]) == (True, True)
        assert date_task.check(f" {r['completion']}\n", r["completion"]) == (True, True)
    check = date_task.check
    assert check("1998-03-04", "1998-03-03") == (True, False)  # a real date, the wrong one
    for bad in ("1998-3-3", "03/03/1998", "March 3, 1998", "1998-02-30", "1998-13-01", "1998-03-03 is the date",
                '{"date": "1998-03-03"}', ""):
        assert check(bad, "1998-03-03") == (False, False), bad


@pytest.mark.parametrize("name,file", [("dates", "dates.jsonl"), (DEMO_DATA, "demo.jsonl")])
def test_shipped_names_resolve_to_the_shipped_files(name, file):
    path = data_path(TrainConfig(data=name))
    assert path.name == file and path.is_file() and path == shipped_data_path(name)
    assert data_path(TrainConfig(data="elsewhere/dates.jsonl")).as_posix() == "elsewhere/dates.jsonl"


def test_the_dates_task_set_is_judged_as_text_and_the_demo_set_as_json(tiny_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    dates = build_task_set(tok, load_examples(DATES, tok, 1024, strict=True)[0][:8], "dates rows")
    demo = build_task_set(tok, load_examples(demo_data_path(), tok, 1024, strict=True)[0][:8], "demo rows")
    assert dates.kind == "text" and demo.kind == "json"
    item = dates.items[0]
    assert item.prompt and item.expected == _rows(DATES)[0]["completion"]
    assert judge(f" {item.expected}\n", item.expected, dates.kind) == (True, None)
    assert judge("1900-01-01", item.expected, dates.kind) == (False, None)
