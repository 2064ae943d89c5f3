"""minbpe's BasicTokenizer and RegexTokenizer: merges, encoding, round trips, special tokens.

The fast trainer and the fast chunk encoder are checked against the textbook algorithms
(``get_stats`` + ``merge``, recounting everything each step) written out below.
"""

from itertools import pairwise

import pytest
import regex
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from minbpe import BasicTokenizer, RegexTokenizer, get_stats, merge
from minbpe.base import _merge_with_heap, apply_merges, render_token
from minbpe.trainer import learn_merges

# Unicode text without surrogates (which cannot be encoded as UTF-8).
unicode_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
SAMPLES = [
    "",
    "hello world",
    "naïve café, déjà vu",
    "e\u0301 a\u0300\u0316 Z\u0351\u0364\u0336",  # combining marks stacked on letters
    "👋🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",  # skin tone, ZWJ family, flag, variation selector
    "日本語のテキスト、中文，한국어",
    "שלום עולם مرحبا",  # right-to-left scripts
    "tabs\tand\r\nnewlines\n\n\n  trailing   ",
    "\x00\x01 control \x7f\u200b",
    "I'm can't we'll they've 12345 3.14159",
]
TRAIN_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20
    + " ".join(SAMPLES) * 5
)


def naive_train(chunks, num_merges):
    """The textbook loop: recount every pair, merge the most frequent (smallest on ties)."""
    seqs = [list(chunk) for chunk in chunks]
    merges = []
    for rank in range(num_merges):
        stats = {}
        for seq in seqs:
            get_stats(seq, stats)
        pair = min(stats, key=lambda p: (-stats[p], p))
        seqs = [merge(seq, pair, 256 + rank) for seq in seqs]
        merges.append(pair)
    return merges


def naive_encode_chunk(ids, merges):
    """Repeatedly merge the adjacent pair that was learned first."""
    while len(ids) >= 2:
        pair = min(pairwise(ids), key=lambda p: merges.get(p, float("inf")))
        if pair not in merges:
            break
        ids = merge(ids, pair, merges[pair])
    return ids


@pytest.fixture(scope="module")
def basic():
    return BasicTokenizer().train(TRAIN_TEXT, 300)


@pytest.fixture(scope="module")
def regex_tok():
    return RegexTokenizer("gpt4").train(TRAIN_TEXT, 300)


# -- the Wikipedia example and small cases ---------------------------------------------------


def test_wikipedia_example_gives_the_expected_merges():
    # Wikipedia: aaabdaaabac -> ZabdZabac (Z=aa) -> ZYdZYac (Y=ab) -> XdXac (X=ZY)
    tok = BasicTokenizer().train("aaabdaaabac", 259)
    a, b = ord("a"), ord("b")
    assert tok.merges == {(a, a): 256, (a, b): 257, (256, 257): 258}
    assert tok.vocab[258] == b"aaab"
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, a, ord("c")]
    assert tok.decode([258, ord("d"), 258, a, ord("c")]) == "aaabdaaabac"


def test_overlapping_pairs_merge_left_to_right():
    assert merge([1, 1, 1], (1, 1), 9) == [9, 1]
    assert merge([1, 1, 1, 1], (1, 1), 9) == [9, 9]
    tok = BasicTokenizer().train("aaaa", 258)  # aa, then aaaa
    assert tok.encode("aaa") == [256, ord("a")] and tok.encode("aaaaa") == [257, ord("a")]


@pytest.mark.parametrize("bad", [255, 0, -1, 256.0, "512", None, True])
def test_vocab_size_below_256_or_not_an_int_raises(bad):
    for tok in (BasicTokenizer(), RegexTokenizer()):
        with pytest.raises(ValueError, match="vocab_size must be an integer >= 256"):
            tok.train("hello", bad)


def test_vocab_size_256_means_no_merges():
    tok = BasicTokenizer().train("hello hello", 256)
    assert tok.merges == {} and tok.encode("hi") == [ord("h"), ord("i")]


def test_running_out_of_pairs_raises_and_keeps_the_old_model():
    tok = BasicTokenizer().train("abcabc", 258)
    with pytest.raises(ValueError, match="no pairs left to merge after 3 merges"):
        tok.train("abcabc", 300)
    assert len(tok.merges) == 2


