"""`python -m edgeft ...`: the same CLI as the `edgeft` command, for launchers that take a module
(`accelerate launch -m edgeft train ...`, `torchrun -m edgeft train ...`)."""

from .cli import main

main()
