"""bench.PeakTensorMemory counts what operations create and forget what is freed; the peak
bytes of causal attention's forward + backward grow quadratically for the explicit math and
linearly for flash_attention's tiles; hybrid stacks' cache bytes per token, counted and measured;
the MQAR sweep's runs, table and CSV, and its refusals."""

import csv
import functools

import pytest
import torch

from attnbook import bench, cli
from attnbook.bench import (
    CAUSAL,
    MQAR_COLUMNS,
    PeakTensorMemory,
    hybrid_table,
    main,
    mqar_rows,
    parse_variant,
    peak_bytes,
)


def test_peak_counts_new_storages_once_and_forgets_freed_ones():
    x = torch.ones(1000)  # made before the region: not counted
    with PeakTensorMemory() as memory:
        a = x * 2  # 4000 bytes
        b = a + 1  # 8000 held
        view = b[:10]  # a view: no new storage
        del a
        c = b * 3  # a is freed: still 8000 held
        assert memory.current == 8000 and view.untyped_storage().nbytes() == 4000
    assert memory.peak == 8000 and c.shape == (1000,)


def test_the_explicit_math_peaks_quadratically_and_the_tiles_linearly():
    def peak(kernel, T):
        q, k, v = (torch.randn(1, 1, T, 64, requires_grad=True) for _ in range(3))
        return peak_bytes(functools.partial(CAUSAL[kernel], block=64), q, k, v)

    ref = [peak("reference", T) for T in (512, 1024)]
    flash = [peak("flash", T) for T in (512, 1024)]
    assert 3.5 < ref[1] / ref[0] < 4.5 and 1.5 < flash[1] / flash[0] < 2.5
    assert ref[1] > 5 * flash[1] and ref[1] >= 3 * 1024 * 1024 * 4  # several T x T float tensors


def test_bench_hybrid_counts_and_measures_the_same_cache_bytes(capsys):
    rows = dict(hybrid_table([1024, 32768]))
    full = 12 * 2 * 12 * 64 * 4  # 12 blocks' keys and values of one token, float32
    assert all(f == m for figures in rows.values() for f, m in figures.values())
    gemma, oss, qwen = (rows[name] for name in list(rows)[1:])
    assert rows["all global: mha x 12"][32768][1] == full
    assert gemma[1024][1] == full and gemma[32768][1] == full * (2 + 10 * 1024 / 32768) / 12
    assert oss[32768][1] == full * (6 + 6 * 128 / 32768) / 12
    state = 12 * 64 * 64 + 3 * 768 * 3  # one Gated DeltaNet block: S and the conv's inputs
    assert qwen[32768][1] == full * 3 / 12 + 9 * state * 4 / 32768
    main(["hybrid", "--lengths", "1024", "4096"])
    out = capsys.readouterr().out
    assert "Gemma 3" in out and "27,648 / 27,648 (0.375)" in out


def test_bench_streaming_decodes_past_block_size_at_constant_cache_bytes(capsys):
    cli.main(["bench", "streaming", "--block_size", "16", "--factor", "3", "--window", "4",
              "--sink_tokens", "2"])  # fmt: skip
    out = capsys.readouterr().out
    rows = [line.split("|")[1:3] for line in out.splitlines() if line.startswith("| ") and
            line[2].isdigit()]  # fmt: skip
    lengths = [int(n) for n, _ in rows]
    held = {int(b.replace(",", "")) for _, b in rows}
    assert lengths == [1, 6, 16, 32, 48] and len(held) == 1  # past block_size, same bytes
    assert "tokens/s" in out


def test_bench_train_times_both_adamw_kernels_for_every_shape_and_dtype(capsys, monkeypatch):
    tiny = {"2x2x32, block 16": dict(n_layer=2, n_head=2, n_embd=32, block_size=16)}
    monkeypatch.setattr(bench, "TRAIN_SHAPES", tiny)
    main(["train", "--repeats", "1", "--batch_size", "2"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 2x2x32")]  # fmt: skip
    dtypes = ["float32", "bfloat16"] if len(rows) == 4 else ["float32"]
    assert [(r[1], r[2]) for r in rows] == [(d, k) for d in dtypes for k in ("fused", "unfused")]
    assert all(float(r[3]) > 0 for r in rows)  # ms/step
    assert [r[-1] for r in rows if r[2] == "unfused"] == ["1.00x |"] * len(dtypes)


def test_bench_mqar_trains_every_variant_pairs_and_seed_and_writes_each_run(tmp_path, capsys):
    path = tmp_path / "mqar.csv"
    cli.main(["bench", "mqar", "--variants", "mha", "deltanet:use_delta=False,conv_size=2",
              "--pairs", "2", "3", "--seeds", "0", "1", "--steps", "2", "--n_embd", "16",
              "--n_head", "2", "--batch_size", "3", "--vocab_size", "12", "--queries", "12",
              "--csv", str(path)])  # fmt: skip
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(MQAR_COLUMNS)
    variants = ("mha", "deltanet:use_delta=False,conv_size=2")
    assert [(r["variant"], r["n_pairs"], r["seed"]) for r in rows] == [
        (v, p, s) for s in ("0", "1") for v in variants for p in ("2", "3")
    ]  # seed by seed
    assert [(r["seq_len"], r["pairs_per_head_dim"]) for r in rows[:2]] == [
        ("16", "0.25"), ("18", "0.375")  # 2 n + 12 queries; n / head_dim 8
    ]  # fmt: skip
    assert all(0 <= float(r["recall_acc"]) <= 1 and r["steps"] == "2" for r in rows)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 4 and table[1].startswith("| mha | 2 | 0.25 | ")


def test_parse_variant_reads_options_as_literals_and_refuses_others():
    assert parse_variant("mha") == ("mha", {})
    assert parse_variant("deltanet:use_delta=False,conv_size=2") == (
        "deltanet", {"use_delta": False, "conv_size": 2}
    )  # fmt: skip
    for spec in ("deltanet:use_delta", "deltanet:use_delta=maybe", "deltanet:=3"):
        with pytest.raises(ValueError, match="name:option=value"):
            parse_variant(spec)


@pytest.mark.parametrize(
    "variants, pairs, seeds, match",
    [
        (["nope"], [2], [0], "unknown variants"),
        (["deltanet:window=3"], [2], [0], "window"),
        (["mha"], [30], [0], "distinct keys do not fit"),
        (["mha"], [0], [0], "pairs must be a positive integer"),
        (["mha"], [2], [], "at least one"),
        (["mha"], [2, 1], [0], "use queries >= 14"),
    ],
)
def test_bench_mqar_refuses_bad_settings_before_training(variants, pairs, seeds, match):
    with pytest.raises(ValueError, match=match):
        mqar_rows(variants, pairs, seeds, vocab_size=12, n_embd=16, n_head=2, queries=12)
