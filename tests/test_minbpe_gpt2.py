"""minbpe's GPT2Tokenizer against tiktoken's "gpt2" encoding: the same ids on every text.

These tests need GPT-2's vocab.bpe/encoder.json, tiktoken's copy of them and TinyShakespeare,
all from local caches (CI points ATTNBOOK_DATA_MIRROR and TIKTOKEN_CACHE_DIR at them). They
never use the network: without the files they are skipped, saying what to set.
"""

import hashlib
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import minbpe
from attnbook.download import cache_dir
from minbpe import GPT2Tokenizer, RegexTokenizer
from minbpe.gpt2 import ENCODER_JSON_URL, VOCAB_BPE_URL, byte_to_char, read_gpt2_files

OFFLINE_HINT = (
    "set ATTNBOOK_DATA_MIRROR and TIKTOKEN_CACHE_DIR (CI does; see .ci/run); tests stay offline"
)


def _in_attnbook_cache_or_mirror(*filenames):
    cached = all((cache_dir() / name).is_file() for name in filenames)
    return cached or bool(
        os.environ.get("ATTNBOOK_DATA_MIRROR") or os.environ.get("TIKTOKEN_CACHE_DIR")
    )


@pytest.fixture(scope="module")
def ours():
    if not _in_attnbook_cache_or_mirror("vocab.bpe", "encoder.json"):
        pytest.skip(f"GPT-2's vocab.bpe/encoder.json are not in attnbook's cache: {OFFLINE_HINT}")
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    tiktoken = pytest.importorskip("tiktoken")
    folder = (
        os.environ.get("TIKTOKEN_CACHE_DIR")
        or os.environ.get("DATA_GYM_CACHE_DIR")
        or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    )
    keys = [hashlib.sha1(url.encode()).hexdigest() for url in (VOCAB_BPE_URL, ENCODER_JSON_URL)]
    if not all((Path(folder) / key).is_file() for key in keys):
        pytest.skip(f"tiktoken's gpt2 files are not in its cache {folder}: {OFFLINE_HINT}")
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def shakespeare():
    if not _in_attnbook_cache_or_mirror("tinyshakespeare.txt"):
        pytest.skip(f"TinyShakespeare is not in attnbook's cache: {OFFLINE_HINT}")
    from attnbook.data import corpus_path

    return corpus_path("tinyshakespeare").read_text(encoding="utf-8")


def test_byte_characters_are_distinct_and_printable():
    chars = byte_to_char()
    assert len(set(chars)) == 256 and chars[ord("A")] == "A" and chars[ord(" ")] == "Ġ"
    assert all(ch.isprintable() for ch in chars)


def test_whole_tinyshakespeare_gives_tiktokens_ids(ours, tiktoken_gpt2, shakespeare):
    ids = ours.encode(shakespeare)
    assert ids == tiktoken_gpt2.encode(shakespeare)
    assert ours.decode(ids) == shakespeare


unicode_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)
# Characters that exercise the split pattern: contractions, spaces before words, digit runs,
# whitespace runs before letters and at the end, punctuation, letters with accents, emoji.
tricky_text = st.text(
    alphabet=list(" \n\t\r'sdtmlrevSDTMLRE0123456789aZé.,!?-😀\u0301\u00a0\u3000"), max_size=80
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(unicode_text, tricky_text))
@example("Hello world")
@example("  hello  \n\n world \t\n")
@example("I'm you're he'll we've she'd it's IT'S 1234567 3.14")
@example("e\u0301\u0301 👨‍👩‍👧‍👦 🇫🇷 日本語 \u00a0x")
def test_hypothesis_text_gives_tiktokens_ids(ours, tiktoken_gpt2, text):
    assert ours.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)
    assert ours.encode(text, allowed_special="all") == tiktoken_gpt2.encode(
        text, allowed_special="all"
    )
    assert ours.decode(ours.encode(text, allowed_special="all")) == text


def test_known_ids(ours):
    assert ours.encode("Hello world") == [15496, 995]
    assert ours.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert ours.vocab_size == 50257 and ours.decode([50256]) == "<|endoftext|>"


def outcome(encode, text, **options):
    """What ``encode(text, **options)`` does: its ids, or 'ValueError'."""
    try:
        return encode(text, **options)
    except ValueError:
        return "ValueError"


SPECIAL_TEXTS = [
    "plain text",
    "a<|endoftext|>b",
    "<|endoftext|><|endoftext|> x",
    "<|endoftext|",
    "a<|x|>b",
]
EOT = {"<|endoftext|>"}
# (our options, tiktoken's options) that mean the same thing
CHOICES = [
    ({}, {}),  # none_raise, the default of both
    ({"allowed_special": "all"}, {"allowed_special": "all"}),
    ({"allowed_special": "none"}, {"disallowed_special": ()}),
    ({"allowed_special": EOT}, {"allowed_special": EOT}),
    ({"allowed_special": set()}, {"allowed_special": set()}),
    ({"allowed_special": {"<|x|>"}}, {"allowed_special": {"<|x|>"}}),  # unregistered: ignored
    ({"allowed_special": EOT | {"<|x|>"}}, {"allowed_special": EOT | {"<|x|>"}}),
]


