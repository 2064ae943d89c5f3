"""Train a ``GPT``: ``TrainConfig``, the training loop, checkpoints, resume, data parallelism.

    from attnbook.train import TrainConfig, train
    result = train(TrainConfig(out_dir="runs/baby", max_iters=200))

or ``python -m attnbook.train --max_iters 200`` (a ``--flag`` per field of ``TrainConfig`` and
its ``GPTConfig``, and per attention option: ``--n_kv_head``, ``--window``, ``--impl``, ...), or
``torchrun --nproc_per_node 2 -m attnbook.train ...`` (data parallel). A step: ``grad_accum``
micro-batches (under bf16 autocast, or fp16 with a gradient scaler, if asked; with "dsa"
layers their indexers' KL losses join the loss, after a warm-up that trains the indexers
alone, ``dsa_warmup_iters``), clipping, AdamW (decay on matrices only), linear warm-up then
cosine decay. Checkpoints
(``out_dir/checkpoints/step_N/``: ``model.safetensors`` and a ``weights_only`` ``state.pt``) are
written atomically; restarting with the same ``out_dir`` resumes bit for bit (same thread
count); ``resume=False`` refuses a folder holding another run's checkpoints. Metrics go to
``metrics.jsonl``, a progress bar and optionally MLflow; a non-finite loss, or non-finite weights
when a checkpoint is due, raise ``TrainingDiverged`` before anything is written. Not here: FSDP,
tensor parallelism. Chapter 17 writes the loop step by step and trains with it.
"""

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from tqdm import tqdm

from . import gpt2
from .attention import AttentionConfig, DeepSeekSparseAttention, attention_class, available
from .checks import check_non_negative_int, check_positive_int
from .data import Encoding, TokenData, create_dataloader, prepare
from .model import GPT, SET_BY_GPT, GPTConfig
from .presets import PRESETS, preset