def test_non_str_text_raises():
    with pytest.raises(ValueError, match="text must be a str, got bytes"):
        BasicTokenizer().encode(b"abc")


def test_decode_unknown_id_raises(regex_tok):
    with pytest.raises(ValueError, match="unknown token id 300"):
        regex_tok.decode([104, 300])
    with pytest.raises(ValueError, match="unknown token id -1"):
        regex_tok.decode([-1])
    with pytest.raises(ValueError, match="must be integers, but position 0 is 'a' \\(str\\)"):
        regex_tok.decode(["a"])


def test_split_patterns_by_name():
    text = "Hello world!! I'm 12345 ok\n\n  x"
    assert RegexTokenizer("gpt2").split(text) == [
        "Hello", " world", "!!", " I", "'m", " 12345", " ok", "\n\n ", " x",
    ]  # fmt: skip
    assert RegexTokenizer("gpt4").split(text) == [
        "Hello", " world", "!!", " I", "'m", " ", "123", "45", " ok", "\n\n", " ", " x",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not a valid regex"):
        RegexTokenizer("(unclosed")


def test_a_pattern_that_loses_text_raises():
    tok = RegexTokenizer(r"[^\s\x00]+|\s+")  # covers the probe text, but drops NUL characters
    for call in (tok.encode, tok.split, lambda t: tok.train(t, 260)):
        with pytest.raises(ValueError, match="does not cover the text"):
            call("two\x00words")


# -- fast == textbook ----------------------------------------------------------------------


# Chunks over a tiny alphabet: many repeats, ties and overlapping runs like "aaaa".
small_chunks = st.lists(
    st.text(alphabet="aab c", max_size=12).map(str.encode), min_size=1, max_size=12
)


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(small_chunks, st.lists(st.binary(max_size=12), min_size=1, max_size=12)),
    st.integers(0, 12),
)
@example([b"aaaa", b"aaab", b"abab", b"aaaa"], 6)
def test_incremental_trainer_equals_recounting(chunks, num_merges):
    weights = {}
    for chunk in chunks:
        weights[chunk] = weights.get(chunk, 0) + 1
    try:
        expected = naive_train(chunks, num_merges)
    except ValueError:  # min() of no pairs: the naive loop ran out of pairs too
        with pytest.raises(ValueError, match="no pairs left"):
            learn_merges(weights.items(), num_merges)
        return
    learned = learn_merges(weights.items(), num_merges)
    assert [pair for pair, _ in learned] == expected


def test_incremental_trainer_equals_recounting_on_real_text():
    chunks = RegexTokenizer("gpt2").split(TRAIN_TEXT)
    expected = naive_train([c.encode() for c in chunks], 40)
    assert [p for p, _ in learn_merges([(c.encode(), 1) for c in chunks], 40)] == expected
    whole = TRAIN_TEXT.encode()
    assert [p for p, _ in learn_merges([(whole, 1)], 40)] == naive_train([whole], 40)


@settings(max_examples=100, deadline=None)
@given(unicode_text)
@example("aaaaaaaaaa")
def test_fast_chunk_encoder_equals_the_merge_loop(basic, text):
    ids = list(text.encode("utf-8"))
    expected = naive_encode_chunk(ids, basic.merges)
    assert apply_merges(ids, basic.merges) == expected  # the loop or the heap, by length
    assert _merge_with_heap(ids, basic.merges) == expected  # the heap, whatever the length


# -- round trips -----------------------------------------------------------------------------


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(unicode_text)
def test_round_trip_arbitrary_unicode(basic, regex_tok, text):
    for tok in (basic, regex_tok):
        ids = tok.encode(text)
        assert all(0 <= i < tok.n_vocab for i in ids)
        assert tok.decode(ids) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_samples(basic, regex_tok, text):
    for tok in (basic, regex_tok):
        assert tok.decode(tok.encode(text)) == text


@settings(max_examples=40, deadline=None)
@given(unicode_text, st.integers(256, 300))
def test_trained_on_random_text_round_trips(text, vocab_size):
    for tok in (BasicTokenizer(), RegexTokenizer()):
        try:
            tok.train(text, vocab_size)
        except ValueError:
            continue  # too few pairs for this many merges
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(TRAIN_TEXT)) == TRAIN_TEXT