@pytest.mark.parametrize("text", SPECIAL_TEXTS)
@pytest.mark.parametrize("ours_options, tiktoken_options", CHOICES)
def test_special_token_choices_match_tiktoken(
    ours, tiktoken_gpt2, text, ours_options, tiktoken_options
):
    expected = outcome(tiktoken_gpt2.encode, text, **tiktoken_options)
    assert outcome(ours.encode, text, **ours_options) == expected
    if "<|endoftext|>" in text and not ours_options:
        assert expected == "ValueError"


def test_extra_special_token_with_a_set_matches_tiktoken(ours, tiktoken_gpt2, tmp_path):
    """A second special token: allowing one of the two raises on the other, in both."""
    import tiktoken

    t = tiktoken.Encoding(
        name="gpt2_fim",
        pat_str=tiktoken_gpt2._pat_str,
        mergeable_ranks=tiktoken_gpt2._mergeable_ranks,
        special_tokens={"<|endoftext|>": 50256, "<|fim|>": 50257},
    )
    mine = minbpe.load(_saved(ours, tmp_path))  # a copy, so the shared fixture stays as it is
    mine.register_special_tokens({"<|fim|>": 50257})
    for text in ["x<|fim|>y", "x<|endoftext|>y<|fim|>", "none here"]:
        for allowed in ["all", {"<|fim|>"}, EOT, set()]:
            expected = outcome(t.encode, text, allowed_special=allowed)
            assert outcome(mine.encode, text, allowed_special=allowed) == expected, (text, allowed)
    assert outcome(mine.encode, "x<|fim|>y", allowed_special={"<|fim|>"})[-2:] == [50257, 88]


def _saved(tok, folder):
    tok.save(folder / "gpt2")
    return folder / "gpt2.model"


def test_save_load_round_trip_gives_identical_ids(ours, tmp_path, shakespeare):
    loaded = minbpe.load(_saved(ours, tmp_path))
    assert type(loaded) is RegexTokenizer  # GPT-2 is a regex tokenizer with fixed merges
    assert loaded.merges == ours.merges and loaded.byte_ids == ours.byte_ids
    sample = shakespeare[:20000] + " naïve 😀 <|endoftext|>"
    assert loaded.encode(sample, allowed_special="all") == ours.encode(
        sample, allowed_special="all"
    )
    listing = (tmp_path / "gpt2.vocab").read_text(encoding="utf-8")
    assert "15496 [Hello]  <- [H][ello]" in listing


def test_training_gpt2_is_refused(ours):
    with pytest.raises(NotImplementedError, match="RegexTokenizer\\('gpt2'\\)"):
        ours.train("text", 300)


def test_bad_gpt2_files_raise_value_error(ours, tmp_path):
    from minbpe.gpt2 import gpt2_files

    vocab_bpe, encoder_json = gpt2_files()
    lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
    cases = {
        "no version line": ("\n".join(lines[1:]), "expected a '#version' first line"),
        "unknown token": (
            "\n".join(lines[:5] + ["Ġzzzq Ġqqq"] + lines[5:]),
            "line 6: 'Ġzzzq Ġqqq' is not a pair of known tokens",
        ),
        "merges swapped": (
            "\n".join(lines[:3] + [lines[4], lines[3]] + lines[5:]),
            "merge 2 .* should create id 258",
        ),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.bpe"
        path.write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            read_gpt2_files(path, encoder_json)


# -- review fixes: each of these failed before its fix ---------------------------------------


def test_n_vocab_matches_tiktoken(ours, tiktoken_gpt2):
    assert ours.n_vocab == tiktoken_gpt2.n_vocab == 50257


# Text with surrogates: lone ones, and pairs spelled as two code points.
surrogate_text = st.lists(
    st.one_of(st.characters(), st.sampled_from(["\ud800", "\udfff", "\ud83d\ude00", "\udbff"])),
    max_size=40,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(surrogate_text)
@example("\ud800")
@example("a\ud83d\ude00b \udc00\ud800")
def test_surrogates_give_tiktokens_ids(ours, tiktoken_gpt2, text):
    ids = ours.encode(text)
    assert ids == tiktoken_gpt2.encode(text)
    assert ours.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)
    assert ours.decode(ids) == tiktoken_gpt2.decode(ids)


def test_gpt2_tokenizer_refuses_to_load_another_model(tmp_path):
    tok = GPT2Tokenizer()  # a fresh one: if load wrongly succeeded, the shared fixture is safe
    other = RegexTokenizer("gpt2").train("hello world " * 20, 260)
    other.save(tmp_path / "other")
    with pytest.raises(NotImplementedError, match="minbpe.load"):
        tok.load(tmp_path / "other.model")
    assert len(tok.merges) == 50_000 and tok.encode("Hello world") == [15496, 995]
