"""``llama2 safety-distill``: safety context distillation (paper §4.2.4).

Answer adversarial prompts twice: once with a safety preprompt as the system message
("You are a safe and responsible assistant ..." from templates) and once without. Keep the
preprompted answer only where the safety reward model scores it above the plain one (the
paper's targeted distillation: the preprompt can make good answers vaguer), then fine-tune
on the kept answers *without* the preprompt, so the model behaves as if it had read it.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from llama2.checkpoint import load_model, load_scalar_model, load_tokenizer
from llama2.data.chat_data import tokenize_conversation
from llama2.data.world import World
from llama2.recipe import add_config_args, setting
from llama2.scoring import sample_answers, score_answers
from llama2.train.finetune import NO_VALIDATION, FinetuneConfig, finetune, refuse_validation, stage_main
from llama2.train.state import check_resume
from llama2.utils import DataError, default_device, log_to_stderr, read_jsonl

# Safety preprompts, built from templates like the paper's ("You are a safe and responsible
# assistant" plus a risk-specific sentence).
PREPROMPTS = (
    "You are a safe and responsible assistant. Refuse requests that could hurt people, and help with harmless ones.",
    "You are a safe and responsible assistant. Never give instructions for crimes, weapons, drugs or self-harm.",
    "You are a helpful, safe and responsible assistant. Decline harmful requests briefly and politely.",
)


@dataclass
class DistillConfig(FinetuneConfig):
    out: str = setting("runs/safety-distill", "run folder: samples.jsonl, checkpoints/, model/", metavar="DIR")
    model: str = setting("runs/sft/model", "chat model to distill into", metavar="DIR")
    safety_model: str = setting("runs/reward-safety/model", "safety reward model that judges the answers",
                                metavar="DIR")
    data: str = setting("", "adversarial prompts, JSONL {\"messages\"|\"prompt\"}; empty: the bundled world's "
                            "safety prompts", metavar="FILE")
    prompts: int = setting(500, "prompts drawn from the bundled world when --data is empty")
    temperature: float = setting(0.7, "sampling temperature")
    max_new_tokens: int = setting(96, "longest answer")
    epochs: int = setting(1, "fine-tuning passes over the kept answers")
    world_seed: int = setting(0, "seed of the bundled assistant world")
    eval_every: int = setting(0, NO_VALIDATION)
    eval_batches: int = setting(0, NO_VALIDATION)

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_validation(self, "safety distillation")


def load_prompts(cfg: DistillConfig) -> list[list[dict]]:
    if cfg.data:
        out = []
        for n, obj in read_jsonl(cfg.data):
            msgs = obj.get("messages") or ([{"role": "user", "content": obj["prompt"]}] if "prompt" in obj else None)
            if not msgs:
                raise DataError(f"{cfg.data}:{n}: expected 'messages' or 'prompt'")
            out.append(msgs)
        return out

    rows = World(cfg.world_seed).rl_prompts("train", cfg.prompts * 4)
    return [r["messages"] for r in rows if r["safety"]][: cfg.prompts]


def with_preprompt(messages: list[dict], preprompt: str) -> list[dict]:
    rest = [m for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": preprompt}] + rest


def run(cfg: DistillConfig, quiet: bool = False) -> dict:
    check_resume(cfg.out, cfg.resume)  # refused before sampling
    log = log_to_stderr(quiet)
    prompts = load_prompts(cfg)
    rng = random.Random(cfg.seed)
    model = load_model(cfg.model, device=default_device())
    tok = load_tokenizer(cfg.model, model.config.vocab_size)
    preprompted = [with_preprompt(p, rng.choice(PREPROMPTS)) for p in prompts]
    guided = sample_answers(model, tok, preprompted, 1, cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                            seed=cfg.seed)
    plain = sample_answers(model, tok, prompts, 1, cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                           seed=cfg.seed + 1)
    del model
    keep = [i for i in range(len(prompts)) if guided[i] and plain[i]]
    judge = load_scalar_model(cfg.safety_model, device=default_device())
    # Both answers are judged in the plain context: what the distilled model will see.
    g = score_answers(judge, tok, [prompts[i] for i in keep], [guided[i][0] for i in keep])
    p = score_answers(judge, tok, [prompts[i] for i in keep], [plain[i][0] for i in keep])
    chosen = [i for i, better in zip(keep, (g > p).tolist()) if better]
    log(f"safety distillation: the preprompted answer scored higher on {len(chosen)} of {len(keep)} prompts")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w") as f:
        for j, i in enumerate(keep):
            f.write(json.dumps({"messages": prompts[i], "preprompted": guided[i][0], "plain": plain[i][0],
                                "score_preprompted": float(g[j]), "score_plain": float(p[j]),
                                "kept": i in set(chosen)}) + "\n")
    if not chosen:
        raise ValueError("no preprompted answer beat the plain one: nothing to distill")
    examples = [tokenize_conversation(tok, prompts[i] + [{"role": "assistant", "content": guided[i][0]}])
                for i in chosen]
    return finetune(cfg, examples, [], tok, run_config=cfg, quiet=quiet)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Without --config the tiny recipe's safety-distill block applies "
                     "(src/llama2/resources/recipes/tiny.yaml), starting from runs/sft/model.")
    add_config_args(parser, DistillConfig)


def main(args: argparse.Namespace) -> int:
    return stage_main(DistillConfig, args, "safety-distill", run, required=("model", "safety_model"))
