"""``llama2 tokenizer``: train a SentencePiece BPE tokenizer with Llama 2's settings, or inspect one.

    llama2 tokenizer train --input FILES... --out DIR [--vocab-size 32000]
    llama2 tokenizer train --default-corpus --out DIR --vocab-size 4096 [--world-examples 3000]
    llama2 tokenizer encode --tokenizer T "some text"     # ids and pieces
    llama2 tokenizer decode --tokenizer T 1 15043 3186

:class:`TokenizerConfig` is both the flags of ``tokenizer train`` and the ``tokenizer`` stage of a
``llama2 run`` recipe.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llama2.corpus import default_corpus_files
from llama2.data.world import World
from llama2.recipe import add_config_args, load_config, setting
from llama2.tokenizer import Tokenizer, train_tokenizer


@dataclass
class TokenizerConfig:
    vocab_size: int = setting(32000, "pieces (Llama 2's: 32,000, §2.1)")
    world_examples: int | None = setting(None, "also train on the bundled assistant world's fact sheet and this many "
                                               "of its SFT conversations (what `llama2 run` does); none: the "
                                               "inputs alone")
    world_seed: int = setting(0, "seed of the bundled assistant world")
    threads: int | None = setting(None, "trainer threads (default: CPU count)")

    def __post_init__(self) -> None:
        if self.vocab_size < 260:  # 256 byte-fallback pieces + <unk>, <s>, </s> + one merge
            raise ValueError(f"vocab_size {self.vocab_size} is too small; byte fallback alone needs 259 pieces")


def world_text(path: Path, world_seed: int, examples: int) -> Path:
    """The world's fact sheet and the messages of ``examples`` SFT conversations, one per line:
    the chat vocabulary the tokenizer should know besides the corpus."""
    world = World(world_seed)
    lines = [world.knowledge_text()]
    for row in world.sft_examples("train", examples):
        lines += [m["content"] for m in row["messages"]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train(cfg: TokenizerConfig, inputs: Sequence[str | os.PathLike], out: str | os.PathLike) -> Tokenizer:
    """Train ``out/tokenizer.model`` on ``inputs`` (and the world's text, see ``world_examples``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inputs = list(inputs)
    if cfg.world_examples is not None:
        inputs.append(world_text(out / "world.txt", cfg.world_seed, cfg.world_examples))
    return train_tokenizer(inputs, out, vocab_size=cfg.vocab_size, num_threads=cfg.threads, verbose=False)


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a BPE tokenizer (Llama 2's settings, paper §2.1)")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="FILE", help="text (.txt, .gz, .xz) or JSONL files")
    src.add_argument("--default-corpus", action="store_true", help="the corpus shipped with the package")
    t.add_argument("--out", required=True, metavar="DIR", help="writes DIR/tokenizer.model")
    add_config_args(t, TokenizerConfig, config_flag=False)
    for name, help_text in (("encode", "text -> token ids"), ("decode", "token ids -> text")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--tokenizer", required=True, metavar="T", help="tokenizer.model or a model directory")
        p.add_argument("items", nargs="+", metavar="TEXT" if name == "encode" else "ID")
        if name == "encode":
            p.add_argument("--bos", action="store_true", help="prepend BOS")
            p.add_argument("--eos", action="store_true", help="append EOS")
            p.add_argument("--json", action="store_true", help="print only the ids as a JSON list")


def main(args: argparse.Namespace) -> int:
    if args.action == "train":
        cfg = load_config(TokenizerConfig, args)
        tok = train(cfg, default_corpus_files() if args.default_corpus else args.input, args.out)
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
