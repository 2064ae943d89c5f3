import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnbook.attention import AttentionConfig, build_attention
from attnbook.positions import (
    PositionalEmbedding,
    RotaryEmbedding,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    half_to_interleaved,
    interleaved_to_half,
    rope_cos_sin,
    rope_permutation,
    sinusoidal_embedding,
)


def test_sinusoidal_table_follows_the_formula():
    table = sinusoidal_embedding(50, 16)
    pos, i = 37, 3
    angle = pos / 10000 ** (2 * i / 16)
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert sinusoidal_embedding(4, 7).shape == (4, 7)  # odd widths work too


@pytest.mark.parametrize("kind", ["learned", "sinusoidal"])
def test_positional_embedding_offsets_and_limits(kind):
    pe = PositionalEmbedding(kind, block_size=10, n_embd=8)
    torch.testing.assert_close(pe(3, start=4), pe(10)[4:7])
    with pytest.raises(ValueError, match="block_size=10"):
        pe(3, start=8)
    assert ("table.weight" in pe.state_dict()) == (kind == "learned")


def _rope(x, pos, pairing="half", base=10000.0):
    cos, sin = rope_cos_sin(torch.tensor(pos), x.shape[-1], base)
    return apply_rope(x, cos, sin, pairing)


@settings(max_examples=50, deadline=None)
@given(
    m=st.integers(0, 500),
    n=st.integers(0, 500),
    shift=st.integers(-500, 500),
    pairing=st.sampled_from(["half", "interleaved"]),
    seed=st.integers(0, 2**16),
)
def test_rope_scores_depend_only_on_the_offset(m, n, shift, pairing, seed):
    torch.manual_seed(seed)
    q, k = torch.randn(1, 16, dtype=torch.float64), torch.randn(1, 16, dtype=torch.float64)
    score = _rope(q, [m], pairing) @ _rope(k, [n], pairing).T
    shifted = _rope(q, [m + shift], pairing) @ _rope(k, [n + shift], pairing).T
    assert abs(score.item() - shifted.item()) < 1e-4 * (1 + abs(score.item()))


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_rope_preserves_norms_and_position_zero_is_identity(pairing):
    x = torch.randn(3, 5, 8)
    rotated = _rope(x, list(range(5)), pairing)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(_rope(x[:, :1], [0], pairing), x[:, :1])


def test_half_pairing_rotates_i_with_i_plus_half():
    x = torch.zeros(1, 4)
    x[0, 0] = 1.0  # pair (0, 2) in the half split, pair (0, 1) interleaved
    angle = 1.0  # position 1, pair 0 has frequency 1
    half = _rope(x, [1], "half")
    inter = _rope(x, [1], "interleaved")
    assert half[0, 2].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert inter[0, 1].item() == pytest.approx(math.sin(angle), abs=1e-6)


