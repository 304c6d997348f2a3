"""edgeft/run.py owns the run folder: no other module spells a run sub-path or walks the steps list backwards
to find an entry (Run.last and run.last_entry do). Read from the source, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OWNER = ROOT / "edgeft" / "run.py"
# The run's files: spelled anywhere else, they are a second definition of the layout.
FILES = {"manifest.json", ".manifest.json.lock", "eval_tokens.json", "task_tokens.json", "train_config.json",
         "compare.png", "report.html", "report.png", ".locks"}
# The run's folders: also format names and ledger keys ({"format": "gguf"}), so only a path made with them counts.
FOLDERS = {"merged", "adapter", "gguf", "onnx", "checkpoints"}


def _sources() -> list[Path]:
    return [p for folder in ("edgeft", "converters", "devices") for p in sorted((ROOT / folder).rglob("*.py"))
            if p != OWNER]


def _is_path_part(node: ast.AST, parents: dict) -> bool:
    """`x / "merged"`, `Path("merged")`, or a constant of a folder name (`ADAPTER_DIR = "adapter"`)."""
    parent = parents.get(node)
    if isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.Div):
        return True
    if isinstance(parent, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in parent.targets):
        return True
    return (isinstance(parent, ast.Call) and node in parent.args
            and ast.unparse(parent.func).split(".")[-1] in ("Path", "joinpath", "PurePath"))


def sub_path_literals(tree: ast.AST) -> list[tuple[int, str]]:
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in FILES or (node.value in FOLDERS and _is_path_part(node, parents)):
                found.append((node.lineno, node.value))
    return sorted(found)


def steps_scans(tree: ast.AST) -> list[tuple[int, str]]:
    """`reversed(<the steps list>)`: the hand-written 'last entry of ...' that Run.last is."""
    return sorted((node.lineno, ast.unparse(node)) for node in ast.walk(tree)
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "reversed" and node.args
            and "steps" in ast.unparse(node.args[0]))


def test_the_readers_find_what_they_look_for():
    code = ast.parse('p = run / "merged"\nq = Path("adapter")\nfmt = {"format": "gguf"}\nm = "manifest.json"\n'
                     'e = next(x for x in reversed(run.steps()) if x["step"] == "train")\n'
                     'f = next(x for x in reversed(manifest["steps"]))\nCHECKPOINTS = "checkpoints"\n')
    assert sub_path_literals(code) == [(1, "merged"), (2, "adapter"), (4, "manifest.json"), (7, "checkpoints")]
    assert [line for line, _ in steps_scans(code)] == [5, 6]


def test_no_run_sub_path_literal_outside_run_py():
    found = {str(p.relative_to(ROOT)): hits for p in _sources()
             if (hits := sub_path_literals(ast.parse(p.read_text(encoding="utf-8"))))}
    assert not found, f"use edgeft.run (Run's properties or its constants): {found}"


def test_no_hand_written_scan_of_the_steps_list_outside_run_py():
    found = {str(p.relative_to(ROOT)): hits for p in _sources()
             if (hits := steps_scans(ast.parse(p.read_text(encoding="utf-8"))))}
    assert not found, f"use Run.last or run.last_entry: {found}"
