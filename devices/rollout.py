"""`edgeft deploy RUN --hosts FLEET.yaml --serve --waves 1,25%,100%`: a model reaches a fleet in gated waves;
`edgeft deploy --rollback`: boards go back to the version they served before.

Waves are cumulative counts of the fleet's boards in file order: `1,25%,100%` on 20 boards is board 1 (the
canary), then boards 2-5, then 6-20. Each board of a wave gets the model in a version folder of its own
(versions.py), is switched to it, serves it, and is checked through its server (smoke_served.check_each):
perplexity on the board vs the host's score of the same GGUF, the task's held-out prompts through
/v1/chat/completions vs the host's answers (the quant's exact-drop gate, as export's), decode tokens/s vs
the profile's bound; and, where the board served a checked version before, the task's exact answers may not
fall more than that same gate below that version's on this board. A wave with a board that fails a gate
stops the rollout (exit 3): all of its boards switch back to their previous version and are checked serving
again; later waves are never touched.

Each wave, each switch back and the rollout itself are entries in the run's ledger. The boards remember
their versions and checks (DEST/versions.json), so a rollout run again after Ctrl-C, a killed process or a
board that dropped off skips boards already serving this version with a passed check, and sends only what a
board does not hold verified. Boards that cannot be reached (or fail without a gate) are rows too; more than
--max-unavailable of them stops the rollout after their wave (exit 2).
"""

from __future__ import annotations

import math
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..config import to_dict
from ..errors import EdgeftError, GateFailed
from ..gates import TASK_PPL_GATE_OTHER, TASK_PPL_GATES, Gate, parse_gates
from ..run import ROLLBACK, ROLLOUT, ROLLOUT_SWITCH, ROLLOUT_WAVE, Run, what_to_serve
from . import serve, versions
from .fleet import Board, board_config, boards_of, read_hosts


def plan_waves(spec: str, boards: int) -> list[int]:
    """Cumulative board counts of each wave: '1,25%,100%' -> [1, 5, 20] for 20 boards; a wave that adds no
    board (25% of 3 is 1) is dropped. The last must reach every board."""
    counts = []
    for part in spec.split(","):
        part = part.strip()
        try:
            n = math.ceil(float(part[:-1]) / 100 * boards) if part.endswith("%") else int(part)
        except ValueError:
            raise EdgeftError(f"--waves {spec}: {part!r} is not a count or a percentage; write e.g. 1,25%,100%") \
                from None
        if n < 1 or (part.endswith("%") and not 0 < float(part[:-1]) <= 100):
            raise EdgeftError(f"--waves {spec}: {part!r} is out of range; counts from 1, percentages in (0, 100]")
        counts.append(min(n, boards))
    if counts != sorted(counts):
        raise EdgeftError(f"--waves {spec}: waves are cumulative, so each must reach at least as many boards as "
                          f"the one before")
    if counts[-1] != boards:
        raise EdgeftError(f"--waves {spec}: the last wave reaches {counts[-1]} of the {boards} boards; end with 100%")
    return sorted(set(counts))


def _row(board: Board, **fields) -> dict:
    """A board's row, with the keys every fleet table reads (tables.fleet_rows)."""
    row = {"board": board.name, "host": board.host, "device": board.device, "model": "", "version": None,
           "adapters": None, "tokens_per_s": None, "ppl_change": None, "exact_match": None, "passed": False,
           "skipped": False, "error": None, "failed_gate": False, "unavailable": False}
    row.update(fields)
    return row


