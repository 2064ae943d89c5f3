"""The trainer: schedule, optimizer groups, checkpoints, exact resume after SIGKILL, early
stopping, divergence, corrupt checkpoints, torchrun data parallelism, MLflow, the command line."""

import dataclasses
import functools
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import attnbook.train as train_module
from attnbook.data import Encoding, SlidingWindowDataset, TokenData, get_encoding, prepare
from attnbook.model import GPT, GPTConfig
from attnbook.train import (
    CheckpointMismatch,
    TrainConfig,
    TrainingDiverged,
    add_config_arguments,
    checkpoint_dirs,
    config_from_args,
    latest_checkpoint,
    load_checkpoint,
    load_trained,
    lr_at,
    make_optimizer,
    read_metrics,
    train,
)

TEXT = "".join(f"{i % 7} little pigs went to market {i * 13 % 31}.\n" for i in range(300))


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A small text file, with the download cache (and prepared tokens) inside tmp_path."""
    monkeypatch.setenv("ATTNBOOK_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def tiny(corpus, out_dir, dropout=0.1, **kw) -> TrainConfig:
    model = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=dropout)
    settings = dict(
        model=model, out_dir=str(out_dir), data=str(corpus), batch_size=4, max_iters=12,
        warmup_iters=2, lr_decay_iters=12, lr=3e-3, min_lr=3e-4, eval_interval=6, eval_iters=2,
        log_interval=1, ckpt_interval=6, progress=False, device="cpu",
    )  # fmt: skip
    return TrainConfig(**{**settings, **kw})


def saved_model_config(out_dir) -> GPTConfig:
    return GPTConfig.from_dict(json.loads((Path(out_dir) / "config.json").read_text())["model"])


def weights(out_dir):
    return load_file(str(checkpoint_dirs(out_dir)[-1] / "model.safetensors"))


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert lr_at(0, cfg) == pytest.approx(1 / 11)
    assert lr_at(9, cfg) == pytest.approx(10 / 11)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(110, cfg) == lr_at(5000, cfg) == 0.1


def test_weight_decay_on_matrices_only():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    decay, no_decay = make_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["params"]
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["params"]
    n_opt = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters())  # tied weights counted once


def test_adamw_is_fused_where_torch_has_the_kernel():
    cfg = TrainConfig()
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    assert all(g["fused"] for g in make_optimizer(model, cfg).param_groups)  # on the CPU
    with torch.device("meta"):  # a device without the fused kernel: the default one
        on_meta = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    assert not any(g["fused"] for g in make_optimizer(on_meta, cfg).param_groups)
    assert not any(g["fused"] for g in make_optimizer(model, cfg, fused=False).param_groups)
    with pytest.raises(ValueError, match="fused must be None .*, got 'yes'"):
        make_optimizer(model, cfg, fused="yes")


def test_checkpoints_of_the_unfused_optimizer_resume_with_the_fused_one(
    corpus, tmp_path, monkeypatch
):
    """Runs whose checkpoints an unfused AdamW wrote resume (their moments and step counts
    carry over) and go on with the fused kernel: the same weights, up to rounding, as a run
    never interrupted, and not those of a run that lost the optimizer's state."""
    straight = tiny(corpus, tmp_path / "straight", dropout=0.0)
    train(straight)
    old = tiny(corpus, tmp_path / "old", dropout=0.0, max_iters=6)
    with monkeypatch.context() as patch:
        unfused = functools.partial(make_optimizer, fused=False)  # what it built before
        patch.setattr(train_module, "make_optimizer", unfused)
        train(old)
    state = torch.load(checkpoint_dirs(old.out_dir)[-1] / "state.pt", weights_only=True)
    assert not any(g["fused"] for g in state["optimizer"]["param_groups"])
    model = GPT(saved_model_config(old.out_dir))
    optimizer = make_optimizer(model, old)
    load_checkpoint(checkpoint_dirs(old.out_dir)[-1], model, optimizer)
    assert all(g["fused"] for g in optimizer.param_groups)  # the kernel chosen here stays
    assert all(s["step"].item() == 6 for s in optimizer.state.values())
    train(dataclasses.replace(old, max_iters=12))
    for name, tensor in weights(straight.out_dir).items():
        torch.testing.assert_close(weights(old.out_dir)[name], tensor, msg=name)
    lost = tiny(corpus, tmp_path / "lost", dropout=0.0, max_iters=6)  # moments lost at 6
    train(lost)
    last = checkpoint_dirs(lost.out_dir)[-1]
    model = GPT(saved_model_config(lost.out_dir))
    state = load_checkpoint(last, model)
    torch.save({**state, "optimizer": make_optimizer(model, lost).state_dict()}, last / "state.pt")
    train(dataclasses.replace(lost, max_iters=12))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(weights(lost.out_dir), weights(straight.out_dir))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"batch_size": 6, "grad_accum": 4}, "not divisible by grad_accum"),
        ({"min_lr": 2e-3, "lr": 1e-3}, "min_lr <= lr"),
        ({"dtype": "half"}, "dtype must be one of"),
        ({"device": "tpu"}, "device must be"),
        ({"patience": -1}, "patience must be an integer >= 0"),
        ({"lr": float("inf"), "min_lr": 1e-4}, "lr must be a finite number, got inf"),
        ({"weight_decay": float("nan")}, "weight_decay must be a finite number, got nan"),
        ({"grad_clip": float("nan")}, "grad_clip must be a finite number, got nan"),
        ({"beta2": float("inf")}, "beta2 must be a finite number"),
        ({"lr": "1e-3"}, "lr must be a number, got '1e-3'"),
    ],
)
def test_invalid_train_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_short_run_learns_and_keeps_last_checkpoints_and_the_best(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", max_iters=40, ckpt_interval=10, eval_interval=10,
               keep_last=2, lr_decay_iters=40)  # fmt: skip
    result = train(cfg)
    assert result.step == 40 and result.stopped == "max_iters"
    losses = [m["loss"] for m in read_metrics(cfg.out_dir) if "loss" in m]
    assert len(losses) == 40 and losses[-1] < 0.7 * losses[0]
    best = json.loads((Path(cfg.out_dir) / "checkpoints" / "best.json").read_text())
    kept = [p.name for p in checkpoint_dirs(cfg.out_dir)]
    assert kept[-2:] == ["step_0000030", "step_0000040"]
    assert set(kept) == {"step_0000030", "step_0000040", best["checkpoint"]}
    assert best["val_loss"] == pytest.approx(result.best_val_loss)
    model, loaded_cfg, meta = load_trained(cfg.out_dir)
    assert loaded_cfg.model == GPTConfig.from_dict(
        {**cfg.model.to_dict(), "vocab_size": model.config.vocab_size}
    )
    assert meta["vocab_size"] == model.config.vocab_size


