"""DeepSeek Sparse Attention: an explicit float64 reference (index scores, top-k and MLA's softmax
over the chosen latents, one query at a time), MLA's two modes, the cache, the contract with
"mla", the indexer's two training stages and the trainer's warm-up."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attnbook.attention import (
    AttentionConfig,
    DeepSeekSparseAttention,
    MultiHeadLatentAttention,
    available,
    build_attention,
)
from attnbook.attention.dsa import IndexedLatentCache, index_scores, top_k_mask
from attnbook.model import GPT, GPTConfig
from attnbook.train import TrainConfig, checkpoint_dirs, parse_config, read_metrics, train

SIZES = dict(kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5,
             index_n_heads=3, index_head_dim=6)  # fmt: skip
BLOCK = 24


def _layer(positions="rope", q_lora_rank=0, index_topk=4, dtype=torch.float32):
    cfg = AttentionConfig(n_embd=32, n_head=4, block_size=BLOCK, positions=positions)
    torch.manual_seed(0)
    layer = DeepSeekSparseAttention(cfg, q_lora_rank=q_lora_rank, index_topk=index_topk, **SIZES)
    return layer.to(dtype).eval()


def _rotate(layer, x, pos):
    """RoPE on the last dimension of ``x`` ``(..., d)`` as position ``pos`` (unchanged without)."""
    return x if layer.rope is None else layer.rope(x[..., None, :], pos)[..., 0, :]


def reference(layer, x, index_topk):
    """DSA by hand, one query at a time: ``(B, T, n_embd)``."""
    B, T, _ = x.shape
    H, r, nope, rope, dv = 4, 12, 6, 4, 5
    idx = layer.indexer
    qr = layer.q_norm(layer.wq_a(x)) if layer.q_lora_rank else None
    q = (layer.wq_b(qr) if qr is not None else layer.wq(x)).view(B, T, H, nope + rope)
    c, k_rope = layer.wkv_a(x).split([r, rope], dim=-1)
    c = layer.kv_norm(c)  # (B, T, r)
    w_kv_b = layer.wkv_b.weight.view(H, nope + dv, r)
    iq = (idx.wq_b(qr) if qr is not None else idx.wq(x)).view(B, T, 3, 6)
    ik = F.layer_norm(idx.wk(x), (6,), idx.k_norm.weight, idx.k_norm.bias, 1e-6)  # (B, T, 6)
    iw = idx.weights_proj(x) / math.sqrt(3 * 6)  # (B, T, 3)
    out = torch.zeros(B, T, H * dv, dtype=x.dtype)
    for b in range(B):
        for t in range(T):
            keys = [
                torch.cat([_rotate(layer, ik[b, s, :4], s), ik[b, s, 4:]]) for s in range(t + 1)
            ]
            scores = []
            for s in range(t + 1):
                score = 0.0
                for j in range(3):
                    q_j = torch.cat([_rotate(layer, iq[b, t, j, :4], t), iq[b, t, j, 4:]])
                    score += iw[b, t, j] * torch.relu(q_j @ keys[s])
                scores.append(float(score))
            chosen = sorted(range(t + 1), key=lambda s: (-scores[s], s))[:index_topk]
            for h in range(H):
                q_h = torch.cat([q[b, t, h, :nope], _rotate(layer, q[b, t, h, nope:], t)])
                logits = []
                for s in chosen:
                    k_h = torch.cat([w_kv_b[h, :nope] @ c[b, s], _rotate(layer, k_rope[b, s], s)])
                    bias = 0.0 if layer.alibi_slopes is None else -layer.alibi_slopes[h] * (t - s)
                    logits.append(q_h @ k_h / math.sqrt(nope + rope) + bias)
                weights = torch.softmax(torch.stack(logits), dim=0)
                values = torch.stack([w_kv_b[h, nope:] @ c[b, s] for s in chosen])  # (k, dv)
                out[b, t, h * dv : (h + 1) * dv] = weights @ values
    return layer.c_proj(out)


def _decode(layer, x, chunks, absorb=True):
    layer.absorb = absorb
    cache = layer.new_cache(x.shape[0])
    outs, start = [], 0
    for size in chunks:
        outs.append(layer(x[:, start : start + size], cache=cache))
        start += size
    assert cache.length == x.shape[1]
    return torch.cat(outs, dim=1)


# ---- the reference, MLA's two modes, the cache ---------------------------------------------


@pytest.mark.parametrize("positions, q_lora_rank", [("rope", 0), ("rope", 10), ("alibi", 10),
                                                    ("none", 0)])  # fmt: skip
def test_every_path_equals_the_explicit_reference_in_float64(positions, q_lora_rank):
    layer = _layer(positions, q_lora_rank, dtype=torch.float64)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(layer, x, index_topk=4)
        for absorb in (False, True):
            layer.absorb = absorb
            torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)
            for chunks in ([1] * 12, [5, 1, 2, 4]):
                out = _decode(layer, x, chunks, absorb)
                torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
        layer.config = AttentionConfig(**{**vars(layer.config), "impl": "reference"})
        torch.testing.assert_close(_decode(layer, x, [3, 9]), expected, rtol=1e-10, atol=1e-12)


def test_top_k_breaks_ties_toward_the_earliest_whatever_the_length():
    scores = torch.tensor([[0.0, 2.0, 0.0, 0.0, 1.0, float("-inf")]])
    assert top_k_mask(scores, 3).tolist() == [[True, True, False, False, True, False]]
    assert top_k_mask(scores[:, :5], 3).tolist() == [[True, True, False, False, True]]
    assert top_k_mask(scores, 9).tolist() == [[True] * 5 + [False]]  # never a masked one


def test_index_scores_are_the_weighted_relu_sum():
    q, k, w = torch.randn(2, 3, 4, 6), torch.randn(2, 5, 6), torch.randn(2, 4, 3)
    by_hand = torch.stack([(w[:, :, j, None] * (q[:, j] @ k.transpose(1, 2)).relu())
                           for j in range(3)]).sum(0)  # fmt: skip
    torch.testing.assert_close(index_scores(q, w, k), by_hand)


@pytest.mark.parametrize("positions", ["rope", "alibi", "learned", "none"])
@pytest.mark.parametrize("chunks", [[1] * BLOCK, [5, 1, 3, 7, 2, 6], [1, 23], [23, 1]])
@pytest.mark.parametrize("absorb", [False, True])
def test_cached_decoding_with_a_small_top_k_equals_the_full_pass(positions, chunks, absorb):
    layer = _layer(positions, q_lora_rank=10)
    x = torch.randn(2, BLOCK, 32)
    layer.absorb = False
    full = layer(x)
    torch.testing.assert_close(_decode(layer, x, chunks, absorb), full, atol=1e-5, rtol=1e-5)


def test_a_decoding_step_reads_only_the_chosen_latents():
    """Every latent and rotary key the step does not choose is NaN: the absorbed step (which
    gathers) is untouched, the naive one (which masks the whole cache) is poisoned."""
    layer = _layer(q_lora_rank=10)
    x = torch.randn(1, BLOCK, 32)
    full = layer(x)
    for absorb in (True, False):
        layer.absorb = absorb
        cache = layer.new_cache(1)
        layer(x[:, :-1], cache=cache)
        with torch.no_grad():  # the last query's choice among all 24 tokens
            q, w, k = layer.indexer(x, layer.q_norm(layer.wq_a(x)))
            q, k = layer.indexer.rotate(q, k, 0, layer.rope)
            chosen = top_k_mask(index_scores(q[:, :, -1:], w[:, -1:], k), 4)[0, 0]
        assert chosen.sum() == 4
        cache.v[:, :, :-1][:, :, ~chosen[:-1]] = float("nan")  # latents
        cache.k[:, :, :-1][:, :, ~chosen[:-1]] = float("nan")  # rotary keys
        step = layer(x[:, -1:], cache=cache)
        if absorb:
            torch.testing.assert_close(step, full[:, -1:], atol=1e-5, rtol=1e-5)
        else:
            assert step.isnan().all()


def test_naive_and_absorbed_give_the_same_outputs_weights_and_gradients():
    layer = _layer("alibi", q_lora_rank=10)
    x = torch.randn(2, 16, 32)
    results = []
    for absorb in (False, True):
        layer.absorb = absorb
        layer.zero_grad()
        y, w = layer(x, need_weights=True)
        layer(x).square().sum().backward()
        results.append((y, w, [p.grad.clone() for p in layer.parameters() if p.grad is not None]))
    (y_n, w_n, g_n), (y_a, w_a, g_a) = results
    torch.testing.assert_close(y_a, y_n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_a, w_n, atol=1e-6, rtol=1e-5)
    assert ((w_n > 0).sum(-1) <= 4).all() and torch.all(w_n.triu(1) == 0)  # top-4, causal
    for a, n in zip(g_a, g_n, strict=True):
        torch.testing.assert_close(a, n, atol=1e-5 * n.abs().max().item(), rtol=1e-4)


def test_changing_the_future_never_changes_the_past():
    layer = _layer(index_topk=3)
    x = torch.randn(1, 16, 32)
    y = x.clone()
    y[:, 9:] = torch.randn(1, 7, 32)
    torch.testing.assert_close(layer(y)[:, :9], layer(x)[:, :9])
    assert not torch.allclose(layer(y)[:, 9:], layer(x)[:, 9:])


def test_a_padding_mask_masks_the_choice_too_with_and_without_a_cache():
    layer = _layer(q_lora_rank=10)
    x = torch.randn(2, 16, 32)
    real = torch.ones(2, 16, dtype=torch.bool)
    real[1, :5] = False
    full, w = layer(x, attn_mask=real[:, None, None, :], need_weights=True)
    assert torch.all(w[1, :, :, :5] == 0)  # the real tokens choose among the real ones
    assert ((w[1, :, 5:] > 0).sum(-1) == torch.arange(1, 12).clamp(max=4)).all()
    for absorb in (False, True):
        layer.absorb = absorb
        cache = layer.new_cache(2)
        steps = [layer(x[:, :6], attn_mask=real[:, None, None, :6], cache=cache)]
        steps += [layer(x[:, t : t + 1], attn_mask=real[:, None, None, : t + 1], cache=cache)
                  for t in range(6, 16)]  # fmt: skip
        torch.testing.assert_close(torch.cat(steps, 1)[:, 5:], full[:, 5:], atol=1e-5, rtol=1e-5)


# ---- the contract with MLA -----------------------------------------------------------------


def _mla_twin(layer):
    """An "mla" layer with ``layer``'s weights (the indexer's are left over)."""
    mla = MultiHeadLatentAttention(layer.config, q_lora_rank=layer.q_lora_rank,
                                   **{k: v for k, v in SIZES.items() if "index" not in k})  # fmt: skip
    missing, unexpected = mla.load_state_dict(layer.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("indexer.") for k in unexpected)
    return mla.eval()


@pytest.mark.parametrize("positions", ["rope", "alibi"])
def test_a_top_k_covering_every_token_is_mla_and_a_small_one_is_not(positions):
    x = torch.randn(2, BLOCK, 32)
    layer = _layer(positions, q_lora_rank=10, index_topk=BLOCK)
    mla = _mla_twin(layer)
    for absorb in (False, True):
        layer.absorb = mla.absorb = absorb
        torch.testing.assert_close(layer(x), mla(x), rtol=0, atol=0)
        cached = _decode(layer, x, [5, 1, 18], absorb)
        torch.testing.assert_close(cached, _decode(mla, x, [5, 1, 18], absorb), rtol=0, atol=0)
    layer.index_topk = 4
    assert (layer(x) - mla(x))[:, 4:].abs().amax(-1).min() > 1e-3  # every query past the 4th
    torch.testing.assert_close(layer(x)[:, :4], mla(x)[:, :4])  # the first 4 see all they can


# ---- training the indexer ------------------------------------------------------------------


def _kl_by_hand(p, scores, support):
    """Mean over queries of sum_s p log(p / softmax over the support of the scores)."""
    total = 0.0
    for b in range(p.shape[0]):
        for t in range(p.shape[1]):
            s = support[b, t]
            log_q = torch.log_softmax(scores[b, t][s], dim=0)
            total += (p[b, t][s] * (p[b, t][s].log() - log_q)).sum()
    return total / (p.shape[0] * p.shape[1])


@pytest.mark.parametrize("warmup", [True, False])
def test_the_indexer_loss_is_the_kl_from_the_head_summed_attention(warmup):
    layer = _layer("alibi", q_lora_rank=10, dtype=torch.float64).train()
    layer.dense_warmup = warmup
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    _, weights = layer(x, need_weights=True)  # (B, H, T, T): dense during the warm-up
    p = weights.sum(1) / weights.sum((1, 3))[..., None]
    idx = layer.indexer  # by hand, no RoPE with ALiBi: (B, T, 3, 6), (B, T, 6), (B, T, 3)
    q = idx.wq_b(layer.q_norm(layer.wq_a(x))).view(2, 10, 3, 6)
    k = F.layer_norm(idx.wk(x), (6,), idx.k_norm.weight, idx.k_norm.bias, 1e-6)
    w = idx.weights_proj(x) / math.sqrt(3 * 6)
    scores = (w[..., None] * torch.einsum("btjd,bsd->btjs", q, k).relu()).sum(2)  # (B, T, T)
    scores = scores.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
    support = scores > float("-inf") if warmup else top_k_mask(scores, 4)
    assert ((weights.sum(1) > 0) == support).all()
    expected = _kl_by_hand(p, scores, support)
    torch.testing.assert_close(layer.indexer_loss, expected, rtol=1e-10, atol=1e-12)
    layer.eval()
    layer(x)
    assert layer.indexer_loss is None


def _split(layer):
    main = {n: p for n, p in layer.named_parameters() if not n.startswith("indexer.")}
    index = {n: p for n, p in layer.named_parameters() if n.startswith("indexer.")}
    return main, index


def test_the_dense_warm_up_lowers_the_kl_and_leaves_the_main_weights_alone():
    layer = _layer(q_lora_rank=10).train()
    layer.dense_warmup = True
    main, _ = _split(layer)
    before = {n: p.detach().clone() for n, p in main.items()}
    x = torch.randn(4, 16, 32)
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-2)
    losses = []
    for _ in range(15):
        layer(x)
        opt.zero_grad()
        layer.indexer_loss.backward()
        assert all(p.grad is None for p in main.values())
        opt.step()
        losses.append(layer.indexer_loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(p, before[n]) for n, p in main.items())


def test_in_sparse_training_the_lm_loss_misses_the_indexer_and_the_kl_the_main_weights():
    layer = _layer(q_lora_rank=10).train()
    main, index = _split(layer)
    x = torch.randn(2, 16, 32)
    layer(x).square().sum().backward()
    assert all(p.grad is None for p in index.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in main.values())
    layer.zero_grad(set_to_none=True)
    layer(x)
    layer.indexer_loss.backward()
    assert all(p.grad is None for p in main.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in index.values())


# ---- the trainer's warm-up -----------------------------------------------------------------

TEXT = "".join(f"{i % 7} little pigs went to market {i * 13 % 31}.\n" for i in range(300))


def _run(tmp_path, name, **kw):
    model = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                      attention="dsa", positions="rope", attention_options={"index_topk": 4})  # fmt: skip
    settings = dict(
        model=model, out_dir=str(tmp_path / name), data=str(tmp_path / "corpus.txt"), batch_size=4,
        max_iters=6, dsa_warmup_iters=3, warmup_iters=1, lr_decay_iters=6, lr=3e-3, min_lr=3e-4,
        eval_interval=3, eval_iters=1, log_interval=1, ckpt_interval=3, keep_last=5,
        progress=False, device="cpu",
    )  # fmt: skip
    return TrainConfig(**{**settings, **kw})


def _weights(run_dir, step):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


def test_training_warms_the_indexers_up_then_trains_everything_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBOOK_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    assert parse_config(["--attention", "dsa", "--dsa_warmup_iters", "3"]).dsa_warmup_iters == 3
    cfg = _run(tmp_path, "straight")
    train(cfg)
    saved = json.loads((Path(cfg.out_dir) / "config.json").read_text())["model"]
    torch.manual_seed(cfg.seed)  # the weights train() starts from
    start = GPT(GPTConfig.from_dict(saved)).state_dict()
    warm, later = _weights(cfg.out_dir, 3), _weights(cfg.out_dir, 6)
    for name, tensor in warm.items():
        index = ".indexer." in name
        assert torch.equal(tensor, start[name]) != index, name  # only the indexers moved
        assert not torch.equal(later[name], tensor), name  # and then every weight
    rows = [m for m in read_metrics(cfg.out_dir) if "loss" in m]
    assert len(rows) == 6 and all(m["indexer_loss"] > 0 for m in rows)
    split = _run(tmp_path, "split", max_iters=2)  # stops during the warm-up, then resumes
    train(split)
    train(_run(tmp_path, "split"))
    for name, tensor in _weights(split.out_dir, 6).items():
        assert torch.equal(tensor, later[name]), name
    with pytest.raises(ValueError, match="dsa_warmup_iters 3 -> 4"):
        train(_run(tmp_path, "split", max_iters=8, dsa_warmup_iters=4))
    assert len(checkpoint_dirs(split.out_dir)) == 3


def test_the_warm_up_needs_dsa_layers(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBOOK_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    cfg = _run(tmp_path, "mha")
    cfg.model = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)
    with pytest.raises(ValueError, match="this model has none: use attention 'dsa'"):
        train(cfg)
    with pytest.raises(ValueError, match="dsa_warmup_iters must be an integer >= 0"):
        TrainConfig(dsa_warmup_iters=-1)


# ---- options, refusals, the cache ----------------------------------------------------------


def test_registered_with_deepseeks_names_and_small_defaults():
    assert "dsa" in available()
    layer = build_attention("dsa", AttentionConfig(n_embd=64, n_head=4))  # head_dim 16, rope 8
    assert (layer.index_head_dim, layer.index_topk, layer.indexer.n_heads) == (16, 8, 4)
    assert set(dict(layer.indexer.named_children())) == {"wq", "wk", "k_norm", "weights_proj"}
    layer = build_attention("dsa", AttentionConfig(n_embd=64, n_head=4), q_lora_rank=8)
    assert set(dict(layer.indexer.named_children())) == {"wq_b", "wk", "k_norm", "weights_proj"}
    assert DeepSeekSparseAttention.options_for_length(64, 4) == {"index_topk": 16}


def test_the_cache_holds_latents_rotary_keys_and_index_keys():
    layer = _layer()
    cache = layer.new_cache(batch_size=3, max_len=10)
    assert isinstance(cache, IndexedLatentCache)
    assert cache.bytes_per_token == (12 + 4 + 6) * 4
    assert cache.nbytes == 3 * 10 * cache.bytes_per_token
    small = IndexedLatentCache(1, 12, 4, 6, 10, index_dtype=torch.bfloat16)
    assert small.bytes_per_token == (12 + 4) * 4 + 6 * 2 and small.index_k.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"expected index_k of shape \(3, 1, 6\)"):
        cache.append(torch.randn(3, 1, 1, 4), torch.randn(3, 1, 1, 12), torch.randn(3, 1, 5))
    assert cache.length == 0
    with pytest.raises(ValueError, match="index_head_dim must be a positive integer"):
        IndexedLatentCache(1, 12, 4, 0, 10)


def test_what_it_cannot_honour_is_refused():
    with pytest.raises(ValueError, match="causal must be True .* use 'mla'"):
        build_attention("dsa", AttentionConfig(n_embd=32, n_head=4, causal=False))
    with pytest.raises(ValueError, match="impl='flash' .* use impl='sdpa' or 'reference'"):
        build_attention("dsa", AttentionConfig(n_embd=32, n_head=4, impl="flash"))
    with pytest.raises(ValueError, match="index_head_dim=4 is smaller than qk_rope_head_dim=8"):
        build_attention("dsa", AttentionConfig(n_embd=64, n_head=4), index_head_dim=4)
    with pytest.raises(ValueError, match="must have 1 in its head dimension"):
        _layer()(torch.randn(1, 5, 32), attn_mask=torch.ones(1, 4, 5, 5, dtype=torch.bool))


def test_bench_dsa_prints_every_variant_and_the_targets(capsys):
    from attnbook import bench

    bench.main(
        ["dsa", "--lengths", "64", "--repeats", "1", "--n_head", "4", "--index_n_heads", "2"]
    )
    out = capsys.readouterr().out
    for row in ("MLA, absorbed (mla.py)", "dense, one SDPA call", "DSA, float32 index keys",
                "DSA, bfloat16 index keys"):  # fmt: skip
        assert f"| 64 | {row} |" in out
    assert "| 64 | DSA, float32 index keys |" in out and "0.285 |" in out  # 128/576 + 1/16
    assert "not measured (add 32768 to --lengths)" in out