def _figures(entries: list[dict]) -> dict:
    """The checks' figures for a row and the board's record: the worst run's."""
    changes = [e["perplexity"]["ppl"] / e["reference"]["ppl"] - 1 for e in entries
               if (e.get("perplexity") or {}).get("ppl") and (e.get("reference") or {}).get("ppl")]
    exact = [(e["metrics"].get("served_answers") or {}).get("exact_match") for e in entries]
    speed = [(e["metrics"].get("decode") or {}).get("tokens_per_s") for e in entries]
    task = [e["metrics"].get("served_task") or {} for e in entries]
    return {"ppl_change": round(max(changes, key=abs), 6) if changes else None,
            "task_ppl": max((t["ppl"] for t in task if t.get("ppl")), default=None),
            "task_items": max((t["items"] for t in task if t.get("items")), default=None),
            "exact_match": min(x for x in exact if x is not None) if any(x is not None for x in exact) else None,
            "tokens_per_s": min(x for x in speed if x) if any(speed) else None}


def check_board(c, remote, served, version: str, replaces: dict | None) -> tuple[list[dict], dict]:
    """The served version checked on one board (c: that board's config); its smoke entries and figures.
    `replaces`: the board's record of the version served before, whose exact answers it may not fall below
    by more than the quant's gate. Raises GateFailed (with .entries) when a gate fails."""
    from ..models import load_tokenizer
    from . import get
    from .smoke_served import check_each, exact_limit

    profile = get(c.device)
    tokenizer = load_tokenizer(served.source)
    folder = versions.version_dir(c.dest or versions.DEFAULT_DEST, version)
    before = (replaces or {}).get("check") or {}

    def regression(entry: dict) -> list[Gate]:
        """The task gates of the ledger (export's limits for this quant), with the version this one replaces
        on this board as the reference: a fine-tune that did not take, or forgot the task, stops here. Only
        against a version that passed its check, on as many task items."""
        if not before.get("passed"):
            return []
        gates = []
        task = entry["metrics"].get("served_task") or {}
        if task.get("ppl") and before.get("task_ppl") and task.get("items") == before.get("task_items"):
            limit = parse_gates(c.max_task_ppl_rise, TASK_PPL_GATES, [served.quant], TASK_PPL_GATE_OTHER,
                                "--max-task-ppl-rise")[served.quant]
            rise = task["ppl"] / before["task_ppl"] - 1
            gates.append(Gate("served task perplexity rise vs the version it replaces on this board", rise, limit,
                              f"{version}: task perplexity {task['ppl']:.4f} on the board, {100 * rise:+.1f}% from "
                              f"{before['task_ppl']:.4f} of the version it replaces ({replaces.get('name')}) "
                              f"(limit {100 * limit:+.0f}%)"))
        now = (entry["metrics"].get("served_answers") or {}).get("exact_match")
        if now is not None and before.get("exact_match") is not None:
            limit = exact_limit(c, served.quant)
            gates.append(Gate("served exact-match drop vs the version it replaces on this board",
                              before["exact_match"] - now, limit,
                              f"{version} answered {100 * now:.0f}% of the task exactly through the server where the "
                              f"version it replaces ({replaces.get('name')}) answered "
                              f"{100 * before['exact_match']:.0f}% on this board (limit: a drop of {100 * limit:.0f}%)"))
        return gates

    with remote.tunnel(c.serve_port) as port:
        client = serve.Client(port, timeout=60 * (50 if c.emulate else 1))
        entries = check_each(c, remote, served, folder, client, profile, tokenizer, more_gates=regression,
                             inputs={"version": version, "replaces": (replaces or {}).get("name")})
    return entries, _figures(entries)


def _record_check(remote, dest: str, version: str, passed: bool, figures: dict, reason: str | None,
                  keep: int, prune: bool = True) -> None:
    state = versions.read_state(remote, dest)
    if version in state["versions"]:
        state["versions"][version]["check"] = {"passed": passed, "at": versions.now(), "reason": reason, **figures}
        if prune and passed and state["current"] == version:  # a newer version passed here: old ones can go
            versions.remove(remote, dest, state, versions.to_remove(state, keep))
        versions.write_state(remote, dest, state)