@pytest.mark.parametrize("stride", [None, 500])
def test_resume_after_sigkill_is_exact(corpus, tmp_path, stride):
    """Random batches, or epochs of windows (stride 500: 4 batches an epoch, so the run
    resumes in the middle of its second epoch)."""
    straight = tiny(corpus, tmp_path / "straight", stride=stride)
    train(straight)
    killed = tiny(corpus, tmp_path / "killed", stride=stride)
    script = textwrap.dedent(f"""
        import os, signal
        import torch
        import attnbook.train as T
        torch.set_num_threads({torch.get_num_threads()})  # bit-exact needs the same threads
        lr_at = T.lr_at
        def lr_or_die(step, cfg):
            if step == 9:  # steps 0..8 done, the checkpoint of step 6 written
                os.kill(os.getpid(), signal.SIGKILL)
            return lr_at(step, cfg)
        T.lr_at = lr_or_die
        T.train(T.TrainConfig(**{killed.to_dict()!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=os.environ.copy())
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in checkpoint_dirs(killed.out_dir)][-1] == "step_0000006"
    assert train(killed).step == 12  # resumes from step 6
    for name, tensor in weights(straight.out_dir).items():
        assert torch.equal(tensor, weights(killed.out_dir)[name]), name
    strip = lambda rows: [{k: v for k, v in r.items() if "per" not in k} for r in rows]  # noqa: E731
    assert strip(read_metrics(killed.out_dir)) == strip(read_metrics(straight.out_dir))


def test_early_stopping(tmp_path, monkeypatch):
    """Train text alternates "ab", validation text repeats "aabb": learning the first makes
    the second worse, so validation loss stops improving and the run stops early."""
    monkeypatch.setenv("ATTNBOOK_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "ab.txt"
    path.write_text("ab" * 900 + "aabb" * 50, encoding="utf-8")
    cfg = tiny(path, tmp_path / "run", max_iters=200, lr_decay_iters=200, eval_interval=5,
               patience=2, val_fraction=0.1, dropout=0.0)  # fmt: skip
    result = train(cfg)
    assert result.stopped == "early_stopping" and result.step < 200
    vals = [m["val_loss"] for m in read_metrics(cfg.out_dir) if "val_loss" in m]
    assert min(vals[-2:]) >= min(vals[:-2])
    again = train(cfg)  # a stopped run stays stopped
    assert (again.step, again.stopped) == (result.step, "early_stopping")


def test_resuming_into_another_model_shape_is_refused(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", max_iters=6)
    train(cfg)
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_embd=64))
    with pytest.raises(CheckpointMismatch, match="other n_embd than this one.*another out_dir"):
        train(wider)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    class BreaksAtStep8(GPT):
        calls = 0

        def forward(self, idx, targets=None, caches=None):
            logits, loss = super().forward(idx, targets, caches)
            if self.training:
                BreaksAtStep8.calls += 1
                if BreaksAtStep8.calls == 8:
                    loss = loss * float("nan")
            return logits, loss

    monkeypatch.setattr(train_module, "GPT", BreaksAtStep8)
    cfg = tiny(corpus, tmp_path / "run")
    with pytest.raises(TrainingDiverged, match="loss is nan at step 8.*step_0000006"):
        train(cfg)
    assert [p.name for p in checkpoint_dirs(cfg.out_dir)][-1] == "step_0000006"


def test_non_finite_weights_are_never_saved_as_a_good_checkpoint(corpus, tmp_path, monkeypatch):
    """A step whose loss is finite but after which a weight is NaN (what an overflowing update
    leaves): the checkpoint due then is refused, and the error names the last good one."""

    real_make_optimizer = train_module.make_optimizer

    def corrupting_optimizer(model, cfg):
        optimizer = real_make_optimizer(model, cfg)
        real_step, steps = optimizer.step, []

        def step(*args, **kwargs):
            real_step(*args, **kwargs)
            steps.append(1)
            if len(steps) == 8:
                with torch.no_grad():
                    model.lm_head.weight[0, 0] = float("nan")

        optimizer.step = step
        return optimizer

    monkeypatch.setattr(train_module, "make_optimizer", corrupting_optimizer)
    cfg = tiny(corpus, tmp_path / "run", ckpt_interval=2)
    with pytest.raises(TrainingDiverged, match="no longer finite after step 8.*step_0000006"):
        train(cfg)
    assert [p.name for p in checkpoint_dirs(cfg.out_dir)][-1] == "step_0000006"


def test_two_trainings_cannot_share_an_out_dir(corpus, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    cfg = tiny(corpus, tmp_path / "run")
    Path(cfg.out_dir).mkdir()
    with open(Path(cfg.out_dir) / ".lock", "w") as other:  # a training running there
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="another training is running in"):
            train(cfg)
    assert train(cfg).step == cfg.max_iters  # once it is gone, the folder is free


def test_resume_refuses_data_that_changed_since_the_checkpoint(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", max_iters=6, lr_decay_iters=12)
    train(cfg)
    corpus.write_text(TEXT.replace("pigs", "pigz"), encoding="utf-8")  # an edited corpus
    with pytest.raises(ValueError, match="trained on other data .*differing: .*source_sha256"):
        train(dataclasses.replace(cfg, max_iters=12))


def test_resume_refuses_another_learning_rate_or_seed(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", max_iters=6, lr_decay_iters=12)
    train(cfg)
    config_json = (Path(cfg.out_dir) / "config.json").read_text()
    with pytest.raises(ValueError, match=r"other settings .*lr 0.003 -> 0.001; seed 1337 -> 7"):
        train(dataclasses.replace(cfg, max_iters=12, lr=1e-3, seed=7))
    assert (Path(cfg.out_dir) / "config.json").read_text() == config_json  # not overwritten
    assert train(dataclasses.replace(cfg, max_iters=12, eval_iters=3)).step == 12  # may change


def test_fine_tuning_starts_from_a_trained_run_or_a_gpt2_folder(corpus, tmp_path):
    pretrained = tiny(corpus, tmp_path / "pretrained", dropout=0.0)
    train(pretrained)
    still = dict(lr=1e-12, min_lr=1e-12, max_iters=1, lr_decay_iters=1, warmup_iters=0)
    tuned = tiny(corpus, tmp_path / "tuned", dropout=0.0, init_from=str(tmp_path / "pretrained"),
                 **still)  # fmt: skip
    train(tuned)
    for (name, a), b in zip(weights(pretrained.out_dir).items(), weights(tuned.out_dir).values(),
                            strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)  # one step of lr 1e-12
    fresh = tiny(corpus, tmp_path / "fresh", dropout=0.0, **still)
    train(fresh)
    first = {run.out_dir: read_metrics(run.out_dir)[0]["loss"] for run in (tuned, fresh)}
    assert first[tuned.out_dir] < first[fresh.out_dir] - 0.5  # it starts where training ended
    wider = dataclasses.replace(tuned, out_dir=str(tmp_path / "wider"),
                                model=dataclasses.replace(tuned.model, n_embd=64))  # fmt: skip
    with pytest.raises(ValueError, match=r"another shape: n_embd 32 \(ours 64\)"):
        train(wider)
    with pytest.raises(ValueError, match="neither a training run's folder, a GPT-2 folder"):
        train(dataclasses.replace(tuned, out_dir=str(tmp_path / "x"), init_from="nowhere"))


def test_fine_tuning_on_another_corpus_encodes_it_as_the_pretrained_run_did(corpus, tmp_path):
    """The new corpus has fewer characters: its own 'char' vocabulary would give its letters
    other ids than the pretrained model learned, so it is encoded with the run's vocabulary."""
    pretrained = tiny(corpus, tmp_path / "pretrained", max_iters=2)
    train(pretrained)
    pigs = tmp_path / "pigs.txt"
    pigs.write_text("little pigs went to market.\n" * 60)
    train(tiny(pigs, tmp_path / "tuned", max_iters=2, init_from=pretrained.out_dir))
    theirs, ours = load_trained(pretrained.out_dir)[2], load_trained(tmp_path / "tuned")[2]
    assert ours["encoding"] == theirs["encoding"] and ours["source"] == str(pigs.resolve())
    run_encoding = Encoding.from_dict(theirs["encoding"])
    tokens = TokenData(prepare(str(pigs), run_encoding)).tokens["train"]
    assert tokens[:6].tolist() == run_encoding.encode("little")
    assert get_encoding("char", pigs.read_text()).encode("little") != run_encoding.encode("little")
    with pytest.raises(ValueError, match="trained with encoding 'char', and encoding='gpt2'"):
        train(tiny(pigs, tmp_path / "t2", encoding="gpt2", init_from=pretrained.out_dir))
    zebra = tmp_path / "zebra.txt"
    zebra.write_text("Zebras are not pigs.\n" * 40)
    with pytest.raises(ValueError, match="cannot be encoded with Encoding\\('char', vocab_size="):
        train(tiny(zebra, tmp_path / "t3", init_from=pretrained.out_dir))


def test_fine_tuning_from_a_hugging_face_gpt2_folder(corpus, tmp_path):
    from attnbook.gpt2 import save_gpt2

    model_cfg = GPTConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=32,
                          mlp="gelu_tanh", dropout=0.0)  # fmt: skip
    torch.manual_seed(3)
    save_gpt2(GPT(model_cfg), tmp_path / "hf")
    cfg = tiny(corpus, tmp_path / "run", encoding="gpt2", init_from=str(tmp_path / "hf"),
               lr=1e-12, min_lr=1e-12, max_iters=1, lr_decay_iters=1, warmup_iters=0)  # fmt: skip
    cfg = dataclasses.replace(cfg, model=model_cfg)
    train(cfg)
    torch.manual_seed(3)
    expected = GPT(model_cfg).state_dict()
    for name, tensor in weights(cfg.out_dir).items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0, msg=name)


