"""The demo task: pull who/where/when out of a sentence as one line of JSON.

Chosen because its output format is checkable by a program (the base model does not follow it unprompted,
a fine-tune should), and because it is small enough to train on a CPU in minutes. `python -m
edgeft.data.demo_task` rewrites demo.jsonl; the file is shipped so training needs no generator.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

INSTRUCTION = "Extract who, where and when from the sentence as JSON with keys who, where, when."
NAMES = ["Maria", "Ahmed", "Chen", "Olga", "Tomas", "Aisha", "Kenji", "Lucia", "Pavel", "Ines", "Kwame", "Sofia",
         "Ravi", "Hannah", "Diego", "Yuki", "Omar", "Elena", "Felix", "Amara", "Jonas", "Priya", "Mateo", "Lena"]
PLACES = ["Lisbon", "Nairobi", "Oslo", "Lima", "Hanoi", "Toronto", "Krakow", "Dakar", "Porto", "Seoul", "Quito",
          "Tunis", "Bergen", "Cusco", "Riga", "Accra", "Perth", "Graz", "Malmo", "Osaka"]
TEMPLATES = [
    "In {when}, {who} moved to {where} to open a bakery.",
    "{who} gave a talk about rivers in {where} in {when}.",
    "The first exhibition by {who} took place in {where} during {when}.",
    "{who} was born in {where} in the spring of {when}.",
    "Back in {when}, {who} repaired old radios in a small shop in {where}.",
    "{who} ran the marathon in {where} in {when} and finished third.",
    "It was {when} when {who} started teaching chemistry in {where}.",
    "A bridge designed by {who} opened in {where} in {when}.",
    "{who} spent the winter of {when} writing a novel in {where}.",
    "The orchestra in {where} hired {who} as its conductor in {when}.",
]


def answer(who: str, where: str, when: int) -> str:
    return json.dumps({"who": who, "where": where, "when": when})


def make_rows(n: int = 200, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        who, where, when = rng.choice(NAMES), rng.choice(PLACES), rng.randint(1950, 2024)
        sentence = rng.choice(TEMPLATES).format(who=who, where=where, when=when)
        rows.append({"prompt": f"{INSTRUCTION}\n{sentence}", "completion": answer(who, where, when)})
    return rows


def check(output: str, expected_completion: str) -> tuple[bool, bool]:
    """(format_ok, exact): format_ok when the output is one JSON object with exactly the keys who/where/when
    (who and where strings, when an integer); exact when it also equals the expected values."""
    try:
        got = json.loads(output.strip())
    except json.JSONDecodeError:
        return False, False
    format_ok = (isinstance(got, dict) and set(got) == {"who", "where", "when"} and isinstance(got["who"], str)
                 and isinstance(got["where"], str) and isinstance(got["when"], int))
    return format_ok, format_ok and got == json.loads(expected_completion)


if __name__ == "__main__":
    out = Path(__file__).with_name("demo.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in make_rows()))
    print(f"wrote {out}")
