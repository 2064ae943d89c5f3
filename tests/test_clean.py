"""clean.py: each step on a text written to need it, the report's counts adding up, a clean text
left alone, TinyShakespeare's few changes, and prepare(clean=True) keeping the report."""

import json

import pytest

from attnbook.clean import CleanReport, clean_text
from attnbook.data import TokenData, load_text, prepare

BOILERPLATE = ("Subscribe to our newsletter for the latest news, offers and stories. " * 2).strip()


def test_each_step_on_a_scraped_text():
    raw = (
        "\ufeffCafe\u0301 du monde\r\n"  # a BOM, e + combining acute, Windows line ending
        "a\u00a0b\u2009c\u200bd   \r\n"  # no-break space, thin space, zero-width space, trailing
        "\x07bell\t\n\n\n\n"  # a control character, trailing tab, a run of blank lines
        f"{BOILERPLATE}\n\nROMEO:\nAy.\n\nROMEO:\nAy.\n\n{BOILERPLATE}\n\nthe end"
    )
    text, report = clean_text(raw)
    assert text == (
        "Caf\u00e9 du monde\na b cd\nbell\n\n"
        f"{BOILERPLATE}\n\nROMEO:\nAy.\n\nROMEO:\nAy.\n\nthe end"  # short repeats stay
    )
    assert (report.normalized, report.line_endings, report.controls_removed) == (1, 2, 3)
    assert (report.spaces_replaced, report.trailing_cut, report.blank_runs_cut) == (2, 2, 1)
    assert (report.duplicates_removed, report.duplicate_chars) == (1, len(BOILERPLATE) + 2)
    assert report.examples == [BOILERPLATE[:60]]
    assert (report.chars_before, report.chars_after) == (len(raw), len(text))
    assert f"{len(raw):,} -> {len(text):,} characters ({len(raw) - len(text):,} removed" in str(
        report
    )


def test_the_duplicate_threshold_and_a_clean_text():
    text = "A paragraph long enough.\n\nA paragraph long enough.\n\nend"
    assert clean_text(text)[0] == text  # 24 characters: below the default 100
    assert clean_text(text, min_duplicate_chars=20)[0] == "A paragraph long enough.\n\nend"
    same, report = clean_text("Nothing to do here.\n\nAt all.")
    assert same == "Nothing to do here.\n\nAt all." and report.chars_before == report.chars_after
    with pytest.raises(ValueError, match="min_duplicate_chars must be a positive integer, got 0"):
        clean_text(text, min_duplicate_chars=0)
    with pytest.raises(ValueError, match="clean_text needs a str, got bytes"):
        clean_text(b"bytes")


def test_tinyshakespeare_is_nearly_clean_already():
    """Two lines end in spaces and two runs of blank lines are cut; no paragraph of 100
    characters or more repeats (short speeches such as "MARIANA:\\nNo, my lord." do)."""
    raw = load_text("tinyshakespeare")
    text, report = clean_text(raw)
    assert (report.trailing_cut, report.blank_runs_cut, report.duplicates_removed) == (2, 2, 0)
    assert report.chars_before - report.chars_after == 6 and report.normalized == 0


def test_prepare_cleans_into_its_own_folder_and_keeps_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBOOK_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "page.txt"
    source.write_text("\r\n\r\n".join([BOILERPLATE, "some text here"] * 3))
    raw, cleaned = prepare(str(source), "char"), prepare(str(source), "char", clean=True)
    assert raw != cleaned and cleaned.name.endswith("-clean")
    meta = TokenData(cleaned).meta
    report = CleanReport(**meta["cleaning"])
    assert report.duplicates_removed == 2 and report.line_endings == 10
    assert "cleaning" not in TokenData(raw).meta
    assert TokenData(cleaned).encoding.decode(TokenData(cleaned).tokens["train"][:9]) == "Subscribe"
    assert prepare(str(source), "char", clean=True) == cleaned  # found again, not redone
    assert json.loads((cleaned / "meta.json").read_text())["cleaning"] == meta["cleaning"]
    with pytest.raises(ValueError, match="clean must be True or False, got 'yes'"):
        prepare(str(source), "char", clean="yes")
