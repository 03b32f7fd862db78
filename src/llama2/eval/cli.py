"""``llama2 evaluate``: the assistant-world suite on a model directory (and lm-eval-style
multiple-choice tasks in-process).

The suite measures what each alignment stage exists to improve: task accuracy on helpful
prompts, the safe-refusal rate on unsafe prompts, the false-refusal rate on benign prompts
that only look unsafe (§4.2), and Ghost Attention adherence to a system instruction at turns
1, 2, 4, 6, 10 and 20 (the shape of Table 30). Answers are greedy.

``--adapter DIR`` evaluates ``--model`` with a LoRA adapter merged in (for the suite and for
``--task`` alike). It applies to ``--model`` only: a reward model given to ``--reward-model`` /
``--safety-model`` may itself be an adapter directory (it loads as its base + adapter), so the
scorers need no flag of their own, and one adapter cannot fit a policy and a reward model both.

``--perplexity FILE`` instead reports the model's perplexity on a text file the way llama.cpp's
``llama-perplexity -f FILE -c CTX`` computes it (llama2.eval.perplexity), so the two compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from llama2.chat import encode_chat
from llama2.checkpoint import load_model, load_tokenizer
from llama2.data.world import World
from llama2.eval.multiple_choice import evaluate
from llama2.eval.perplexity import perplexity, read_text
from llama2.eval.suite import evaluate_world, format_table
from llama2.generate import Generator, SamplingParams
from llama2.model.quant import parse_quantize
from llama2.recipe import add_config_args, load_config, setting
from llama2.scoring import RewardScorer
from llama2.utils import default_device


def chat_generate_fn(model, tokenizer, max_new_tokens: int = 64, batch_size: int = 32):
    """A ``generate_fn(list of dialogues) -> list of answers`` over our batched greedy decoder.
    Dialogues longer than the context keep their system message and lose their oldest turns."""
    gen = Generator(model, tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    limit = model.config.max_seq_len - max_new_tokens

    def encode(messages: Sequence[dict]) -> list[int]:
        msgs = list(messages)
        ids = encode_chat(tokenizer, msgs)
        while len(ids) > limit and len([m for m in msgs if m["role"] != "system"]) > 1:
            first = 1 if msgs[0]["role"] == "system" else 0
            msgs = msgs[:first] + msgs[first + 2:]  # drop the oldest exchange, keep the system prompt
            ids = encode_chat(tokenizer, msgs)
        return ids[-limit:]

    def generate(dialogues: Sequence[Sequence[dict]]) -> list[str]:
        prompts = [encode(d) for d in dialogues]
        # Similar lengths batch together: less padding.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[str] = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            for i, c in zip(idx, gen.generate([prompts[i] for i in idx], params)):
                out[i] = c.text.strip()
        return out

    return generate


def evaluate_model(model_dir: str, split: str = "test", max_items: int | None = 100,
                   gatt_turns: Sequence[int] = (1, 2, 4, 6, 10, 20), gatt_dialogues: int = 30,
                   max_new_tokens: int = 64, reward_model: str | None = None, safety_model: str | None = None,
                   reward_prompts: int = 100, world_seed: int = 0, adapter: str | None = None,
                   quantize: str | None = None) -> dict:
    """Run the assistant-world suite on a model directory; see llama2.eval.suite.evaluate_world.
    ``adapter``: a LoRA adapter directory merged into the model (its base). ``quantize``: int8 or
    int4[:GROUP] weight-only quantization of the model (not of the reward models) after loading.
    With ``reward_model`` (and optionally ``safety_model``) it also scores greedy answers to
    ``reward_prompts`` held-out RL prompts with the reward models: ``combined_reward`` is the mean
    of the paper's gated Rc (§3.2.3), the quantity rejection sampling and PPO maximise."""
    scorer, device = None, default_device()
    if reward_model:  # loaded first: a wrong directory fails before minutes of generation
        if reward_prompts < 1:
            raise ValueError(f"reward_prompts must be at least 1, got {reward_prompts}")
        scorer = RewardScorer(reward_model, safety_model or None, device=device)
    model = _load(model_dir, device, adapter, quantize)
    tok = load_tokenizer(model_dir, model.config.vocab_size)
    generate = chat_generate_fn(model, tok, max_new_tokens)
    result = evaluate_world(generate, split=split, max_items=max_items, gatt_turns=tuple(gatt_turns),
                            gatt_dialogues=gatt_dialogues, seed=world_seed)
    if scorer is not None:
        result.update(held_out_reward(generate, scorer, split, reward_prompts, world_seed))
    return result


def held_out_reward(generate, scorer, split: str = "test", n: int = 100, world_seed: int = 0) -> dict:
    """Mean helpfulness, safety and combined reward (probabilities) of ``generate``'s answers to
    ``n`` RL prompts of the bundled world's ``split``, under a ``RewardScorer``."""
    prompts = World(world_seed).rl_prompts(split, n)
    answers = generate([p["messages"] for p in prompts])
    s = scorer.combined([p["messages"] for p in prompts], answers, [p["safety"] for p in prompts])
    return {"combined_reward": s["combined"].mean().item(), "helpful_reward": s["helpful"].mean().item(),
            "safety_reward": s["safety"].mean().item(), "reward_prompts": len(prompts),
            # per prompt, in the order of the world's RL prompts: two models compare prompt by prompt
            "combined_rewards": [round(x, 6) for x in s["combined"].tolist()]}