CHECKPOINT_FORMAT = 1
DTYPES = ("float32", "bfloat16", "float16")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint on disk is the last good one."""


class CheckpointMismatch(ValueError):
    """A checkpoint was written for another model configuration than the one it is loaded into."""


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model's shape (``model``).

    Args:
        model: the ``GPTConfig``; its ``vocab_size`` is set from the data.
        out_dir: folder for checkpoints and metrics; a run resumes from it if it has checkpoints.
        data: a registered corpus name or a UTF-8 text file, prepared with ``encoding``.
        encoding: how text becomes tokens (``attnbook.data.get_encoding``): "char", "gpt2", ...
        val_fraction: the end of the token stream kept for validation.
        batch_size: sequences per optimizer step over all processes and micro-batches.
        grad_accum: micro-batches per step (the batch is split between them).
        max_iters: optimizer steps in all.
        lr, min_lr: peak and final learning rate.
        warmup_iters: steps of linear warm-up, from ``lr / (warmup_iters + 1)`` at step 0 to
            ``lr``.
        lr_decay_iters: step at which the cosine decay reaches ``min_lr`` (it stays there after).
        weight_decay: AdamW's decay, on matrices (weights of dimension >= 2) only.
        beta1, beta2: AdamW's betas.
        grad_clip: clip the gradient norm to this (0 turns clipping off).
        eval_interval, eval_iters: evaluate every so many steps, on so many fixed batches.
        log_interval: log the training loss every so many steps.
        ckpt_interval: write a checkpoint every so many steps (and at the end).
        keep_last: how many recent checkpoints to keep (the best is kept as well).
        patience: stop when validation loss has not improved for this many evaluations (0: never).
        dtype: "float32"; "bfloat16" for bf16 autocast where the device supports it; "float16"
            for fp16 autocast with a gradient scaler (the loss is scaled up before the backward
            pass so that small gradients do not flush to zero in fp16, and a step whose
            gradients overflow is skipped while the scale is lowered).
        compile: wrap the model in ``torch.compile``.
        device: "auto" (CUDA if available), "cpu" or "cuda".
        seed: seeds the weights, the data order and dropout.
        resume: continue from the newest checkpoint in ``out_dir`` if there is one.
        progress: show a progress bar.
        mlflow_uri: MLflow tracking URI to log params and metrics to; None: the
            ``MLFLOW_TRACKING_URI`` of a ``.env`` file in the working directory (which may also
            hold the credentials), else no MLflow.
        mlflow_experiment: the MLflow experiment name.
        peak_flops: the machine's peak FLOP/s, for model FLOPs utilisation (``mfu``) in the log
            (``GPT.flops_per_token`` times tokens/s over it); 0 measures it once at the start
            (a matrix multiply in the run's dtype, ``bench.matmul_peak``); None: no MFU.
        stride: None draws each training batch's windows at random, with replacement (nanoGPT's
            ``get_batch``); a number walks the training split by epochs in windows ``stride``
            tokens apart (``data.create_dataloader``), shuffled every epoch from ``seed``, so
            that each window is seen once per epoch. Evaluation uses random windows either way.
        clean: clean the text before encoding it (``clean.clean_text``: Unicode, whitespace,
            repeated paragraphs); the prepared data's meta.json keeps what it removed.
        init_from: start from pretrained weights instead of random ones (fine-tuning): a trained
            run's folder (its newest checkpoint; ``data`` is then encoded with that run's
            encoding, so that every id keeps its meaning), a Hugging Face GPT-2 folder, or a
            GPT-2 name ("gpt2", "gpt2-medium", ...) found on this machine (``gpt2.find_gpt2``;
            never downloads). The model must have the same shape. Its weights are ignored when
            the run resumes.
        dsa_warmup_iters: for a model with DeepSeek Sparse Attention ("dsa") layers (all of
            them, or those of a hybrid ``layer_attention``), the first so many steps are its
            dense warm-up: attention over every past token, and only the indexers learn, from
            their KL losses (``indexer_loss``). Afterwards, and from the start when 0, the step
            minimises the loss plus the indexers' KL losses (each reaches only its indexer).
            One process only while warming up.
    """

    model: GPTConfig = field(
        default_factory=lambda: GPTConfig(
            block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, vocab_size=65
        )
    )
    out_dir: str = "runs/default"
    data: str = "tinyshakespeare"
    encoding: str = "char"
    val_fraction: float = 0.1
    batch_size: int = 12
    grad_accum: int = 1
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 200
    log_interval: int = 10
    ckpt_interval: int = 250
    keep_last: int = 2
    patience: int = 0
    dtype: str = "float32"
    compile: bool = False
    device: str = "auto"
    seed: int = 1337
    resume: bool = True
    progress: bool = True
    mlflow_uri: str | None = None
    mlflow_experiment: str = "attnbook"
    peak_flops: float | None = None
    stride: int | None = None
    clean: bool = False
    init_from: str | None = None
    dsa_warmup_iters: int = 0

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = GPTConfig.from_dict(self.model)
        positive = ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters")
        positive += ("log_interval", "ckpt_interval", "keep_last", "lr_decay_iters")
        for name in positive:
            check_positive_int(name, getattr(self, name))
        for name in ("warmup_iters", "patience", "seed", "dsa_warmup_iters"):
            check_non_negative_int(name, getattr(self, name))
        if self.stride is not None:
            check_positive_int("stride", self.stride)
        if self.peak_flops is not None and not (
            isinstance(self.peak_flops, int | float) and 0 <= self.peak_flops < math.inf
        ):
            raise ValueError(
                f"peak_flops must be None, 0 (measure) or a positive FLOP/s, got "
                f"{self.peak_flops!r}"
            )
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(
                f"weight_decay and grad_clip must be >= 0, got {self.weight_decay}, {self.grad_clip}"
            )
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")

    def to_dict(self) -> dict:
        """A JSON-safe dict; ``TrainConfig(**d)`` rebuilds it."""
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d


@dataclass
class TrainResult:
    """What a run ended with: ``step`` reached, ``best_val_loss`` (inf if never evaluated),
    ``stopped`` ("max_iters" or "early_stopping"), and the ``out_dir``."""

    step: int
    best_val_loss: float
    stopped: str
    out_dir: Path


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_iters`` steps, cosine decay to ``min_lr`` at ``lr_decay_iters``."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch's fused AdamW kernel exists


