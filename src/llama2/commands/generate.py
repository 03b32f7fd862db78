"""``llama2 generate``: complete one prompt with a model directory (ours/HF or Meta's format).

    llama2 generate --model runs/demo/sft --prompt "The capital of France is"
    llama2 generate --model llama-2-7b/ --prompt-file prompt.txt --temperature 0 --max-new-tokens 64
    echo "Once upon a time" | llama2 generate --model DIR --prompt - --json --seed 0
    llama2 generate --model llama-2-7b/ --adapter runs/lora/model --prompt "Hello"
    llama2 generate --model llama-2-7b/ --quantize int8 --prompt "Hello"
    llama2 generate --model codellama-7b/ --prompt "def add(a, b):\n    " --suffix "\n\nprint(add(1, 2))"

``--suffix TEXT`` fills in the middle (Code Llama §2.3): ``--prompt`` is the text before the gap,
``--suffix`` the text after it, and the model writes what goes between, ending it with its
``<EOT>`` token. Only the middle is printed, exactly as it sits between the two (a leading space
included), so ``prefix + middle + suffix`` is the filled text. The prompt is Code Llama's
prefix-suffix-middle format, or suffix-prefix-middle with ``--infill-format spm``; the model's
tokenizer needs Code Llama's infilling pieces (``<PRE>``, ``<SUF>``, ``<MID>``, ``<EOT>``).

``--adapter DIR`` applies a LoRA adapter (PEFT's format) to the model: it is folded into the
weights as they load, so decoding runs exactly as fast as with a plain model.

``--quantize int8|int4[:GROUP]`` quantizes every linear layer after loading (weight-only: int8
per output channel, or int4 with a scale and zero per GROUP = 32/64/128 inputs, default 128) and
decodes with PyTorch's packed kernels (``llama2.model.quant``).

Text is streamed to stdout as it is decoded; ``--json`` prints one object instead:
``{"text", "tokens", "logprobs", "prompt_tokens", "finish_reason"}``. Defaults are Meta's
(temperature 0.6, top-p 0.9); temperature 0 is greedy.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from llama2.checkpoint import load_model, load_state, load_tokenizer
from llama2.generate import Generator, SamplingParams
from llama2.model.quant import parse_quantize
from llama2.tokenizer import infill_tokens
from llama2.utils import check_device

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model/--adapter/--dtype/--device/--no-verify/--compile/--draft-model/--quantize, shared with ``llama2 chat``."""
    p.add_argument("--model", type=Path, required=True, metavar="DIR",
                   help="model directory (config.json + safetensors, or Meta's params.json + consolidated.*.pth); "
                        "a LoRA adapter directory also works: its recorded base with the adapter merged")
    p.add_argument("--adapter", type=Path, default=None, metavar="DIR",
                   help="a LoRA adapter directory (PEFT's adapter_config.json + adapter_model.safetensors) whose "
                        "base is --model; merged into the weights as they load (no slower than the plain model)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="compute dtype (default auto: the stored dtype, but float32 for float16 weights on CPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking the weight files against the model directory's checksums.json "
                        "(one extra read of the weights; faster start)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA graphs on a GPU; on a CPU its matrix-vector products "
                        "become reductions that stream the weights at the memory's speed, 2-3x eager): faster "
                        "decoding after a first call that compiles (~30-60 s)")
    p.add_argument("--draft-model", type=Path, default=None, metavar="DIR",
                   help="speculative decoding: a smaller model with the same tokenizer (e.g. a 7B for a 70B, or a "
                        "small one for a 7B) proposes --draft-tokens tokens that --model checks in one pass; greedy "
                        "output is unchanged, sampled output keeps its distribution, decoding gets faster when the "
                        "draft is often right. Loaded with the same --dtype/--device")
    p.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="tokens the draft proposes per round (default 4, with --draft-model)")
    p.add_argument("--quantize", default=None, metavar="int8|w8a8|int4[:GROUP]",
                   help="quantize every linear layer after loading (weight-only): int8 per output channel, or "
                        "int4 with a scale and zero per GROUP inputs (32, 64 or 128; default 128). Smaller and, "
                        "on CPU, faster; slightly less accurate. w8a8 (CPU): int8 weights and int8 activations "
                        "on fbgemm's kernels, as llama.cpp's q8_0 computes; the fastest on CPUs with VNNI")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6, Meta's chat default)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"most tokens to generate (default {max_new_tokens}); capped by the context")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same output)")