@dataclass
class EvaluateConfig:
    """The flags of ``llama2 evaluate`` and the ``evaluate`` stage of a ``llama2 run`` recipe
    (the keyword arguments of :func:`evaluate_model` besides the model directories)."""
    split: Literal["train", "val", "test"] = setting("test", "which split of the bundled assistant world (test: "
                                                             "held out)")
    max_items: int = setting(100, "prompts per kind (task / unsafe / benign)")
    gatt_turns: tuple[int, ...] = setting((1, 2, 4, 6, 10, 20), "turns at which GAtt adherence is measured "
                                                               "(Table 30)", metavar="T")
    gatt_dialogues: int = setting(30, "constrained dialogues for GAtt adherence")
    max_new_tokens: int = setting(64, "longest answer")
    reward_prompts: int = setting(100, "held-out RL prompts to score with --reward-model")
    world_seed: int = setting(0, "seed of the bundled assistant world the model was trained on")


def _load(model_dir, device, adapter=None, quantize: str | None = None):
    """The evaluated model: ``model_dir`` (+ a merged adapter), weight-only quantized with ``quantize``."""
    if quantize:
        parse_quantize(quantize)  # a bad spec fails before any weight is read
    return load_model(model_dir, device=device, adapter=adapter, quantize=quantize)  # quantized as it is read


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="model directory (or a LoRA adapter directory: its base with the adapter merged)")
    parser.add_argument("--adapter", metavar="DIR", default=None,
                        help="a LoRA adapter directory (PEFT's format) whose base is --model; it is merged into "
                             "--model's weights for the suite or --task (not into the reward models, which may "
                             "be adapter directories themselves)")
    parser.add_argument("--quantize", metavar="int8|int4[:GROUP]", default=None,
                        help="weight-only quantize --model after loading (as llama2 generate --quantize) to measure "
                             "what quantization costs on the suite, a --task or --perplexity")
    parser.add_argument("--task", metavar="YAML",
                        help="instead of the suite, score an lm-eval multiple-choice task file in-process")
    parser.add_argument("--perplexity", metavar="FILE",
                        help="instead of the suite, report perplexity on a text file as llama.cpp's "
                             "llama-perplexity does (non-overlapping --ctx chunks, second half of each scored)")
    parser.add_argument("--ctx", type=int, default=512, metavar="N",
                        help="with --perplexity: tokens per chunk (llama-perplexity's -c; default: 512)")
    parser.add_argument("--max-chunks", type=int, default=None, metavar="N",
                        help="with --perplexity: score at most the first N chunks (llama-perplexity's --chunks)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N",
                        help="with --perplexity: chunks per forward pass (default: 4)")
    parser.add_argument("--reward-model", metavar="DIR",
                        help="also score answers to held-out RL prompts with this helpfulness reward model")
    parser.add_argument("--safety-model", metavar="DIR", help="safety reward model for the gated combined reward")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_args(parser, EvaluateConfig, config_flag=False)


def main(args: argparse.Namespace) -> int:
    cfg = load_config(EvaluateConfig, args)  # first: a bad value fails before any model is loaded
    if args.perplexity:
        return perplexity_main(args)
    if args.task:
        model = _load(args.model, default_device(), args.adapter, args.quantize)
        tokenizer = load_tokenizer(args.model, model.config.vocab_size)
        result = evaluate(model, tokenizer, args.task).to_dict()
        print(json.dumps(result) if args.json else f"{result['task']}: accuracy {result['acc']:.4f} "
                                                    f"on {result['n']} questions")
        return 0
    result = evaluate_model(args.model, reward_model=args.reward_model, safety_model=args.safety_model,
                            adapter=args.adapter, quantize=args.quantize, **dataclasses.asdict(cfg))
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


def perplexity_main(args: argparse.Namespace) -> int:
    """``llama2 evaluate --perplexity FILE``: one line (or one JSON object)."""
    text = read_text(args.perplexity)  # first: a missing file fails before the model loads
    model = _load(args.model, default_device(), args.adapter, args.quantize)
    tokenizer = load_tokenizer(args.model, model.config.vocab_size)
    result = perplexity(model, tokenizer, text, ctx=args.ctx, max_chunks=args.max_chunks,
                        batch_size=args.batch_size, name=args.perplexity)
    result["file"] = args.perplexity
    if args.quantize:
        result["quantize"] = args.quantize
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.perplexity}: PPL = {result['perplexity']:.4f} +/- {result['stderr']:.5f} "
              f"({result['chunks']} chunks of {result['ctx']} tokens, {result['tokens']} scored)")
    return 0
