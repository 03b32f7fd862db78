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

``--against DIR`` instead compares ``--model`` (A) with a second model (B) head to head on the
world's held-out prompts, as the paper's Figure 1 / Figure 12 (win / tie / loss with 95%
intervals) and Figure 11 (the reward models' helpfulness and harmlessness axes) do; see
llama2.eval.headtohead. ``chat_generate_fn`` lives there and is re-exported here.

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

from llama2.checkpoint import load_model, load_tokenizer, parse_dtype
from llama2.data.world import World
from llama2.eval import headtohead
from llama2.eval.headtohead import chat_generate_fn, format_headtohead, head_to_head, headtohead_prompts
from llama2.eval.multiple_choice import evaluate
from llama2.eval.perplexity import perplexity, read_text
from llama2.eval.suite import evaluate_world, format_table
from llama2.model.quant import parse_quantize
from llama2.recipe import add_config_args, load_config, setting
from llama2.scoring import RewardScorer
from llama2.utils import default_device


def evaluate_model(model_dir: str, split: str = "test", max_items: int | None = 100,
                   gatt_turns: Sequence[int] = (1, 2, 4, 6, 10, 20), gatt_dialogues: int = 30,
                   max_new_tokens: int = 64, reward_model: str | None = None, safety_model: str | None = None,
                   reward_prompts: int = 100, world_seed: int = 0, adapter: str | None = None,
                   quantize: str | None = None, dtype: str | None = None) -> dict:
    """Run the assistant-world suite on a model directory; see llama2.eval.suite.evaluate_world.
    ``dtype`` ("f32", "bf16", ...) casts the model's weights (default: as stored).
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
    model = _load(model_dir, device, adapter, quantize, dtype)
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
    headtohead_items: int = setting(50, "held-out prompts per kind (task / unsafe / benign) for --against, and for "
                                        "llama2 run's head-to-head of every stage against SFT (0 there: none)")
    sampled_answers: int = setting(1, "head to head: sampled answers (temperature 0.6, top-p 0.9) per prompt "
                                      "besides the greedy one; 0 = greedy only")

    def suite(self) -> dict:
        """The keyword arguments of :func:`evaluate_model` (the fields but the head-to-head ones)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("headtohead_items", "sampled_answers")}

    def __post_init__(self) -> None:
        for name in ("headtohead_items", "sampled_answers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def _load(model_dir, device, adapter=None, quantize: str | None = None, dtype: str | None = None):
    """The evaluated model: ``model_dir`` (+ a merged adapter), weight-only quantized with
    ``quantize``, its (other) weights cast to ``dtype``."""
    if quantize:
        parse_quantize(quantize)  # a bad spec fails before any weight is read
    return load_model(model_dir, dtype=parse_dtype(dtype), device=device, adapter=adapter,
                      quantize=quantize)  # quantized as it is read


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="model directory (or a LoRA adapter directory: its base with the adapter merged)")
    parser.add_argument("--adapter", metavar="DIR", default=None,
                        help="a LoRA adapter directory (PEFT's format) whose base is --model; it is merged into "
                             "--model's weights for the suite or --task (not into the reward models, which may "
                             "be adapter directories themselves)")
    parser.add_argument("--quantize", metavar="int8|w8a8|int4[:GROUP]", default=None,
                        help="weight-only quantize --model after loading (as llama2 generate --quantize) to measure "
                             "what quantization costs on the suite, a --task or --perplexity")
    parser.add_argument("--dtype", default="auto", choices=("auto", "f32", "f16", "bf16"),
                        help="cast --model's weights (default: as stored); with --quantize, the embeddings and norms")
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
    parser.add_argument("--against", metavar="DIR", default=None,
                        help="instead of the suite, compare --model (A) with this model (B) head to head on the "
                             "world's held-out prompts: win / tie / loss of A with 95%% Wilson intervals and a "
                             "sign test, judged by the world's annotator (and the reward models, if given)")
    parser.add_argument("--reward-model", metavar="DIR",
                        help="also score answers to held-out RL prompts with this helpfulness reward model")
    parser.add_argument("--safety-model", metavar="DIR", help="safety reward model for the gated combined reward")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_args(parser, EvaluateConfig, config_flag=False)


