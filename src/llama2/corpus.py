"""Plain-text pretraining corpora: the embedded default corpus and readers for text files.

The default corpus ships inside the package (``llama2/resources/corpus/*.txt.xz``, about
5.2 MB of text, 1.5 MB compressed): Jane Austen's six novels and Herman Melville's *Moby
Dick*, all public domain (see ``SOURCES.md`` there). It needs no network, so a tiny model
can be pretrained anywhere.

Readers work on ``.txt``, ``.jsonl`` (one ``{"text": ...}`` object a line) and either of
those compressed as ``.gz``, ``.xz`` or ``.bz2``. :func:`iter_documents` cuts plain text into
training documents of a few hundred to a few thousand characters:

* two or more blank lines end a section (the embedded books put one chapter in each);
* one blank line ends a paragraph;
* consecutive paragraphs of a section are packed into one document up to ``max_chars``;
  a paragraph longer than that is split between sentences. A piece shorter than
  ``min_chars`` (a chapter heading, a section's last line) stays with its neighbour, so a
  document can run past ``max_chars`` by less than ``2 * min_chars``. Documents never span
  two sections.

JSONL records are documents as they stand (empty ones are skipped).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

__all__ = [
    "CORPUS_SUFFIXES",
    "default_corpus_dir",
    "default_corpus_files",
    "iter_documents",
    "read_text",
    "split_documents",
]

# Suffixes read_text/iter_documents understand (the compression suffix is optional).
CORPUS_SUFFIXES = (".txt", ".jsonl")
_OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}

_SECTION_BREAK = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+")


def default_corpus_dir() -> Path:
    """The folder of the embedded corpus inside the installed package."""
    return Path(str(resources.files("llama2").joinpath("resources", "corpus")))


def default_corpus_files() -> list[Path]:
    """The embedded corpus files (``*.txt.xz``), sorted by name; raises if none are installed."""
    folder = default_corpus_dir()
    files = sorted(p for p in folder.glob("*.txt.xz") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no embedded corpus files (*.txt.xz) in {folder}")
    return files


def _kind(path: Path) -> tuple[str, str | None]:
    """(content suffix, compression suffix or None) of a corpus file name."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes[-1] if suffixes and suffixes[-1] in _OPENERS else None
    if compression:
        suffixes = suffixes[:-1]
    content = suffixes[-1] if suffixes else ""
    if content not in CORPUS_SUFFIXES:
        raise ValueError(
            f"{path}: unsupported corpus file; expected .txt or .jsonl, optionally .gz, .xz or .bz2"
        )
    return content, compression


def _read_raw(path: Path, compression: str | None) -> str:
    if compression is None:
        data = path.read_bytes()
    else:
        with _OPENERS[compression](path, "rb") as f:
            data = f.read()
    # utf-8-sig: a leading byte-order mark is not text
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _jsonl_texts(path: Path, raw: str) -> Iterator[str]:
    for lineno, line in enumerate(raw.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f'{path}:{lineno}: expected an object with a string "text" field')
        text = obj["text"].strip()
        if text:
            yield text


def read_text(path: str | os.PathLike) -> str:
    """The whole text of a corpus file, decompressed.

    For ``.jsonl`` files the non-empty ``text`` fields are joined by two blank lines (the
    section break :func:`iter_documents` uses for plain text).
    """
    path = Path(path)
    content, compression = _kind(path)
    raw = _read_raw(path, compression)
    if content == ".jsonl":
        return "\n\n\n".join(_jsonl_texts(path, raw))
    return raw


def _split_long(paragraph: str, max_chars: int) -> list[str]:
    """Pieces of at most about ``max_chars``, cut after sentences (or at spaces if need be)."""
    pieces: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(paragraph):
        while len(sentence) > max_chars:  # a run-on "sentence": cut at the last space
            cut = sentence.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            if current:
                pieces.append(current)
                current = ""
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if not sentence:
            continue
        if current and len(current) + 1 + len(sentence) > max_chars:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        pieces.append(current)
    return pieces


def split_documents(text: str, max_chars: int = 2048, min_chars: int = 256) -> Iterator[str]:
    """Cut plain text into documents (see the module docstring for the rules)."""
    if max_chars < 1 or min_chars < 0:
        raise ValueError("max_chars must be positive and min_chars non-negative")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    for section in _SECTION_BREAK.split(text):
        docs: list[str] = []
        current = ""
        for para in _PARAGRAPH_BREAK.split(section):
            para = para.strip()
            if not para:
                continue
            for piece in _split_long(para, max_chars) if len(para) > max_chars else [para]:
                if len(current) >= min_chars and len(current) + 2 + len(piece) > max_chars:
                    docs.append(current)
                    current = piece
                else:
                    current = f"{current}\n\n{piece}" if current else piece
        if current:
            if docs and len(current) < min_chars:
                docs[-1] = f"{docs[-1]}\n\n{current}"
            else:
                docs.append(current)
        yield from docs


def iter_documents(path: str | os.PathLike, max_chars: int = 2048, min_chars: int = 256) -> Iterator[str]:
    """Documents of a corpus file: JSONL records as they are, plain text cut by :func:`split_documents`."""
    path = Path(path)
    content, compression = _kind(path)
    raw = _read_raw(path, compression)
    if content == ".jsonl":
        yield from _jsonl_texts(path, raw)
    else:
        yield from split_documents(raw, max_chars=max_chars, min_chars=min_chars)
