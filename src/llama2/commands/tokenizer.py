"""``llama2 tokenizer``: train a SentencePiece BPE tokenizer with Llama 2's settings, or inspect one.

    llama2 tokenizer train --input FILES... --out DIR [--vocab-size 32000] [--infilling]
    llama2 tokenizer train --default-corpus --out DIR --vocab-size 4096 [--world-examples 3000]
    llama2 tokenizer code-llama LLAMA2_TOKENIZER OUT      # Code Llama's 32,016-piece vocabulary
    llama2 tokenizer encode --tokenizer T "some text"     # ids and pieces
    llama2 tokenizer encode --tokenizer T --infill-suffix "  return x" "def f():"   # PRE/SUF/MID prompt
    llama2 tokenizer decode --tokenizer T 1 15043 3186

``--infilling`` and ``code-llama`` append Code Llama's 16 pieces, among them the infilling
sentinels PRE/SUF/MID/EOT (Code Llama §2.3), after the base vocabulary.

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
from llama2.tokenizer import Tokenizer, add_infilling_pieces, infill_tokens, train_tokenizer


@dataclass
class TokenizerConfig:
    vocab_size: int = setting(32000, "pieces (Llama 2's: 32,000, §2.1)")
    world_examples: int | None = setting(None, "also train on the bundled assistant world's fact sheet and this many "
                                               "of its SFT conversations (what `llama2 run` does); none: the "
                                               "inputs alone")
    world_seed: int = setting(0, "seed of the bundled assistant world")
    threads: int | None = setting(None, "trainer threads (default: CPU count)")
    infilling: bool = setting(False, "append Code Llama's 16 pieces (PRE/SUF/MID/EOT sentinels and their BPE "
                                     "pieces, Code Llama §2.3) after the vocab_size trained ones")

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
    return train_tokenizer(inputs, out, vocab_size=cfg.vocab_size, num_threads=cfg.threads, verbose=False,
                           infilling=cfg.infilling)


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a BPE tokenizer (Llama 2's settings, paper §2.1)")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="FILE", help="text (.txt, .gz, .xz) or JSONL files")
    src.add_argument("--default-corpus", action="store_true", help="the corpus shipped with the package")
    t.add_argument("--out", required=True, metavar="DIR", help="writes DIR/tokenizer.model")
    add_config_args(t, TokenizerConfig, config_flag=False)
    c = sub.add_parser("code-llama", help="Code Llama's vocabulary: a Llama 2 tokenizer.model plus the 16 infilling "
                                          "pieces at ids 32000..32015 (Code Llama §2.3)")
    c.add_argument("src", metavar="SRC", help="the Llama 2 (any SentencePiece BPE) tokenizer.model, or its directory")
    c.add_argument("out", metavar="OUT", help="a .model file, or a directory that gets tokenizer.model")
    for name, help_text in (("encode", "text -> token ids"), ("decode", "token ids -> text")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--tokenizer", required=True, metavar="T", help="tokenizer.model or a model directory")
        p.add_argument("items", nargs="+", metavar="TEXT" if name == "encode" else "ID")
        if name == "encode":
            p.add_argument("--bos", action="store_true", help="prepend BOS")
            p.add_argument("--eos", action="store_true", help="append EOS")
            p.add_argument("--json", action="store_true", help="print only the ids as a JSON list")
            p.add_argument("--infill-suffix", metavar="S", help="encode Code Llama's infilling prompt instead: "
                                                                "TEXT is the prefix, S the suffix (Code Llama §2.3)")
            p.add_argument("--suffix-first", action="store_true", help="with --infill-suffix: the SPM order "
                                                                       "(suffix before prefix)")


def main(args: argparse.Namespace) -> int:
    if args.action == "train":
        cfg = load_config(TokenizerConfig, args)
        tok = train(cfg, default_corpus_files() if args.default_corpus else args.input, args.out)
        print(f"wrote {tok.path} ({tok.vocab_size} pieces)")
        return 0
    if args.action == "code-llama":
        tok = add_infilling_pieces(args.src, args.out)
        print(f"wrote {tok.path} ({tok.vocab_size} pieces; PRE {tok.prefix_id}, SUF {tok.suffix_id}, "
              f"MID {tok.middle_id}, EOT {tok.eot_id})")
        return 0
    tok = Tokenizer(args.tokenizer)
    if args.action == "encode":
        text = " ".join(args.items)
        if args.infill_suffix is not None:
            if args.bos or args.eos:
                raise ValueError("encode: --bos/--eos do not apply to --infill-suffix (the prompt starts with BOS "
                                 "and has no EOS)")
            ids = infill_tokens(tok, text, args.infill_suffix, suffix_first=args.suffix_first)
        elif args.suffix_first:
            raise ValueError("encode: --suffix-first needs --infill-suffix")
        else:
            ids = tok.encode(text, bos=args.bos, eos=args.eos)
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