def test_regex_encoding_uses_the_cache_consistently(regex_tok):
    text = " ".join(SAMPLES)
    first, second = regex_tok.encode(text), regex_tok.encode(text)
    assert regex_tok._chunk_cache
    regex_tok.clear_cache()
    assert not regex_tok._chunk_cache and regex_tok.encode(text) == first
    expected = []
    for chunk in regex_tok.split(text):
        expected += naive_encode_chunk(list(chunk.encode()), regex_tok.merges)
    assert first == second == expected


def test_merges_never_cross_chunks(regex_tok):
    for pair, new_id in regex_tok.merges.items():
        token = regex_tok.vocab[new_id].decode("utf-8", errors="ignore")
        if token:
            assert len(regex_tok.split(token)) == 1, (pair, token)


# -- special tokens --------------------------------------------------------------------------


@pytest.fixture
def special():
    tok = RegexTokenizer().train(TRAIN_TEXT, 300)
    tok.register_special_tokens({"<|endoftext|>": 300, "<|pad|>": 301})
    return tok


def test_special_tokens_choices(special):
    text = "hi<|endoftext|>there<|pad|>"
    with pytest.raises(ValueError, match="special token '<\\|endoftext\\|>' at character 2"):
        special.encode(text)
    ordinary = special.encode_ordinary(text)
    assert special.encode(text, allowed_special="none") == ordinary
    assert 300 not in ordinary and special.decode(ordinary) == text
    hi, there = special.encode("hi"), special.encode("there")
    assert special.encode(text, allowed_special="all") == hi + [300] + there + [301]
    assert special.encode(text, allowed_special={"<|endoftext|>", "<|pad|>"}) == hi + [
        300
    ] + there + [301]
    with pytest.raises(ValueError, match="'<\\|pad\\|>' at character 20"):  # allowed: only one
        special.encode(text, allowed_special={"<|endoftext|>"})
    assert special.encode("no specials", allowed_special=set()) == special.encode("no specials")
    assert special.decode(hi + [300] + there + [301]) == text


def test_special_token_errors(special):
    with pytest.raises(ValueError, match="allowed_special must be one of"):
        special.encode("x", allowed_special="everything")
    with pytest.raises(ValueError, match="ids 0..299 are taken"):
        special.register_special_tokens({"<|x|>": 299})
    with pytest.raises(ValueError, match="share the id 301"):
        special.register_special_tokens({"<|x|>": 301})
    with pytest.raises(ValueError, match="already registered with id 300"):
        special.register_special_tokens({"<|endoftext|>": 400})
    with pytest.raises(ValueError, match="below vocab_size=512"):
        special.train(TRAIN_TEXT, 512)
    assert special.special_tokens == {"<|endoftext|>": 300, "<|pad|>": 301}


def test_training_ignores_registered_special_tokens():
    tok = RegexTokenizer()
    tok.register_special_tokens({"<|endoftext|>": 1000})
    tok.train("<|endoftext|>ab ab ab<|endoftext|>" * 50, 258)
    assert all(b"|" not in tok.vocab[i] for i in tok.merges.values())
    assert tok.encode("ab<|endoftext|>", allowed_special="all")[-1] == 1000


# -- review fixes: each of these failed before its fix ---------------------------------------


@pytest.fixture(scope="module")
def tiktoken_patterns():
    """The split patterns tiktoken ships, read from its own definitions (not copied here).

    ``tiktoken_ext.openai_public`` builds each encoding from its token file; we stub the file
    loaders so that reading the pattern needs neither the files nor the network.
    """
    from unittest import mock

    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    with (
        mock.patch.object(openai_public, "load_tiktoken_bpe", lambda *a, **k: {}),
        mock.patch.object(openai_public, "data_gym_to_mergeable_bpe_ranks", lambda *a, **k: {}),
    ):
        return {
            "gpt2": openai_public.gpt2()["pat_str"],
            "gpt4": openai_public.cl100k_base()["pat_str"],
        }


