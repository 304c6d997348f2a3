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
