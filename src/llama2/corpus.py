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

A second bundled corpus holds source code, for Code Llama's infilling training (Code Llama
§2.3) at tiny scale: about 1.8 MB of pure-Python modules of CPython's standard library
(``llama2/resources/code/*.jsonl.xz``, PSF licence; see ``SOURCES.md`` there), already cut
into documents by :func:`split_python_source`: one top-level function or class each, small
neighbours packed together and long classes split between methods, so that one document
(a median of about 440 tokens with a 4096-piece vocabulary, 93% within 1,024) fits a tiny
model's 1024-token context, and a fill-in-the-middle example made from it keeps its
sentinels in one training window when the sequence length is that long (with 256-token
windows, most examples span two to four). :func:`code_corpus_files` lists them; :func:`iter_documents` reads them like any JSONL.
"""

from __future__ import annotations

import ast
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
    "code_corpus_dir",
    "code_corpus_files",
    "default_corpus_dir",
    "default_corpus_files",
    "iter_documents",
    "read_text",
    "split_documents",
    "split_python_source",
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


def code_corpus_dir() -> Path:
    """The folder of the embedded code corpus inside the installed package."""
    return Path(str(resources.files("llama2").joinpath("resources", "code")))


def code_corpus_files() -> list[Path]:
    """The embedded code corpus files (``*.jsonl.xz``, one ``{"text", "source"}`` record per
    document), sorted by name; raises if none are installed."""
    folder = code_corpus_dir()
    files = sorted(p for p in folder.glob("*.jsonl.xz") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no embedded code corpus files (*.jsonl.xz) in {folder}")
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


# ------------------------------------------------------------------------------------------
# Source code: documents of whole definitions
# ------------------------------------------------------------------------------------------

def _first_line(node: ast.stmt) -> int:
    """1-based first line of a statement, its decorators included."""
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def _units(lines: list[str], nodes: list[ast.stmt], start: int, end: int) -> list[tuple[int, int, ast.stmt]]:
    """(first, last) 0-based line spans, one per statement of ``nodes``, covering lines
    ``[start, end)``: each statement takes the comments and blank lines before it; lines
    after the last statement go to the last one."""
    spans = []
    for k, node in enumerate(nodes):
        last = node.end_lineno if k + 1 < len(nodes) else end
        spans.append((start, last, node))
        start = last
    return spans


def _pack(pieces: list[str], max_chars: int, min_chars: int, header: str = "") -> list[str]:
    """Consecutive pieces joined into documents of at most ``max_chars``; a piece longer than
    that is a document alone, and a piece shorter than ``min_chars`` (or a document so far
    shorter than that) is never cut from its neighbour. Every document after the first starts
    with ``header``."""
    docs: list[str] = []
    current = ""
    for piece in pieces:
        if (len(current) >= min_chars and len(piece) >= min_chars
                and len(current) + len(piece) > max_chars):
            docs.append(current)
            current = header
        current += piece
    if current.strip():
        docs.append(current)
    return docs


def split_python_source(source: str, max_chars: int = 1536, min_chars: int = 256) -> list[str]:
    """Cut a Python module into documents of whole top-level statements.

    Each top-level statement (a function or class with its decorators, an import, an
    assignment) keeps the comments and blank lines above it; consecutive statements are packed
    into one document up to ``max_chars``, and a statement shorter than ``min_chars`` (an
    ``if __name__ == "__main__":`` block, a lone assignment) stays with its neighbour even past
    ``max_chars``. A class longer than ``max_chars`` is split between the statements of its
    body, and every piece after the first repeats the class's header lines (``class
    Name(Base):``), so every document is itself valid Python. A single function or method
    longer than ``max_chars`` stays whole: cutting it would leave code that does not parse.
    Raises ``SyntaxError`` for source that does not parse.
    """
    if max_chars < 1 or min_chars < 0:
        raise ValueError(f"max_chars must be positive and min_chars non-negative, got {max_chars}, {min_chars}")
    source = source.replace("\r\n", "\n").replace("\r", "\n")
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    if not tree.body:
        return [source.strip()] if source.strip() else []
    pieces: list[str] = []
    for first, last, node in _units(lines, tree.body, 0, len(lines)):
        text = "".join(lines[first:last])
        if len(text) <= max_chars or not isinstance(node, ast.ClassDef) or len(node.body) < 2:
            pieces.append(text)
            continue
        # A long class: its header (decorators to the line before the first body statement),
        # then its body statements packed like the module's.
        body_start = _first_line(node.body[0]) - 1
        if body_start < node.lineno:  # "class A: x = 1; ..." on one line: nothing to split
            pieces.append(text)
            continue
        header = "".join(lines[_first_line(node) - 1:body_start])
        members = ["".join(lines[a:b]) for a, b, _ in _units(lines, node.body, body_start, last)]
        parts = _pack(members, max(1, max_chars - len(header)), min_chars, header)
        pieces.extend(["".join(lines[first:body_start]) + parts[0]] + parts[1:])
    docs = []
    for doc in _pack(pieces, max_chars, min_chars):
        doc = doc.strip("\n").rstrip()
        if doc:
            docs.append(doc)
    return docs
