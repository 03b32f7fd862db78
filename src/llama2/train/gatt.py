"""``llama2 gatt``: Ghost Attention (paper §3.3) — keeping a system instruction over many turns.

1. Take multi-turn dialogues and an instruction (constraints combined at random and
   shortened half the time; the bundled world provides both).
2. Write the instruction before *every* user message and get the answers: sampled from the
   current model (``--answers model``) or taken from the data (``--answers data``, the
   bundled world's gold answers, which satisfy the instruction).
3. For training keep the instruction only once, as the system message of the first turn,
   and zero the loss on every token of earlier turns, the assistant's answers included:
   the model learns to answer turn t as the instruction says while seeing it only at turn 1.
4. Fine-tune on it with the same trainer as SFT, mixed with ordinary SFT data so that the
   other skills are kept.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llama2.chat import encode_chat, validate_dialogue
from llama2.checkpoint import load_model, load_state, load_tokenizer
from llama2.data.chat_data import to_messages, tokenize_conversation
from llama2.data.world import World
from llama2.generate import Generator, SamplingParams
from llama2.recipe import add_config_args, dump_recipe, load_config, setting
from llama2.train.finetune import FinetuneConfig, finetune
from llama2.train.state import check_resume
from llama2.utils import DataError, default_device, log_to_stderr, read_jsonl


@dataclass
class GAttConfig(FinetuneConfig):
    out: str = setting("runs/gatt", "run folder: metrics.jsonl, checkpoints/, model/", metavar="DIR")
    model: str = setting("runs/sft/model", "chat model to start from (and to sample answers with)", metavar="DIR")
    answers: Literal["data", "model"] = setting(
        "data", "data: the dialogues' own answers (which follow the instruction); model: sample them from "
                "--model with the instruction written before every user turn (§3.3)")
    data: str = setting("", "multi-turn dialogues, JSONL {\"messages\": [...], \"instruction\": ...}; empty: "
                            "the bundled assistant world", metavar="FILE")
    instructions: str = setting("", "text file of instructions, one per line, combined at random for dialogues "
                                    "without one (--data only)", metavar="FILE")
    dialogues: int = setting(1500, "dialogues drawn from the bundled world when --data is empty")
    min_turns: int = setting(2, "fewest turns of a bundled dialogue")
    max_turns: int = setting(20, "most turns of a bundled dialogue (Table 30 measures up to 20)")
    sft_examples: int = setting(1500, "ordinary SFT examples from the bundled world mixed in, so other skills stay")
    temperature: float = setting(0.7, "sampling temperature with --answers model")
    max_new_tokens: int = setting(64, "longest sampled answer with --answers model")
    world_seed: int = setting(0, "seed of the bundled assistant world")


def with_instruction_everywhere(messages: list[dict], instruction: str) -> list[dict]:
    """The sampling view (§3.3): no system message, the instruction before every user turn."""
    return [{"role": m["role"], "content": f"{instruction}\n{m['content']}" if m["role"] == "user" else m["content"]}
            for m in messages if m["role"] != "system"]


def gatt_example(messages: list[dict], instruction: str, upto: int) -> tuple[list[dict], int]:
    """The training view of the first ``upto`` exchanges: the instruction as the first turn's
    system message only, and the index of the one exchange that carries the loss (the last)."""
    turns = [m for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": instruction}] + turns[: 2 * upto], upto - 1


def combine_instructions(pool: list[str], rng: random.Random) -> str:
    """One or two instructions from the pool, as the paper combines constraints at random."""
    k = 1 if len(pool) < 2 or rng.random() < 0.6 else 2
    return " ".join(rng.sample(pool, k))


def sample_answers(model_dir: str, dialogues: list[tuple[list[dict], str]], cfg: GAttConfig, log) -> list[list[dict]]:
    """Answer each dialogue's user turns with the model, the instruction before every user turn;
    returns the dialogues (without system message) with the sampled answers."""
    model = load_model(model_dir, device=default_device())
    tok = load_tokenizer(model_dir, model.config.vocab_size)
    gen = Generator(model, tok)
    users = [[m["content"] for m in msgs if m["role"] == "user"] for msgs, _ in dialogues]
    answered: list[list[dict]] = [[] for _ in dialogues]
    limit = model.config.max_seq_len - cfg.max_new_tokens
    for turn in range(max(len(u) for u in users)):
        rows, prompts = [], []
        for i, (u, (_, instruction)) in enumerate(zip(users, dialogues)):
            if turn >= len(u) or len(answered[i]) < 2 * turn:
                continue  # finished, or stopped early at the context limit
            msgs = answered[i] + [{"role": "user", "content": u[turn]}]
            ids = encode_chat(tok, with_instruction_everywhere(msgs, instruction))
            if len(ids) <= limit:
                rows.append(i)
                prompts.append(ids)
        params = SamplingParams(temperature=cfg.temperature, top_p=0.9, max_new_tokens=cfg.max_new_tokens,
                                seed=cfg.seed + turn)
        for start in range(0, len(prompts), 32):
            outs = gen.generate(prompts[start:start + 32], params)
            for i, out in zip(rows[start:start + 32], outs):
                answered[i] += [{"role": "user", "content": users[i][turn]},
                                {"role": "assistant", "content": out.text.strip() or "..."}]
        log(f"sampled turn {turn + 1}: {len(prompts)} answers")
    return answered


def build_examples(cfg: GAttConfig, tokenizer, log) -> tuple[list, list]:
    rng = random.Random(cfg.seed)
    if cfg.data:
        pool = [line.strip() for line in Path(cfg.instructions).read_text().splitlines() if line.strip()] \
            if cfg.instructions else []
        dialogues = []
        for n, row in read_jsonl(cfg.data):
            instruction = row.get("instruction") or (combine_instructions(pool, rng) if pool else None)
            try:
                if not instruction:
                    raise ValueError("no 'instruction' and no --instructions file")
                msgs = to_messages(row)
                validate_dialogue(msgs, allow_final_assistant=True)
            except ValueError as e:
                raise DataError(f"{cfg.data}:{n}: {e}") from None
            dialogues.append((msgs, instruction))
        extra = []
    else:
        world = World(cfg.world_seed)
        rows = world.gatt_dialogues("train", cfg.dialogues, turns=(cfg.min_turns, cfg.max_turns))
        dialogues = [(r["messages"], r["constraint"]["text"]) for r in rows]
        extra = [r["messages"] for r in world.sft_examples("train", cfg.sft_examples)] if cfg.sft_examples else []
    if cfg.answers == "model":
        answered = sample_answers(cfg.model, dialogues, cfg, log)
        dialogues = [(msgs, instruction) for msgs, (_, instruction) in zip(answered, dialogues) if msgs]
    examples = []
    for msgs, instruction in dialogues:
        n_turns = sum(m["role"] == "assistant" for m in msgs if m["role"] != "system")
        if n_turns == 0:
            continue
        # One training view per dialogue, cut after a random turn: every turn depth is learned.
        upto = rng.randint(1, n_turns)
        view, loss_turn = gatt_example(msgs, instruction, upto)
        examples.append(tokenize_conversation(tokenizer, view, loss_turns=[loss_turn]))
    log(f"GAtt data: {len(examples):,} dialogues ({cfg.answers} answers) + {len(extra):,} SFT examples")
    examples += [tokenize_conversation(tokenizer, m) for m in extra]
    random.Random(cfg.seed).shuffle(examples)
    n_val = max(1, len(examples) // 50)
    return examples[n_val:], examples[:n_val]


def run(cfg: GAttConfig, quiet: bool = False) -> dict:
    check_resume(cfg.out, cfg.resume)  # refused before sampling
    model_cfg = load_state(cfg.model)[0]
    tokenizer = load_tokenizer(cfg.model, model_cfg.vocab_size)
    log = log_to_stderr(quiet)
    train, val = build_examples(cfg, tokenizer, log)
    return finetune(cfg, train, val, tokenizer, run_config=cfg, quiet=quiet)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Without --config the tiny recipe's gatt block applies "
                     "(src/llama2/resources/recipes/tiny.yaml), starting from runs/sft/model.")
    add_config_args(parser, GAttConfig)


def main(args: argparse.Namespace) -> int:
    cfg = load_config(GAttConfig, args, stage="gatt")
    if getattr(args, "print_config", False):
        print(dump_recipe(cfg), end="")
        return 0
    run(cfg)
    return 0
