"""gpt2.py against Hugging Face transformers: a randomly initialised GPT2LMHeadModel, saved in
each checkpoint format, loads into our GPT with the same logits and the same greedy tokens;
exported, it loads back into transformers; what does not fit raises ValueError. Offline."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from attnbook.gpt2 import (
    REVISIONS,
    SIZES,
    config_from_hf,
    find_gpt2,
    gpt2_config,
    load_gpt2,
    load_state,
    save_gpt2,
    to_gqa,
)
from attnbook.model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

SMALL = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=101, n_positions=64)


def _hf_model(**sizes):
    """A GPT2LMHeadModel in eval mode with random weights everywhere (biases and norms too, so
    a tensor loaded in the wrong place shows) and no <|endoftext|> to stop at. Built on the meta
    device and filled here: transformers' own initialisation of 124M weights takes seconds."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**{**SMALL, **sizes}, bos_token_id=None, eos_token_id=None)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(cfg)
    model = model.to_empty(device="cpu").eval()
    model.tie_weights()  # to_empty gives lm_head a tensor of its own
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_weight = ".ln_" in name and name.endswith(".weight")
            # matrices at 0.2, not GPT-2's 0.02: at 0.02 a small model barely reads its input,
            # greedy decoding repeats one token and a cache with wrong positions would pass
            p.normal_(1.0 if is_norm_weight else 0.0, 0.2 if p.ndim == 2 else 0.02)
    assert not list(model.buffers())  # nothing left unfilled
    return model


def _ids(model, *shape):
    return torch.randint(
        0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(1)
    )


@pytest.fixture(scope="module")
def hf():
    return _hf_model()


@pytest.fixture(scope="module")
def folder(hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(path)
    return path


def _hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits  # (B, T, V)


def _openai_layout(folder, hf, dest):
    """``folder``'s checkpoint as OpenAI's GPT-2 was first published: a ``pytorch_model.bin``
    without the ``transformer.`` prefix and with every layer's causal mask stored as a tensor."""
    dest.mkdir()
    (dest / "config.json").write_text((folder / "config.json").read_text())
    n = hf.config.n_positions
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    state.pop("lm_head.weight", None)
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, dest / "pytorch_model.bin")
    return dest


def test_safetensors_and_pytorch_bin_load_with_transformers_logits(hf, folder, tmp_path):
    idx = _ids(hf, 2, 24)
    expected = _hf_logits(hf, idx)
    for source in (folder, _openai_layout(folder, hf, tmp_path / "bin")):
        model = load_gpt2(source)
        assert not model.training and model.config.mlp == "gelu_tanh"
        assert model.lm_head.weight is model.transformer.wte.weight
        # logits of size ~6 from another implementation: 1e-4 is ~2e-5 of their size
        torch.testing.assert_close(model(idx)[0], expected, rtol=0, atol=1e-4)


def test_conv1d_weights_are_transposed_into_linear_layers(hf, folder):
    model = load_gpt2(folder)
    for ours, theirs in zip(model.transformer.h, hf.transformer.h, strict=True):
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            linear, conv = ours.get_submodule(name), theirs.get_submodule(name)
            assert torch.equal(linear.weight, conv.weight.T), name
            assert torch.equal(linear.bias, conv.bias), name
    assert torch.equal(model.transformer.wpe.table.weight, hf.transformer.wpe.weight)


def test_greedy_generation_with_our_kv_cache_equals_transformers_generate(hf, folder):
    model = load_gpt2(folder)
    prompt = _ids(hf, 1, 8)
    theirs = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
        use_cache=True, pad_token_id=0,
    )  # fmt: skip
    ours = model.generate(prompt, 32, temperature=0)
    assert ours.shape == (1, 40)
    assert len(set(ours[0, 8:].tolist())) >= 12  # the continuation depends on its context
    assert torch.equal(ours, theirs)