def test_stride_walks_each_window_once_per_epoch(corpus, tmp_path, monkeypatch):
    """With a stride the training rows are the split's windows, each once per epoch, in a new
    order every epoch (random batches start anywhere); bad strides are refused."""
    seen = []
    forward = GPT.forward

    def recording_forward(self, idx, targets=None, **kw):
        if self.training:
            seen.extend(tuple(row) for row in idx.tolist())
        return forward(self, idx, targets, **kw)

    monkeypatch.setattr(GPT, "forward", recording_forward)
    letters = tmp_path / "letters.txt"  # windows of random letters: no two alike
    letters.write_text("".join(random.Random(0).choices("abcdefgh \n", k=9000)))
    tokens = TokenData(prepare(str(letters), "char")).tokens["train"]
    windows = SlidingWindowDataset(tokens, block_size=16, stride=300)
    per_epoch = len(windows) // 4 * 4  # rows of the whole batches of 4
    train(tiny(letters, tmp_path / "run", stride=300, max_iters=2 * per_epoch // 4))
    every = {tuple(windows[i][0].tolist()) for i in range(len(windows))}
    assert len(every) == len(windows) and len(seen) == 2 * per_epoch
    first, second = seen[:per_epoch], seen[per_epoch:]
    for epoch in (first, second):
        assert len(set(epoch)) == per_epoch and set(epoch) <= every
    assert first != second
    with pytest.raises(ValueError, match="stride must be a positive integer, got 0"):
        tiny(corpus, tmp_path / "zero", stride=0)
    with pytest.raises(ValueError, match="make no whole batch of batch_size=4"):
        train(tiny(corpus, tmp_path / "few", stride=4000))


def test_a_split_shorter_than_one_block_fails_before_any_step(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", val_fraction=0.01)  # about 100 validation tokens
    long = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, block_size=4096))
    with pytest.raises(ValueError, match="the val split holds .* tokens, shorter than one block"):
        train(long)
    assert not Path(cfg.out_dir).exists()  # nothing trained, nothing written


def test_float16_trains_with_a_gradient_scaler_and_resumes_exactly(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", dtype="float16", dropout=0.0)
    result = train(cfg)
    losses = [m["loss"] for m in read_metrics(cfg.out_dir) if "loss" in m]
    assert result.step == 12 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    state = torch.load(checkpoint_dirs(cfg.out_dir)[-1] / "state.pt", weights_only=True)
    assert state["grad_scaler"]["scale"] > 0  # the scaler's state travels with the checkpoint
    half = tiny(corpus, tmp_path / "half", dtype="float16", dropout=0.0, max_iters=6)
    train(half)
    train(dataclasses.replace(half, max_iters=12))
    resumed = [m["loss"] for m in read_metrics(half.out_dir) if "loss" in m]
    assert resumed == losses  # the same 12 steps, interrupted or not


def test_mfu_is_logged_against_a_given_or_measured_peak(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "given", max_iters=3, peak_flops=1e12)
    train(cfg)
    model = GPT(saved_model_config(cfg.out_dir))
    for m in (m for m in read_metrics(cfg.out_dir) if "loss" in m):
        expected = model.flops_per_token() * m["tokens_per_s"] / 1e12
        assert m["mfu"] == pytest.approx(expected, rel=1e-9)
    measured = tiny(corpus, tmp_path / "measured", max_iters=2, peak_flops=0)
    train(measured)
    assert all(0 < m["mfu"] < 1 for m in read_metrics(measured.out_dir) if "loss" in m)
    assert "mfu" not in read_metrics(train(tiny(corpus, tmp_path / "none", max_iters=1)).out_dir)[0]
    with pytest.raises(ValueError, match="peak_flops must be None, 0 .measure. or a positive"):
        TrainConfig(peak_flops=-1.0)


def test_the_text_log_reads_like_the_metrics(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", max_iters=6, lr_decay_iters=12)
    train(cfg)
    train(dataclasses.replace(cfg, max_iters=12))
    lines = (Path(cfg.out_dir) / "train.log").read_text().splitlines()
    assert " started: mha {}, 2 layers x 2 heads x 32" in lines[0]
    assert any(" resumed at step 6: " in line for line in lines)
    assert sum(" step " in line and " loss=" in line for line in lines) == 12
    best = min(m["val_loss"] for m in read_metrics(cfg.out_dir) if "val_loss" in m)
    assert lines[-1].endswith(f"stopped (max_iters) at step 12, best val_loss {best:.4f}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_says_so(corpus, tmp_path):
    with pytest.raises(ValueError, match="device='cuda', but this machine has no CUDA GPU"):
        train(tiny(corpus, tmp_path / "run", device="cuda"))


def test_no_resume_refuses_a_folder_with_an_earlier_runs_checkpoints(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run")
    train(cfg)
    before = checkpoint_dirs(cfg.out_dir)
    with pytest.raises(ValueError, match="resume=False, but .* holds checkpoints of an earlier"):
        train(dataclasses.replace(cfg, resume=False, max_iters=6, lr_decay_iters=6))
    assert checkpoint_dirs(cfg.out_dir) == before  # nothing of the old run lost or mixed


def test_a_torn_metrics_line_is_dropped_on_resume_and_a_damaged_one_is_named(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", max_iters=6, lr_decay_iters=12)
    train(cfg)
    path = Path(cfg.out_dir) / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 7, "lo')  # what a crash mid-write leaves
    with pytest.warns(UserWarning, match="dropping its torn last line"):
        train(dataclasses.replace(cfg, max_iters=12))
    assert [m["step"] for m in read_metrics(cfg.out_dir) if "loss" in m] == list(range(1, 13))
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2, is not JSON"):
        read_metrics(cfg.out_dir)


def test_load_trained_falls_back_past_a_torn_checkpoint_and_checks_best_json(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", eval_interval=100)
    train(cfg)
    latest = checkpoint_dirs(cfg.out_dir)[-1]
    (latest / "state.pt").write_bytes(b"torn")
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*step_0000012"):
        model, loaded, _ = load_trained(cfg.out_dir)
    assert isinstance(model, GPT) and loaded.max_iters == cfg.max_iters
    (Path(cfg.out_dir) / "checkpoints" / "best.json").write_text(
        '{"checkpoint": "../../elsewhere"}'
    )
    with pytest.raises(ValueError, match="names '../../elsewhere', which is not a checkpoint"):
        load_trained(cfg.out_dir, best=True)


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", eval_interval=100)
    train(cfg)
    latest = checkpoint_dirs(cfg.out_dir)[-1]
    data = (latest / "model.safetensors").read_bytes()
    (latest / "model.safetensors").write_bytes(data[: len(data) // 2])  # a torn write
    model = GPT(saved_model_config(cfg.out_dir))
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*step_0000012"):
        state = latest_checkpoint(cfg.out_dir, model)
    assert state["step"] == 6


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_loading_never_unpickles_objects(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", max_iters=6)
    train(cfg)
    path = checkpoint_dirs(cfg.out_dir)[-1]
    torch.save({"format": 1, "evil": Payload()}, path / "state.pt")
    model = GPT(saved_model_config(cfg.out_dir))
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(path, model)


def test_bf16_autocast_and_grad_accum_run(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", dtype="bfloat16", grad_accum=2, max_iters=4)
    train(cfg)
    assert all(
        torch.isfinite(torch.tensor(m["loss"])) for m in read_metrics(cfg.out_dir) if "loss" in m
    )


def test_torchrun_two_processes_match_one(corpus, tmp_path):
    """Same global batch, dropout off: two processes' loss curve equals one process's to 1e-5
    (only the order of the gradient sums differs)."""
    common = ["--data", str(corpus), "--batch_size", "4", "--max_iters", "6",
              "--block_size", "16", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
              "--eval_iters", "1", "--eval_interval", "6", "--log_interval", "1",
              "--no-progress", "--device", "cpu"]  # fmt: skip
    one = tmp_path / "one"
    train_module.main([*common, "--out_dir", str(one)])
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", "-m", "attnbook.train", *common, "--out_dir", str(two)]  # fmt: skip
    subprocess.run(cmd, check=True, env=os.environ.copy(), capture_output=True)
    a = [m["loss"] for m in read_metrics(one) if "loss" in m]
    b = [m["loss"] for m in read_metrics(two) if "loss" in m]
    assert len(a) == len(b) == 6
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=1e-5)


def test_mlflow_logs_to_a_local_file_store(corpus, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # mlflow.set_tracking_uri sets it: undo after
    uri = (tmp_path / "mlruns").as_uri()
    cfg = tiny(corpus, tmp_path / "run", max_iters=4, mlflow_uri=uri)
    train(cfg)
    client = mlflow.tracking.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("attnbook").experiment_id])
    logged = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert logged == [m["loss"] for m in read_metrics(cfg.out_dir) if "loss" in m]
    assert run.data.params["model.n_layer"] == "2"


def test_mlflow_uri_and_credentials_come_from_a_dot_env_file(corpus, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("dotenv")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME"):
        monkeypatch.setenv(name, "")  # so that what .env sets is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    (tmp_path / ".env").write_text(f"MLFLOW_TRACKING_URI={uri}\nMLFLOW_TRACKING_USERNAME=ann\n")
    monkeypatch.chdir(tmp_path)
    train(tiny(corpus, tmp_path / "run", max_iters=2))
    client = mlflow.tracking.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("attnbook").experiment_id])
    assert run.info.run_name == "run" and os.environ["MLFLOW_TRACKING_USERNAME"] == "ann"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///elsewhere")  # the environment alone
    (tmp_path / ".env").unlink()
    train(tiny(corpus, tmp_path / "quiet", max_iters=2))  # logs nowhere: no .env, no mlflow_uri
    assert len(client.search_runs([client.get_experiment_by_name("attnbook").experiment_id])) == 1


def test_command_line_flags_cover_both_configs():
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--n_layer", "3", "--attention", "gqa", "--attention_options",
                              '{"n_kv_head": 1}', "--no-progress", "--lr", "0.01"])  # fmt: skip
    cfg = config_from_args(args)
    assert cfg.model.n_layer == 3 and cfg.model.attention == "gqa"
    assert cfg.model.attention_options == {"n_kv_head": 1}
    assert cfg.progress is False and cfg.lr == 0.01 and cfg.batch_size == TrainConfig().batch_size


def test_flags_of_optional_fields_take_the_fields_type():
    """A field that defaults to None converts its flag's text to the type it holds otherwise."""
    cfg = _parse("--peak_flops", "0", "--d_ff", "96", "--init_from", "runs/a", "--stride", "32")
    assert cfg.peak_flops == 0.0 and isinstance(cfg.peak_flops, float)
    assert cfg.model.d_ff == 96 and cfg.init_from == "runs/a" and cfg.stride == 32


def _parse(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_every_attention_option_is_a_flag_named_as_its_variant_names_it():
    cfg = _parse("--attention_type", "mla", "--kv_lora_rank", "32", "--qk_rope_head_dim", "8",
                 "--no-kv_norm", "--impl", "flash", "--positions", "rope")  # fmt: skip
    assert cfg.model.attention == "mla"
    assert cfg.model.attention_options == {
        "kv_lora_rank": 32, "qk_rope_head_dim": 8, "kv_norm": False, "impl": "flash"
    }  # fmt: skip
    cfg = _parse("--attention", "local", "--attention_options", '{"window": 4}', "--window", "8")
    assert cfg.model.attention_options == {"window": 8}  # the flag wins over the JSON
    assert _parse("--attention", "gqa", "--n_kv_head", "2").model.attention_options == {
        "n_kv_head": 2
    }
    with pytest.raises(ValueError, match="MultiHeadAttention has no option window"):
        _parse("--attention", "mha", "--window", "8")


def test_run_name_trains_under_runs():
    assert _parse("--run_name", "gqa-2").out_dir == str(Path("runs") / "gqa-2")
    with pytest.raises(ValueError, match="give it or --out_dir 'elsewhere', not both"):
        _parse("--run_name", "gqa-2", "--out_dir", "elsewhere")
