"""The ``attnbook`` command: prepare, train, generate, bench attention, flash and baby's
estimates, and --help for each."""

import pytest
import torch

from attnbook import cli
from attnbook.attention import available
from attnbook.bench import loss_estimates
from attnbook.data import TokenData, prepare
from attnbook.model import GPT, GPTConfig
from attnbook.train import TrainConfig

TEXT = "".join(f"to be or not to be, line {i}\n" for i in range(200))


@pytest.mark.parametrize(
    "command", [[], ["prepare"], ["train"], ["generate"], ["compare"], ["bench"]]
)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: attnbook" in capsys.readouterr().out


def test_prepare_train_generate(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATTNBOOK_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    cli.main(["prepare", "--data", str(corpus)])
    out = capsys.readouterr().out
    assert f"vocab_size {len(set(TEXT))}, uint16" in out
    cli.main(["prepare", "--data", str(corpus), "--clean"])
    assert "cleaned: " in capsys.readouterr().out  # the report, counted by test_clean
    run = str(tmp_path / "run")
    cli.main(["train", "--data", str(corpus), "--out_dir", run, "--max_iters", "4",
              "--block_size", "16", "--n_layer", "1", "--n_head", "2", "--n_embd", "16",
              "--eval_iters", "1", "--no-progress", "--attention", "gqa",
              "--attention_options", '{"n_kv_head": 1}'])  # fmt: skip
    cli.main(["generate", "--out_dir", run, "--prompt", "to be", "--max_new_tokens", "20",
              "--num_samples", "2"])  # fmt: skip
    samples = capsys.readouterr().out.split("-" * 40 + "\n")
    assert len(samples) == 2
    assert all(s.startswith("to be") and len(s.rstrip("\n")) >= 5 for s in samples)


def test_generate_streams_past_block_size_when_every_cache_is_bounded(
    tmp_path, monkeypatch, capsys
):
    """A local + RoPE model keeps its rolling caches past block_size; a full-cache model
    recomputes on the last block_size tokens instead."""
    monkeypatch.setenv("ATTNBOOK_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    used = []
    generate = GPT.generate
    monkeypatch.setattr(GPT, "generate", lambda self, *a, **kw: used.append(kw["use_cache"])
                        or generate(self, *a, **kw))  # fmt: skip
    for variant, expected in ((["local", "--window", "4"], True), (["mha"], False)):
        run = str(tmp_path / variant[0])
        cli.main(["train", "--data", str(corpus), "--out_dir", run, "--max_iters", "2",
                  "--block_size", "16", "--n_layer", "1", "--n_head", "2", "--n_embd", "16",
                  "--eval_iters", "1", "--no-progress", "--positions", "rope",
                  "--attention", *variant])  # fmt: skip
        cli.main(["generate", "--out_dir", run, "--prompt", "to be", "--max_new_tokens", "40"])
        assert used[-1] is expected
        assert capsys.readouterr().out.rstrip("\n").startswith("to be")


def test_generate_without_a_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="attnbook generate: error: no checkpoint in .*: train"):
        cli.main(["generate", "--out_dir", str(tmp_path)])


def test_user_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--lr", "inf", "--out_dir", str(tmp_path / "run")])
    assert (
        exit_.value.code == 2 and "lr must be a finite number, got inf" in capsys.readouterr().err
    )
    with pytest.raises(
        SystemExit, match="attnbook prepare: error: .* is neither a registered corpus"
    ):
        cli.main(["prepare", "--data", str(tmp_path / "missing.txt")])


def test_generate_refuses_what_it_cannot_do_in_one_line(monkeypatch):
    with pytest.raises(SystemExit, match="--num_samples must be >= 1"):
        cli.main(["generate", "--num_samples", "0"])
    model = GPT(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=8))
    monkeypatch.setattr(
        cli.train, "load_trained", lambda *a, **k: (model, None, {"tasks": ["recall"]})
    )
    with pytest.raises(SystemExit, match="without a text encoding to decode with"):
        cli.main(["generate", "--out_dir", "runs/compare/recall/mha"])
    with pytest.raises(ValueError, match="temperature must be 0 .* or a finite number >= 1e-06"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 2, temperature=1e-45)


def test_bench_attention_prints_every_kernel_and_variant(capsys):
    cli.main(["bench", "attention", "--lengths", "128", "--repeats", "1"])
    out = capsys.readouterr().out
    for name in ["full causal SDPA", "local", "sparse", "linear", *available()]:
        assert f"| {name} |" in out
    assert "not measured (add T=4096 to --lengths)" in out


def test_bench_flash_measures_each_kernel_in_a_fresh_process(capsys):
    cli.main(["bench", "flash", "--lengths", "256", "--block", "64", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| T | reference MiB | reference ms | flash MiB | flash ms | sdpa MiB | sdpa ms |" in out
    row = next(line for line in out.splitlines() if line.startswith("| 256 |"))
    assert len(row.split("|")) == 10  # T, 3 x (MiB, ms), the ratio, and the two ends


def test_baby_bench_val_estimates_are_independent_means_of_random_batches(tmp_path, monkeypatch):
    """`bench baby` shows how far nanoGPT's 20-batch estimate strays: each of its estimates
    is the mean of its own consecutive random validation batches."""
    monkeypatch.setenv("ATTNBOOK_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    data = TokenData(prepare(str(corpus), "char"))
    model_cfg = GPTConfig(vocab_size=data.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    cfg = TrainConfig(model=model_cfg, out_dir=str(tmp_path / "run"), batch_size=4, seed=5)
    model = GPT(model_cfg).eval()
    estimates = loss_estimates(model, data, cfg, "val", draws=3, batches=2)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    with torch.no_grad():
        losses = torch.stack([model(*data.get_batch("val", 4, 16, gen))[1] for _ in range(6)])
    torch.testing.assert_close(estimates, losses.view(3, 2).mean(dim=1))
    assert len(set(estimates.tolist())) == 3  # three different draws
