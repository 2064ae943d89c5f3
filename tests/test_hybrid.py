"""Hybrid stacks (``GPTConfig.layer_attention``): each block builds its own variant with the
options it takes, decodes with its own cache kind (cached = full pass, token for token), stays
causal, trains from the command line, checkpoints, and its cache bytes per token measured from
the caches equal the count from the config."""

import json

import pytest
import torch

from attnbook import cli
from attnbook.attention import (
    GatedDeltaNet,
    GroupedQueryAttention,
    LocalAttention,
    MultiHeadAttention,
    MultiHeadLatentAttention,
)
from attnbook.attention.deltanet import DeltaNetCache
from attnbook.attention.dsa import DeepSeekSparseAttention
from attnbook.attention.local import RollingKVCache
from attnbook.attention.mla import LatentCache
from attnbook.bench import cache_bytes_formula
from attnbook.convert import mha_to_gqa
from attnbook.gpt2 import config_to_hf
from attnbook.kv_cache import KVCache
from attnbook.model import GPT, GPTConfig, layer_pattern
from attnbook.train import (
    CheckpointMismatch,
    TrainConfig,
    load_checkpoint,
    load_trained,
    make_optimizer,
    save_checkpoint,
    train,
)

VOCAB, BLOCK = 61, 16
SHAPE = dict(vocab_size=VOCAB, block_size=BLOCK, n_head=4, n_embd=32, positions="rope")
# options that make each variant's idea matter at BLOCK positions; each goes to its own blocks
OPTIONS = {"local": {"window": 4}, "gated_deltanet": {"chunk_size": 4}, "mla": {"kv_lora_rank": 8}}
STACKS = {
    "local+mha": ["local", "local", "mha"],
    "gated_deltanet+mha": ["gated_deltanet", "gated_deltanet", "mha"],
    "mla+local": ["mla", "local", "mla"],
}


def _config(names, **kw):
    options = {k: v for name in names for k, v in OPTIONS.get(name, {}).items()}
    given = dict(n_layer=len(names), layer_attention=names, attention_options=options, **SHAPE)
    return GPTConfig(**{**given, **kw})


def _ids(*shape):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(1))


# ---- decoding: cached = full pass, generation token for token, causality --------------------


@pytest.mark.parametrize("stack", STACKS)
def test_cached_chunks_give_the_full_forward_logits_and_the_same_greedy_tokens(stack):
    torch.manual_seed(0)
    model = GPT(_config(STACKS[stack])).eval()
    idx = _ids(2, BLOCK)
    full, _ = model(idx)
    caches = model.new_caches(2)
    parts = [model(idx[:, a:b], caches=caches)[0] for a, b in [(0, 7), (7, 8), (8, BLOCK)]]
    scale = full.abs().max().item()
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5 * scale, rtol=1e-5)
    prompt = idx[:, :5]
    cached = model.generate(prompt, BLOCK - 5, temperature=0)
    plain = model.generate(prompt, BLOCK - 5, temperature=0, use_cache=False)
    assert cached.shape == (2, BLOCK) and torch.equal(cached, plain)


@pytest.mark.parametrize("stack", STACKS)
def test_a_hybrid_model_is_causal(stack):
    torch.manual_seed(0)
    model = GPT(_config(STACKS[stack])).eval()
    idx = _ids(1, BLOCK)
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % VOCAB  # every token from position 9 on
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(after[:, :9], before[:, :9], atol=0, rtol=0)
    assert not torch.allclose(after[:, 9:], before[:, 9:])


# ---- each block its variant, its options and its cache --------------------------------------


def test_blocks_get_their_variant_their_options_and_their_cache_kind():
    names = ["local", "gqa", "mha", "gated_deltanet", "mla"]
    options = {"window": 4, "n_kv_head": 2, "chunk_size": 4, "kv_lora_rank": 8, "rope_base": 500.0}
    cfg = GPTConfig(n_layer=5, layer_attention=names, attention_options=options, **SHAPE)
    model = GPT(cfg)
    attns = [block.attn for block in model.transformer.h]
    kinds = [LocalAttention, GroupedQueryAttention, MultiHeadAttention, GatedDeltaNet]
    assert [type(a) for a in attns] == [*kinds, MultiHeadLatentAttention]
    local, gqa, mha, gdn, mla = attns
    assert local.window == 4 and local.n_kv_head == 2 and gqa.n_kv_head == 2
    assert mha.n_kv_head == 4 and vars(mha.options) == {}  # neither window nor n_kv_head
    assert gdn.options.chunk_size == 4 and mla.kv_lora_rank == 8
    assert all(a.config.rope_base == 500.0 for a in attns)  # AttentionConfig's, for every block
    caches = model.new_caches(1, max_len=12)
    assert [type(c) for c in caches] == [
        RollingKVCache,
        KVCache,
        KVCache,
        DeltaNetCache,
        LatentCache,
    ]
    assert caches[0].k.shape[2] == 4 and caches[1].k.shape[1] == 2 and caches[2].k.shape[1] == 4


