"""``llama2 sft``: supervised fine-tuning of a pretrained model into a chat model (paper §3.1).

Conversations in Meta's chat format, the loss on the assistant's answers (and their EOS) only,
several conversations packed per sequence without seeing each other. Defaults are the
paper's (cosine from 2e-5, weight decay 0.1, batch 64, 2 epochs); without ``--config`` the
tiny recipe's ``sft`` block (tiny.yaml) applies, which continues ``llama2 pretrain``'s
default output on the bundled assistant world.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from llama2.checkpoint import load_state, load_tokenizer
from llama2.data.chat_data import load_conversations, tokenize_conversation
from llama2.data.world import World
from llama2.recipe import add_config_args, dump_recipe, load_config, setting
from llama2.train.finetune import FinetuneConfig, finetune
from llama2.train.state import check_resume
from llama2.utils import log_to_stderr


@dataclass
class SFTConfig(FinetuneConfig):
    data: str = setting("", "training conversations, JSONL ({\"messages\": [...]} or {\"prompt\", "
                            "\"completion\"}); empty: the bundled assistant world's train split", metavar="FILE")
    val_data: str = setting("", "validation conversations, JSONL; empty: the bundled world's validation split "
                                "when training on it, else none", metavar="FILE")
    world_examples: int = setting(4000, "examples drawn from the bundled assistant world when --data is empty")
    world_seed: int = setting(0, "seed of the bundled assistant world")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Without --config the tiny recipe's sft block applies (src/llama2/resources/recipes/"
                     "tiny.yaml: the output of `llama2 pretrain` on the bundled assistant world); the dataclass "
                     "defaults are the paper's.")
    add_config_args(parser, SFTConfig)


def load_examples(cfg: SFTConfig, tokenizer) -> tuple[list, list]:
    """Tokenized (train, validation) conversations, each with answer-only labels."""
    if cfg.data:
        train_msgs = load_conversations(cfg.data)
        val_msgs = load_conversations(cfg.val_data) if cfg.val_data else []
    else:
        world = World(cfg.world_seed)
        train_msgs = [row["messages"] for row in world.sft_examples("train", cfg.world_examples)]
        val_msgs = [row["messages"] for row in world.sft_examples("val", max(50, cfg.world_examples // 20))]
    return ([tokenize_conversation(tokenizer, m) for m in train_msgs],
            [tokenize_conversation(tokenizer, m) for m in val_msgs])


def run(cfg: SFTConfig, quiet: bool = False) -> dict:
    check_resume(cfg.out, cfg.resume)  # refused before any work
    model_cfg = load_state(cfg.model)[0]  # fails early, naming the directory
    tokenizer = load_tokenizer(cfg.model, model_cfg.vocab_size)
    train, val = load_examples(cfg, tokenizer)
    log_to_stderr(quiet)(f"SFT data: {len(train):,} training and {len(val):,} validation conversations"
                         f" from {cfg.data or 'the bundled assistant world'}")
    return finetune(cfg, train, val, tokenizer, run_config=cfg, quiet=quiet)


def main(args: argparse.Namespace) -> int:
    cfg = load_config(SFTConfig, args, stage="sft")
    if getattr(args, "print_config", False):
        print(dump_recipe(cfg), end="")
        return 0
    if not Path(cfg.model).exists():
        raise FileNotFoundError(f"{cfg.model}: no model to fine-tune (run `llama2 pretrain` first or pass --model)")
    run(cfg)
    return 0
