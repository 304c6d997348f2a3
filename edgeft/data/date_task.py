"""The dates task: rewrite a date written in words in a sentence as ISO 8601 `YYYY-MM-DD`.

The second shipped task, beside the demo task, so that two adapters can be trained on one base. Chosen because:
- its answer is checkable by a program (one valid calendar date, one right answer), like the demo task's;
- the answer is plain text, not JSON, so the two shipped tasks exercise both ways held-out answers are judged
  (task.judge: JSON compared as JSON, anything else compared as text);
- it is far enough from the demo task (a date string where the demo gives a JSON object) that an adapter
  answering the other task's prompt, or a request routed to the wrong adapter, is obvious at a glance.
`python -m edgeft.data.date_task` rewrites dates.jsonl; the file is shipped so training needs no generator.
"""

from __future__ import annotations

import calendar
import datetime
import json
import random
import re
from pathlib import Path

INSTRUCTION = "Write the date in this sentence as YYYY-MM-DD."
# Spelled out rather than calendar.month_name, which follows the process's locale: the shipped file must not.
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
ORDINAL_WORDS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
                 "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
                 "eighteenth", "nineteenth", "twentieth", "twenty-first", "twenty-second", "twenty-third",
                 "twenty-fourth", "twenty-fifth", "twenty-sixth", "twenty-seventh", "twenty-eighth", "twenty-ninth",
                 "thirtieth", "thirty-first"]
# No names or places, unlike the demo task's sentences: a demo adapter has nothing here to pull into its JSON.
TEMPLATES = [
    "The shop reopened on {date}.",
    "On {date}, the river flooded the lower town.",
    "The contract was signed on {date} after months of talks.",
    "Our first harvest came in on {date}.",
    "The bridge was closed for repairs on {date}.",
    "It snowed heavily on {date}, and the schools stayed shut.",
    "The library received the letter on {date}.",
    "Tickets went on sale on {date} and sold out within an hour.",
    "The old mill burned down on {date}.",
    "A new timetable for the trains started on {date}.",
    "The committee met for the last time on {date}.",
    "The comet was first seen from the observatory on {date}.",
]


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


# Several spellings of one date, so the adapter learns to read a date rather than one fixed phrasing.
SPELLINGS = [
    lambda d: f"the {ORDINAL_WORDS[d.day - 1]} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{MONTHS[d.month - 1]} {_ordinal(d.day)}, {d.year}",
    lambda d: f"the {_ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
]


def make_rows(n: int = 200, seed: int = 11) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        year, month = rng.randint(1900, 2030), rng.randint(1, 12)
        # Any day of that month (29 February only in leap years): every answer is a real date.
        date = datetime.date(year, month, rng.randint(1, calendar.monthrange(year, month)[1]))
        sentence = rng.choice(TEMPLATES).format(date=rng.choice(SPELLINGS)(date))
        rows.append({"prompt": f"{INSTRUCTION}\n{sentence}", "completion": date.isoformat()})
    return rows


ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def check(output: str, expected_completion: str) -> tuple[bool, bool]:
    """(format_ok, exact): format_ok when the output is one YYYY-MM-DD that is a real calendar date (2023-02-30
    has the shape but is not); exact when it is also the expected date."""
    got = output.strip()
    try:
        format_ok = bool(ISO_DATE.match(got)) and datetime.date.fromisoformat(got) is not None
    except ValueError:
        format_ok = False
    return format_ok, format_ok and got == expected_completion.strip()


if __name__ == "__main__":
    out = Path(__file__).with_name("dates.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in make_rows()))
    print(f"wrote {out}")