def _one_board(c, board: Board, served, version: str, deploy) -> dict:
    bc = board_config(c, board)
    dest = bc.dest or versions.DEFAULT_DEST
    model = served.model.name
    reached = False
    try:
        remote = bc.remote()
        state = versions.read_state(remote, dest)
        reached = True
        mine = state["versions"].get(version) or {}
        if not c.redo and state["current"] == version and (mine.get("check") or {}).get("passed"):
            figures = {k: mine["check"].get(k) for k in ("ppl_change", "exact_match", "tokens_per_s", "task_ppl")}
            return _row(board, model=model, version=version, passed=True, skipped=True, **figures)
        before = state["current"] if state["current"] != version else versions.previous(state)
        replaces = {**state["versions"][before], "name": before} if before in state["versions"] else None
        deployed = deploy(bc)
        entries, figures = check_board(bc, remote, served, version, replaces)
    except GateFailed as e:
        figures = _figures(getattr(e, "entries", []))
        try:
            _record_check(remote, dest, version, False, figures, str(e), c.keep)
        except EdgeftError:
            pass  # the board dropped off after failing: its row says why it failed
        return _row(board, model=model, version=version, error=str(e), failed_gate=True, **figures)
    except EdgeftError as e:
        row = _row(board, model=model, version=version, error=str(e), unavailable=True)
        # Switched to the new version but its server did not come up (or the board dropped off while it did):
        # where the board still answers, it goes back to what it served, so it is not left down.
        try:
            if reached and versions.read_state(remote, dest)["current"] == version:
                _record_check(remote, dest, version, False, {}, str(e), c.keep)
                row["switched_back"] = switch_back(c, board, version, "failed")
        except EdgeftError:  # it dropped off: its row says why, a rerun handles it
            pass
        return row
    _record_check(remote, dest, version, True, figures, None, c.keep)
    m = deployed.entry["metrics"]
    return _row(board, model=model, version=version, passed=True, adapters=len(served.loras), **figures,
                bytes_sent=m["bytes_sent"], files_skipped=m["files_skipped"], files_linked=m["files_linked"],
                previous=replaces and replaces["name"], boot=(m.get("serve") or {}).get("boot"))


def switch_back(c, board: Board, leaving: str | None, mark: str) -> dict:
    """Board back to the version it served before `leaving` (None: before its current one), relaunched and
    checked. mark "failed": `leaving` failed its check (already recorded); "rolled_back": by hand."""
    bc = board_config(c, board)
    dest = bc.dest or versions.DEFAULT_DEST
    left_run = None
    try:
        remote = bc.remote()
        state = versions.read_state(remote, dest)
        leaving = leaving or state["current"]
        if leaving is None:
            return _row(board, error="nothing deployed here", unavailable=True)
        left_run = (state["versions"].get(leaving) or {}).get("run")
        if state["current"] != leaving:  # never switched to it (its deploy failed first): the old one serves
            target = state["current"]
        else:
            if mark == "rolled_back" and leaving in state["versions"]:
                state["versions"][leaving]["rolled_back"] = versions.now()
            target = versions.previous(state)
        if target is None:
            serve.stop(remote, bc.serve_port)
            versions.write_state(remote, dest, state)
            return _row(board, version=None, left=leaving, left_run=left_run, passed=False,
                        error=f"no earlier version on the board to go back to: its server on port {bc.serve_port} "
                              f"is stopped")
        script = f"{versions.version_dir(dest, target)}/{versions.SCRIPT}"
        if remote.run(f"[ -x {shlex.quote(script)} ] && echo yes || echo no").strip() != "yes":
            raise EdgeftError(f"{target} on {board.host} was deployed without --serve (no {versions.SCRIPT} to start); "
                              f"deploy its run again with --serve")
        versions.switch(remote, dest, target)
        versions.made_current(state, target)
        versions.write_state(remote, dest, state)
        info = state["versions"][target]
        serve.launch(remote, versions.current_dir(dest), bc.serve_port, f"{target} (switched back)")
        entries, figures = _check_again(bc, remote, info, target, state)
        # not a newer version passing: nothing is removed (the one left stays, to look at or to go back to)
        _record_check(remote, dest, target, True, figures, None, c.keep, prune=False)
        return _row(board, model=info.get("gguf", ""), version=target, left=leaving, left_run=left_run, passed=True,
                    **figures,
                    checked="full" if entries else "health and one chat answer")
    except GateFailed as e:
        figures = _figures(getattr(e, "entries", []))
        return _row(board, left=leaving, left_run=left_run, error=f"switched back, but its check failed: {e}",
                    failed_gate=True,
                    **figures)
    except EdgeftError as e:
        return _row(board, left=leaving, error=str(e), unavailable=True)


