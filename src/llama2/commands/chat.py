"""``llama2 chat``: talk to a chat model in the terminal, in Llama 2-Chat's format.

    llama2 chat --model runs/demo/sft
    llama2 chat --model llama-2-7b-chat/ --system "Answer in one sentence." --temperature 0
    llama2 chat --model llama-2-7b/ --adapter runs/lora/model   # a LoRA adapter, merged as it loads
    llama2 chat --model llama-2-7b-chat/ --quantize int4        # int4 weights (or int8, int4:GROUP)

Each answer is streamed as it is decoded. The conversation is re-encoded every turn with
Meta's format (one BOS ... EOS per exchange); when it would no longer leave
``--max-new-tokens`` of room in the context, the oldest exchanges are forgotten (never the
system prompt). Commands: ``/reset`` forgets the conversation, ``/exit`` (or Ctrl-D) quits,
``/help`` lists them. Answers go to stdout; notes and errors to stderr, so a piped session's
stdout holds just the answers, one per line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from llama2.chat_session import ChatSession
from llama2.commands.generate import (
    add_model_args,
    add_sampling_args,
    load_for_inference,
    make_generator,
    sampling_params,
)
from llama2.generate import ContextOverflow

HELP = "commands: /reset forgets the conversation, /exit (or Ctrl-D) quits, /help shows this"


def configure(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--system", metavar="TEXT", default=None, help="system prompt, kept for the whole conversation")
    add_sampling_args(p, max_new_tokens=512)


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_line(interactive: bool) -> str | None:
    """The next user line, or None at end of input (Ctrl-D / EOF / Ctrl-C at the prompt)."""
    try:
        if interactive:
            return input("> ")
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None
    except (EOFError, KeyboardInterrupt):
        if interactive:
            print()
        return None


def main(args) -> int:
    params = sampling_params(args)  # validate before loading
    model, tokenizer = load_for_inference(args.model, args.dtype, args.device, args.verify, args.adapter,
                                          args.quantize)
    gen = make_generator(args, model, tokenizer)
    session = ChatSession(tokenizer, gen.max_seq_len, params.max_new_tokens, args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        what = f"{args.model} + adapter {args.adapter}" if args.adapter is not None else f"{args.model}"
        note(f"chatting with {what} ({gen.max_seq_len}-token context); {HELP}")
    turn = 0
    while True:
        line = read_line(interactive)
        if line is None:
            break
        user = line.strip()
        if not user:
            continue
        if user.startswith("/"):
            command = user.split()[0].lower()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                session.reset()
                note("(conversation cleared)")
            elif command == "/help":
                note(HELP)
            else:
                note(f"unknown command {command}; {HELP}")
            continue
        try:
            ids, dropped = session.prompt(user)
        except ValueError as e:  # special tags, or a message longer than the context
            note(str(e) if not isinstance(e, ContextOverflow) else f"Error: {e}")
            continue
        if dropped:
            note(f"(forgot the {dropped} oldest exchange{'s' * (dropped > 1)} to fit the context)")
        turn_params = params if params.seed is None else dataclasses.replace(params, seed=(params.seed + turn) % 2**63)
        turn += 1
        pieces: list[str] = []
        try:
            for delta in gen.stream(ids, turn_params):
                pieces.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            note("(answer interrupted; it is not kept in the conversation)")
            continue
        sys.stdout.write("\n\n" if interactive else "\n")
        sys.stdout.flush()
        session.add(user, "".join(pieces))
    return 0
