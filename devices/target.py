"""Running the board's binaries on a target: over ssh on a board, here, or under qemu-user (either place).

The one place that knows how a command reaches the target and what its failures mean (SIGILL: the build's
flags do not fit the CPU), shared by smoke, the served-adapter smoke and deploy's server start.
"""

from __future__ import annotations

import math
import shlex
import signal
import subprocess
from typing import Callable

from ..errors import EdgeftError
from ..scoring import PerplexityResult
from .ssh import SSHOptions

SIGILL = 132


def qemu_prefix(profile, emulate: bool) -> list[str]:
    """What runs the board's binaries when emulating: qemu-user with the board's CPU model."""
    return [f"qemu-{profile.arch}-static", "-cpu", profile.qemu_cpu or "max"] if emulate else []


def target_threads(profile, emulate: bool, asked: int = 0) -> int:
    """Threads on the target: --threads, else the profile's; emulated, 2 (qemu-user runs on the host's cores)."""
    return asked or (2 if emulate else profile.threads or 2)


def runner(c: SSHOptions, profile, workdir: str) -> Callable[[list[str], float], str]:
    """A function running a command (an argument list) in the target's work folder, returning stdout (`c`: a
    smoke config: its ssh options and `emulate`).
    Never through a local shell: profile fields are data (a user's profile is a YAML file anyone can hand
    over). On a board the command line is the remote shell's, so every argument is quoted."""
    prefix = qemu_prefix(profile, c.emulate)
    sigill = (f"the {profile.name} build died with SIGILL (illegal instruction) on the target CPU"
              + (f" (qemu -cpu {profile.qemu_cpu})" if c.emulate else "")
              + ": the profile's compiler flags use instructions that CPU lacks; pick the board's profile")

    if c.host:
        remote = c.remote()

        def run(argv: list[str], timeout: float) -> str:
            try:
                return remote.run(f"cd -- {shlex.quote(workdir)} && {shlex.join(prefix + argv)}", timeout=timeout)
            except EdgeftError as e:
                if f"(exit {SIGILL})" in str(e):
                    raise EdgeftError(sigill) from None
                raise
        return run

    def run_local(argv: list[str], timeout: float) -> str:
        try:
            proc = subprocess.run(prefix + argv, cwd=workdir, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise EdgeftError(f"{(prefix + argv)[0]}: not found on this machine"
                              + ("; apt-get install qemu-user-static" if prefix else "")) from None
        except subprocess.TimeoutExpired:
            raise EdgeftError(f"`{shlex.join(argv)[:60]}` took longer than {timeout:.0f} s on the target") from None
        if proc.returncode in (SIGILL, -signal.SIGILL):
            raise EdgeftError(sigill)
        if proc.returncode != 0:
            raise EdgeftError(f"`{shlex.join(argv)[:60]}` failed on the target (exit {proc.returncode}): "
                              f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
        return proc.stdout
    return run_local


def board_perplexity(out: dict, host: PerplexityResult, backend: str) -> PerplexityResult:
    """edgeft-board's perplexity output as a result over the same tokens as the host's (per token, so the two
    can be compared token by token)."""
    token_nll = [math.nan if x is None else x for x in out["token_nll"]]  # the board prints NaN as null
    # The board starts its windows with BOS when the GGUF's vocabulary adds one, the host when the HF tokenizer
    # does (scoring.model_bos); a build from before BOS-aware scoring prints no "bos" and uses none.
    if (out.get("bos", -1) >= 0) != host.bos:
        raise EdgeftError(f"edgeft-board scored {'with' if out.get('bos', -1) >= 0 else 'without'} BOS where the "
                          f"host's tokenizer {'adds' if host.bos else 'adds no'} BOS: the GGUF's add_bos_token "
                          f"disagrees with the tokenizer, or the board has another version's build; run `edgeft "
                          f"deploy` again")
    if len(token_nll) != host.tokens:
        raise EdgeftError(f"edgeft-board scored {len(token_nll)} tokens where the host scored {host.tokens}: "
                          f"another version's build; run `edgeft deploy` again")
    return PerplexityResult(ppl=math.exp(sum(token_nll) / len(token_nll)), nll_sum=sum(token_nll),
                            tokens=len(token_nll), windows=out["windows"], window=host.window, stride=host.stride,
                            seconds=out["seconds"], backend=backend, bos=host.bos, token_nll=token_nll,
                            token_top1=out["top1"])
