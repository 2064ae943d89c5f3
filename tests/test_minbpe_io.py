"""minbpe's model files: save/load round trips, and every kind of damaged file raises ValueError."""

import hashlib

import pytest

import minbpe
from minbpe import BasicTokenizer, RegexTokenizer

TEXT = (
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune, 😀 naïve café 日本語\n"
) * 10
PROBE = "The question is not the mind 12 times, 😀 ü\x00 déjà"


@pytest.fixture(scope="module")
def trained():
    regex_tok = RegexTokenizer("gpt2").train(TEXT, 320)
    regex_tok.register_special_tokens({"<|endoftext|>": 320, 'a "quoted"\nname': 400})
    return {"basic": BasicTokenizer().train(TEXT, 300), "regex": regex_tok}


@pytest.fixture
def saved(trained, tmp_path):
    trained["regex"].save(tmp_path / "tok")
    return tmp_path / "tok.model"


def same_model(a, b):
    return (
        a.merges == b.merges
        and a.vocab == b.vocab
        and a.pattern == b.pattern
        and a.special_tokens == b.special_tokens
        and a.byte_ids == b.byte_ids
    )


@pytest.mark.parametrize("kind", ["basic", "regex"])
def test_save_load_round_trip_gives_identical_ids(trained, tmp_path, kind):
    tok = trained[kind]
    tok.save(tmp_path / kind)
    fresh = type(tok)().load(tmp_path / f"{kind}.model")
    by_module = minbpe.load(tmp_path / f"{kind}.model")
    assert type(by_module) is type(tok)
    for loaded in (fresh, by_module):
        assert same_model(tok, loaded)
        assert loaded.encode(PROBE) == tok.encode(PROBE)
        assert loaded.encode(TEXT) == tok.encode(TEXT)
    vocab_listing = (tmp_path / f"{kind}.vocab").read_text(encoding="utf-8")
    assert vocab_listing.count("\n") == tok.vocab_size + 1  # a header line, then one line per id
    assert "[\\u000a]" in vocab_listing  # control characters are escaped, not printed raw


def test_special_tokens_survive_the_round_trip(trained, saved):
    loaded = minbpe.load(saved)
    text = "end<|endoftext|>"
    assert loaded.encode(text, allowed_special="all") == trained["regex"].encode(
        text, allowed_special="all"
    )
    assert loaded.special_tokens == {"<|endoftext|>": 320, 'a "quoted"\nname': 400}


def test_loading_the_wrong_kind_raises(trained, saved):
    basic = BasicTokenizer()
    with pytest.raises(
        ValueError, match="holds a 'regex' tokenizer, but BasicTokenizer loads 'basic'"
    ):
        basic.load(saved)
    assert basic.merges == {}


