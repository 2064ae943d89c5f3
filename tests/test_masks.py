import pytest
import torch

from attnbook.attention import additive_mask, causal_mask, padding_mask


def test_causal_mask_is_lower_triangle_when_square():
    m = causal_mask(4)
    assert m.dtype == torch.bool and m.shape == (4, 4)
    for i in range(4):
        for j in range(4):
            assert m[i, j].item() == (j <= i)


def test_causal_mask_aligns_queries_with_the_last_keys():
    m = causal_mask(2, 5)  # queries at positions 3 and 4
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert causal_mask(1, 7).all()  # one new token sees the whole cache


@pytest.mark.parametrize("t_q, t_k", [(0, 3), (3, 0), (-1, 2), (4, 3)])
def test_causal_mask_rejects_bad_sizes(t_q, t_k):
    with pytest.raises(ValueError, match="t_q"):
        causal_mask(t_q, t_k)


def test_padding_mask_marks_real_tokens():
    m = padding_mask(torch.tensor([3, 1, 0]), 4)
    assert m.shape == (3, 4)
    assert m.tolist() == [
        [True, True, True, False],
        [True, False, False, False],
        [False, False, False, False],
    ]


@pytest.mark.parametrize(
    "lengths, t, match",
    [
        (torch.tensor([5]), 4, "every length"),
        (torch.tensor([-1]), 4, "every length"),
        (torch.tensor([[1, 2]]), 4, "lengths"),
        (torch.tensor([1.0]), 4, "lengths"),
        (torch.tensor([1]), 0, "t must be positive"),
    ],
)
def test_padding_mask_rejects_bad_input(lengths, t, match):
    with pytest.raises(ValueError, match=match):
        padding_mask(lengths, t)


def test_additive_mask_orientation():
    bias = additive_mask(torch.tensor([True, False]))
    assert bias.tolist() == [0.0, float("-inf")]
    with pytest.raises(ValueError, match="boolean"):
        additive_mask(torch.zeros(2))