def test_layer_pattern_repeats_a_period_and_cuts_it_at_n_layer():
    assert layer_pattern(["local"] * 5 + ["mha"], 12) == (["local"] * 5 + ["mha"]) * 2
    assert layer_pattern(["local", "mha"], 3) == ["local", "mha", "local"]
    with pytest.raises(ValueError, match="period must be a non-empty list"):
        layer_pattern([], 4)


BASE = dict(n_layer=3, **SHAPE)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layer_attention=["local", "mha"]), "layer_attention names 2 variants for n_layer=3"),
        (dict(layer_attention=["local", "mah", "mha"]), "layer_attention: unknown attention 'mah'"),
        (dict(layer_attention="local,local,mha"), "layer_attention must be None or a list"),
        (dict(layer_attention=["local", 1, "mha"]), "layer_attention must be None or a list"),
        (
            dict(attention="gqa", layer_attention=["local", "local", "mha"]),
            "attention='gqa' and layer_attention are both set: .* leave attention at its default",
        ),
        (
            dict(layer_attention=["mha", "gated_deltanet", "mha"], attention_options={"window": 4}),
            r"attention_options \['window'\] are options of none of layer_attention's variants "
            r"\(mha, gated_deltanet\)",
        ),
        (
            dict(layer_attention=["local", "gqa", "mha"], attention_options={"n_kv_head": 3}),
            "n_kv_head=3 does not divide n_head=4",
        ),
        (
            dict(layer_attention=["mha", "linear", "mha"], positions="alibi"),
            "never forms the scores that ALiBi",
        ),
    ],
)
def test_bad_layer_lists_raise_naming_layer_attention(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**BASE, **kwargs})


def test_config_round_trips_through_json_and_old_configs_load():
    cfg = GPTConfig(n_layer=3, layer_attention=("local", "local", "mha"), **SHAPE,
                    attention_options=OPTIONS["local"])  # fmt: skip
    assert cfg.layer_attention == ["local", "local", "mha"]  # stored as JSON's list
    d = json.loads(json.dumps(cfg.to_dict()))
    assert GPTConfig.from_dict(d) == cfg
    del d["layer_attention"]  # a config saved before the field existed (and without options)
    d["attention_options"] = {}
    assert GPTConfig.from_dict(d).layer_variants() == ["mha"] * 3


# ---- checkpoints, the command line, and what refuses a hybrid -------------------------------


def test_checkpoint_round_trip_of_a_hybrid_and_an_old_checkpoint_still_loads(tmp_path):
    cfg = _config(STACKS["gated_deltanet+mha"])
    torch.manual_seed(0)
    model = GPT(cfg)
    train_cfg = TrainConfig(model=cfg)
    state = {"format": 1, "step": 3, "train_config": json.dumps(train_cfg.to_dict())}
    path = save_checkpoint(tmp_path, model, make_optimizer(model, train_cfg), state, 2, False)
    torch.manual_seed(1)
    loaded = GPT(cfg)
    load_checkpoint(path, loaded)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 loaded.state_dict().values(), strict=True))  # fmt: skip
    with pytest.raises(CheckpointMismatch, match="other attention_options, layer_attention than"):
        load_checkpoint(path, GPT(GPTConfig(n_layer=3, **SHAPE)))
    plain = GPTConfig(n_layer=3, **SHAPE)
    old = TrainConfig(model=plain).to_dict()
    del old["model"]["layer_attention"]  # written before the field existed
    model = GPT(plain)
    state = {"format": 1, "step": 1, "train_config": json.dumps(old)}
    path = save_checkpoint(
        tmp_path / "old", model, make_optimizer(model, TrainConfig()), state, 2, False
    )
    load_checkpoint(path, GPT(plain))


TEXT = "".join(f"{i % 7} little pigs went to market {i * 13 % 31}.\n" for i in range(300))


