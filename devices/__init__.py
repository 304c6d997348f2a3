"""The board side of edgeft (shipped as edgeft.devices): board profiles and their memory arithmetic here, and
  build.py         llama.cpp and the board program (board/) cross-compiled for a profile, cached
  deploy.py        a run's GGUF, the build and the ids to a board over ssh (--serve: llama-server there)
  smoke.py         the shipped GGUF run on the target: answer, speed, perplexity against the host's
  smoke_served.py  the adapters a board serves, checked through its server
  serve.py         llama-server on the board: started, stopped, asked
  fleet.py         --hosts: deploy or smoke on many boards at once (deploy() and smoke() run it)
  ssh.py, target.py  the connection; running the board's binaries over ssh, here or under qemu-user
Board profiles are data: one YAML file per board, shipped in the wheel.

A profile says what llama.cpp must be built for (arch, CMake flags), how much RAM and how many threads
the board has, and its memory bandwidth with the source of that figure (decode speed is bound by
bandwidth / model size). Users add their own boards as YAML files in $EDGEFT_HOME/devices/.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgeftError
from ..inputs import shown_value

_FIELDS = ("name", "description", "arch", "cpu", "threads", "ram_gb", "memory_bandwidth_gbs",
           "memory_bandwidth_source", "cmake", "c_flags", "qemu_cpu")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    arch: str
    cpu: str
    threads: int
    ram_gb: tuple[float, ...]
    memory_bandwidth_gbs: float | None
    memory_bandwidth_source: str
    cmake: tuple[str, ...]
    c_flags: str
    qemu_cpu: str | None
    source: Path

    @property
    def ram_bytes(self) -> int:
        """The smallest RAM variant, or the host's RAM for a profile that says 0."""
        smallest = min(self.ram_gb)
        if smallest:
            return int(smallest * 2**30)
        import psutil

        return psutil.virtual_memory().total


def _user_dir() -> Path:
    from ..models import edgeft_home

    return edgeft_home() / "devices"


# Values that reach file names and (quoted) command lines: plain names only.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def _load(path: Path) -> Profile:
    """One profile file, validated: it is data anyone can hand over, and its names reach build paths and the
    commands run on a board."""
    from ..config import read_config_file

    data = read_config_file(path, "board profile")
    missing = [f for f in _FIELDS if f not in data]
    if missing:
        raise EdgeftError(f"{path}: missing {', '.join(missing)}; see the shipped profiles in {Path(__file__).parent}")

    def bad(field: str, want: str) -> EdgeftError:
        return EdgeftError(f"{path}: '{field}' is {shown_value(data[field])}; it must be {want}")

    for f in ("name", "arch"):
        if not isinstance(data[f], str) or not _NAME.fullmatch(data[f]):
            raise bad(f, "a plain name (letters, digits, '.', '_', '+', '-')")
    qemu_cpu = data["qemu_cpu"]
    if qemu_cpu is not None and (not isinstance(qemu_cpu, str) or not _NAME.fullmatch(qemu_cpu)):
        raise bad("qemu_cpu", "a qemu CPU model name or null")
    for f in ("description", "cpu", "c_flags", "memory_bandwidth_source"):
        if not isinstance(data[f], str):
            raise bad(f, "text")
    if not isinstance(data["cmake"], list) or not all(isinstance(x, str) for x in data["cmake"]):
        raise bad("cmake", "a list of CMake flags")
    # The flags reach CMake's command line and the Makefiles it generates, which a shell runs: each must be a
    # plain flag (no spaces, quotes, ';', '$', '`', '&', '|', redirections), the only kind a board needs.
    odd = next((x for x in data["cmake"] if not _CMAKE_FLAG.fullmatch(x)), None)
    if odd is not None:
        raise EdgeftError(f"{path}: 'cmake' entry {odd!r} is not a plain -DNAME=VALUE flag (letters, digits and "
                          f"._+-=:,/ only); write each flag as its own list entry without shell characters")
    odd = next((x for x in data["c_flags"].split() if not _C_FLAG.fullmatch(x)), None)
    if odd is not None:
        raise EdgeftError(f"{path}: 'c_flags' has {odd!r}, not a plain compiler flag (a '-' then letters, digits and "
                          f"._+-=:,/ only); give flags such as -mtune=cortex-a76, separated by spaces")
    ram = data["ram_gb"] if isinstance(data["ram_gb"], list) else [data["ram_gb"]]
    if not ram or not all(_number(r) and r >= 0 for r in ram):
        raise bad("ram_gb", "a number of GB or a list of them (0: the host's)")
    if isinstance(data["threads"], bool) or not isinstance(data["threads"], int) or not 0 <= data["threads"] <= 4096:
        raise bad("threads", "a whole number (0: all cores)")
    if data["memory_bandwidth_gbs"] is not None and not (_number(data["memory_bandwidth_gbs"])
                                                         and data["memory_bandwidth_gbs"] > 0):
        raise bad("memory_bandwidth_gbs", "a positive number or null")
    return Profile(**{**{f: data[f] for f in _FIELDS}, "ram_gb": tuple(float(r) for r in ram),
                      "cmake": tuple(data["cmake"]), "source": path})


_CMAKE_FLAG = re.compile(r"-D[A-Za-z_][A-Za-z0-9_]*(:[A-Z]+)?=[A-Za-z0-9._+\-=:,/]*")
_C_FLAG = re.compile(r"-[A-Za-z0-9][A-Za-z0-9._+\-=:,/]*")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def profiles() -> dict[str, Profile]:
    """Shipped profiles, then the user's (a user file with a shipped name replaces it)."""
    found: dict[str, Profile] = {}
    for folder in (Path(__file__).parent, _user_dir()):
        for f in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            p = _load(f)
            found[p.name] = p
    return found


def get(name: str) -> Profile:
    known = profiles()
    if name not in known:
        raise EdgeftError(f"--device {name}: unknown board; known: {', '.join(known)} (add yours as YAML in "
                          f"{_user_dir()})")
    return known[name]


RUNTIME_OVERHEAD = 256 * 2**20  # llama.cpp's compute buffers and the process itself, for a small model
USABLE_RAM = 0.8  # the OS, the SSH session and page cache need the rest


def kv_cache_bytes(config: dict, context: int) -> int:
    """F16 K and V for every layer at `context` tokens (llama.cpp's default cache type)."""
    # Older architectures (GPT-2 and kin, converted by llama.cpp's converter) name the same sizes differently.
    def get(*names):
        return next((config[n] for n in names if config.get(n)), None)

    n_head = get("num_attention_heads", "n_head")
    hidden, layers = get("hidden_size", "n_embd"), get("num_hidden_layers", "n_layer")
    if not (n_head and hidden and layers):
        raise EdgeftError("config.json: no attention heads / hidden size / layer count to size the KV cache by; "
                          "pass a model folder with a complete config.json")
    head_dim = config.get("head_dim") or hidden // n_head
    return layers * context * 2 * (get("num_key_value_heads") or n_head) * head_dim * 2


def memory_need(model_bytes: int, config: dict, context: int) -> int:
    return model_bytes + kv_cache_bytes(config, context) + RUNTIME_OVERHEAD


def fits(profile: Profile, need_bytes: int, ram_bytes: int | None = None) -> tuple[bool, int]:
    """(whether `need_bytes` fits in the usable part of the board's RAM, the usable bytes)."""
    usable = int(USABLE_RAM * (ram_bytes or profile.ram_bytes))
    return need_bytes <= usable, usable
