"""``llama2 tokenizer``: train a SentencePiece BPE tokenizer with Llama 2's settings, or inspect one.

    llama2 tokenizer train --input FILES... --out DIR [--vocab-size 32000]
    llama2 tokenizer train --default-corpus --out DIR --vocab-size 4096
    llama2 tokenizer encode --tokenizer T "some text"     # ids and pieces
    llama2 tokenizer decode --tokenizer T 1 15043 3186
"""

from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a BPE tokenizer (Llama 2's settings, paper §2.1)")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="FILE", help="text (.txt, .gz, .xz) or JSONL files")
    src.add_argument("--default-corpus", action="store_true", help="the corpus shipped with the package")
    t.add_argument("--out", required=True, metavar="DIR", help="writes DIR/tokenizer.model")
    t.add_argument("--vocab-size", type=int, default=32000, help="pieces (default: 32000, Llama 2's)")
    t.add_argument("--threads", type=int, default=None, help="trainer threads (default: CPU count)")
    for name, help_text in (("encode", "text -> token ids"), ("decode", "token ids -> text")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--tokenizer", required=True, metavar="T", help="tokenizer.model or a model directory")
        p.add_argument("items", nargs="+", metavar="TEXT" if name == "encode" else "ID")
        if name == "encode":
            p.add_argument("--bos", action="store_true", help="prepend BOS")
            p.add_argument("--eos", action="store_true", help="append EOS")
            p.add_argument("--json", action="store_true", help="print only the ids as a JSON list")


def main(args: argparse.Namespace) -> int:
    from llama2.tokenizer import Tokenizer, train_tokenizer

    if args.action == "train":
        if args.vocab_size < 260:  # 256 byte-fallback pieces + <unk>, <s>, </s> + one merge
            raise ValueError(f"--vocab-size {args.vocab_size} is too small; byte fallback alone needs 259 pieces")
        if args.default_corpus:
            from llama2.data.corpus import default_corpus_files

            inputs = default_corpus_files()
        else:
            inputs = args.input
        tok = train_tokenizer(inputs, args.out, vocab_size=args.vocab_size, num_threads=args.threads,
                              verbose=False)
        print(f"wrote {tok.path} ({tok.vocab_size} pieces)")
        return 0
    tok = Tokenizer(args.tokenizer)
    if args.action == "encode":
        ids = tok.encode(" ".join(args.items), bos=args.bos, eos=args.eos)
        if args.json:
            print(json.dumps(ids))
        else:
            print(f"{len(ids)} tokens: {ids}")
            print(" ".join(tok.id_to_piece(i) for i in ids))
        return 0
    try:
        ids = [int(x) for x in args.items]
    except ValueError:
        raise ValueError(f"decode: token ids must be integers, got {' '.join(args.items)!r}") from None
    print(tok.decode(ids))
    return 0
