"""Shared fixtures. The fast tier (`-m "not slow"`) uses tiny models built from a config with a tokenizer
trained here; tests marked slow use the real default model (materialised once per session into a temporary
EDGEFT_HOME, unless EDGEFT_HOME is set), real llama.cpp builds for the board, or run the chain end to end."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def assert_one_line_error(result, *needles, code: int = 2):
    """A CLI failure the way users must see it: exit code, one `error:` line naming what is wrong, no traceback."""
    assert result.exit_code == code, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "Traceback" not in result.output, result.output
    for n in needles:
        assert n in line, line  # nothing may download weights
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Small perplexity windows: tiny models score a few hundred ids in a second.
WINDOW = ["--window", "128", "--stride", "128", "--eval-budget", "300"]

needs_cross = pytest.mark.skipif(
    not shutil.which("aarch64-linux-gnu-g++") or not shutil.which("qemu-aarch64-static"),
    reason="needs gcc-aarch64-linux-gnu, g++-aarch64-linux-gnu, qemu-user-static (dev.py test installs them "
           "where it can)")


@pytest.fixture(scope="session", autouse=True)
def edgeft_home(tmp_path_factory) -> Path:
    """A fresh EDGEFT_HOME for the session (token caches, builds, the materialised default model), unless the
    environment names one."""
    if os.environ.get("EDGEFT_HOME"):
        return Path(os.environ["EDGEFT_HOME"])
    home = tmp_path_factory.mktemp("edgeft-home")
    os.environ["EDGEFT_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def default_model(edgeft_home) -> Path:
    from edgeft.models import DEFAULT_BASE, resolve_model

    return resolve_model(DEFAULT_BASE)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE of 2,048 tokens trained on the CPython docs in a second or two, with SmolLM's
    pre-tokenizer (each digit alone, then GPT-2's regex), ChatML special tokens and a template with a default
    system turn: tiny models need neither the 135M default model nor any download."""
    from .tiny_models import CHATML_WITH_SYSTEM, bpe_tokenizer

    return bpe_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"), "smollm", vocab_size=2048,
                         chat_template=CHATML_WITH_SYSTEM)


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer, tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights (seed 0) and the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_llama, tmp_path_factory):
    """A Qwen2 (q/k/v biases, NEOX RoPE, untied head) with the default tokenizer and random weights."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(3)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # random init leaves biases at zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def train_tiny(base: Path, run: Path, rows: list[dict] | None = None, **overrides):
    """A few steps of edgeft train on the tiny Llama with demo-task rows (or `rows`): a real adapter in seconds."""
    import json

    from edgeft.data.demo_task import make_rows
    from edgeft.train import TrainConfig, train

    data = run.parent / f"{run.name}-data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (rows or make_rows(24))))
    settings = dict(model=str(base), data=str(data), run=str(run), batch_size=4, max_steps=6, save_every=2,
                    eval_budget=300, window=128, stride=128, eval_generate=0, max_ppl_rise=100.0, lr=1e-3)
    settings.update(overrides)
    return train(TrainConfig(**settings))


@pytest.fixture(scope="session")
def tiny_adapter_run(tiny_llama, tmp_path_factory) -> Path:
    """An adapter trained on the unquantized tiny Llama (lr high enough that the delta is far from zero)."""
    return train_tiny(tiny_llama, tmp_path_factory.mktemp("runs") / "tiny", lr=1e-2, max_steps=4).run


@pytest.fixture(scope="session")
def tiny_export_run(tiny_llama, tmp_path_factory) -> Path:
    """A run with the tiny Llama exported to F16 and Q8_0 GGUFs (what deploy and smoke ship)."""
    from click.testing import CliRunner

    from edgeft.cli import cli

    run = tmp_path_factory.mktemp("tiny-export-run")
    result = CliRunner().invoke(cli, ["export", "--model", str(tiny_llama), "--quant", "f16,q8_0", "--run", str(run),
                                      *WINDOW])
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture
def copy_run(tmp_path):
    """A copy of a session's run for a test that writes to it (deploy, smoke and merge append to its ledger):
    the session's run stays as its fixture built it for the tests after."""
    def copy(run: Path, name: str = "run") -> Path:
        return Path(shutil.copytree(run, tmp_path / name))
    return copy


def deploy_cli(run, board, dest, *extra):
    """`edgeft deploy` of `run` to the loopback board, emulated Pi 5."""
    from click.testing import CliRunner

    from edgeft.cli import cli

    return CliRunner().invoke(cli, ["deploy", str(run), "--device", "rpi5", "--host", "board", "--ssh-config",
                                    board.config, "--dest", str(dest), "--emulate", "--json", *extra])


@pytest.fixture(scope="session")
def board(tmp_path_factory):
    """A real OpenSSH server on 127.0.0.1 standing in for a board, with a throwaway host key and client key.
    The ssh config it returns has: `board` (known host key), `board2` (the same server on a second port: a
    second board of a fleet), `stranger` (same server, key not in known_hosts) and `nowhere` (a closed port)."""
    import getpass
    import shutil
    import socket
    import subprocess
    import time
    from types import SimpleNamespace

    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists() or not shutil.which("ssh"):
        pytest.skip("openssh-server/openssh-client not installed (apt-get install openssh-server openssh-client)")
    d = tmp_path_factory.mktemp("board")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port, port2, closed = free_port(), free_port(), free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nPort {port2}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation folder sshd insists on
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")], stderr=open(d / "sshd.log", "w"))
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {(d / 'host_key.pub').read_text()}"
                                   f"[127.0.0.1]:{port2} {(d / 'host_key.pub').read_text()}")
    (d / "empty_known_hosts").write_text("")
    common = (f"  HostName 127.0.0.1\n  User {getpass.getuser()}\n  IdentityFile {d / 'client_key'}\n"
              f"  IdentitiesOnly yes\n  StrictHostKeyChecking yes\n  LogLevel ERROR\n")
    (d / "ssh_config").write_text(
        f"Host board\n  Port {port}\n{common}  UserKnownHostsFile {d / 'known_hosts'}\n"
        f"Host board2\n  Port {port2}\n{common}  UserKnownHostsFile {d / 'known_hosts'}\n"
        f"Host stranger\n  Port {port}\n{common}  UserKnownHostsFile {d / 'empty_known_hosts'}\n"
        f"Host nowhere\n  Port {closed}\n{common}  UserKnownHostsFile {d / 'known_hosts'}\n")
    yield SimpleNamespace(config=str(d / "ssh_config"), root=d)
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def tiny_merged_task_run(tiny_adapter_run, tmp_path_factory) -> Path:
    """A copy of the tiny adapter run with its adapter merged (float32): a run whose ledger has the task at
    train and merge, ready for exports of either format."""
    from edgeft.merge import MergeConfig, merge

    run = tmp_path_factory.mktemp("merged-task") / "run"
    shutil.copytree(tiny_adapter_run, run)
    merge(MergeConfig(adapter=str(run), dtype="float32", window=128, stride=128))
    return run


def free_serve_port() -> int:
    """A port for a board's server where the next port is free too (smoke measures one model on port + 1). Taken
    below the kernel's ephemeral range: on a loopback board, the ssh connections and tunnels of the same test
    take ephemeral ports, and one of them on port + 1 kept the measuring server from binding."""
    import random
    import socket

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low - 2)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two free ports next to each other below the ephemeral range")
