"""edgeft: fine-tune a small LLM and ship it to an edge board, with the perplexity of every step measured.

Each step of the chain is a plain function taking one config object and returning an artifact:
`evaluate(EvalConfig)`, `train(TrainConfig)`, ... The click CLI in `edgeft.cli` only parses and prints.
"""

__version__ = "0.1.0"