# Whitespace-heavy text: the GPT-4 patterns differed only at whitespace at the end of the text.
split_text = st.one_of(
    unicode_text,
    st.text(alphabet=list(" \t\n\r\x0b\u00a0\u3000a5Z.'!é😀s"), max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(split_text)
@example("a\t5\n ")
@example("Hello world!! I'm 12345 ok\n\n  x  \n")
def test_split_patterns_agree_with_tiktoken(tiktoken_patterns, text):
    for name, theirs in tiktoken_patterns.items():
        assert RegexTokenizer(name).split(text) == regex.findall(theirs, text), name


def test_n_vocab_sizes_an_embedding_table():
    tok = RegexTokenizer().train(TRAIN_TEXT, 260)
    tok.register_special_tokens({"<|endoftext|>": 100_000})
    assert tok.vocab_size == 261  # number of ids: 256 bytes + 4 merges + 1 special
    assert tok.n_vocab == 100_001  # largest id + 1: the rows an embedding table needs
    ids = tok.encode("ab<|endoftext|>", allowed_special="all")
    assert max(ids) == 100_000 and all(0 <= i < tok.n_vocab for i in ids)
    assert BasicTokenizer().n_vocab == 256


@pytest.mark.parametrize(
    "text, same_as",
    [
        ("\ud800", "\ufffd"),  # a lone surrogate becomes U+FFFD, as in tiktoken
        ("a\udfffb", "a\ufffdb"),
        ("\ud83d\ude00", "😀"),  # a surrogate pair spelled as two code points is joined
    ],
)
def test_surrogates_are_replaced_like_tiktoken(basic, regex_tok, text, same_as):
    for tok in (basic, regex_tok):
        assert tok.encode(text) == tok.encode(same_as)
        assert tok.decode(tok.encode(text)) == same_as
    assert regex_tok.encode_ordinary(text) == regex_tok.encode_ordinary(same_as)


def test_allowed_special_ignores_unregistered_names_like_tiktoken(special):
    text = "a<|endoftext|>b"
    assert special.encode("x<|eot|>", allowed_special={"<|eot|>"}) == special.encode("x<|eot|>")
    with pytest.raises(ValueError, match="special token '<\\|endoftext\\|>'"):
        special.encode(text, allowed_special={"<|eot|>"})  # not allowed by naming another
    expected = special.encode("a") + [300] + special.encode("b")
    assert special.encode(text, allowed_special={"<|endoftext|>", "<|eot|>"}) == expected
    assert special.encode(text, allowed_special=["<|endoftext|>"]) == expected  # lists too


@pytest.mark.parametrize("name", ["gpt3", "GPT4", "gpt-2", "cl100k_base"])
def test_a_mistyped_pattern_name_raises_at_construction(name):
    with pytest.raises(ValueError, match=f"{name}.*not a known pattern name .*gpt2.*gpt4"):
        RegexTokenizer(name)


@pytest.mark.parametrize("pattern", [r"\w+", r"(\w+)|\s+|."])
def test_a_pattern_that_loses_the_probe_text_raises_at_construction(pattern):
    with pytest.raises(ValueError, match="does not cover"):
        RegexTokenizer(pattern)


def test_basic_encode_takes_the_same_allowed_special_choices(basic):
    text = "x<|endoftext|>y"
    for choice in ("none_raise", "none", "all", set(), {"<|endoftext|>"}):
        assert basic.encode(text, allowed_special=choice) == basic.encode(text)
    with pytest.raises(ValueError, match="allowed_special must be one of"):
        basic.encode(text, allowed_special="everything")


def test_decode_converts_each_id_and_names_the_bad_one(basic):
    import numpy as np
    import torch

    with pytest.raises(ValueError, match="unknown token id 5000"):
        basic.decode([np.int64(104), np.int64(5000)])
    assert basic.decode([np.int64(104), np.int32(105)]) == "hi"
    assert basic.decode(torch.tensor([104, 105])) == "hi"
    with pytest.raises(ValueError, match="flat sequence.*position 0 is \\[104, 101\\]"):
        basic.decode(torch.tensor([[104, 101], [108, 108]]))
    with pytest.raises(ValueError, match="position 1 is 1.0 \\(float\\)"):
        basic.decode([104, 1.0])
    with pytest.raises(ValueError, match="a sequence of token ids, not a str"):
        basic.decode("hi")


def test_render_token_shows_invalid_utf8_bytes_as_hex():
    rendered = [render_token(bytes([b])) for b in range(128, 256)]
    assert rendered == [f"\\x{b:02x}" for b in range(128, 256)]  # all distinct
    assert render_token("é".encode()) == "é" and render_token("é".encode()[:1]) == "\\xc3"
    assert render_token(b"\n") == "\\u000a"
    assert render_token(b"\\x80") == "\\\\x80" != render_token(b"\x80")  # a real backslash
