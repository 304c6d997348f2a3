import pytest

from edgeft.atomic import atomic_dir, atomic_file, sha256_file, write_json


def test_atomic_file_appears_only_when_complete(tmp_path):
    target = tmp_path / "model.bin"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind either

    with atomic_file(target) as tmp:
        tmp.write_bytes(b"whole")
        assert not target.exists()
    assert target.read_bytes() == b"whole"


def test_atomic_dir_replaces_old_folder_only_on_success(tmp_path):
    target = tmp_path / "merged"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("v2-partial")
            raise KeyboardInterrupt
    assert (target / "a.txt").read_text() == "v1"
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("v2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_write_json_and_sha256(tmp_path):
    write_json(tmp_path / "x.json", {"a": 1})
    assert (tmp_path / "x.json").read_text() == '{\n  "a": 1\n}\n'
    assert sha256_file(tmp_path / "x.json") == \
        __import__("hashlib").sha256(b'{\n  "a": 1\n}\n').hexdigest()


def _killed_mid_write(target, code: str) -> int:
    """Run `code` in a child that writes `target` through atomic_file/atomic_dir and is SIGKILLed inside the
    block (no finally runs: the OOM killer, kill -9, a power cut); return its pid."""
    import subprocess
    import sys

    script = ("import os, signal, sys\nfrom pathlib import Path\nfrom edgeft.atomic import atomic_dir, atomic_file\n"
              f"target = Path({str(target)!r})\n{code}\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    assert proc.wait() == -9
    return proc.pid


def test_a_killed_writer_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    target = tmp_path / "model.gguf"
    pid = _killed_mid_write(target, "with atomic_file(target) as tmp:\n    tmp.write_bytes(b'x' * 1000)\n"
                                    "    os.kill(os.getpid(), signal.SIGKILL)")
    assert [p.name for p in tmp_path.iterdir()] == [f".model.gguf.tmp-{pid}"]
    with atomic_file(target) as tmp:  # the re-run
        tmp.write_bytes(b"whole")
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"] and target.read_bytes() == b"whole"


def test_a_temporary_of_a_live_process_is_left_alone(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "model.gguf"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".model.gguf.tmp-{live.pid}").write_bytes(b"another writer, still at work")
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"mine")
        assert (tmp_path / f".model.gguf.tmp-{live.pid}").exists()
    finally:
        live.kill()
        live.wait()


def test_a_folder_swap_killed_between_its_two_renames_is_completed(tmp_path):
    """atomic_dir moves the old folder aside, then the new one in: killed in between, the final name is
    missing, but the new folder was complete; the next write (or cleanup) puts it in place first."""
    from edgeft.atomic import remove_leftovers

    target = tmp_path / "merged"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("v1")
    _killed_mid_write(target, "import os as _os\nreal = _os.replace\ncalls = []\n"
                              "def replace(a, b):\n    real(a, b)\n    calls.append(a)\n"
                              "    if len(calls) == 1:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
                              "_os.replace = replace\n"
                              "with atomic_dir(target) as tmp:\n    (tmp / 'a.txt').write_text('v2')")
    assert not target.exists()
    remove_leftovers(target)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"] and (target / "a.txt").read_text() == "v2"


def test_a_full_disk_is_a_one_line_error_and_leaves_nothing(tmp_path):
    """A real full filesystem (a 1 MiB tmpfs; needs root to mount, skipped otherwise)."""
    import subprocess

    from edgeft.errors import EdgeftError

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        with pytest.raises(EdgeftError, match="model.gguf: no space left on device.*nothing half-written"):
            with atomic_file(disk / "model.gguf") as tmp:
                with open(tmp, "wb") as f:
                    for _ in range(4):
                        f.write(b"x" * 2**19)
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_json_is_strict_and_says_where_numbers_were_not_finite(tmp_path):
    import json
    import math

    write_json(tmp_path / "x.json", {"ppl": math.nan, "curve": [1.0, math.inf], "ok": 2.5})
    text = (tmp_path / "x.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"ppl": None, "curve": [1.0, None], "ok": 2.5,
                                "non_finite": {"ppl": "nan", "curve[1]": "inf"}}
