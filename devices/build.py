"""`edgeft build --device P`: edgeft-board, llama-server and llama-cli compiled for a board profile.

The source is the llama.cpp tree vendored in the llama-cpp-python sdist of the installed version, so the
board reads exactly the GGUF version the host's Python binding writes and scores. aarch64 profiles are
cross-compiled with Debian's gcc-aarch64-linux-gnu and linked statically (GGML_STATIC, no OpenMP: a static
link cannot take libgomp.so), so the board needs nothing installed. Builds are cached in
$EDGEFT_HOME/builds by (llama.cpp version, profile, flags, our board source); a second call is instant.
edgeft-board is compiled first and timed apart from the server and CLI, so build.json says what serving
adds to a cold build.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..atomic import atomic_dir, write_json
from ..errors import EdgeftError
from ..inputs import read_json
from ..models import edgeft_home
from ..progress import bar
from . import Profile, get

BOARD = ("edgeft-board",)  # what smoke needs
RUNTIME = ("llama-server", "llama-cli")  # what deploy --serve installs (and a user runs by hand)
BINARIES = BOARD + RUNTIME
# One build at a time in this process: a fleet's boards ask for the same build from their threads at once, and
# the build's temporary folder is named by process (atomic.py), so two threads would write into one folder;
# the second now finds the first's build cached. Other processes build into folders of their own.
_BUILDING = threading.Lock()
_CROSS = {"aarch64": ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "gcc-aarch64-linux-gnu g++-aarch64-linux-gnu")}


@dataclass
class Build:
    profile: Profile
    folder: Path  # holds bin/ and build.json
    seconds: float
    cached: bool
    seconds_by_part: dict  # the cold build's: board (edgeft-board and libllama), runtime (server, CLI)

    @property
    def bin(self) -> Path:
        return self.folder / "bin"


def _board_source() -> Path:
    # Editable installs map edgeft.devices to the top-level devices/ folder; both hold board/.
    import edgeft.devices

    return Path(edgeft.devices.__file__).parent / "board"


def _cache_key(profile: Profile, flags: list[str]) -> str:
    h = hashlib.sha256()
    h.update(metadata.version("llama_cpp_python").encode())
    h.update("\0".join(flags).encode())
    for f in sorted(_board_source().iterdir()):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise EdgeftError(f"{tool} not found; it is needed to build llama.cpp for the board: apt-get install {package}")
    return path


def cmake_flags(profile: Profile) -> list[str]:
    host = platform.machine()
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_STATIC=ON", "-DGGML_OPENMP=OFF",
             "-DCMAKE_EXE_LINKER_FLAGS=-static", *profile.cmake]
    if profile.c_flags:
        flags += [f"-DCMAKE_C_FLAGS={profile.c_flags}", f"-DCMAKE_CXX_FLAGS={profile.c_flags}"]
    if profile.arch != host:
        if profile.arch not in _CROSS:
            raise EdgeftError(f"--device {profile.name}: cross-compiling from {host} to {profile.arch} is not supported")
        cc, cxx, package = _CROSS[profile.arch]
        flags += [f"-DCMAKE_C_COMPILER={_need(cc, package)}", f"-DCMAKE_CXX_COMPILER={_need(cxx, package)}",
                  "-DCMAKE_SYSTEM_NAME=Linux", f"-DCMAKE_SYSTEM_PROCESSOR={profile.arch}"]
    return flags


def build(device: str, threads: int = 0, runtime: bool = True) -> Build:
    """The profile's build, cached. `runtime=False` (smoke, which runs only edgeft-board) takes a full build if
    one is cached and otherwise builds edgeft-board alone, in a folder of its own: the server and CLI are the
    larger part of a cold build, and a smoke test here (--local, --emulate) never needs them."""
    with _BUILDING:
        return _build(device, threads, runtime)


def _build(device: str, threads: int, runtime: bool) -> Build:
    from ..llamacpp import vendored_source

    profile = get(device)
    _need("cmake", "cmake")
    flags = cmake_flags(profile)
    # Keyed by what the binaries depend on, not the profile name: profiles with the same flags share a build.
    full = edgeft_home() / "builds" / f"{profile.arch}-{_cache_key(profile, flags)}"
    # Cached builds that will do, best first; the last one is what gets built when none is there.
    candidates = [(full, BINARIES)] + ([] if runtime else [(full.with_name(full.name + "-board"), BOARD)])
    for target, binaries in candidates:
        if all((target / "bin" / b).is_file() for b in binaries):
            first = read_json(target / "build.json", "delete the build folder and build again")
            return Build(profile, target, 0.0, cached=True, seconds_by_part=first.get("seconds_by_part", {}))
    target, binaries = candidates[-1]
    source = vendored_source()
    start = time.perf_counter()
    with atomic_dir(target) as tmp:
        work = tmp / "cmake"
        log = tmp / "build.log"
        with open(log, "w") as logf:
            _run(["cmake", "-S", str(_board_source()), "-B", str(work), f"-DLLAMA_CPP_SOURCE={source}", *flags],
                 logf, f"configure for {profile.name}")
            jobs = str(threads or os.cpu_count() or 2)
            seconds = {}
            for part, targets in (("board", BOARD), ("runtime", RUNTIME)) if runtime else (("board", BOARD),):
                t0 = time.perf_counter()
                _run(["cmake", "--build", str(work), "--target", *targets, "-j", jobs], logf,
                     f"compile {', '.join(targets)} for {profile.name}", progress=True)
                seconds[part] = round(time.perf_counter() - t0, 1)
        (tmp / "bin").mkdir()
        for b in binaries:  # llama.cpp's own tools land in its runtime output folder, bin/
            shutil.copy2(work / b if (work / b).is_file() else work / "bin" / b, tmp / "bin" / b)
        shutil.rmtree(work)
        total = time.perf_counter() - start
        # "runtime" is what llama-server and llama-cli add on top of edgeft-board (libllama is shared).
        write_json(tmp / "build.json", {"profile": profile.name, "arch": profile.arch, "flags": flags,
                                        "llama_cpp_python": metadata.version("llama_cpp_python"),
                                        "seconds": round(total, 1), "seconds_by_part": seconds})
    return Build(profile, target, total, cached=False, seconds_by_part=seconds)


def _run(cmd: list[str], logf, what: str, progress: bool = False) -> None:
    """Run a build command, its output to the log; a bar follows make's [ NN%] lines."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with bar(what, 100 if progress else None) as update:
        for line in proc.stdout:
            logf.write(line)
            m = re.match(r"\[\s*(\d+)%\]", line)
            if m and progress:
                update(int(m.group(1)))
    if proc.wait() != 0:
        logf.flush()
        log = Path(logf.name)
        tail = log.read_text().strip().splitlines()[-5:]
        # The log sits in the build's temporary folder, which is deleted as the error leaves it: keep a copy
        # where the message can point, one per build folder (the next failure of the same build replaces it).
        kept = edgeft_home() / "builds" / "failed" / f"{log.parent.name.lstrip('.')}.log"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, kept)
        raise EdgeftError(f"{what} failed (log: {kept}): {' | '.join(tail)[-400:]}")


