"""Embedded pretraining corpus: shipped files, decompression, document cutting, readers."""

import bz2
import gzip
import json
import lzma
import re
from collections import Counter

import pytest

from llama2.corpus import (
    default_corpus_dir,
    default_corpus_files,
    iter_documents,
    read_text,
    split_documents,
)

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def corpus_texts():
    return {p.name: read_text(p) for p in default_corpus_files()}


def test_embedded_files_exist_and_are_small():
    files = default_corpus_files()
    assert len(files) >= 2
    assert (default_corpus_dir() / "SOURCES.md").is_file()
    for p in files:
        assert p.name.endswith(".txt.xz")
        assert 10_000 < p.stat().st_size < 2 * MiB, p


def test_every_shipped_file_is_named_in_sources():
    sources = (default_corpus_dir() / "SOURCES.md").read_text(encoding="utf-8")
    for p in default_corpus_files():
        assert f"`{p.name}`" in sources, p.name


def test_embedded_text_decompresses_to_enough_english(corpus_texts):
    total = sum(len(t) for t in corpus_texts.values())
    assert total > 4_000_000
    for name, text in corpus_texts.items():
        assert text.isascii(), name
        assert "gutenberg" not in text.lower(), name  # boilerplate stripped
        words = Counter(re.findall(r"[a-z]+", text.lower()))
        top = [w for w, _ in words.most_common(10)]
        assert {"the", "and", "of", "to"} <= set(top), (name, top)


def test_documents_are_nonempty_english_of_sensible_size():
    docs = [d for p in default_corpus_files() for d in iter_documents(p)]
    assert len(docs) > 2000
    lengths = [len(d) for d in docs]
    assert all(d.strip() == d and d for d in docs)
    assert min(lengths) >= 100
    assert max(lengths) <= 2048 + 2 * 256
    assert 1000 < sorted(lengths)[len(lengths) // 2] <= 2048
    with_the = sum(1 for d in docs if re.search(r"\bthe\b", d, re.IGNORECASE))
    assert with_the / len(docs) > 0.95
    assert any("CHAPTER 1. Loomings.\n\nCall me Ishmael." in d for d in docs)
    assert any("It is a truth universally acknowledged" in d for d in docs)


def test_documents_keep_all_the_words():
    p = default_corpus_files()[0]
    text = read_text(p)
    docs = list(iter_documents(p, max_chars=500, min_chars=50))
    assert max(len(d) for d in docs) <= 500 + 2 * 50
    assert " ".join(" ".join(docs).split()) == " ".join(text.split())


def test_split_documents_sections_paragraphs_and_long_paragraphs():
    text = (
        "CHAPTER 1\n\nOne two three.\n\nFour five six.\n\n\n"
        "CHAPTER 2\n\n" + "A long sentence here. " * 20 + "\n\n\n\nEnd."
    )
    docs = list(split_documents(text, max_chars=60, min_chars=10))
    # chapter 1 fits in one document; chapters never share one
    assert docs[0] == "CHAPTER 1\n\nOne two three.\n\nFour five six."
    assert docs[1].startswith("CHAPTER 2\n\nA long sentence here.")
    assert all(len(d) <= 60 + 20 for d in docs)
    assert all(d.endswith(".") for d in docs)  # long paragraph cut between sentences
    assert docs[-1] == "End."
    assert " ".join(" ".join(docs).split()) == " ".join(text.split())


def test_split_documents_rejects_bad_sizes():
    with pytest.raises(ValueError):
        list(split_documents("text", max_chars=0))


@pytest.mark.parametrize(
    "suffix,opener", [("", open), (".gz", gzip.open), (".xz", lzma.open), (".bz2", bz2.open)]
)
def test_txt_files_any_compression(tmp_path, suffix, opener):
    body = "\ufeffThe first paragraph.\r\n\r\nThe second one.\r\n\r\n\r\nA new chapter.\r\n"
    path = tmp_path / f"book.txt{suffix}"
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        f.write(body)
    assert read_text(path) == "The first paragraph.\n\nThe second one.\n\n\nA new chapter.\n"
    assert list(iter_documents(path, min_chars=0)) == [
        "The first paragraph.\n\nThe second one.",
        "A new chapter.",
    ]


@pytest.mark.parametrize("suffix,opener", [("", open), (".gz", gzip.open), (".xz", lzma.open)])
def test_jsonl_documents(tmp_path, suffix, opener):
    path = tmp_path / f"stories.jsonl{suffix}"
    records = [{"text": "Once upon a time there was a cat."}, {"text": "  "}, {"text": "The end.", "id": 3}]
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write("\n")  # blank lines are skipped
    assert list(iter_documents(path)) == ["Once upon a time there was a cat.", "The end."]
    assert read_text(path) == "Once upon a time there was a cat.\n\n\nThe end."


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "no text field"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        list(iter_documents(path))
    path.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        read_text(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported"):
        read_text(path)
