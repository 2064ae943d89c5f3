"""``attnbook compare``: a tiny comparison end to end, reruns skipped, the measured columns."""

import csv
import json

import pytest
import torch

from attnbook import cli
from attnbook.compare import (
    CompareConfig,
    SuiteData,
    cache_bytes_per_token,
    compare,
    cpu_cores,
    model_config,
    recall_suite,
    variant_options,
)
from attnbook.model import GPT
from attnbook.train import read_metrics

TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, max_iters=12, batch_size=6)


def _cfg(tmp_path, **kw):
    return CompareConfig(**{**TINY, "out_dir": str(tmp_path), "progress": False, **kw})


def test_tiny_recall_comparison_writes_every_output_and_reuses_finished_variants(tmp_path, capsys):
    cfg = _cfg(tmp_path, variants=("mha", "local"), eval_batches=2)
    rows = compare(cfg)
    root = tmp_path / "recall"
    with open(root / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == ["mha", "local"] == [r["variant"] for r in rows]
    for r in table:
        assert 0 <= float(r["recall_acc"]) <= 1 and float(r["val_loss"]) > 0
        assert int(r["params"]) > 0 and float(r["gen_tokens_per_s"]) > 0
        assert float(r["train_tokens_per_s"]) > 0 and float(r["peak_rss_mb"]) > 0
    markdown = (root / "results.md").read_text()
    assert markdown.count("\n| mha |") == 1 and markdown.count("\n| local |") == 1
    for name in ("loss_curves", "recall_by_gap", "cache_bytes", "throughput"):
        assert (root / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    # local attention caches a window of block_size // 8 = 4 positions: 8x less than MHA
    by_name = {r["variant"]: r for r in rows}
    assert by_name["mha"]["cache_bytes_per_token"] == 2 * 32 * 4  # k and v, 32 dims, float32
    assert by_name["local"]["cache_bytes_per_token"] == 2 * 32 * 4 * 4 / 1024
    # the CSV flattens the recall bins that hold queries; curves.csv has every evaluation
    assert [k for k in table[0] if k.startswith("recall_gap_")] == [
        "recall_gap_1_7",
        "recall_gap_8_15",
        "recall_gap_16_31",
    ]
    for r, row in zip(table, rows, strict=True):
        assert float(r["recall_gap_8_15"]) == pytest.approx(row["recall_by_gap"][1][2])
    with open(root / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    evaluated = [m for m in read_metrics(root / "local") if "val_loss" in m]
    assert [int(c["step"]) for c in curves if c["variant"] == "local"] == [
        m["step"] for m in evaluated
    ]
    assert float(curves[-1]["val_loss"]) == pytest.approx(evaluated[-1]["val_loss"])
    # the recall-by-gap bins count every answer of the evaluation set once
    answers = sum(count for *_, count in by_name["mha"]["recall_by_gap"])
    assert answers == 2 * 6 * (32 - 2 * recall_suite(cfg)[0].n_pairs)  # every query position asks

    capsys.readouterr()
    stamp = (root / "mha" / "result.json").stat().st_mtime_ns
    again = compare(cfg)
    assert "mha: finished before with these settings" in capsys.readouterr().out
    assert (root / "mha" / "result.json").stat().st_mtime_ns == stamp
    assert again == json.loads(json.dumps(rows))

    changed = compare(_cfg(tmp_path, variants=("mha",), eval_batches=2, seed=7))
    assert (root / "mha" / "result.json").stat().st_mtime_ns != stamp  # other settings: rerun
    assert changed[0]["settings"]["seed"] == 7


def test_lm_workload_on_a_text_file(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    cfg = _cfg(tmp_path / "out", workload="lm", data=str(text), variants=("mqa",), eval_batches=2)
    (row,) = compare(cfg)
    assert "recall_acc" not in row and row["val_loss"] < 3.5  # 28 characters: ln 28 = 3.33
    header = (tmp_path / "out" / "lm" / "results.csv").read_text().splitlines()[0]
    assert header.startswith("variant,params,train_loss,val_loss,train_tokens_per_s")
    assert not (tmp_path / "out" / "lm" / "recall_by_gap.png").exists()


def test_every_registered_variant_builds_with_its_options():
    cfg = CompareConfig(**TINY, progress=False)
    data = SuiteData(recall_suite(cfg))
    x, y = data.get_batch("train", 6, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (6, 32) and (y >= 0).any()
    for name in cfg.variants:
        model = GPT(model_config(name, cfg, data.vocab_size))
        logits, loss = model(x, y)
        assert logits.shape == (6, 32, data.vocab_size) and torch.isfinite(loss)
        assert cache_bytes_per_token(model.config) > 0
    assert variant_options("local", cfg) == {"window": 4}
    assert variant_options("mha", cfg) == {}


def test_bad_settings_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown variants \\['flash'\\]"):
        CompareConfig(variants=("flash",))
    with pytest.raises(ValueError, match="workload must be one of"):
        CompareConfig(workload="vision")
    with pytest.raises(ValueError, match="batch_size must be a multiple of 3, got 8"):
        CompareConfig(batch_size=8)
    with pytest.raises(ValueError, match="positions must be one of .*, got 'xpos'"):
        CompareConfig(positions="xpos")
    with pytest.raises(ValueError, match="max_iters must be a positive integer, got 0"):
        CompareConfig(max_iters=0)
    with pytest.raises(SystemExit):
        cli.main(["compare", "--quick", "--full"])
    with pytest.raises(SystemExit):
        cli.main(["compare", "--variants", "nope"])
    assert "unknown variants ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["compare", "--jobs", "-2"])
    assert "jobs must be an integer >= 0 (0: one per core), got -2" in capsys.readouterr().err


def test_presets_fill_only_what_is_not_given():
    cfg = CompareConfig(preset="full", n_layer=3)
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.max_iters) == (3, 64, 64, 8000)


def test_training_variants_side_by_side_changes_timings_only(tmp_path):
    """jobs=2 trains both variants at once with one thread each; jobs=1 one after the other with
    every core: the same losses and accuracies (up to the order of float sums), the same rows."""
    one = compare(_cfg(tmp_path / "one", variants=("mha", "mqa"), eval_batches=2, jobs=1))
    two = compare(_cfg(tmp_path / "two", variants=("mha", "mqa"), eval_batches=2, jobs=2))
    assert [r["variant"] for r in two] == ["mha", "mqa"]  # cfg.variants order, not finish order
    assert [r["threads"] for r in two] == [max(1, cpu_cores() // 2)] * 2
    for a, b in zip(one, two, strict=True):
        assert a["settings"] == b["settings"] and a["params"] == b["params"]
        for key in ("train_loss", "val_loss", "recall_acc", "copy_acc", "induction_acc"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), key