def tools(device: str, targets: tuple[str, ...], threads: int = 0) -> Path:
    """Other targets of the board's CMake project built for a profile, e.g. llama.cpp's own `llama-perplexity`
    beside edgeft-board (the tests hold edgeft's scoring against the tool's figure): the same vendored source,
    flags and cache as `build`, in $EDGEFT_HOME/builds/ARCH-KEY-TARGETS. Returns the folder holding them."""
    from ..llamacpp import vendored_source

    profile = get(device)
    _need("cmake", "cmake")
    flags = cmake_flags(profile)
    target = edgeft_home() / "builds" / f"{profile.arch}-{_cache_key(profile, flags)}-{'-'.join(targets)}"
    if all((target / "bin" / t).is_file() for t in targets):
        return target / "bin"
    source = vendored_source()
    start = time.perf_counter()
    with atomic_dir(target) as tmp:
        work = tmp / "cmake"
        with open(tmp / "build.log", "w") as logf:
            _run(["cmake", "-S", str(_board_source()), "-B", str(work), f"-DLLAMA_CPP_SOURCE={source}", *flags],
                 logf, f"configure for {profile.name}")
            _run(["cmake", "--build", str(work), "--target", *targets, "-j", str(threads or os.cpu_count() or 2)],
                 logf, f"compile {', '.join(targets)} for {profile.name}", progress=True)
        (tmp / "bin").mkdir()
        for t in targets:
            shutil.copy2(work / t if (work / t).is_file() else work / "bin" / t, tmp / "bin" / t)
        shutil.rmtree(work)
        write_json(tmp / "build.json", {"profile": profile.name, "targets": list(targets), "flags": flags,
                                        "llama_cpp_python": metadata.version("llama_cpp_python"),
                                        "seconds": round(time.perf_counter() - start, 1)})
    return target / "bin"
