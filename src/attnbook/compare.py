"""Train every attention variant under identical conditions and compare them (``attnbook compare``).

    rows = compare(CompareConfig(preset="quick"))  # or: attnbook compare --quick

Every variant gets the same GPT shape, seed, data order, steps, optimiser and schedule; only
``GPTConfig.attention`` and its options change (``variant_options``: each variant's own choice
for the sequence length). Workloads: ``"recall"`` (``attnbook.tasks``' recall, copying and
induction, accuracy per task and recall by gap) and ``"lm"`` (validation loss on a corpus). Each variant
trains in a spawned child process (call ``compare`` under ``if __name__ == "__main__":`` in a
script), ``jobs`` at a time, into ``out_dir/<workload>/<variant>/``; finished variants with the
same settings are reused. ``out_dir/<workload>/`` then holds ``results.csv``, ``results.md``,
``curves.csv`` and the figures. Presets: ``"quick"`` and ``"full"`` (``PRESETS``; recall needs
the full one's steps).
Chapter 18 explains the comparison and reads its results.
"""

import argparse
import csv
import json
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

from .attention import attention_class, available
from .attention.config import POSITIONS
from .checks import check_non_negative_int, check_positive_int
from .data import TokenData, prepare
from .model import GPT, GPTConfig
from .tasks import TaskBatch, accuracy, accuracy_by_gap, build_task
from .train import TrainConfig, load_trained, read_metrics, train

WORKLOADS = ("recall", "lm")
PRESETS = {
    "quick": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, max_iters=1500, batch_size=48),
    "full": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, max_iters=8000, batch_size=48),
}
GAP_EDGES = (1, 8, 16, 32, 64, 128, 256)  # recall accuracy is reported per gap bin [lo, hi)
CACHE_T = 1024  # cache bytes per token are reported for a sequence of this length
TASK_FIELDS = ("idx", "targets", "gaps")  # TaskBatch's tensors, in order