def test_export_then_reload_in_transformers_gives_the_same_logits(hf, folder, tmp_path):
    model = load_gpt2(folder)
    save_gpt2(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = _ids(hf, 2, 24)
    torch.testing.assert_close(_hf_logits(back, idx), _hf_logits(hf, idx), rtol=0, atol=1e-6)
    reloaded = load_gpt2(tmp_path / "out")  # and back into ours, tensor for tensor
    for (name, a), b in zip(
        model.state_dict().items(), reloaded.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_an_untied_trained_gpt_exports_and_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=67,
        block_size=32,
        n_layer=2,
        n_head=2,
        n_embd=32,
        mlp="gelu",
        d_ff=48,
        tie_weights=False,
    )  # fmt: skip (d_ff: GPT-2's n_inner)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_gpt2(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["activation_function"] == "gelu"
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 67, (2, 32))
    torch.testing.assert_close(_hf_logits(back, idx), model(idx)[0], rtol=0, atol=1e-5)
    assert load_gpt2(tmp_path).config == cfg


def test_gqa_conversion_with_every_head_kept_is_the_same_model(hf, folder):
    model = load_gpt2(folder)
    gqa = to_gqa(model, n_kv_head=hf.config.n_head)
    assert gqa.config.attention == "gqa" and model.config.attention == "mha"
    idx = _ids(hf, 2, 24)
    torch.testing.assert_close(gqa(idx)[0], model(idx)[0], rtol=0, atol=1e-5)
    assert not torch.allclose(to_gqa(model, n_kv_head=1)(idx)[0], model(idx)[0], atol=1e-3)


def test_gpt2_124m_shape_logits_and_greedy_tokens_match_transformers(tmp_path):
    """GPT-2 small's exact shape (random weights): the sizes, not only the code paths, agree."""
    hf = _hf_model(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    hf.save_pretrained(tmp_path)
    model = load_gpt2(tmp_path)
    assert model.config == gpt2_config("gpt2")
    assert model.num_params(non_embedding=False) == sum(p.numel() for p in hf.parameters())
    prompt = _ids(hf, 1, 6)
    # logits of size ~30 through 12 blocks of width 768: 1e-3 is ~3e-5 of their size
    torch.testing.assert_close(model(prompt)[0], _hf_logits(hf, prompt), rtol=0, atol=1e-3)
    theirs = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
        use_cache=True, pad_token_id=0,
    )  # fmt: skip
    assert torch.equal(model.generate(prompt, 6, temperature=0), theirs)


def test_published_sizes_have_their_parameter_counts():
    millions = {"gpt2": 124, "gpt2-medium": 355, "gpt2-large": 774, "gpt2-xl": 1558}
    for name in SIZES:
        cfg = gpt2_config(name)
        # count from the shapes, without building 1.5B parameters
        d, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
        per_block = (
            4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
        )
        n = V * d + cfg.block_size * d + L * per_block + 2 * d
        assert round(n / 1e6) == millions[name], name
    with pytest.raises(ValueError, match="name must be one of gpt2, gpt2-medium"):
        gpt2_config("gpt3")


# ---- what does not fit ----------------------------------------------------------------------


def _tensors(folder):
    return load_file(folder / "model.safetensors")


def _rewrite(folder, tmp_path, tensors=None, **config):
    """A copy of ``folder``'s checkpoint with other tensors and/or config fields."""
    dest = tmp_path / "edited"
    dest.mkdir()
    cfg = {**json.loads((folder / "config.json").read_text()), **config}
    (dest / "config.json").write_text(json.dumps(cfg))
    save_file(_tensors(folder) if tensors is None else tensors, dest / "model.safetensors")
    return dest


def test_missing_unexpected_and_misshapen_tensors_are_named(folder, tmp_path):
    tensors = _tensors(folder)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    tensors["transformer.h.0.attn.rotary.weight"] = torch.zeros(3)
    tensors["transformer.h.0.attn.c_proj.weight"] = torch.zeros(64, 65)
    with pytest.raises(ValueError) as err:
        load_gpt2(_rewrite(folder, tmp_path, tensors))
    message = str(err.value)
    assert "missing ['transformer.h.1.mlp.c_fc.bias']" in message
    assert "unexpected ['transformer.h.0.attn.rotary.weight']" in message
    assert "transformer.h.0.attn.c_proj.weight (64, 65) (expected (64, 64))" in message


def test_a_shape_mismatch_with_the_config_is_named(folder, tmp_path):
    source = _rewrite(folder, tmp_path, n_positions=32)
    with pytest.raises(
        ValueError, match=r"transformer\.wpe\.weight \(64, 64\) \(expected \(32, 64\)"
    ):
        load_gpt2(source)


