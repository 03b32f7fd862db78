"""``llama2 quantize SRC DST --int8|--int4``: a quantized model directory that reloads as it is.

    llama2 quantize llama-2-7b-chat-hf/ llama-2-7b-chat-int8/ --int8
    llama2 quantize llama-2-70b-chat-hf/ llama-2-70b-chat-int4/ --int4 --group-size 64
    llama2 chat --model llama-2-70b-chat-int4/      # no --quantize: the directory says how

The weights are what ``--quantize int8|int4:GROUP`` computes on load (llama2.model.quant), stored
as plain int8 / two-per-byte 4-bit values with their scales (llama2.checkpoint.quantized); the
source is streamed one tensor at a time. generate, chat, serve and evaluate load the directory
without quantizing again; training, convert and adapters refuse it and want the float model.
transformers, vLLM and llama.cpp's converter do not read it (its model_type says so); for
llama.cpp export GGUF from the float model: ``llama2 convert SRC model.gguf --dtype q4_0``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from llama2.checkpoint import detect_format, load_state, parse_dtype, quantize_dir
from llama2.checkpoint.quantized import check_shapes
from llama2.model import Transformer
from llama2.model.quant import INT4_DEFAULT_GROUP, INT4_GROUPS

from .convert import add_output_args, parse_size, progress_printer


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="float model directory (ours/Hugging Face, Meta's, or a LoRA adapter "
                                              "directory, quantized as its base + the adapter)")
    p.add_argument("dst", metavar="DST", help="new output directory")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--int8", dest="kind", action="store_const", const="int8",
                      help="int8 weights, one scale per output channel (about half of bf16's memory)")
    kind.add_argument("--int4", dest="kind", action="store_const", const="int4",
                      help="4-bit weights with a scale and zero per group of --group-size columns (about a "
                           "quarter of bf16's memory)")
    p.add_argument("--group-size", type=int, default=None, choices=INT4_GROUPS,
                   help=f"int4 group size (default {INT4_DEFAULT_GROUP}; smaller is more accurate and larger)")
    p.add_argument("--dtype", default="auto", choices=("auto", "f32", "f16", "bf16"),
                   help="type of the unquantized embeddings and norms (default: keep the checkpoint's)")
    p.add_argument("--merge-adapter", type=Path, default=None, metavar="DIR",
                   help="a LoRA adapter directory whose base is SRC, merged before quantizing")
    add_output_args(p, "largest safetensors file (default 5GB, as transformers)")


def spec_from_args(args: argparse.Namespace) -> str:
    if args.kind == "int8":
        if args.group_size is not None:
            raise ValueError("--group-size applies to --int4 only (int8 has one scale per output channel)")
        return "int8"
    return f"int4:{args.group_size or INT4_DEFAULT_GROUP}"


def main(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    src, dst = Path(args.src), Path(args.dst)
    if args.tokenizer is not None and not Path(args.tokenizer).is_file():
        raise FileNotFoundError(f"{args.tokenizer}: tokenizer file not found")
    cfg = load_state(src, adapter=args.merge_adapter)[0]  # the config only: fails before anything is written
    check_shapes(cfg, spec)
    with torch.device("meta"):
        total = len(Transformer(cfg).state_dict())
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    merged = f" + adapter {args.merge_adapter}" if args.merge_adapter is not None else ""
    say(f"{src} ({detect_format(src)}){merged}: {cfg.num_params():,} parameters -> {spec} in {dst}")
    start = time.monotonic()
    quantize_dir(src, dst, spec, dtype=parse_dtype(args.dtype), max_shard_bytes=parse_size(args.max_shard_size),
                 tokenizer=args.tokenizer, progress=progress_printer(total, args.quiet), verify=args.verify,
                 adapter=args.merge_adapter)
    if sys.stderr.isatty() and not args.quiet:
        print(file=sys.stderr)
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    say(f"done in {time.monotonic() - start:.1f}s: {dst} ({size / 2**20:,.1f} MiB of weights)")
    return 0