def _check_again(bc, remote, info: dict, name: str, state: dict) -> tuple[list[dict], dict]:
    """The version switched back to, serving again: the full check when its run is on this host, else its
    /health and one chat answer (an app's request) through the server."""
    limit = serve.load_seconds(0, bc.emulate) * (3 if bc.emulate else 1)
    with remote.tunnel(bc.serve_port) as port:
        client = serve.Client(port, timeout=60 * (50 if bc.emulate else 1))
        client.wait(limit, lambda: serve.pid(remote, bc.serve_port) is not None)
        answer = client.chat([{"role": "user", "content": "What is the capital of France?"}], 8, [])
    run = Run(info.get("run", ""))
    if not run.is_run():
        text = answer["choices"][0]["message"].get("content")
        return [], {"tokens_per_s": (answer.get("timings") or {}).get("predicted_per_second"),
                    "answer": text}
    runs = info.get("runs") or []
    adapters = [str(run.path.parent / r) for r in runs] if info.get("adapters") else []
    served = what_to_serve(str(run.path), adapters, info.get("quant", ""))
    before = versions.previous({**state, "current": name})
    replaces = {**state["versions"][before], "name": before} if before in state["versions"] else None
    return check_board(bc, remote, served, name, replaces)


def _pool(c, work, boards: list[Board]) -> list[dict]:
    with ThreadPoolExecutor(max_workers=max(1, c.parallel)) as pool:
        return list(pool.map(work, boards))