def test_attnbook_train_layer_attention_trains_a_hybrid(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATTNBOOK_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    run = str(tmp_path / "run")
    args = ["train", "--data", str(corpus), "--out_dir", run, "--max_iters", "2",
            "--block_size", "16", "--n_layer", "3", "--n_head", "2", "--n_embd", "16",
            "--eval_iters", "1", "--no-progress", "--positions", "rope", "--window", "4"]  # fmt: skip
    cli.main([*args, "--layer_attention", "local, gated_deltanet,mha"])
    model, cfg, _ = load_trained(run)
    assert cfg.model.layer_attention == ["local", "gated_deltanet", "mha"]
    assert [type(b.attn) for b in model.transformer.h] == [
        LocalAttention, GatedDeltaNet, MultiHeadAttention
    ]  # fmt: skip
    assert model.transformer.h[0].attn.window == 4
    for bad, match in [
        ("local,mha", "layer_attention names 2 variants for n_layer=3"),
        ("local,,mha", "--layer_attention takes comma-separated attention names"),
    ]:
        with pytest.raises(SystemExit):
            cli.main([*args, "--out_dir", str(tmp_path / "bad"), "--layer_attention", bad])
        assert match in capsys.readouterr().err


def test_dsa_warmup_trains_only_the_indexers_of_a_hybrids_dsa_blocks(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBOOK_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    model = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, positions="rope",
                      layer_attention=["dsa", "mha"], attention_options={"index_topk": 4})  # fmt: skip
    cfg = TrainConfig(
        model=model, out_dir=str(tmp_path / "run"), data=str(tmp_path / "corpus.txt"),
        batch_size=4, max_iters=2, dsa_warmup_iters=2, warmup_iters=1, lr_decay_iters=2,
        eval_interval=2, eval_iters=1, ckpt_interval=2, progress=False, device="cpu",
    )  # fmt: skip
    train(cfg)
    trained, saved, _ = load_trained(cfg.out_dir)
    torch.manual_seed(saved.seed)  # the trainer's initial weights
    initial = GPT(saved.model).state_dict()
    assert isinstance(trained.transformer.h[0].attn, DeepSeekSparseAttention)
    for name, tensor in trained.state_dict().items():
        moved = not torch.equal(tensor, initial[name])
        assert moved == ("h.0.attn.indexer." in name), name


def test_gpt2_saving_and_mha_conversion_refuse_a_hybrid():
    cfg = GPTConfig(n_layer=2, layer_attention=["mha", "mha"], **{**SHAPE, "positions": "learned"})
    with pytest.raises(ValueError, match="GPT-2 cannot represent layer_attention"):
        config_to_hf(cfg)
    with pytest.raises(ValueError, match="got a hybrid stack"):
        mha_to_gqa(GPT(cfg), 2)


# ---- cache bytes per token: measured from the caches = counted from the config --------------

MEMORY_STACKS = {  # window 4 < BLOCK
    "all global": dict(n_layer=4),
    "5 local : 1 global": dict(
        layer_attention=layer_pattern(["local"] * 5 + ["mha"], 6), attention_options={"window": 4}
    ),
    "3 gated_deltanet : 1 mha": dict(
        layer_attention=layer_pattern(["gated_deltanet"] * 3 + ["mha"], 4)
    ),
    "1 local : 1 mha": dict(layer_attention=["local", "mha"], attention_options={"window": 4}),
    "mla + local": dict(
        layer_attention=["mla", "local"], attention_options={"kv_lora_rank": 8, "window": 4}
    ),
}


@pytest.mark.parametrize("stack", MEMORY_STACKS)
def test_cache_bytes_per_token_measured_after_filling_equals_the_formula(stack):
    kw = MEMORY_STACKS[stack]
    cfg = GPTConfig(**{"n_layer": len(kw.get("layer_attention", [])), **SHAPE, **kw})
    model = GPT(cfg).eval()
    for L in (3, BLOCK):  # below and above the window
        caches = model.new_caches(1, max_len=L)
        with torch.no_grad():
            model(_ids(1, L), caches=caches)  # fill all L positions
        filled = sum(c.nbytes for c in caches) / L
        assert filled == model.cache_bytes_per_token(L) == cache_bytes_formula(cfg, L)
    full = 2 * 32 * 4  # one full layer's keys and values of one token, float32
    if stack == "all global":
        assert model.cache_bytes_per_token(BLOCK) == 4 * full
    if stack == "5 local : 1 global":
        assert model.cache_bytes_per_token(BLOCK) == full * (1 + 5 * 4 / BLOCK)