def configure(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT", help="the prompt; '-' reads it from stdin")
    src.add_argument("--prompt-file", type=Path, metavar="PATH", help="read the prompt from a file ('-' = stdin)")
    p.add_argument("--suffix", metavar="TEXT", default=None,
                   help="fill in the middle (Code Llama §2.3): the prompt is the text before the gap, this the "
                        "text after it; prints only the middle, generated until the model's <EOT> (or EOS). "
                        "Needs a tokenizer with Code Llama's infilling pieces")
    p.add_argument("--infill-format", choices=("psm", "spm"), default=None,
                   help="with --suffix: the infilling prompt's order, prefix-suffix-middle (psm, default) or "
                        "suffix-prefix-middle (spm); Code Llama was trained on both")
    add_sampling_args(p)
    p.add_argument("--stop", nargs="+", action="extend", default=[], metavar="S",
                   help="stop before any of these strings (may be given several times)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    p.add_argument("--json", action="store_true",
                   help='print {"text", "tokens", "logprobs", "prompt_tokens", "finish_reason"} as one JSON object')
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print text as it is generated (default); --no-stream prints it at the end")


def read_prompt(args) -> str:
    if args.prompt is not None:
        return sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.prompt_file is not None:
        if str(args.prompt_file) == "-":
            return sys.stdin.read()
        if not args.prompt_file.is_file():
            raise FileNotFoundError(f"{args.prompt_file}: prompt file not found")
        try:
            return args.prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{args.prompt_file}: not UTF-8 text (byte {e.start})") from None
    raise ValueError("no prompt: give --prompt TEXT or --prompt-file PATH ('-' reads stdin for either)")


def load_for_inference(path: Path, dtype: str = "auto", device: str | None = None, verify: bool = True,
                       adapter: Path | None = None, quantize: str | None = None):
    """(model, tokenizer) ready for decoding. The device and the tokenizer (against the model's
    vocabulary) are checked before any weight is read, so a mistake fails fast with one clear
    line. ``verify`` checks the weight files against the directory's checksums. ``adapter``: a
    LoRA adapter directory merged into the model at ``path`` (the tokenizer is the base's).
    ``quantize``: "int8" / "int4" / "int4:GROUP": each linear weight is quantized as it is read
    (after merging an adapter), so the float model is never held whole."""
    device = check_device(device)
    if quantize is not None:
        parse_quantize(quantize)  # a bad spec fails before any weight is read
    # Config only (and the adapter's small tensors, so a broken adapter fails before the base
    # is read); the base's tensors are read lazily below.
    cfg = load_state(path, adapter=adapter, allow_quantized=True)[0]  # a quantized directory loads as it is
    tokenizer = load_tokenizer(path, cfg.vocab_size)
    if dtype == "auto":
        chosen = None
    else:
        chosen = getattr(torch, dtype)
    model = load_model(path, dtype=chosen, device=device, verify=verify, adapter=adapter, quantize=quantize)
    if chosen is None and str(device).startswith("cpu") and model.tok_embeddings.weight.dtype == torch.float16:
        for p in model.parameters():  # float16 matmuls are slow (or missing) on CPU; quantized
            p.data = p.data.float()   # layers hold buffers in their kernels' dtypes and stay as they are
    return model, tokenizer


def make_generator(args, model, tokenizer) -> Generator:
    """The Generator for ``--compile`` / ``--draft-model``: the draft is loaded like the model
    (its tokenizer checked against the model's vocabulary) and refused in one line if it
    cannot draft for it."""
    if args.draft_model is None:
        if args.draft_tokens is not None:
            raise ValueError("--draft-tokens needs --draft-model")
        return Generator(model, tokenizer, compile=args.compile)
    k = 4 if args.draft_tokens is None else args.draft_tokens
    if k < 1:
        raise ValueError(f"--draft-tokens must be >= 1, got {k}")
    if args.compile:
        raise ValueError("--compile cannot be combined with --draft-model yet")
    draft, draft_tok = load_for_inference(args.draft_model, args.dtype, args.device, args.verify)
    if not draft_tok.same_pieces(tokenizer):
        raise ValueError(f"--draft-model {args.draft_model}: its tokenizer is not --model's ({draft_tok.vocab_size} "
                         f"vs {tokenizer.vocab_size} pieces); a draft must share the model's tokenizer")
    return Generator(model, tokenizer, draft=draft, draft_tokens=k)


def sampling_params(args, **extra):
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens, seed=args.seed, **extra)