def rollout(c, deploy) -> dict:
    """Waves of the fleet's boards, each deployed (by `deploy`, deploy.deploy: one board's copy, switch and
    server start), served and checked before the next; the rollout's entry."""
    from .versions import served_version

    if not c.serve:
        raise EdgeftError("--waves checks each board through its server: add --serve")
    boards = read_hosts(c.hosts)
    plan = plan_waves(c.waves, len(boards))
    served = what_to_serve(c.run, c.adapters, c.quant)
    version = served_version(served)
    run, others = served.runs[0], served.runs[1:]
    waves = [boards[a:b] for a, b in zip([0, *plan], plan)]
    base = {"hosts": str(Path(c.hosts).resolve()), "model": served.model.name, "version": version,
            "boards": len(boards), "waves": [len(w) for w in waves]}
    rows: list[dict] = []
    stop: Exception | None = None
    with run.record(ROLLOUT, to_dict(c), base, also=others) as summary:
        unavailable = 0
        for k, wave in enumerate(waves, 1):
            with run.record(ROLLOUT_WAVE, to_dict(c), {**base, "wave": k, "boards": len(wave),
                                                       "names": [b.name for b in wave]}, also=others) as entry:
                got = _pool(c, lambda b: _one_board(c, b, served, version, deploy), wave)
                unavailable += sum(r["unavailable"] for r in got)
                failed = [r["board"] for r in got if r["failed_gate"]]
                entry["metrics"] = _counts(got)
                if failed:
                    entry["status"] = "failed"
                    entry["reason"] = f"wave {k}: {', '.join(failed)} failed a gate"
                elif unavailable > c.max_unavailable:
                    entry["status"] = "failed"
                    entry["reason"] = (f"wave {k}: {unavailable} boards unavailable so far, more than "
                                       f"--max-unavailable {c.max_unavailable}")
            rows += got
            if failed:
                reachable = [b for b, r in zip(wave, got) if not r["unavailable"]]
                with run.record(ROLLOUT_SWITCH, to_dict(c), {**base, "wave": k, "reason": entry["reason"],
                                                             "names": [b.name for b in reachable]},
                                also=others) as switch:
                    back = _pool(c, lambda b: switch_back(c, b, version, "failed"), reachable)
                    switch["metrics"] = _counts(back)
                    by_name = {r["board"]: r for r in back}
                    for r in got:
                        r["switched_back"] = by_name.get(r["board"])
                    if any(not r["passed"] for r in back):
                        switch["status"] = "failed"
                        switch["reason"] = "; ".join(f"{r['board']}: {r['error']}" for r in back if not r["passed"])
                stop = GateFailed(f"{entry['reason']}; its boards were switched back to their previous version and "
                                  f"the {len(boards) - len(rows)} boards of later waves were not touched")
                break
            if entry["status"] == "failed":
                stop = EdgeftError(f"{entry['reason']}; the {len(boards) - len(rows)} boards of later waves were "
                                   f"not touched (allow more with --max-unavailable, or run again when they are back)")
                break
        summary["metrics"] = {**_counts(rows), "not_reached": len(boards) - len(rows),
                              "waves_done": k if not stop else k - 1}
        if not stop and unavailable:  # within --max-unavailable the waves went on; the exit still says so
            stop = EdgeftError(f"{unavailable} of {len(boards)} boards were unavailable (within --max-unavailable "
                               f"{c.max_unavailable}, so every wave ran); run the same command again when they are "
                               f"back: the others are skipped")
        if stop:
            summary["status"] = "failed"
            summary["reason"] = str(stop)
    if stop:
        stop.fleet_entry = summary
        raise stop
    return summary


def _counts(rows: list[dict]) -> dict:
    return {"boards": rows, "passed": sum(r["passed"] for r in rows), "failed": sum(not r["passed"] for r in rows),
            "skipped": sum(r["skipped"] for r in rows), "unavailable": sum(r["unavailable"] for r in rows)}


def rollback(c) -> dict:
    """Every board (of --hosts, or --host) back to its previous version, relaunched and checked; an entry in
    the ledger of each run that was left, when that run is on this host."""
    import time

    from ..ledger import now

    boards = boards_of(c, "--rollback")
    start, started = time.perf_counter(), now()
    rows = _pool(c, lambda b: switch_back(c, b, None, "rolled_back"), boards)
    inputs = {"hosts": str(Path(c.hosts).resolve()) if c.hosts else None, "host": c.host or None,
              "model": "previous versions", "boards": len(boards)}
    entry = {"step": ROLLBACK, "status": "ok", "started": started, "inputs": inputs,
             "metrics": {**_counts(rows), "seconds": round(time.perf_counter() - start, 2)}}
    failed = [r["board"] for r in rows if not r["passed"]]
    if failed:
        entry["status"], entry["reason"] = "failed", f"{len(failed)} of {len(rows)} boards: {', '.join(failed)}"
    left = {r.get("left_run") for r in rows} - {None}
    for r in rows:  # the ledger of each run a board left says so
        run = Run(r["left_run"]) if r.get("left_run") else None
        if run is not None and run.is_run() and r["left_run"] in left:
            left.discard(r["left_run"])
            with run.record(ROLLBACK, to_dict(c), inputs) as e:
                e["metrics"] = entry["metrics"]
                if failed:
                    e["status"], e["reason"] = "failed", entry["reason"]
    if failed:
        error = (GateFailed if any(r["failed_gate"] for r in rows) else EdgeftError)(entry["reason"])
        error.fleet_entry = entry
        raise error
    return entry
