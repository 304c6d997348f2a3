"""The board's folder, one owner (as edgeft/run.py owns the host's run folder): where each deployed version
lives, which one is served, and what the board remembers about each.

    DEST/versions/NAME/     one deployed version: the GGUF (and LoRA GGUFs), the board's binaries, the ids,
                            deploy.json (what it is), serve.sh (the server's command line, once served)
    DEST/current            a link to versions/NAME: what the server runs (the systemd unit and the nohup
                            start both go through it, so switching versions is a link and a restart)
    DEST/versions.json      the board's record: every version kept (run, artifact, digest, quant, adapters,
                            when deployed, its last check on this board), the order they were served in,
                            which one is current

NAME is the run's folder name and the first 12 hex digits of the artifact's digest (the GGUF's sha256, or
with adapters a digest over the base's and every LoRA's), so the same model deployed twice lands in the same
folder and is skipped file by file. DEST is --dest, or `edgeft` in the login's home: one folder per served
model, whatever run it came from, so the version before stays beside the new one and a rollback is a switch.

A version is kept until a newer one has passed its checks on this board: then the newest `keep` versions
that passed (the current one included) stay, and older ones are removed. The current one is never removed.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import time

from ..atomic import sha256_file
from ..errors import EdgeftError
from ..inputs import parse_json

VERSIONS = "versions"
CURRENT = "current"
STATE = "versions.json"
MANIFEST = "deploy.json"  # in each version folder: what was deployed there
SCRIPT = "serve.sh"
TASK_PIECES = "task_pieces.txt"  # in a version folder: the task set's pieces for `edgeft-board score`
TASK_PROMPTS = "task_prompts.txt"  # its prompts for `edgeft-board answers`
DEFAULT_DEST = "edgeft"
DEFAULT_KEEP = 2


def version_name(run_name: str, digest: str) -> str:
    """A folder name any shell, systemd and a person can read: the run's name with anything but letters,
    digits and ._+- replaced (a run folder may be called anything), and the digest's first 12 hex digits."""
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", run_name)[:60].lstrip(".-") or "run"
    return f"{safe}-{digest[:12]}"


def served_digest(model_sha: str, lora_shas: list[str]) -> str:
    """The artifact's digest: the GGUF's sha256 alone, or with adapters one over the base's and each LoRA's."""
    if not lora_shas:
        return model_sha
    return hashlib.sha256("\n".join([model_sha, *lora_shas]).encode()).hexdigest()


def served_dest(c, served=None) -> str:
    """The board's folder: --dest, else `edgeft` in the login's home, whatever is served."""
    return c.dest or DEFAULT_DEST


def served_version(served, hashes: dict[str, str] | None = None) -> str:
    """The version folder's name for what is served: the (first) run's name and the artifact's digest.
    `hashes` (name -> sha256) saves hashing the files again when the caller has them."""
    def sha(path) -> str:
        return (hashes or {}).get(path.name) or sha256_file(path)

    digest = served_digest(sha(served.model), [sha(lora) for lora in served.loras])
    names = [r.path.resolve().name for r in served.runs]
    label = names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1}"
    return version_name(label, digest)


def version_dir(dest: str, name: str) -> str:
    return f"{dest}/{VERSIONS}/{name}"


def current_dir(dest: str) -> str:
    return f"{dest}/{CURRENT}"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def empty_state() -> dict:
    return {"versions": {}, "history": [], "current": None}


def read_state(remote, dest: str) -> dict:
    """The board's record, and the current link as the board has it (the link is the truth: a process killed
    between switching and writing the record leaves the record one step behind)."""
    q = shlex.quote
    out = remote.run(f"cat -- {q(f'{dest}/{STATE}')} 2>/dev/null; echo; echo '--link--'; "
                     f"readlink -- {q(current_dir(dest))} 2>/dev/null || true", timeout=remote.connect_timeout + 20)
    text, _, link = out.rpartition("--link--")
    state = empty_state()
    if text.strip():
        state = parse_json(text.strip(), f"{remote.host}:{dest}/{STATE}",
                           "remove it on the board (the versions stay; deploy again to list them)")
        if not isinstance(state, dict) or not isinstance(state.get("versions"), dict):
            raise EdgeftError(f"{remote.host}:{dest}/{STATE} is not a versions record; remove it on the board")
    link = link.strip()
    state["current"] = link.rsplit("/", 1)[-1] if link else None
    state.setdefault("history", [])
    return state


def write_state(remote, dest: str, state: dict) -> None:
    """Replace the record at once (written beside it, then renamed)."""
    q = shlex.quote
    tmp, final = f"{dest}/.{STATE}.tmp", f"{dest}/{STATE}"
    remote.run(f"printf '%s\\n' {q(json.dumps(state, sort_keys=True))} > {q(tmp)} && mv -f -- {q(tmp)} {q(final)}")


def switch(remote, dest: str, name: str) -> None:
    """Point DEST/current at versions/NAME. A new link beside it renamed over the old one (mv -T) is atomic; a
    board whose mv lacks -T (busybox) replaces the link in two steps."""
    q = shlex.quote
    tmp, link = f"{dest}/.{CURRENT}.tmp", current_dir(dest)
    target = f"{VERSIONS}/{name}"
    remote.run(f"test -d {q(version_dir(dest, name))} && ln -sfn -- {q(target)} {q(tmp)} && "
               f"{{ mv -Tf -- {q(tmp)} {q(link)} 2>/dev/null || {{ rm -f -- {q(link)} && mv -f -- {q(tmp)} {q(link)}; }}; }}")


def made_current(state: dict, name: str) -> None:
    """The record after switching to `name`."""
    state["current"] = name
    state["history"] = [h for h in state["history"] if h in state["versions"]] + [name]


def previous(state: dict) -> str | None:
    """The version to go back to: the latest one served before the current one that is still on the board, did
    not fail its check here and was not rolled back from."""
    current = state.get("current")
    for name in reversed(state.get("history", [])):
        v = state["versions"].get(name)
        if name == current or not v or v.get("rolled_back"):
            continue
        if (v.get("check") or {}).get("passed") is False:
            continue
        return name
    return None


def to_remove(state: dict, keep: int) -> list[str]:
    """Versions to delete once the current one passed: all but the newest `keep` that passed (the current
    one counts) and the current one."""
    current = state.get("current")
    order = [h for h in reversed(state.get("history", [])) if h in state["versions"]]
    order += [n for n in state["versions"] if n not in order]
    kept = {current}
    for name in order:
        if len(kept) >= max(keep, 1):
            break
        if (state["versions"][name].get("check") or {}).get("passed"):
            kept.add(name)
    return [n for n in state["versions"] if n not in kept]


def remove(remote, dest: str, state: dict, names: list[str]) -> None:
    if not names:
        return
    remote.run("rm -rf -- " + " ".join(shlex.quote(version_dir(dest, n)) for n in names))
    for n in names:
        state["versions"].pop(n, None)
    state["history"] = [h for h in state["history"] if h in state["versions"]]
