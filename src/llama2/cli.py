"""The ``llama2`` command: one subcommand per stage of the recipe.

Each subcommand lives in its own module exposing ``configure(parser)`` and ``main(args)``;
modules are imported only when their command runs, so ``llama2 --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("llama2.pipeline", "run the whole Llama 2 recipe end to end, with a report"),
    "tokenizer": ("llama2.commands.tokenizer", "train or inspect a SentencePiece tokenizer"),
    "prepare": ("llama2.data.shards", "tokenize text/JSONL files into token shards"),
    "pretrain": ("llama2.train.pretrain", "pretrain a model on token shards (paper §2.2)"),
    "sft": ("llama2.train.sft", "supervised fine-tuning on chat data (paper §3.1)"),
    "gatt": ("llama2.train.gatt", "Ghost Attention data and fine-tuning (paper §3.3)"),
    "reward": ("llama2.train.reward", "train or evaluate a helpfulness/safety reward model (§3.2.2)"),
    "rejection-sample": ("llama2.train.rejection", "rejection sampling fine-tuning (§3.2.3)"),
    "ppo": ("llama2.train.ppo", "PPO with the safety-gated reward and KL penalty (§3.2.3)"),
    "dpo": ("llama2.train.dpo", "direct preference optimization on preference pairs (beside PPO)"),
    "safety-distill": ("llama2.train.distill", "safety context distillation (§4.2.4)"),
    "generate": ("llama2.commands.generate", "complete a prompt"),
    "chat": ("llama2.commands.chat", "chat with a model in the terminal"),
    "serve": ("llama2.serve.app", "OpenAI-compatible HTTP server"),
    "guard": ("llama2.train.guard", "Llama Guard-style safety classifier"),
    "evaluate": ("llama2.eval.cli", "evaluate a model on the assistant-world suite"),
    "convert": ("llama2.commands.convert", "convert between Meta, Hugging Face and GGUF formats"),
    "quantize": ("llama2.commands.quantize", "write an int8/int4 quantized model directory that reloads as it is"),
    "info": ("llama2.commands.info", "parameters and memory of a preset or model directory"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama2",
        description="The Llama 2 recipe: pretraining, alignment and use, in one package.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        if only is None or name == only:  # only the chosen command's module is imported
            importlib.import_module(module).configure(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 0 if args.command is None else 2
    from llama2.checkpoint import CheckpointError

    try:
        return importlib.import_module(args._module).main(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (CheckpointError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
            PermissionError) as e:
        # Bad input: one line naming the file/field/value, no traceback.
        print(f"llama2 {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