def test_the_two_pairings_agree_after_the_permutation():
    q, k = torch.randn(7, 8), torch.randn(7, 8)
    perm = rope_permutation(8)
    assert perm.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    pos = list(range(7))
    scores_inter = _rope(q, pos, "interleaved") @ _rope(k, pos, "interleaved").T
    scores_half = _rope(q[:, perm], pos, "half") @ _rope(k[:, perm], pos, "half").T
    torch.testing.assert_close(scores_half, scores_inter)


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_converting_weights_between_pairings_keeps_the_layer(name):
    cfg = dict(n_embd=32, n_head=4, positions="rope")
    options = {"n_kv_head": 2} if name == "gqa" else {}
    inter = build_attention(name, AttentionConfig(**cfg, rope_pairing="interleaved"), **options)
    half = build_attention(name, AttentionConfig(**cfg, rope_pairing="half"), **options)
    d, kv = 32, inter.n_kv_head * inter.head_dim
    state = inter.state_dict()
    for key in ("c_attn.weight", "c_attn.bias"):
        wq, wk, wv = state[key].split([d, kv, kv])
        state[key] = torch.cat(
            [interleaved_to_half(wq, inter.n_head), interleaved_to_half(wk, inter.n_kv_head), wv]
        )
    half.load_state_dict(state)
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(half(x), inter(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
@pytest.mark.parametrize("start", [0, 3, 6, 10_000])
def test_rotary_embedding_past_its_table_follows_the_formula(pairing, start):
    """Positions beyond the table (max_len=6) get the angles ``m * base^(-2i/d)`` computed on
    the fly, in float64 here, pair by pair: the same rotation as inside the table."""
    rope = RotaryEmbedding(head_dim=8, max_len=6, base=100.0, pairing=pairing)
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    got = rope(x, start=start)  # positions start .. start + 3
    pairs = (
        [(i, i + 4) for i in range(4)]
        if pairing == "half"
        else [(2 * i, 2 * i + 1) for i in range(4)]
    )
    expected = torch.empty_like(x)
    for t in range(4):
        for i, (a, b) in enumerate(pairs):
            angle = (start + t) * 100.0 ** (-2 * i / 8)
            c, s = math.cos(angle), math.sin(angle)
            expected[:, t, a] = x[:, t, a] * c - x[:, t, b] * s
            expected[:, t, b] = x[:, t, a] * s + x[:, t, b] * c
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)  # float32 angles


def test_rotary_embedding_limits_and_errors():
    rope = RotaryEmbedding(head_dim=8, max_len=6)
    with pytest.raises(ValueError, match="start must be a position >= 0, got -1"):
        rope(torch.randn(1, 4, 8), start=-1)
    with pytest.raises(ValueError, match="head_dim must be even, got 7"):
        RotaryEmbedding(head_dim=7, max_len=6)
    with pytest.raises(ValueError, match="rope_pairing"):
        RotaryEmbedding(head_dim=8, max_len=6, pairing="zigzag")


def _paper_slopes(n):
    """ALiBi slopes as the paper defines them, written independently of the module."""

    def power_of_two(n):
        first = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [first * first**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_two(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_two(closest) + _paper_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("n_head", range(1, 65))
def test_alibi_slopes_match_the_paper_for_1_to_64_heads(n_head):
    torch.testing.assert_close(
        alibi_slopes(n_head), torch.tensor(_paper_slopes(n_head)), rtol=1e-6, atol=0
    )


def test_alibi_slopes_for_eight_heads():
    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]


def test_alibi_bias_is_minus_slope_times_distance_bottom_right():
    bias = alibi_bias(torch.tensor([0.5]), t_q=2, t_k=4)  # queries at positions 2, 3
    assert bias[0].tolist() == [[-1.0, -0.5, 0.0, -0.5], [-1.5, -1.0, -0.5, 0.0]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"positions": "relative"}, "positions must be one of"),
        ({"positions": "rope", "n_embd": 36, "n_head": 4}, "head_dim=9"),
        ({"rope_pairing": "zigzag"}, "rope_pairing must be one of"),
        ({"rope_base": 1.0}, "rope_base"),
        ({"block_size": 0}, "block_size must be a positive integer"),
    ],
)
def test_bad_position_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionConfig(**{"n_embd": 32, "n_head": 4, **kwargs})


@pytest.mark.parametrize("positions", ["none", "learned", "rope", "alibi"])
def test_attention_without_positions_is_permutation_equivariant(positions):
    """Only RoPE and ALiBi put positions inside attention; the others leave it equivariant."""
    attn = build_attention(
        "mha", AttentionConfig(n_embd=16, n_head=2, causal=False, positions=positions)
    )
    x = torch.randn(1, 6, 16)
    perm = torch.randperm(6)
    equivariant = torch.allclose(attn(x)[:, perm], attn(x[:, perm]), atol=1e-6)
    assert equivariant == (positions in ("none", "learned"))


def test_weight_conversion_round_trip_and_errors():
    w = torch.randn(3 * 8, 5)
    torch.testing.assert_close(half_to_interleaved(interleaved_to_half(w, 3), 3), w)
    assert not torch.equal(interleaved_to_half(w, 3), w)
    with pytest.raises(ValueError, match="not a multiple of n_head=5"):
        interleaved_to_half(w, 5)
    with pytest.raises(ValueError, match="head_dim must be even, got 5"):
        apply_rope(torch.randn(2, 5), torch.ones(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="t_q <= t_k"):
        alibi_bias(torch.ones(2), t_q=3, t_k=2)
