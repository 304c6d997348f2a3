"""`python -m edgeft ...`: the same CLI as the `edgeft` command, for launchers that take a module
(`accelerate launch -m edgeft train ...`, `torchrun -m edgeft train ...`)."""

from .cli import main

if __name__ == "__main__":  # a spawned child (export/onnx.py) imports this module too, and must not run the CLI
    main()