def damage_cases(data: bytes):
    """(description, damaged bytes, expected message) for a good model file's bytes."""
    lines = data.split(b"\n")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    return [
        ("empty", b"", "not a minbpe model file"),
        ("another file", b"#version: 0.2\nh e\n", "does not start with 'minbpe model v1'"),
        ("not UTF-8", b"\xff\xfe" + data, "not UTF-8 text"),
        ("cut mid-line", data[: len(data) // 2], "truncated"),
        ("cut at a line end", b"\n".join(lines[:-5]) + b"\n", "truncated"),
        ("no last newline", data[:-1], "truncated"),
        ("one bit flipped", bytes(flipped), "corrupted"),
        ("a merge line removed", b"\n".join(lines[:12] + lines[13:]), "corrupted"),
        ("a digit changed", data.replace(b"\n104 101\n", b"\n104 102\n", 1), "corrupted"),
        ("a line duplicated", b"\n".join(lines[:12] + lines[11:]), "corrupted"),
    ]


def test_damaged_files_raise_value_error_and_leave_the_tokenizer_alone(trained, saved, tmp_path):
    data = saved.read_bytes()
    assert b"\n104 101\n" in data  # the merge "h" + "e" that one case alters
    tok = RegexTokenizer("gpt2").train(TEXT, 300)
    before = tok.encode(PROBE)
    for description, damaged, message in damage_cases(data):
        path = tmp_path / "damaged.model"
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=message):
            tok.load(path)
        with pytest.raises(ValueError, match=message):
            minbpe.load(path)
        assert tok.encode(PROBE) == before and len(tok.merges) == 44, description


def write_with_checksum(path, body):
    """A hand-made model file with a correct checksum, to reach the checks behind it."""
    digest = hashlib.sha256(body.encode()).hexdigest()
    path.write_text(body + f"sha256 {digest}\n", encoding="utf-8")


IDENTITY = "bytes " + " ".join(map(str, range(256)))
SWAPPED = "bytes 1 0 " + " ".join(map(str, range(2, 256)))
REPEATED = "bytes 0 0 " + " ".join(map(str, range(2, 256)))


@pytest.mark.parametrize(
    "body, message",
    [
        (
            f'type regex\npattern "x"\n{IDENTITY}\nspecial 0\nmerges 1\n104 256\n',
            "merge 0 is \\(104, 256\\)",
        ),
        (
            f'type regex\npattern "x"\n{IDENTITY}\nspecial 0\nmerges 2\n104 101\n104 101\n',
            "repeats the pair",
        ),
        (
            f'type regex\npattern "x"\n{IDENTITY}\nspecial 0\nmerges 3\n104 101\n',
            "promises 3 merges, but 1 lines",
        ),
        (
            f'type regex\npattern "x"\n{IDENTITY}\nspecial 0\nmerges 1\n104 -1\n',
            "expected 2 integers",
        ),
        (f'type regex\npattern "x"\n{IDENTITY}\nspecial 0\nmerges one\n', "'merges' needs a count"),
        (
            f'type regex\npattern "x"\n{IDENTITY}\nspecial 1\n"<|e|>" 100\nmerges 0\n',
            "ids 0..255 are taken",
        ),
        (
            f'type regex\npattern "x"\n{IDENTITY}\nspecial 2\n"<|e|>" 300\nmerges 0\n',
            "expected '\"<token>\" <id>'",
        ),
        (
            f'type regex\npattern "x"\n{IDENTITY}\nspecial 2\n"<|e|>" 300\n"<|e|>" 301\nmerges 0\n',
            "listed twice",
        ),
        (f'type regex\npattern "("\n{IDENTITY}\nspecial 0\nmerges 0\n', "not a valid regex"),
        (f'type regex\npattern "x"\n{IDENTITY}\nspecial 0\nmerges 0\n', "does not cover"),
        (f"type regex\npattern x\n{IDENTITY}\nspecial 0\nmerges 0\n", "not a JSON string"),
        (
            f'type regex\npattern "x"\n{REPEATED}\nspecial 0\nmerges 0\n',
            "permutation of the ids 0..255",
        ),
        ('type regex\npattern "x"\nbytes 1 2 3\nspecial 0\nmerges 0\n', "expected 256 integers"),
        (f'type basic\npattern "x"\n{IDENTITY}\nspecial 0\nmerges 0\n', "no split pattern"),
        (
            f'type fancy\npattern "x"\n{IDENTITY}\nspecial 0\nmerges 0\n',
            "unknown tokenizer type 'fancy'",
        ),
        (f"type regex\n{IDENTITY}\nspecial 0\nmerges 0\n", "line 3: expected 'pattern ...'"),
    ],
)
def test_well_formed_checksum_but_bad_content_raises(tmp_path, body, message):
    path = tmp_path / "hand.model"
    write_with_checksum(path, "minbpe model v1\n" + body)
    with pytest.raises(ValueError, match=message):
        minbpe.load(path)


def test_a_hand_made_file_with_a_byte_permutation_loads(tmp_path):
    path = tmp_path / "swapped.model"
    write_with_checksum(
        path,
        f'minbpe model v1\ntype regex\npattern "\\\\S+|\\\\s+"\n{SWAPPED}\nspecial 0\nmerges 1\n0 1\n',
    )
    tok = minbpe.load(path)
    assert tok.encode("\x01\x00\x00") == [256, 1]  # byte 1 has id 0, byte 0 has id 1
    assert tok.decode([256, 1]) == "\x01\x00\x00"


# -- review fixes: each of these failed before its fix ---------------------------------------


def test_a_regex_model_with_an_empty_pattern_raises(tmp_path):
    path = tmp_path / "empty_pattern.model"
    write_with_checksum(
        path, f'minbpe model v1\ntype regex\npattern ""\n{IDENTITY}\nspecial 0\nmerges 0\n'
    )
    with pytest.raises(ValueError, match="line 3: a 'regex' tokenizer needs a split pattern"):
        minbpe.load(path)
    tok = RegexTokenizer()
    with pytest.raises(ValueError, match="needs a split pattern"):
        tok.load(path)
    assert tok.encode("still works") == list(b"still works")


@pytest.mark.parametrize("extra", [b"\n", b"\n\n", b"more\n", b"x"])
def test_data_after_the_checksum_line_is_reported_as_trailing_data(saved, extra):
    saved.write_bytes(saved.read_bytes() + extra)
    with pytest.raises(ValueError, match="trailing data after its 'sha256 ...' line"):
        minbpe.load(saved)


def test_vocab_listing_shows_invalid_utf8_bytes_as_hex(trained, tmp_path):
    trained["basic"].save(tmp_path / "basic")
    listing = (tmp_path / "basic.vocab").read_text(encoding="utf-8")
    assert "   128 [\\x80]\n" in listing and "   255 [\\xff]\n" in listing
    assert "\ufffd" not in listing