def make_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW with ``weight_decay`` on matrices (embeddings, linear weights) and none on biases
    and norm weights; build it after moving the model to its device.

    ``fused=None`` chooses torch's fused AdamW where every parameter is a floating-point tensor
    on a device of ``FUSED_ADAMW_DEVICES`` (the whole update of a tensor in one pass over its
    memory: the default multi-tensor kernel's update up to rounding), else the default kernel;
    True or False forces the choice. A checkpoint written with either kernel resumes with the
    one chosen here (``load_checkpoint``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"fused must be None (choose by device), True or False, got {fused!r}")
    if fused is None:
        fused = all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


# --- checkpoints ----------------------------------------------------------------------------


def checkpoint_dirs(out_dir) -> list[Path]:
    """The complete checkpoints in ``out_dir``, oldest first."""
    root = Path(out_dir) / "checkpoints"
    return sorted(root.glob("step_*")) if root.is_dir() else []


def save_checkpoint(out_dir, model, optimizer, state: dict, keep_last: int, best: bool) -> Path:
    """Write ``step_NNNNNNN/`` atomically (temporary folder, then rename); prune old ones."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state['step']:07d}"
    tmp = root / f".tmp_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save({**state, "optimizer": optimizer.state_dict()}, tmp / "state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)  # a rerun of the same step replaces it
    os.replace(tmp, final)
    best_file = root / "best.json"
    if best:
        _write_json_atomic(
            best_file, {"checkpoint": final.name, "val_loss": state["best_val_loss"]}
        )
    keep = {final.name}
    if best_file.exists():
        keep.add(json.loads(best_file.read_text())["checkpoint"])
    for old in checkpoint_dirs(out_dir)[:-keep_last]:
        if old.name not in keep:
            shutil.rmtree(old)
    return final


def load_checkpoint(path, model, optimizer=None) -> dict:
    """Load weights (and optimizer state) from one checkpoint folder; return its state dict."""
    path = Path(path)
    state = torch.load(path / "state.pt", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {state.get('format')!r}, expected 1")
    saved = json.loads(state["train_config"])["model"]
    saved = {**GPTConfig().to_dict(), **saved}  # a field newer than the checkpoint: its default
    if isinstance(model, GPT) and saved != model.config.to_dict():
        changed = sorted(k for k in saved if saved[k] != model.config.to_dict().get(k))
        raise CheckpointMismatch(
            f"{path} holds a model with other {', '.join(changed)} than this one: train it in "
            f"another out_dir (or delete that run's checkpoints to start over there)"
        )
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit this model: missing {sorted(missing)}, unexpected "
            f"{sorted(unexpected)}"
        )
    if optimizer is not None:
        kernels = [
            {k: g[k] for k in ("foreach", "fused") if k in g} for g in optimizer.param_groups
        ]
        optimizer.load_state_dict(state["optimizer"])  # its groups carry the writer's kernel
        for group, kernel in zip(optimizer.param_groups, kernels, strict=True):
            group.update(kernel)  # the kernel make_optimizer chose for this process's device
    return state


def latest_checkpoint(out_dir, model, optimizer=None) -> dict | None:
    """Load the newest checkpoint that reads back; warn about each one that does not. A
    checkpoint of another model configuration raises ``CheckpointMismatch``."""
    for path in reversed(checkpoint_dirs(out_dir)):
        try:
            return load_checkpoint(path, model, optimizer)
        except CheckpointMismatch:
            raise
        except Exception as err:  # a torn or corrupt file: fall back to the one before
            warnings.warn(f"skipping unreadable checkpoint {path}: {err}", stacklevel=2)
    return None


# The settings a resumed run must keep: they decide which batches and which updates come next.
TRAJECTORY = ("data", "encoding", "val_fraction", "batch_size", "grad_accum", "lr", "min_lr",
              "warmup_iters", "lr_decay_iters", "weight_decay", "beta1", "beta2", "grad_clip",
              "dtype", "seed", "dsa_warmup_iters", "stride", "clean")  # fmt: skip


def _check_same_trajectory(out_dir, saved: dict, current: dict) -> None:
    """ValueError unless a resumed run keeps the ``TRAJECTORY`` settings of its checkpoint
    (``max_iters``, intervals, ``patience`` and the like may change). A setting newer than the
    checkpoint counts as its default."""
    defaults = TrainConfig().to_dict()
    saved = {k: saved.get(k, defaults[k]) for k in TRAJECTORY}
    changed = [f"{k} {saved[k]!r} -> {current[k]!r}" for k in TRAJECTORY
               if saved[k] != current[k]]  # fmt: skip
    if changed:
        raise ValueError(
            f"{out_dir} would resume with other settings than it was trained with "
            f"({'; '.join(changed)}): resume with the same ones, or train in another out_dir"
        )


def _lock(out_dir: Path):
    """An exclusive lock on ``out_dir/.lock`` (the open file; closing it, or the process ending,
    releases it), or ValueError if another training holds it. Where the system has no
    ``fcntl`` (Windows), nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = open(out_dir / ".lock", "w")  # kept open for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ValueError(
            f"another training is running in {out_dir} (it holds {out_dir / '.lock'}): wait for "
            f"it, or train in another out_dir"
        ) from None
    return handle


def _peak_flops(cfg: TrainConfig) -> float:
    """``cfg.peak_flops``, or when it is 0 the matrix-multiply peak measured now in the run's
    dtype (``bench.matmul_peak``; on a CPU, whose threads it uses)."""
    if cfg.peak_flops:
        return cfg.peak_flops
    from .bench import matmul_peak  # bench builds on this module: imported when needed

    return matmul_peak(torch.float32 if cfg.dtype == "float32" else getattr(torch, cfg.dtype))