@dataclass(frozen=True)
class CompareConfig:
    """What ``compare`` runs; every variant shares all of it.

    Args:
        workload: ``"recall"`` (synthetic suite) or ``"lm"`` (language modelling on ``data``).
        variants: registered attention names; empty means every one in ``available()``.
        preset: ``"quick"`` or ``"full"``: the defaults of the fields below set to None.
        n_layer, n_head, n_embd, block_size, max_iters, batch_size: the GPT and the run;
            ``block_size`` is also the synthetic tasks' sequence length.
        positions: the position scheme of every variant (``GPTConfig.positions``).
        lr: AdamW's peak learning rate (warm-up over the first 5% of steps, cosine to lr/10).
        data, encoding: the ``"lm"`` workload's corpus and encoding.
        eval_batches: batches of the fixed evaluation set (accuracy and final losses).
        seed: seeds the weights, the data and the evaluation set.
        out_dir: results folder (the workload gets a subfolder).
        force: rerun variants that already have a result.
        progress: show progress bars.
        jobs: variants trained at once, each in its own process with ``cores // jobs`` torch
            threads; 0 means one per CPU core, at most one per variant. Small models use one
            core about as well as two, so on 2 cores ``jobs=2`` nearly halves the wall time. It
            changes the timing columns, not the losses or accuracies.
    """

    workload: str = "recall"
    variants: tuple = ()
    preset: str = "quick"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    max_iters: int | None = None
    batch_size: int | None = None
    positions: str = "rope"
    lr: float = 3e-3
    data: str = "tinyshakespeare"
    encoding: str = "char"
    eval_batches: int = 8
    seed: int = 1337
    out_dir: str = "results/compare"
    force: bool = False
    progress: bool = True
    jobs: int = 0

    def __post_init__(self):
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {WORKLOADS}, got {self.workload!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        unknown = [v for v in self.variants if v not in available()]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; registered: {', '.join(available())}")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "variants", tuple(self.variants) or tuple(available()))
        for name in ("n_layer", "n_head", "n_embd", "block_size", "max_iters", "batch_size"):
            check_positive_int(name, getattr(self, name))
        if self.batch_size % 3 and self.workload == "recall":
            raise ValueError(
                f"the recall suite mixes 3 tasks equally: batch_size must be a multiple of 3, "
                f"got {self.batch_size}"
            )
        check_positive_int("eval_batches", self.eval_batches)
        check_non_negative_int("jobs", self.jobs, "0: one per core")

    def settings(self) -> dict:
        """What decides a variant's result: a rerun with equal settings is skipped."""
        skip = ("variants", "out_dir", "force", "progress", "jobs")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


def variant_options(name: str, cfg: CompareConfig) -> dict:
    """Attention options of ``name`` for this comparison: the variant's ``options_for_length``
    at ``block_size``."""
    return attention_class(name).options_for_length(cfg.block_size, cfg.n_head)


# --- the data of each workload ------------------------------------------------------------


def recall_suite(cfg: CompareConfig) -> list:
    """The three synthetic tasks at ``block_size`` positions, sharing one vocabulary."""
    T = cfg.block_size
    return [
        build_task("recall", vocab_size=64, seq_len=T, n_pairs=max(2, T // 16)),
        build_task("copy", vocab_size=64, seq_len=T, segment_len=max(2, T // 4)),
        build_task("induction", vocab_size=64, seq_len=T),
    ]


class SuiteData:
    """The synthetic suite with ``train``'s data interface: every batch holds an equal part of
    each task. ``"val"`` batches come from the generator ``train.evaluate`` passes (fixed)."""

    def __init__(self, tasks: list):
        self.tasks = tasks
        self.vocab_size = max(t.vocab_size for t in tasks)
        self.meta = {"tasks": [t.name for t in tasks]}

    def get_batch(self, split, batch_size, block_size, generator, rank=0, world_size=1):
        """``(x, y)``, each ``(batch_size / world_size, block_size)``; ``y`` is -1 off answers."""
        if block_size != self.tasks[0].seq_len:
            raise ValueError(f"block_size={block_size}, the tasks have {self.tasks[0].seq_len}")
        per_task = batch_size // len(self.tasks)
        batches = [t.batch(per_task, generator) for t in self.tasks]
        x = torch.cat([b.idx for b in batches])  # (batch_size, T)
        y = torch.cat([b.targets for b in batches])  # (batch_size, T)
        return x.chunk(world_size)[rank], y.chunk(world_size)[rank]


# --- one variant ----------------------------------------------------------------------------


def model_config(
    name: str, cfg: CompareConfig, vocab_size: int, options: dict | None = None
) -> GPTConfig:
    return GPTConfig(
        vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_embd=cfg.n_embd, dropout=0.0, positions=cfg.positions, attention=name,
        attention_options=variant_options(name, cfg) | (options or {}),
    )  # fmt: skip


def cache_bytes_per_token(model_cfg: GPTConfig, T: int = CACHE_T) -> float:
    """Bytes of all layers' caches for one ``T``-token sequence in float32, divided by ``T``
    (``GPT.cache_bytes_per_token`` of the model built on the meta device)."""
    with torch.device("meta"):
        return GPT(replace(model_cfg, block_size=T)).cache_bytes_per_token(T)


@torch.no_grad()
def generation_tokens_per_s(model: GPT, vocab_size: int, new_tokens: int, repeats: int = 2):
    """Greedy decoding with the cache, batch 1, a 16-token prompt: best of ``repeats``."""
    prompt = torch.randint(0, vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    best = math.inf
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        model.generate(prompt, new_tokens, temperature=0)
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


@torch.no_grad()
def task_scores(model: GPT, tasks: list, cfg: CompareConfig) -> dict:
    """Accuracy per task and recall accuracy per gap bin, on a fixed evaluation set of
    ``eval_batches`` batches per task."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    scores = {}
    for task in tasks:
        parts = [task.batch(cfg.batch_size, gen) for _ in range(cfg.eval_batches)]
        batch = TaskBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in TASK_FIELDS))
        logits = torch.cat([model(p.idx)[0] for p in parts])  # (eval_batches * B, T, V)
        scores[f"{task.name}_acc"] = accuracy(logits, batch)
        if task.name == "recall":
            scores["recall_by_gap"] = accuracy_by_gap(logits, batch, GAP_EDGES)
    return scores


def run_variant(
    name: str,
    cfg: CompareConfig,
    threads: int | None = None,
    tasks: list | None = None,
    options: dict | None = None,
) -> dict:
    """Train ``name`` in ``out_dir/<workload>/<name>/`` with ``threads`` torch threads (None:
    torch's default) and measure it; returns the result row (also written to ``result.json``
    there). ``tasks``: the recall workload's tasks at ``block_size`` positions, mixed equally
    (None: ``recall_suite(cfg)``); ``options``: attention options that replace or add to
    ``variant_options``."""  # fmt: skip
    start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    folder = Path(cfg.out_dir) / cfg.workload / name
    if cfg.workload == "recall":
        tasks = recall_suite(cfg) if tasks is None else tasks
        data = SuiteData(tasks)
    else:
        data = TokenData(prepare(cfg.data, cfg.encoding))
    model_cfg = model_config(name, cfg, data.vocab_size, options)
    train_cfg = TrainConfig(
        model=model_cfg, out_dir=str(folder), batch_size=cfg.batch_size,
        max_iters=cfg.max_iters, lr=cfg.lr, min_lr=cfg.lr / 10,
        warmup_iters=max(1, cfg.max_iters // 20), lr_decay_iters=cfg.max_iters,
        eval_interval=max(1, cfg.max_iters // 10), eval_iters=cfg.eval_batches,
        log_interval=max(1, cfg.max_iters // 100), ckpt_interval=cfg.max_iters,
        seed=cfg.seed, progress=cfg.progress, device="cpu",
    )  # fmt: skip
    train(train_cfg, data)
    model, _, _ = load_trained(folder)  # the final weights, in eval mode
    metrics = read_metrics(folder)
    final = [m for m in metrics if "val_loss" in m][-1]
    row = {
        "variant": name,
        "options": json.dumps(model_cfg.attention_options, sort_keys=True),
        "params": model.num_params(non_embedding=False),
        "train_loss": final["train_loss"],
        "val_loss": final["val_loss"],
    }
    if cfg.workload == "recall":
        row.update(task_scores(model, tasks, cfg))
    row["train_tokens_per_s"] = statistics.median(
        m["tokens_per_s"] for m in metrics if "tokens_per_s" in m
    )
    row["gen_tokens_per_s"] = generation_tokens_per_s(model, data.vocab_size, cfg.block_size - 16)
    row["cache_bytes_per_token"] = cache_bytes_per_token(model_cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    row["peak_rss_mb"] = peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    row["wall_s"] = time.perf_counter() - start
    row["threads"] = torch.get_num_threads()
    row["settings"] = cfg.settings()
    (folder / "result.json").write_text(json.dumps(row, indent=2))
    return row


def _run_variant(args: tuple) -> dict:
    return run_variant(*args)  # Pool.imap passes one argument


# --- all variants ---------------------------------------------------------------------------


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):  # Linux: respects taskset and container limits
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def compare(cfg: CompareConfig) -> list[dict]:
    """Run (or reuse) every variant of ``cfg``, then write the tables and figures; returns the
    rows in ``cfg.variants`` order."""
    root = Path(cfg.out_dir) / cfg.workload
    rows, todo = {}, []
    for name in cfg.variants:
        folder = root / name
        done = folder / "result.json"
        if done.exists() and not cfg.force:
            row = json.loads(done.read_text())
            if row["settings"] == json.loads(json.dumps(cfg.settings())):
                print(f"{name}: finished before with these settings, reusing {done}")
                rows[name] = row
                continue
        shutil.rmtree(folder, ignore_errors=True)  # stale or forced: start afresh
        todo.append(name)
    if todo:
        jobs = min(len(todo), cfg.jobs or cpu_cores())
        threads = max(1, cpu_cores() // jobs)
        print(f"training {', '.join(todo)}: {cfg.max_iters} steps each, {jobs} at a time, "
              f"{threads} thread(s) each", flush=True)  # fmt: skip
        # one fresh child process per variant (maxtasksperchild): its peak memory is its own;
        # with several at a time, one bar counts finished variants instead of one bar each
        child_cfg = replace(cfg, progress=cfg.progress and jobs == 1)
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(jobs, maxtasksperchild=1) as pool:
            runs = pool.imap_unordered(_run_variant, [(n, child_cfg, threads) for n in todo])
            bar = tqdm(
                runs, total=len(todo), desc="variants", disable=not cfg.progress or jobs == 1
            )
            for row in bar:
                rows[row["variant"]] = row
                bar.write(f"{row['variant']}: trained in {row['wall_s']:.0f} s")
            pool.close()  # let the workers exit on their own rather than be terminated
            pool.join()
    rows = [rows[name] for name in cfg.variants]
    write_tables(rows, cfg, root)
    write_figures(rows, cfg, root)
    return rows


COLUMNS = {  # key -> (header, format)
    "variant": ("variant", "{}"),
    "params": ("params", "{:,}"),
    "train_loss": ("train loss", "{:.4f}"),
    "val_loss": ("val loss", "{:.4f}"),
    "recall_acc": ("recall acc", "{:.3f}"),
    "copy_acc": ("copy acc", "{:.3f}"),
    "induction_acc": ("induction acc", "{:.3f}"),
    "train_tokens_per_s": ("train tok/s", "{:,.0f}"),
    "gen_tokens_per_s": ("generate tok/s", "{:,.0f}"),
    "cache_bytes_per_token": (f"cache B/token @{CACHE_T}", "{:,.0f}"),
    "peak_rss_mb": ("peak RSS MB", "{:,.0f}"),
    "wall_s": ("wall s", "{:.0f}"),
    "threads": ("threads", "{}"),
    "options": ("options", "{}"),
}


def gap_columns(row: dict) -> dict:
    """A recall row's accuracy per gap bin as flat columns, ``recall_gap_<lo>_<hi - 1>`` (bins
    that hold no query at this sequence length left out)."""
    bins = row["recall_by_gap"]  # [lo, hi, accuracy, queries] per bin
    return {f"recall_gap_{lo}_{hi - 1}": acc for lo, hi, acc, count in bins if count}


def write_tables(rows: list[dict], cfg: CompareConfig, root: Path) -> None:
    """``results.csv`` (full precision; the recall workload adds ``gap_columns``), ``results.md``
    (rounded, with the settings) and ``curves.csv`` (each variant's training and validation
    loss at every evaluation: ``variant, step, train_loss, val_loss``)."""
    keys = [k for k in COLUMNS if k in rows[0]]
    flat = [{**row, **gap_columns(row)} if "recall_by_gap" in row else row for row in rows]
    gaps = [k for k in flat[0] if k.startswith("recall_gap_")]
    with open(root / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys + gaps, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(flat)
    with open(root / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "step", "train_loss", "val_loss"])
        for row in rows:
            for m in read_metrics(root / row["variant"]):
                if "val_loss" in m:
                    writer.writerow([row["variant"], m["step"], m["train_loss"], m["val_loss"]])
    lines = [
        f"# attnbook compare: {cfg.workload}",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in cfg.settings().items()),
        "",
        "| " + " | ".join(COLUMNS[k][0] for k in keys) + " |",
        "|" + "---|" * len(keys),
    ]
    for row in rows:
        lines.append("| " + " | ".join(COLUMNS[k][1].format(row[k]) for k in keys) + " |")
    (root / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))


def write_figures(rows: list[dict], cfg: CompareConfig, root: Path) -> None:
    """The PNG figures of the module docstring (matplotlib's object API: no global state, so it
    works inside notebooks and without a display)."""
    from matplotlib.figure import Figure

    names = [row["variant"] for row in rows]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for name in names:
        metrics = read_metrics(root / name)
        steps, losses = zip(*[(m["step"], m["loss"]) for m in metrics if "loss" in m], strict=True)
        (line,) = ax.plot(steps, losses, lw=1, alpha=0.8, label=name)
        val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
        ax.plot(*zip(*val, strict=True), "o", ms=3, color=line.get_color())
    ax.set(xlabel="step", ylabel="loss (answer positions)" if cfg.workload == "recall" else "loss",
           title=f"{cfg.workload}: training loss (lines), validation loss (dots)")  # fmt: skip
    ax.set_yscale("log")
    ax.legend(ncol=2, fontsize=8)
    fig.savefig(root / "loss_curves.png", dpi=120)

    if cfg.workload == "recall":
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.subplots()
        for row in rows:
            points = [(lo, acc) for lo, hi, acc, count in row["recall_by_gap"] if count]
            labels = [f"{lo}-{hi - 1}" for lo, hi, _, count in row["recall_by_gap"] if count]
            ax.plot(range(len(points)), [acc for _, acc in points], "o-", label=row["variant"])
        ax.set_xticks(range(len(labels)), labels)
        ax.set(xlabel="gap between a key-value pair and its query (positions)",
               ylabel="recall accuracy", ylim=(-0.02, 1.02),
               title="Associative recall against distance")  # fmt: skip
        ax.legend(ncol=2, fontsize=8)
        fig.savefig(root / "recall_by_gap.png", dpi=120)

    fig = Figure(figsize=(7, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.bar(names, [row["cache_bytes_per_token"] for row in rows], color="tab:purple")
    ax.set(ylabel="bytes per token", title=f"Cache per token of a {CACHE_T}-token sequence, "
           f"{cfg.n_layer} layers, float32")  # fmt: skip
    fig.savefig(root / "cache_bytes.png", dpi=120)

    fig = Figure(figsize=(9, 3.5), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.bar(names, [row["train_tokens_per_s"] for row in rows], color="tab:blue")
    ax1.set(ylabel="tokens/s", title="Training")
    ax2.bar(names, [row["gen_tokens_per_s"] for row in rows], color="tab:green")
    ax2.set(ylabel="tokens/s", title="Greedy generation with the cache (batch 1)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=45)
    fig.savefig(root / "throughput.png", dpi=120)


def main(argv=None) -> None:
    """``attnbook compare``: parse the flags into a ``CompareConfig`` and run ``compare``."""
    parser = argparse.ArgumentParser(
        prog="attnbook compare",
        description="Train every attention variant under identical conditions; write a CSV, a "
        "Markdown table and PNG figures into --out_dir/<workload>/.",
    )
    parser.add_argument("--workload", choices=WORKLOADS, default="recall",
                        help="synthetic recall suite (no download) or language modelling")  # fmt: skip
    parser.add_argument("--variants", nargs="+", default=[], help="default: every registered one")
    parser.add_argument("--quick", action="store_true", help="the quick preset (the default)")
    parser.add_argument("--full", action="store_true", help="the full preset")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "max_iters", "batch_size"):
        parser.add_argument(f"--{name}", type=int, default=None, help="overrides the preset")
    defaults = CompareConfig()
    for name in ("positions", "lr", "data", "encoding", "eval_batches", "seed", "out_dir"):
        value = getattr(defaults, name)
        parser.add_argument(f"--{name}", type=type(value), default=value)
    parser.add_argument("--force", action="store_true", help="rerun finished variants too")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("--jobs", type=int, default=0,
                        help="variants trained at once (default 0: one per CPU core)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick and args.full:
        parser.error("choose one of --quick and --full")
    options = {k: v for k, v in vars(args).items() if k not in ("quick", "full", "no_progress")}
    options["variants"] = tuple(options["variants"])
    try:
        cfg = CompareConfig(preset="full" if args.full else "quick",
                            progress=not args.no_progress, **options)  # fmt: skip
    except ValueError as err:
        parser.error(str(err))
    start = time.perf_counter()
    compare(cfg)
    print(f"results in {Path(cfg.out_dir) / cfg.workload} ({time.perf_counter() - start:.0f} s)")
