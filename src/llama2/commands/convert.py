"""``llama2 convert SRC DST``: between Meta's release format, our/Hugging Face directories and GGUF.

    llama2 convert llama-2-7b/ llama-2-7b-hf/ --to hf
    llama2 convert llama-2-70b-hf/ llama-2-70b/ --to meta --shards 8
    llama2 convert llama-2-7b-hf/ llama-2-7b.f16.gguf --to gguf --dtype f16
    llama2 convert llama-2-7b-hf/ llama-2-7b.q8_0.gguf --dtype q8_0   # or q4_0: quantized for llama.cpp
    llama2 convert llama-2-7b-hf/ my-model/ --merge-adapter runs/lora/model
    llama2 convert runs/lora/model my-model.gguf      # an adapter directory: its base + the adapter

A LoRA adapter (PEFT's adapter_config.json + adapter_model.safetensors) is folded into the
weights as they are streamed, ``W + scaling * B @ A``, one tensor at a time: the output is a
plain model any tool reads, with nothing left of the adapter.

``--dtype q8_0`` / ``q4_0`` (GGUF only) quantizes the matrices as ``llama-quantize --pure``
does, from the source's float32 values; the norms stay F32 and a matrix whose rows are not a
multiple of 32 is written as F16 (``llama2.checkpoint.gguf``).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from llama2.checkpoint import CheckpointError, convert, detect_format, load_state, parse_dtype, staged
from llama2.checkpoint.gguf import GGUF_QUANTS, export_gguf
from llama2.model import Transformer

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
          "KI": 1024, "MI": 1024**2, "GI": 1024**3, "TI": 1024**4}


def parse_size(text: str) -> int:
    """'5GB' / '500MiB' / '1000000' -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"invalid size {text!r}; use e.g. 5GB, 500MiB or a number of bytes")
    unit = (m.group(2) or "").upper().removesuffix("B")
    return int(float(m.group(1)) * _UNITS[unit])


def progress_printer(total: int, quiet: bool):
    """A ``progress(name)`` callback: "[i/total] name" on one rewritten line on a terminal,
    every tenth of the way otherwise (logs), nothing with ``quiet``."""
    done = 0
    tty = sys.stderr.isatty()

    def progress(name: str) -> None:
        nonlocal done
        done += 1
        if quiet:
            return
        if tty:
            print(f"\r  [{done}/{total}] {name:<48}", end="", file=sys.stderr, flush=True)
        elif done == total or done % max(1, total // 10) == 0:
            print(f"  [{done}/{total}] {name}", file=sys.stderr, flush=True)

    return progress


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="model directory: Meta's (params.json + consolidated.NN.pth), "
                                              "ours/Hugging Face (config.json + *.safetensors), or a LoRA "
                                              "adapter directory (written as its recorded base + the adapter)")
    p.add_argument("dst", metavar="DST", help="output directory (hf, meta) or .gguf file (gguf)")
    p.add_argument("--to", choices=("hf", "meta", "gguf"), default=None,
                   help="target format (default: gguf if DST ends in .gguf; else hf when an adapter is merged, "
                        "else the other of hf/meta)")
    p.add_argument("--merge-adapter", type=Path, default=None, metavar="DIR",
                   help="a LoRA adapter directory (PEFT's format) whose base is SRC: DST is SRC with the "
                        "adapter merged into its weights, a plain model")
    p.add_argument("--shards", type=int, default=1, metavar="N",
                   help="model-parallel files for --to meta (Meta used 1 for 7B, 2 for 13B, 8 for 70B)")
    p.add_argument("--dtype", default="auto", choices=("auto", "f32", "f16", "bf16", *GGUF_QUANTS),
                   help="cast the weights (default: keep the checkpoint's); q8_0, q4_0, q6_k and q4_k "
                        "(GGUF only) quantize the matrices as llama-quantize --pure does")
    add_output_args(p, "largest safetensors file for --to hf (default 5GB, as transformers)")


def add_output_args(p: argparse.ArgumentParser, shard_help: str) -> None:
    """--tokenizer, --max-shard-size, --no-verify, --quiet: shared by convert and quantize."""
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="tokenizer.model to ship (default: the one beside or one folder above SRC)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help=shard_help)
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking SRC's weight files against its checksums.json")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def _target(args, src_format: str) -> str:
    if args.to:
        return args.to
    if str(args.dst).lower().endswith(".gguf"):
        return "gguf"
    if args.merge_adapter is not None or src_format == "peft":
        return "hf"  # merging an adapter makes a model, not a change of format: keep the common one
    return "hf" if src_format == "meta" else "meta"


def main(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    quant = args.dtype if args.dtype in GGUF_QUANTS else None
    dtype = None if quant else parse_dtype(args.dtype)
    max_shard_bytes = parse_size(args.max_shard_size)
    if args.tokenizer is not None and not Path(args.tokenizer).is_file():
        raise FileNotFoundError(f"{args.tokenizer}: tokenizer file not found")
    src_format = detect_format(src)
    to = _target(args, src_format)
    if quant and to != "gguf":
        raise ValueError(f"--dtype {quant} quantizes for llama.cpp: it needs a GGUF target (a .gguf DST or "
                         f"--to gguf), not {to}")
    if to == "gguf" and dst.is_dir():
        dst = dst / f"{src.resolve().name}{'.' + args.dtype if dtype is not None or quant else ''}.gguf"
    if to != "meta" and args.shards != 1:
        raise ValueError("--shards applies to --to meta only")

    # Reads only the config (and, for Meta's vocab_size -1, one header; an adapter's own small
    # tensors, so a broken adapter fails before anything is written).
    cfg, _, _ = load_state(src, adapter=args.merge_adapter)
    with torch.device("meta"):
        n_tensors = len(Transformer(cfg).state_dict())
    total = n_tensors * (args.shards if to == "meta" else 1)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    merged = f" + adapter {args.merge_adapter}" if args.merge_adapter is not None else ""
    say(f"{src} ({src_format}){merged}: {cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} heads "
        f"({cfg.n_kv_heads} kv), vocab {cfg.vocab_size}, {cfg.num_params():,} parameters")
    shards = f", {args.shards} shard(s)" if to == "meta" else ""
    say(f"writing {to}{shards}{f' as {args.dtype}' if dtype or quant else ''} -> {dst}")

    start = time.monotonic()
    tty = sys.stderr.isatty()
    progress = progress_printer(total, args.quiet)

    if quant:
        # convert()'s dtype is a torch dtype: the quantization goes to export_gguf, staged as convert does
        if src.resolve() == dst.resolve():
            raise CheckpointError(f"{dst}: output must differ from the input")
        if dst.is_dir():
            raise CheckpointError(f"{dst}: is a directory; a GGUF target is a file")

        def log(line: str) -> None:
            if tty and not args.quiet:
                print(file=sys.stderr)
            say(f"  {line}")

        with staged(dst, directory=False) as tmp:
            export_gguf(src, tmp, tokenizer_path=args.tokenizer, progress=progress, verify=args.verify,
                        adapter=args.merge_adapter, quant=quant, log=log)
        out = dst
    else:
        out = convert(src, dst, to, n_shards=args.shards, max_shard_bytes=max_shard_bytes, dtype=dtype,
                      tokenizer=args.tokenizer, progress=progress, verify=args.verify, adapter=args.merge_adapter)
    if tty and not args.quiet:
        print(file=sys.stderr)
    say(f"done in {time.monotonic() - start:.1f}s: {out}")
    return 0