def _pretrained(source: str) -> tuple[GPT, dict | None]:
    """The model ``init_from`` names (see ``TrainConfig``) and, for a training run, its data's
    description (None for GPT-2); ValueError if there is none."""
    if (Path(source) / "checkpoints").is_dir():
        model, _, meta = load_trained(source)
        return model, meta
    if source in gpt2.SIZES:
        folder = gpt2.find_gpt2(source)
        if folder is None:
            raise ValueError(
                f"init_from={source!r}: no local copy of {source} (gpt2.find_gpt2 never "
                f"downloads): fetch it once with gpt2.load_gpt2({source!r}), or set "
                f"{gpt2.ENV_DIR} to its folder"
            )
        return gpt2.load_gpt2(folder), None
    if (Path(source) / "config.json").is_file():
        return gpt2.load_gpt2(source), None
    raise ValueError(
        f"init_from={source!r} is neither a training run's folder, a GPT-2 folder nor one "
        f"of {', '.join(gpt2.SIZES)}"
    )


def _data_encoding(cfg: TrainConfig, pretrained_meta: dict | None) -> "str | Encoding":
    """What ``cfg.data`` is encoded with: ``cfg.encoding``, or when ``init_from`` is a training
    run (whose data ``pretrained_meta`` describes), that run's own encoding (the same
    vocabulary, so the same ids), whose name ``cfg.encoding`` must give."""
    if cfg.init_from is None or not (Path(cfg.init_from) / "checkpoints").is_dir():
        return cfg.encoding
    if not isinstance(pretrained_meta, dict) or "encoding" not in pretrained_meta:
        raise ValueError(
            f"init_from={cfg.init_from!r} was trained on data without a text encoding, so "
            f"{cfg.data!r} cannot be encoded as it was: fine-tune from a run trained on a corpus"
        )
    encoding = Encoding.from_dict(pretrained_meta["encoding"])
    if encoding.name != cfg.encoding:
        raise ValueError(
            f"init_from={cfg.init_from!r} was trained with encoding {encoding.name!r}, and "
            f"encoding={cfg.encoding!r}: fine-tune with encoding={encoding.name!r} (its "
            f"vocabulary is reused)"
        )
    return encoding


def _load_pretrained(model: GPT, pretrained: GPT, source: str) -> None:
    """Copy ``pretrained``'s weights (from ``init_from=source``) into ``model``; ValueError if
    its model has another shape (dropout aside)."""
    theirs, ours = pretrained.config.to_dict(), model.config.to_dict()
    changed = [f"{k} {theirs[k]!r} (ours {ours[k]!r})" for k in ours
               if k != "dropout" and theirs[k] != ours[k]]  # fmt: skip
    if changed:
        raise ValueError(
            f"init_from={source!r} holds a model of another shape: {'; '.join(changed)}; build "
            f"the run with the same model (for GPT-2, --preset and --encoding gpt2)"
        )
    model.load_state_dict(pretrained.state_dict())


def _check_same_data(out_dir, saved: dict | None, current: dict | None) -> None:
    """ValueError unless the data a run resumes on is described as the data it was trained on
    (same source sha256, encoding, sizes): other data would silently shift the token ids."""
    if saved != current:
        saved, current = saved or {}, current or {}
        changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        raise ValueError(
            f"{out_dir} was trained on other data than it would resume on (differing: "
            f"{', '.join(changed)}): restore that data, or train in another out_dir"
        )


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


# --- the run ---------------------------------------------------------------------------------


