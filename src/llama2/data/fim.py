"""Fill-in-the-middle training documents (Code Llama §2.3; Bavarian et al. 2022).

Code Llama learns infilling from ordinary documents: with probability ``fim_rate`` (0.9 in
Code Llama) a document is split at two character positions drawn independently and uniformly
over its length into a prefix, a middle and a suffix, and moved into one of two orders, each
with sentinel pieces from the tokenizer (``▁<PRE>``, ``▁<SUF>``, ``▁<MID>``, ``▁<EOT>``).
``unit="line"`` draws the two cuts among the line starts instead, so every middle is whole
lines (the unit of single- and multi-line infilling benchmarks): a model trained for minutes
learns that far sooner than middles that start and end anywhere (the code recipe's numbers are
in the README).

* PSM (prefix-suffix-middle)::

      BOS PRE encode(prefix) SUF encode_infilling(suffix) MID encode_infilling(middle) EOT EOS

* SPM (suffix-prefix-middle, chosen with probability ``spm_rate``, 0.5 in Code Llama; laid
  out as Meta's inference code lays it out, ``PRE`` first)::

      BOS PRE SUF encode_infilling(suffix) MID encode(prefix) encode_infilling(middle) EOT EOS

Everything up to the middle is, token for token, the prompt that Meta's codellama inference
code builds for the same prefix and suffix: it is made by ``llama2.tokenizer.infill_tokens``,
the function that builds the prompt whenever the model is asked to infill (``llama2
generate``, the server, the infilling evaluation), so the model is trained on exactly what it
is asked at inference time.

How the pieces are encoded. The prefix starts the document, so it is encoded as any document
is (``encode``, with SentencePiece's dummy-prefix space). The suffix and the middle continue
text that came before them, so they are encoded without the dummy prefix
(``encode_infilling``): a space that begins them is a real space of the document and is kept,
and none is invented. The middle is therefore exactly what a model generates after the
prompt in both orders: in PSM it continues after ``MID``, in SPM it continues the prefix.
Decoding the prefix as a text and the middle and suffix as continuations gives the document
back character for character (``tests/test_fim.py``). Because the cuts fall between
characters, a word cut in two is tokenized as two pieces, not as the one piece it is inside
the whole document; that is intended, a model asked to infill must complete a middle that
starts or ends inside a word.

The middle ends with ``EOT``, the token generation stops at; ``EOS`` after it keeps every
training document framed ``BOS ... EOS`` like the others (so documents can still be counted
in the token stream), and teaches the model nothing it will be asked at inference. A
document left whole (probability ``1 - fim_rate``) is ``BOS encode(text) EOS``, as without
FIM.
"""

from __future__ import annotations

import random
import re

from llama2.tokenizer import Tokenizer, infill_tokens

FIM_RATE = 0.9  # Code Llama §2.3: share of documents turned into infilling examples
SPM_RATE = 0.5  # Code Llama §2.3: share of those in suffix-prefix-middle order
# Where the cuts may fall: "char" anywhere (Code Llama §2.3), "line" only at line starts (and the
# document's end), so every middle is whole lines, as in single-line and multi-line infilling
# benchmarks (Bavarian et al. 2022 §3 evaluate on line-aligned spans).
FIM_UNITS = ("char", "line")


def check_infilling(tok: Tokenizer, what: str = "fill-in-the-middle training") -> None:
    """One-line ValueError when ``tok`` has no infilling pieces (▁<PRE> ▁<SUF> ▁<MID> ▁<EOT>)."""
    if not getattr(tok, "has_infilling", False):
        raise ValueError(
            f"{getattr(tok, 'path', tok)}: this tokenizer has no infilling pieces (▁<PRE> ▁<SUF> ▁<MID> ▁<EOT>), "
            f"which {what} needs; build Code Llama's vocabulary with `llama2 tokenizer code-llama` or train "
            "one with --infilling")


def check_rates(fim_rate: float, spm_rate: float, unit: str = "char") -> None:
    for name, value in (("fim_rate", fim_rate), ("fim_spm_rate", spm_rate)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if unit not in FIM_UNITS:
        raise ValueError(f"fim_unit must be one of {', '.join(FIM_UNITS)}, got {unit!r}")


def split_points(n_chars: int, rng: random.Random) -> tuple[int, int]:
    """Two cut positions ``i <= j`` in ``[0, n_chars]``, drawn independently and uniformly and
    sorted (Code Llama §2.3): prefix ``[:i]``, middle ``[i:j]``, suffix ``[j:]``. Any part may
    be empty."""
    a, b = rng.randint(0, n_chars), rng.randint(0, n_chars)
    return (a, b) if a <= b else (b, a)


def line_split_points(text: str, rng: random.Random) -> tuple[int, int]:
    """Like :func:`split_points`, but the two cuts are two different line starts of ``text``
    (or its end), drawn uniformly, so the prefix ends with a line break and the middle is one
    or more whole lines. Different, because with whole lines as the unit equal cuts would be
    frequent (one in five for a four-line function) and teach the model to end at once."""
    starts = sorted({0, len(text), *(m.end() for m in re.finditer("\n", text))})
    if len(starts) < 2:  # an empty text: nothing to cut
        return 0, 0
    a, b = rng.sample(starts, 2)
    return (a, b) if a <= b else (b, a)


def fim_example(tok: Tokenizer, prefix: str, middle: str, suffix: str, spm: bool = False) -> list[int]:
    """One infilling training document: the inference prompt for ``prefix`` and ``suffix``
    (PSM, or SPM when ``spm``), then the middle, ``EOT`` and ``EOS``."""
    return infill_tokens(tok, prefix, suffix, suffix_first=spm) + tok.encode_infilling(middle) + [tok.eot_id, tok.eos_id]


def fim_tokens(tok: Tokenizer, text: str, rng: random.Random, fim_rate: float = FIM_RATE,
               spm_rate: float = SPM_RATE, unit: str = "char") -> list[int]:
    """The training tokens of one document: with probability ``fim_rate`` an infilling example
    (SPM with probability ``spm_rate``, else PSM) cut at uniform character positions (``unit``
    "char") or line starts ("line"), otherwise ``BOS text EOS``. Draws from ``rng`` only, so the
    same seed gives the same tokens; the first draw decides FIM, whatever the rate, so a rate
    of 0 gives the plain document."""
    check_rates(fim_rate, spm_rate, unit)
    if fim_rate > 0:
        check_infilling(tok)
    if rng.random() >= fim_rate:
        return tok.encode(text, bos=True, eos=True)
    i, j = split_points(len(text), rng) if unit == "char" else line_split_points(text, rng)
    spm = rng.random() < spm_rate
    return fim_example(tok, text[:i], text[i:j], text[j:], spm)


def document_rng(seed: int, shard: str, index: int) -> random.Random:
    """The draws of one document of ``llama2 prepare``: fixed by the seed, the shard's file name
    and the document's place in it, so the output does not depend on the number of workers
    or on which shards were reused, and repeated copies of one text are cut differently."""
    return random.Random(f"fim/{seed}/{shard}/{index}")
