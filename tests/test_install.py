"""What a user installs: the wheel and the sdist, not the editable checkout; and dev.py keeping a GPU box's torch.

The wheel is installed into a new virtualenv whose only other content is a path to the dependencies this
environment already has (the tests reach no package index), and edgeft runs from there, outside the source tree.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from .conftest import WINDOW

ROOT = Path(__file__).resolve().parent.parent


def _dev():
    spec = importlib.util.spec_from_file_location("edgeft_dev_script", ROOT / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bare_venv(path: Path) -> Path:
    venv.create(path, with_pip=False)
    return path / "bin" / "python"


def _site_packages(py: Path) -> Path:
    return next((py.parent.parent / "lib").glob("python3*/site-packages"))


def _stand_in(py: Path, name: str, version: str) -> None:
    """An installed distribution as pip and importlib.metadata see it (metadata only, no code)."""
    info = _site_packages(py) / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


def _wheel_needing_torch(folder: Path) -> None:
    """A package that requires torch >= 2.4, as edgeft's pyproject does."""
    folder.mkdir()
    info = "needs_torch-1.0.dist-info"
    with zipfile.ZipFile(folder / "needs_torch-1.0-py3-none-any.whl", "w") as z:
        z.writestr("needs_torch/__init__.py", "")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: needs-torch\nVersion: 1.0\n"
                                       "Requires-Dist: torch>=2.4\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


def _pip_dry_run(py: Path, constraints: Path, links: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--dry-run", "--no-index",
                           "--disable-pip-version-check", "--find-links", str(links), "-c", str(constraints),
                           "needs-torch"], capture_output=True, text=True)


def test_dev_py_keeps_an_installed_cuda_torch_and_pins_the_rest(tmp_path):
    dev = _dev()
    py = _bare_venv(tmp_path / "gpu-box")
    _stand_in(py, "torch", "2.5.1+cu124")  # a CUDA build, older than the tested pin
    links = tmp_path / "links"
    _wheel_needing_torch(links)

    assert dev.kept_torch(str(py)) == "2.5.1+cu124"
    kept = dev.constraints(str(py))
    pins = kept.read_text()
    assert "torch==" not in pins and "transformers==" in pins and "peft==" in pins
    result = _pip_dry_run(py, kept, links)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Would install needs-torch-1.0" in result.stdout and "torch-2" not in result.stdout
    # what dev.py did before: the full pins ask pip for torch 2.13.0 in place of the box's build
    full = _pip_dry_run(py, ROOT / "constraints.txt", links)
    assert full.returncode != 0 and "torch" in full.stderr


def test_dev_py_installs_the_pinned_torch_where_none_or_an_old_one_is(tmp_path):
    dev = _dev()
    py = _bare_venv(tmp_path / "bare")
    assert dev.kept_torch(str(py)) is None and dev.constraints(str(py)) == ROOT / "constraints.txt"
    _stand_in(py, "torch", "2.3.1")
    assert dev.kept_torch(str(py)) is None and dev.constraints(str(py)) == ROOT / "constraints.txt"


def _clean_copy(dest: Path) -> Path:
    """The files a fresh clone has (tracked, plus new ones git does not ignore): an in-tree build would reuse a
    stale build/ folder and hide a package missing from pyproject.toml."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def _build(tmp_path: Path) -> tuple[Path, Path]:
    dist = tmp_path / "dist"
    tree = _clean_copy(tmp_path / "clone")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "--disable-pip-version-check", "-q", "-w", str(dist)]
    subprocess.run([*pip_wheel, str(tree)], check=True, capture_output=True)
    # the sdist through setuptools' PEP 517 hook, as `python -m build --sdist` calls it
    subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                    "b.build_sdist(sys.argv[1])", str(dist)], cwd=tree, check=True, capture_output=True)
    wheel = next(dist.glob("edgeft-*.whl"))
    sdist = next(dist.glob("edgeft-*.tar.gz"))
    # a wheel built from the sdist: what `pip install edgeft-X.tar.gz` installs
    from_sdist = tmp_path / "from-sdist"
    subprocess.run([*pip_wheel[:-1], str(from_sdist), str(sdist)], check=True, capture_output=True)
    return wheel, next(from_sdist.glob("edgeft-*.whl"))


def _members(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return {n for n in z.namelist() if ".dist-info/" not in n}


def _shipped_sources() -> list[str]:
    """Every tracked file of the package folders that the product needs at run time."""
    out = subprocess.run(["git", "ls-files", "edgeft", "converters", "devices"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    return [f for f in out if f.endswith((".py", ".yaml", ".jsonl", ".cpp", ".h", "CMakeLists.txt"))]


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_the_wheel_and_the_sdist_carry_everything_and_the_installed_wheel_runs_the_chain(tiny_llama, tmp_path):
    wheel, from_sdist = _build(tmp_path)
    members = _members(wheel)
    missing = [f for f in _shipped_sources() if not any(m == f or m.endswith("/" + f) for m in members)]
    assert not missing, f"not in {wheel.name}: {missing}"
    assert _members(from_sdist) == members  # the sdist carries the board build's sources too

    py = _bare_venv(tmp_path / "user-venv")
    # the dependencies this environment has, after the venv's own site-packages (which gets the wheel)
    (_site_packages(py) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "-q", str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{py.parent}{os.pathsep}{env['PATH']}"
    edgeft = str(py.parent / "edgeft")

    where = _run([str(py), "-c", "import edgeft, edgeft.export; print(edgeft.__file__)"], elsewhere, env).stdout
    assert Path(where.strip()).is_relative_to(py.parent.parent), where
    assert "Usage" in _run([edgeft, "--help"], elsewhere, env).stdout
    run = elsewhere / "run"
    _run([edgeft, "eval", "--model", str(tiny_llama), "--run", str(run), *WINDOW], elsewhere, env)
    _run([edgeft, "train", "--model", str(tiny_llama), "--data", "demo", "--run", str(run), "--max-steps", "2",
          "--batch-size", "4", "--eval-generate", "0", "--max-ppl-rise", "100", *WINDOW], elsewhere, env)
    _run([edgeft, "merge", "--adapter", str(run), "--eval-generate", "0", *WINDOW], elsewhere, env)
    _run([edgeft, "export", "--run", str(run), "--quant", "f16", *WINDOW], elsewhere, env)
    steps = json.loads((run / "manifest.json").read_text())["steps"]
    assert [s["step"] for s in steps][:3] == ["eval", "train", "merge"] and steps[-1]["status"] == "ok"
    assert any(s["step"].startswith("export") and s["status"] == "ok" for s in steps)
    assert list((run / "gguf").glob("*.gguf"))