def main(args: argparse.Namespace) -> int:
    cfg = load_config(EvaluateConfig, args)  # first: a bad value fails before any model is loaded
    if args.against and (args.task or args.perplexity):
        raise ValueError("--against compares two models on the assistant world; it cannot be combined with "
                         f"{'--task' if args.task else '--perplexity'}")
    if args.against:
        return against_main(args, cfg)
    if args.perplexity:
        return perplexity_main(args)
    if args.task:
        model = _load(args.model, default_device(), args.adapter, args.quantize, args.dtype)
        tokenizer = load_tokenizer(args.model, model.config.vocab_size)
        result = evaluate(model, tokenizer, args.task).to_dict()
        print(json.dumps(result) if args.json else f"{result['task']}: accuracy {result['acc']:.4f} "
                                                    f"on {result['n']} questions")
        return 0
    result = evaluate_model(args.model, reward_model=args.reward_model, safety_model=args.safety_model,
                            adapter=args.adapter, quantize=args.quantize, dtype=args.dtype,
                            **cfg.suite())
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


def perplexity_main(args: argparse.Namespace) -> int:
    """``llama2 evaluate --perplexity FILE``: one line (or one JSON object)."""
    text = read_text(args.perplexity)  # first: a missing file fails before the model loads
    model = _load(args.model, default_device(), args.adapter, args.quantize, args.dtype)
    tokenizer = load_tokenizer(args.model, model.config.vocab_size)
    result = perplexity(model, tokenizer, text, ctx=args.ctx, max_chunks=args.max_chunks,
                        batch_size=args.batch_size, name=args.perplexity)
    result["file"] = args.perplexity
    if args.quantize:
        result["quantize"] = args.quantize
    result["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.perplexity}: PPL = {result['perplexity']:.4f} +/- {result['stderr']:.5f} "
              f"({result['chunks']} chunks of {result['ctx']} tokens, {result['tokens']} scored)")
    return 0


def same_vocabulary(tok_a, tok_b) -> bool:
    """Whether two tokenizers have the same pieces under the same ids."""
    return len(tok_a) == len(tok_b) and all(tok_a.id_to_piece(i) == tok_b.id_to_piece(i) for i in range(len(tok_a)))


def against_main(args: argparse.Namespace, cfg: EvaluateConfig) -> int:
    """``llama2 evaluate --model A --against B``: the head-to-head table (or one JSON object).
    ``--adapter``, ``--quantize`` and ``--dtype`` apply to A only, so a quantized or adapted
    model can be compared with its original."""
    device = default_device()
    scorer = None
    if args.reward_model:  # loaded first: a wrong directory fails before minutes of generation
        scorer = RewardScorer(args.reward_model, args.safety_model or None, device=device)
    model_a = _load(args.model, device, args.adapter, args.quantize, args.dtype)
    tok_a = load_tokenizer(args.model, model_a.config.vocab_size)
    model_b = _load(args.against, device)
    tok_b = load_tokenizer(args.against, model_b.config.vocab_size)
    if not same_vocabulary(tok_a, tok_b):
        raise ValueError(f"{args.model} and {args.against} do not share a tokenizer vocabulary "
                         f"({len(tok_a)} and {len(tok_b)} pieces); head to head needs the same one")
    world = World(cfg.world_seed)
    prompts = headtohead_prompts(world, cfg.split, cfg.headtohead_items or cfg.max_items)
    modes = ("greedy", "sampled") if cfg.sampled_answers else ("greedy",)
    result = head_to_head(model_a, model_b, tok_a, world, headtohead.make_annotator(world), prompts, modes=modes,
                          sampled_answers=cfg.sampled_answers, max_new_tokens=cfg.max_new_tokens,
                          seed=cfg.world_seed, scorer=scorer)
    result.update({"model": args.model, "against": args.against, "split": cfg.split})
    if args.json:
        print(json.dumps(result))
    else:
        print(f"A: {args.model}\nB: {args.against}")
        print(format_headtohead(result, "A", "B"))
    return 0