def test_an_untied_lm_head_under_a_tied_config_is_refused(folder, tmp_path):
    tensors = _tensors(folder)
    tensors["lm_head.weight"] = torch.randn_like(tensors["transformer.wte.weight"])
    with pytest.raises(ValueError, match="lm_head.weight differs from transformer.wte.weight"):
        load_gpt2(_rewrite(folder, tmp_path, tensors))
    model = GPT(config_from_hf(json.loads((folder / "config.json").read_text())))
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()  # a tied copy: fine
    load_state(model, tensors)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("activation_function", "relu", "activation_function 'relu' is not supported"),
        ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon=1e-06 is not supported"),
        ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx=True"),
        ("model_type", "llama", "model_type must be 'gpt2'"),
    ],
)
def test_configs_gpt_cannot_compute_are_refused(folder, field, value, match):
    cfg = json.loads((folder / "config.json").read_text())
    with pytest.raises(ValueError, match=match):
        config_from_hf({**cfg, field: value})


def test_a_folder_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="must hold config.json and one of model.safetensors"):
        load_gpt2(tmp_path)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(attention="mla", attention_options={"kv_lora_rank": 16}), "attention='mla'"),
        (dict(positions="rope"), "positions='rope'"),
        (dict(mlp="swiglu"), "mlp='swiglu'"),
        (dict(norm="rmsnorm"), "norm='rmsnorm'"),
        (dict(norm_position="post"), "norm_position='post'"),
        (dict(bias=False), "bias=False"),
    ],
)
def test_export_refuses_what_gpt2_cannot_represent(tmp_path, change, match):
    cfg = GPTConfig(vocab_size=67, block_size=16, n_layer=1, n_head=2, n_embd=32, **change)
    with pytest.raises(ValueError, match=f"GPT-2 cannot represent {match}"):
        save_gpt2(GPT(cfg), tmp_path)
    assert not any(tmp_path.iterdir())


# ---- downloading --------------------------------------------------------------------------------


def test_hub_downloads_are_pinned_to_a_commit(folder, monkeypatch):
    """A GPT-2 name downloads at its pinned commit (either repository name), another hub name
    only at a revision given explicitly; the hub is replaced by a recorder that serves ``folder``."""
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def snapshot_download(name, revision=None, allow_patterns=None):
        calls.append((name, revision))
        return str(folder)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    load_gpt2("gpt2")
    load_gpt2("openai-community/gpt2-xl")
    load_gpt2("someone/gpt2-poetry", revision="v1.0")
    assert calls == [
        ("gpt2", REVISIONS["gpt2"]),
        ("openai-community/gpt2-xl", REVISIONS["gpt2-xl"]),
        ("someone/gpt2-poetry", "v1.0"),
    ]
    assert all(len(commit) == 40 for commit in REVISIONS.values())
    with pytest.raises(ValueError, match="'someone/gpt2-poetry' has no pinned revision: pass"):
        load_gpt2("someone/gpt2-poetry")
    assert len(calls) == 3


# ---- finding a local copy -------------------------------------------------------------------


def test_find_gpt2_reads_the_environment_variable(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBOOK_GPT2_DIR", str(folder))
    assert find_gpt2() == folder
    monkeypatch.setenv("ATTNBOOK_GPT2_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="ATTNBOOK_GPT2_DIR=.* must name a folder holding"):
        find_gpt2()


def test_find_gpt2_looks_in_the_hugging_face_cache_only(folder, tmp_path, monkeypatch):
    """An empty cache gives None without a network call; a cached snapshot (the hub cache's
    layout: refs/main names the snapshot folder) is found under either repository name."""
    pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("ATTNBOOK_GPT2_DIR", raising=False)
    assert find_gpt2(cache_dir=tmp_path) is None
    repo = tmp_path / "models--openai-community--gpt2"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    assert find_gpt2(cache_dir=tmp_path) is None  # a snapshot without weights
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    assert find_gpt2(cache_dir=tmp_path) == snapshot
    assert find_gpt2("gpt2-medium", cache_dir=tmp_path) is None
