"""`edgeft compare --methods lora,dora,ia3 --data FILE`: which PEFT method survives the trip to the board.

Each method runs the same chain in its own run folder, RUN/METHOD: train (same data, steps, seed and
held-out ids) → merge → export GGUF F16 and each --quant. The comparison is then read from their ledgers, so
every figure is one that chain measured and gated:
  method · trainable params · adapter MB · train seconds · peak RAM · held-out perplexity and exact answers
  on the task's held-out prompts for the merged model and for each quant · forgetting (merged vs base
  perplexity on the held-out text).
RUN/manifest.json gets a `compare` entry with the rows (so `edgeft report RUN` shows the table), plus
RUN/compare.png. A method whose chain fails (a gate, an error) is a row saying why, with what it measured
before; the others still run; the result carries the failure (`raise_failure()`), and the command exits with
its code after the table. A method already done in RUN/METHOD (trained with the same method, data, rate,
steps and seed; its merge and export entries ok) is read, not rerun, unless --redo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_file
from .config import read_config_file, to_dict
from .errors import EdgeftError, GateFailed
from . import methods
from .heldout import HeldOutOptions
from .ledger import artifact
from .run import COMPARE, EXPORT_GGUF, MERGE, TRAIN, Run, last_entry


def default_lrs() -> str:
    """--lr's default: each method's rate for compare's short runs (15 steps), measured on the demo task so that
    each learns it and passes every gate (methods/*.py say why): LoRA's as the bare number, the others named."""
    rates = methods.lr_defaults("compare_lr")
    bare = rates["lora"]
    return ",".join([f"{bare:g}", *(f"{m}={r:g}" for m, r in rates.items() if r != bare)])


DEFAULT_LR = default_lrs()


def method_lrs(spec: str, wanted: list[str]) -> dict[str, float]:
    """--lr as a rate per method: "0.001" for all, or "0.001,ia3=0.015" (the bare number for the others)."""
    known = methods.names()

    bare, named = None, {}
    for part in str(spec).split(","):
        name, _, value = part.strip().rpartition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = float("nan")
        if not rate > 0 or rate == float("inf"):
            raise EdgeftError(f"--lr {spec}: '{part.strip()}' is not a positive rate; write 0.001 or 0.001,ia3=0.015")
        if name and name not in known:
            raise EdgeftError(f"--lr {spec}: '{name}' is not a method; name one of {', '.join(known)}")
        if name:
            named[name] = rate
        else:
            bare = rate
    if bare is None and not set(wanted) <= set(named):
        raise EdgeftError(f"--lr {spec}: no rate for {', '.join(m for m in wanted if m not in named)}; add a bare "
                          f"number for the others")
    return {m: named.get(m, bare) for m in wanted}


@dataclass
class CompareConfig(HeldOutOptions):
    methods: list[str] = field(default_factory=lambda: ["lora", "dora", "ia3"], metadata={
        "help": "PEFT methods to compare (comma-separated: lora, rslora, dora, ia3)"})
    data: str = field(default="", metadata={"help": "training data, as for train (demo, dates, or a file)"})
    model: str = field(default="smollm2-135m", metadata={"help": "base model"})
    quant: list[str] = field(default_factory=lambda: ["q8_0", "q4_k_m"], metadata={
        "help": "GGUF quants to export each merged model to (F16 is always made: the reference)"})
    pipeline: str = field(default="", metadata={
        "help": "a pipeline file whose train/merge/export sections every method runs (its train.method is set "
                "per method); --data/--quant then override only what you pass"})
    run: str = field(default="runs/compare", metadata={"help": "folder: one run per method inside"})
    max_steps: int = field(default=15, metadata={"help": "optimizer steps for every method"})
    lr: str = field(default=DEFAULT_LR, metadata={
        "help": "peak learning rate: one for every method (0.001), or per method (0.001,ia3=0.015: the bare number "
                "for the others)"})
    seed: int = field(default=0, metadata={"help": "the same seed for every method"})
    eval_generate: int = field(default=10, metadata={"help": "held-out prompts answered at train and merge"})
    redo: bool = field(default=False, metadata={"help": "rerun methods already done in the folder"})


@dataclass
class CompareResult:
    run: Path
    entry: dict
    failure: EdgeftError | None = None  # the first method's failure (GateFailed if any gate failed), to raise

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure


def _spec(c: CompareConfig, method: str, lr: float) -> dict:
    """The pipeline one method runs: the file's sections (or the defaults) with this method."""
    spec = read_config_file(c.pipeline, "--pipeline") if c.pipeline else {}
    train = {"model": c.model, "data": c.data, "max_steps": c.max_steps, "lr": lr, "seed": c.seed,
             "eval_generate": c.eval_generate, "text": c.text, "eval_budget": c.eval_budget, "window": c.window,
             "stride": c.stride, **(spec.get("train") or {}), "method": method}
    if c.data:
        train["data"] = c.data
    merge = {"eval_generate": c.eval_generate, **(spec.get("merge") or {})}
    exports = spec.get("export") or [{"format": "gguf"}]
    exports = [exports] if isinstance(exports, dict) else exports
    exports = [{**e, "quant": ["f16", *[q for q in c.quant if q != "f16"]]} if e.get("format", "gguf") == "gguf"
               and (c.quant or not e.get("quant")) else e for e in exports]
    return {"train": train, "merge": merge, "export": exports}


# What compare itself sets in a method's training: a finished method trained otherwise is run again.
SAME = ("method", "data", "lr", "max_steps", "seed")


def _done(run: Run, train: dict) -> bool:
    steps = run.steps()
    trained = last_entry(steps, TRAIN, status=None)
    return trained is not None and all(trained["config"].get(k) == train[k] for k in SAME) and \
        last_entry(steps, MERGE) is not None and last_entry(steps, EXPORT_GGUF) is not None


def _adapter_mb(train: dict, run: Run) -> float | None:
    """The adapter's weights in MiB (the folder also holds the tokenizer); entries written before train
    recorded adapter_bytes: the weights file in the run."""
    from .adapter import ADAPTER_WEIGHTS

    size = train["metrics"].get("adapter_bytes")
    if size is None and train["outputs"] and (run.adapter / ADAPTER_WEIGHTS).is_file():
        size = (run.adapter / ADAPTER_WEIGHTS).stat().st_size
    return None if size is None else round(size / 2**20, 2)


def _row(method: str, run: Run, error: str | None) -> dict:
    steps = run.steps()
    train = last_entry(steps, TRAIN, status=None)
    merge = last_entry(steps, MERGE)
    row = {"method": method, "run": str(run.path), "ok": error is None, "error": error,
           "trainable_params": None, "adapter_mb": None, "train_seconds": None, "peak_ram_mb": None,
           "base_ppl": None, "merged": None, "quants": {}, "forgetting": None}
    if train and train["metrics"].get("trainable_params"):  # trained, even if its forgetting gate then failed
        m = train["metrics"]
        row.update(trainable_params=m.get("trainable_params"), train_seconds=train.get("wall_s"),
                   peak_ram_mb=train.get("peak_rss_mb"),
                   adapter_mb=_adapter_mb(train, run),
                   base_ppl=(train.get("reference") or {}).get("ppl"))
        adapter_ppl = (train.get("perplexity") or {}).get("ppl")
        if row["base_ppl"] and adapter_ppl:  # the adapter's own, replaced by the merged model's below
            row["forgetting"] = round(adapter_ppl / row["base_ppl"] - 1, 6)

    def measured(e: dict) -> dict:
        task = e.get("task") or {}
        return {"ppl": (e.get("perplexity") or {}).get("ppl"), "task_ppl": task.get("ppl"),
                "exact_match": task.get("exact_match"), "status": e["status"], "bytes": (e["outputs"] or [{}])[0].get(
                    "bytes")}

    if merge:
        row["merged"] = measured(merge)
        if row["base_ppl"] and row["merged"]["ppl"]:
            row["forgetting"] = round(row["merged"]["ppl"] / row["base_ppl"] - 1, 6)
    for e in steps:
        if e["step"] == EXPORT_GGUF and isinstance(e["inputs"].get("quant"), str):
            row["quants"][e["inputs"]["quant"]] = measured(e)  # the last export of each quant
    return row


def compare(config: CompareConfig) -> CompareResult:
    from .pipeline import run_pipeline

    c = config
    if not c.methods:
        raise EdgeftError("--methods: give at least one of " + ", ".join(methods.names()))
    for m in c.methods:
        methods.get(m)
    if len(set(c.methods)) != len(c.methods):
        raise EdgeftError(f"--methods {','.join(c.methods)}: a method is listed twice")
    if not (c.data or c.pipeline):
        raise EdgeftError("--data is required (demo, dates, or a file), or --pipeline FILE with a train section")
    c.check_heldout()
    lrs = method_lrs(c.lr, c.methods)
    root = Run(c.run)
    rows, failures = [], []
    inputs = {"methods": c.methods, "data": c.data or None, "pipeline": c.pipeline or None, "quant": c.quant,
              "model": c.model}
    with root.record(COMPARE, to_dict(c), inputs) as entry:
        for method in c.methods:
            run = root.method_run(method)
            error = None
            spec = _spec(c, method, lrs[method])
            if c.redo or not _done(run, spec["train"]):
                try:
                    run_pipeline(spec, str(run.path))
                except EdgeftError as e:  # a gate or an error: this method's row says so, the others still run
                    error = str(e)
                    failures.append((method, e))
            rows.append(_row(method, run, error))
        entry["metrics"]["rows"] = rows
        with atomic_file(root.compare_plot) as tmp:
            tmp.write_bytes(plot(rows))
        entry["outputs"].append(artifact(root.compare_plot, root.path))
        if failures:
            entry["status"] = "failed"
            entry["reason"] = "; ".join(f"{m}: {e}" for m, e in failures)
    failure = None
    if failures:  # raised by the caller after the table is shown: a failed method is a result too
        failure = (GateFailed if any(isinstance(e, GateFailed) for _, e in failures) else EdgeftError)(entry["reason"])
    return CompareResult(run=root.path, entry=entry, failure=failure)


def plot(rows: list[dict]) -> bytes:
    """Held-out perplexity change vs the base and exact answers, per method, for the merged model and each
    quant: where each method's quality goes on the way to the board."""
    from .report import png_bytes, pyplot  # compare draws with the report's matplotlib setup

    plt = pyplot()
    stages = ["merged", *dict.fromkeys(q for r in rows for q in r["quants"] if q != "f16")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        got = [r["merged"] or {}] + [r["quants"].get(s) or {} for s in stages[1:]]
        change = [100 * (g["ppl"] / r["base_ppl"] - 1) if g.get("ppl") and r["base_ppl"] else 0 for g in got]
        exact = [100 * (g.get("exact_match") or 0) for g in got]
        xs = [j + i * width for j in range(len(stages))]
        left.bar(xs, change, width, label=r["method"])
        right.bar(xs, exact, width, label=r["method"])
    for ax, label in ((left, "held-out perplexity vs base (%)"), (right, "exact answers, held-out prompts (%)")):
        ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(stages))], [s.upper() if s != "merged"
                                                                                      else s for s in stages])
        ax.set_ylabel(label)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.legend(fontsize=8)
    right.set_ylim(0, 100)
    fig.tight_layout()
    return png_bytes(fig, 100)