def _distributed(device: str):
    """``(rank, world_size, device)``; joins the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda', but this machine has no CUDA GPU: use 'cpu' or 'auto'")
    if world_size == 1:
        return 0, 1, torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    rank = dist.get_rank()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return rank, world_size, torch.device("cuda", torch.cuda.current_device())
    return rank, world_size, torch.device("cpu")


def _mean_over_ranks(value: torch.Tensor, world_size: int) -> float:
    if world_size > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world_size
    return value.item()


def _autocast(cfg: TrainConfig, device: torch.device):
    """bf16 or fp16 autocast when asked (and supported), else nothing."""
    if cfg.dtype == "float32":
        return torch.autocast(device.type, enabled=False)
    if cfg.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bfloat16 support: use dtype='float16' or 'float32'")
    return torch.autocast(device.type, dtype=getattr(torch, cfg.dtype))


@torch.no_grad()
def evaluate(model, data, cfg: TrainConfig, device, rank=0, world_size=1) -> dict:
    """Mean loss on ``eval_iters`` fixed batches (the same ones at every evaluation) per split."""
    model.eval()
    out = {}
    for i, split in enumerate(("train", "val")):
        gen = torch.Generator().manual_seed(cfg.seed + 1 + i)
        total = torch.zeros((), device=device)
        for _ in range(cfg.eval_iters):
            x, y = data.get_batch(
                split, cfg.batch_size, cfg.model.block_size, gen, rank, world_size
            )
            with _autocast(cfg, device):
                _, loss = model(x.to(device), y.to(device))
            total += loss.float()
        out[split] = _mean_over_ranks(total / cfg.eval_iters, world_size)
    model.train()
    return out


def _train_batches(data, cfg: TrainConfig, step: int, generator, rank: int, world_size: int):
    """The training batches from ``step`` on, endlessly: this rank's rows of each global batch,
    random windows drawn with ``generator`` or, with ``cfg.stride``, epochs of windows."""
    if cfg.stride is None:
        block = cfg.model.block_size
        return iter(lambda: data.get_batch("train", cfg.batch_size, block, generator, rank,
                                           world_size), None)  # fmt: skip
    if not hasattr(data, "tokens"):
        raise ValueError(
            f"stride={cfg.stride} walks the token stream, and this data ({type(data).__name__}) "
            f"has no tokens to walk: pass a TokenData, or stride=None for random batches"
        )
    loader = create_dataloader(
        data.tokens["train"], cfg.batch_size, cfg.model.block_size, cfg.stride, seed=cfg.seed,
        start_batch=step,
    )  # fmt: skip
    rows = slice(rank * cfg.batch_size // world_size, (rank + 1) * cfg.batch_size // world_size)
    return ((x[rows], y[rows]) for _ in itertools.count() for x, y in loader)


def train(cfg: TrainConfig, data=None) -> TrainResult:
    """Train (or resume) the run in ``cfg.out_dir``; see the module docstring.

    Args:
        cfg: the run's configuration.
        data: anything with ``get_batch(split, batch_size, block_size, generator, rank,
            world_size)`` and ``vocab_size``; ``None`` prepares ``cfg.data`` with ``cfg.encoding``.
    Returns the ``TrainResult``. Raises ``TrainingDiverged`` on a NaN or infinite loss.
    """
    rank, world_size, device = _distributed(cfg.device)
    if cfg.batch_size % (world_size * cfg.grad_accum):
        raise ValueError(
            f"batch_size={cfg.batch_size} must be divisible by world_size * grad_accum = "
            f"{world_size} * {cfg.grad_accum}"
        )
    pretrained, pretrained_meta = (
        (None, None) if cfg.init_from is None else _pretrained(cfg.init_from)
    )  # loaded once: its weights, and for a training run its data's encoding
    if data is None:
        encoding = _data_encoding(cfg, pretrained_meta)
        if rank == 0:
            prepare(cfg.data, encoding, val_fraction=cfg.val_fraction, clean=cfg.clean)
        if world_size > 1:
            dist.barrier()
        folder = prepare(cfg.data, encoding, val_fraction=cfg.val_fraction, clean=cfg.clean)
        data = TokenData(folder)
    cfg = dataclasses.replace(
        cfg, model=GPTConfig.from_dict({**cfg.model.to_dict(), "vocab_size": data.vocab_size})
    )
    for split in ("train", "val"):  # a split too short for one block fails now, not at step N
        data.get_batch(split, cfg.batch_size, cfg.model.block_size, torch.Generator(), 0, 1)
    out_dir = Path(cfg.out_dir)
    lock = _lock(out_dir) if rank == 0 else None  # held until the run ends or its process dies
    torch.manual_seed(cfg.seed)
    raw_model = GPT(cfg.model).to(device)
    indexed = [m for m in raw_model.modules() if isinstance(m, DeepSeekSparseAttention)]
    if cfg.dsa_warmup_iters and not indexed:
        raise ValueError(
            f"dsa_warmup_iters={cfg.dsa_warmup_iters} warms up the indexers of 'dsa' layers, and "
            f"this model has none: use attention 'dsa' (or 'dsa' blocks in layer_attention) or "
            f"dsa_warmup_iters=0"
        )
    if cfg.dsa_warmup_iters and world_size > 1:
        raise ValueError(
            "the dsa warm-up trains the indexers alone, which DistributedDataParallel cannot "
            "do (it waits for every weight's gradient): warm up in one process, or set "
            "dsa_warmup_iters=0"
        )
    optimizer = make_optimizer(raw_model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")  # else no-ops
    data_gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed + rank)  # dropout differs between ranks
    if not cfg.resume and checkpoint_dirs(out_dir):
        raise ValueError(
            f"resume=False, but {out_dir} holds checkpoints of an earlier run ("
            f"{checkpoint_dirs(out_dir)[-1].name}): a new run there would mix with them; "
            f"choose another out_dir, or delete {out_dir / 'checkpoints'} yourself"
        )
    state = latest_checkpoint(out_dir, raw_model, optimizer) if cfg.resume else None
    step, best_val, bad_evals = 0, math.inf, 0
    if state is None and pretrained is not None:
        _load_pretrained(raw_model, pretrained, cfg.init_from)
    if state is not None:
        _check_same_data(out_dir, json.loads(state["data_meta"]), getattr(data, "meta", None))
        _check_same_trajectory(out_dir, json.loads(state["train_config"]), cfg.to_dict())
        step, best_val, bad_evals = state["step"], state["best_val_loss"], state["bad_evals"]
        scaler.load_state_dict(state.get("grad_scaler", {}))
        data_gen.set_state(state["data_rng"])
        if rank == 0:
            torch.set_rng_state(state["torch_rng"])
    batches = _train_batches(data, cfg, step, data_gen, rank, world_size)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    metrics = _Metrics(out_dir, cfg, step, enabled=rank == 0)

    def save(best: bool):
        if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
            last = checkpoint_dirs(out_dir)
            raise TrainingDiverged(
                f"the weights are no longer finite after step {step} (lr {cfg.lr}): nothing "
                f"saved; the last good checkpoint is {last[-1] if last else 'none (none written)'}"
            )
        if rank == 0:
            ckpt = {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "best_val_loss": best_val,
                "bad_evals": bad_evals,
                "torch_rng": torch.get_rng_state(),
                "data_rng": data_gen.get_state(),
                "train_config": json.dumps(cfg.to_dict()),
                "data_meta": json.dumps(getattr(data, "meta", None)),
                "grad_scaler": scaler.state_dict(),
            }
            save_checkpoint(out_dir, raw_model, optimizer, ckpt, cfg.keep_last, best)
        if world_size > 1:
            dist.barrier()

    micro = cfg.batch_size // world_size // cfg.grad_accum
    tokens_per_step = cfg.batch_size * cfg.model.block_size
    peak = _peak_flops(cfg) if cfg.peak_flops is not None else None
    flops_per_token = raw_model.flops_per_token()
    bar = tqdm(total=cfg.max_iters, initial=step, disable=not cfg.progress or rank != 0)
    stopped = "early_stopping" if cfg.patience and bad_evals >= cfg.patience else "max_iters"
    model.train()
    while step < cfg.max_iters and stopped == "max_iters":
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = next(batches)  # (batch_size / world_size, block_size) each
        x, y = x.to(device), y.to(device)
        total, total_kl = torch.zeros((), device=device), torch.zeros((), device=device)
        warming = step < cfg.dsa_warmup_iters  # dsa's dense warm-up: the indexers learn alone
        for layer in indexed:
            layer.dense_warmup = warming
        for i in range(cfg.grad_accum):
            part = slice(i * micro, (i + 1) * micro)
            sync = world_size == 1 or i == cfg.grad_accum - 1  # all-reduce on the last only
            with model.no_sync() if not sync else contextlib.nullcontext(), _autocast(cfg, device):
                _, loss = model(x[part], y[part])
                objective = loss
                if indexed:  # each indexer's KL reaches that indexer only
                    kl = sum(layer.indexer_loss for layer in indexed)
                    objective = kl if warming else loss + kl
                    total_kl += kl.detach().float() / cfg.grad_accum
            scaler.scale(objective / cfg.grad_accum).backward()
            total += loss.detach().float() / cfg.grad_accum
        loss_value = _mean_over_ranks(total, world_size)
        if not math.isfinite(loss_value):
            last = checkpoint_dirs(out_dir)
            raise TrainingDiverged(
                f"loss is {loss_value} at step {step + 1}: lower lr (now {cfg.lr}) or check the "
                f"data; the last good checkpoint is {last[-1] if last else 'none (none written)'}"
            )
        scaler.unscale_(optimizer)  # the true gradients, for clipping
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)  # skipped if fp16 gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        bar.update(1)
        if step % cfg.log_interval == 0:
            metrics.log(
                step,
                loss=loss_value,
                lr=lr_at(step - 1, cfg),
                ms_per_iter=dt * 1e3,
                tokens_per_s=tokens_per_step / dt,
                **({} if peak is None else {"mfu": flops_per_token * tokens_per_step / dt / peak}),
                **({"indexer_loss": _mean_over_ranks(total_kl, world_size)} if indexed else {}),
            )
            bar.set_postfix(loss=f"{loss_value:.4f}")
        is_best = False
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            losses = evaluate(model, data, cfg, device, rank, world_size)
            is_best = losses["val"] < best_val
            best_val, bad_evals = (losses["val"], 0) if is_best else (best_val, bad_evals + 1)
            metrics.log(step, train_loss=losses["train"], val_loss=losses["val"])
            bar.set_postfix(loss=f"{loss_value:.4f}", val=f"{losses['val']:.4f}")
            if cfg.patience and bad_evals >= cfg.patience:
                stopped = "early_stopping"
        last = step == cfg.max_iters or stopped != "max_iters"
        if is_best or last or step % cfg.ckpt_interval == 0:
            save(is_best)
    bar.close()
    metrics.note(f"stopped ({stopped}) at step {step}, best val_loss {best_val:.4f}")
    metrics.close()
    if lock is not None:
        lock.close()
    return TrainResult(step=step, best_val_loss=best_val, stopped=stopped, out_dir=out_dir)


def _tracking_uri_from_env() -> str | None:
    """The ``MLFLOW_TRACKING_URI`` of a ``.env`` file in the working directory (python-dotenv,
    if installed), or None. When there is one, the file's other variables that the environment
    does not set yet (the credentials MLflow reads itself: ``MLFLOW_TRACKING_USERNAME``, ...)
    are added to it."""
    try:
        from dotenv import dotenv_values, load_dotenv
    except ImportError:
        return None
    path = Path.cwd() / ".env"
    uri = dotenv_values(path).get("MLFLOW_TRACKING_URI") if path.is_file() else None
    if uri:
        load_dotenv(path, override=False)
    return uri


class _Metrics:
    """``metrics.jsonl`` (cut back to ``step`` on resume), the same as readable lines in
    ``train.log`` (appended, with when the run started, resumed and stopped) and, if
    configured, MLflow."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, step: int, enabled: bool):
        self.enabled, self.mlflow = enabled, None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        self.path = out_dir / "metrics.jsonl"
        kept = [m for m in read_metrics(out_dir) if m["step"] <= step] if self.path.exists() else []
        self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        self.text_log = out_dir / "train.log"
        model = cfg.model
        self.note(
            f"{'resumed at step ' + str(step) if step else 'started'}: "
            f"{model.layer_attention or model.attention} "
            f"{model.attention_options}, {model.n_layer} layers x {model.n_head} heads x "
            f"{model.n_embd}, block {model.block_size}, {cfg.dtype}, data {cfg.data}"
        )
        uri = cfg.mlflow_uri or _tracking_uri_from_env()
        if uri:
            try:
                import mlflow
            except ImportError as err:
                raise ValueError(
                    f"MLflow tracking URI {uri!r} (mlflow_uri or .env's MLFLOW_TRACKING_URI) needs "
                    f"MLflow: pip install 'attnbook[mlflow]', or leave both unset"
                ) from err
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(cfg.mlflow_experiment)
            self.mlflow = mlflow.start_run(run_name=out_dir.name)
            flat = {k: v for k, v in cfg.to_dict().items() if k != "model"}
            mlflow.log_params({**flat, **{f"model.{k}": v for k, v in cfg.model.to_dict().items()}})

    def note(self, text: str) -> None:
        """A line of ``train.log``, with the time."""
        if self.enabled:
            with open(self.text_log, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        self.note(f"step {step} " + " ".join(f"{k}={v:.5g}" for k, v in values.items()))
        if self.mlflow is not None:
            import mlflow

            mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        if self.mlflow is not None:
            import mlflow

            mlflow.end_run()


def read_metrics(out_dir) -> list[dict]:
    """The lines of ``out_dir/metrics.jsonl`` as dicts; a torn last line (what a crash or a full
    disk leaves) is dropped with a warning, a damaged line elsewhere raises ValueError."""
    path = Path(out_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines()
    metrics = []
    for number, line in enumerate(lines, start=1):
        try:
            metrics.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}, is not JSON ({err}): {line!r}") from err
            warnings.warn(f"{path}: dropping its torn last line {line!r}", stacklevel=2)
    return metrics


def load_trained(out_dir, best: bool = False):
    """``(model, train_config, data_meta)`` from a run's newest (or best) checkpoint, model in
    eval mode on the CPU. ``data_meta`` is the prepared data's metadata (its encoding), or None."""
    root = Path(out_dir) / "checkpoints"
    paths = checkpoint_dirs(out_dir)
    if best and (root / "best.json").exists():
        name = json.loads((root / "best.json").read_text()).get("checkpoint")
        if root / str(name) not in paths:
            raise ValueError(
                f"{root / 'best.json'} names {name!r}, which is not a checkpoint of {out_dir}: "
                f"load the newest one instead (best=False)"
            )
        paths = [root / name]
    if not paths:
        raise ValueError(f"no checkpoint in {out_dir}: train there first (attnbook train)")
    for path in reversed(paths):
        try:
            state = torch.load(path / "state.pt", weights_only=True)
            cfg = TrainConfig(**json.loads(state["train_config"]))
            model = GPT(cfg.model)
            load_checkpoint(path, model)
            return model.eval(), cfg, json.loads(state["data_meta"])
        except Exception as err:  # a torn or corrupt file: fall back to the one before
            warnings.warn(f"skipping unreadable checkpoint {path}: {err}", stacklevel=2)
    raise ValueError(f"no checkpoint of {out_dir} reads back (see the warnings)")


# --- command line ----------------------------------------------------------------------------


def attention_flags() -> dict[str, tuple[type, str]]:
    """Every attention option as a flag: ``name -> (type, help)`` for the ``AttentionConfig``
    fields a ``GPTConfig`` leaves open and the ``Options`` fields of every registered variant."""
    flags = {
        f.name: (f.type, "AttentionConfig's, for every variant")
        for f in dataclasses.fields(AttentionConfig)
        if f.name not in SET_BY_GPT
    }
    takers: dict[str, list[str]] = {}
    for name in available():
        for f in dataclasses.fields(attention_class(name).Options):
            takers.setdefault(f.name, []).append(name)
            flags[f.name] = (f.type, "")
    for option, names in takers.items():
        flags[option] = (flags[option][0], f"an option of {', '.join(names)}")
    return flags


def layer_names(text: str) -> list[str]:
    """``--layer_attention``'s value: comma-separated variant names, one per block."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"--layer_attention takes comma-separated attention names, one per block, got "
            f"{text!r} (an empty name)"
        )
    return names


def _flag_type(annotation) -> type:
    """The type a flag's text converts to: the annotation's, without ``None`` (``float | None``
    gives ``float``)."""
    return next(t for t in getattr(annotation, "__args__", (annotation,)) if t is not type(None))


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per field of ``TrainConfig`` and of ``GPTConfig`` (but ``vocab_size``,
    which comes from the data), defaults the dataclasses'; one per attention option (see
    ``attention_flags``), which go into ``attention_options``; and ``--run_name``."""
    defaults = TrainConfig()
    fields = [(f, getattr(defaults, f.name)) for f in dataclasses.fields(TrainConfig)]
    fields += [(f, getattr(defaults.model, f.name)) for f in dataclasses.fields(GPTConfig)]
    for f, default in fields:
        if f.name in ("model", "vocab_size"):
            continue
        names = [f"--{f.name}"] + (["--attention_type"] if f.name == "attention" else [])
        kind = type(default)
        if f.name == "layer_attention":
            parser.add_argument(
                *names, type=layer_names, default=default, metavar="NAME,NAME,...",
                help="one attention variant per block, comma-separated (a hybrid stack; "
                "--attention then stays mha)",
            )  # fmt: skip
        elif kind is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, default=default)
        elif kind is dict:
            parser.add_argument(
                *names,
                type=json.loads,
                default=default,
                metavar="JSON",
                help=f"a JSON object, e.g. '{{\"n_kv_head\": 2}}' (default {json.dumps(default)}); "
                f"each key is also a flag of its own",
            )
        else:
            parser.add_argument(
                *names, type=_flag_type(f.type), default=default, help=f"default {default}"
            )
    group = parser.add_argument_group("attention options (given ones go into attention_options)")
    for name, (annotation, help_) in attention_flags().items():
        if annotation is bool:
            group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, help=help_)
        else:
            group.add_argument(f"--{name}", type=_flag_type(annotation), default=None, help=help_)
    parser.add_argument(
        "--run_name",
        default=None,
        help="train in runs/RUN_NAME (instead of --out_dir), resuming there",
    )
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="start from a named model shape (attnbook.presets); other flags override it",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` the parsed ``--flags`` describe."""
    values = vars(args)
    if values["run_name"] is not None:
        if values["out_dir"] != TrainConfig().out_dir:
            raise ValueError(
                f"--run_name {values['run_name']!r} names the folder runs/{values['run_name']}: "
                f"give it or --out_dir {values['out_dir']!r}, not both"
            )
        values = {**values, "out_dir": str(Path("runs") / values["run_name"])}
    given = {name: values[name] for name in attention_flags() if values[name] is not None}
    model_names = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}
    model = {**TrainConfig().model.to_dict(), **{k: values[k] for k in model_names}}
    model["attention_options"] = {**model["attention_options"], **given}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    return TrainConfig(model=GPTConfig.from_dict(model), **{k: values[k] for k in train_names})


def parse_config(argv: list[str], parser: argparse.ArgumentParser | None = None) -> TrainConfig:
    """The ``TrainConfig`` of command-line ``argv``: ``--preset`` first sets the model's fields,
    then every flag given overrides them."""
    parser = parser or argparse.ArgumentParser(prog="attnbook train")
    add_config_arguments(parser)
    name = parser.parse_known_args(argv)[0].preset
    if name is not None:
        shape = {k: v for k, v in preset(name).to_dict().items() if k != "vocab_size"}
        parser.set_defaults(**shape)  # the data sets vocab_size
    return config_from_args(parser.parse_args(argv))


def main(argv=None) -> TrainResult:
    parser = argparse.ArgumentParser(
        prog="attnbook train", description="Train a GPT (see attnbook.train's docstring)."
    )
    try:
        cfg = parse_config(argv, parser)
    except ValueError as err:
        parser.error(str(err))
    try:
        result = train(cfg)
    except (ValueError, TrainingDiverged) as err:  # the operator's to fix: one line, no traceback
        raise SystemExit(f"attnbook train: error: {err}") from None
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