class MiddleText:
    """A tokenizer whose ``decode`` spells an infilled middle as it sits after the prefix.

    SentencePiece drops the space that starts a text's first piece ("▁x" alone decodes to "x"),
    which is right for a whole text but loses a real space at the start of a middle. Decoding
    after a fixed one-character anchor and cutting the anchor off keeps it (Meta's codellama
    does the same with "☺"). Everything else is the tokenizer's own.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.anchor = tokenizer.encode("a")
        self.anchor_text = tokenizer.decode(self.anchor)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(self.anchor + [int(i) for i in ids])[len(self.anchor_text):]

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def check_infill_args(args) -> None:
    """Flags that make no sense without / with ``--suffix``: one line, before any weight is read."""
    if args.suffix is None:
        if args.infill_format is not None:
            raise ValueError("--infill-format needs --suffix (it orders the infilling prompt)")
        return
    if args.no_bos:
        raise ValueError("--no-bos cannot be combined with --suffix: the infilling prompt starts with BOS "
                         "(Code Llama §2.3)")


def infill_prompt(tokenizer, args, prefix: str) -> list[int]:
    """The infilling prompt (Code Llama §2.3) for ``prefix`` and ``args.suffix``, or a one-line
    error naming the model directory when its tokenizer has no infilling pieces."""
    if not getattr(tokenizer, "has_infilling", False):
        raise ValueError(f"--suffix: {args.model}: the tokenizer has no infilling pieces (<PRE> <SUF> <MID> <EOT>); "
                         "infilling needs a Code Llama model (or a tokenizer extended with them)")
    return infill_tokens(tokenizer, prefix, args.suffix, suffix_first=args.infill_format == "spm")


def main(args) -> int:
    check_infill_args(args)
    params = sampling_params(args, stop=tuple(args.stop), logprobs=args.json)  # validate before loading
    text = read_prompt(args)
    model, tokenizer = load_for_inference(args.model, args.dtype, args.device, args.verify, args.adapter,
                                          args.quantize)
    if args.suffix is not None:
        # The middle ends with <EOT> (Code Llama §2.3); EOS still ends it too.
        ids = infill_prompt(tokenizer, args, text)
        params = replace(params, stop_token_ids=(tokenizer.eot_id,))
        tokenizer = MiddleText(tokenizer)
    else:
        ids = tokenizer.encode(text, bos=not args.no_bos)
    gen = make_generator(args, model, tokenizer)
    gen.check_prompt(ids)  # empty / longer than the context: one line, before any output
    room = gen.max_seq_len - len(ids)
    if params.max_new_tokens > room:
        print(f"llama2 generate: note: the context leaves room for {room} new tokens "
              f"(--max-new-tokens {params.max_new_tokens})", file=sys.stderr)
    if args.json:
        out = gen.generate([ids], params)[0]
        print(json.dumps({
            "text": out.text, "tokens": out.tokens, "logprobs": out.logprobs,
            "prompt_tokens": out.prompt_tokens, "finish_reason": out.finish_reason,
        }, ensure_ascii=False))
    elif args.stream:
        for delta in gen.stream(ids, params):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(gen.generate([ids], params)[0].text)
    if gen.draft is not None and gen.stats["drafted"]:
        print(f"llama2 generate: speculative decoding: {gen.stats['accepted']} of {gen.stats['drafted']} drafted "
              f"tokens accepted ({gen.stats['accepted'] / gen.stats['drafted']:.0%}) in {gen.stats['rounds']} "
              "rounds", file=sys.stderr)
    return 0
