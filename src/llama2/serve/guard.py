"""``llama2 guard``: a Llama Guard-style safety classifier (Llama Guard v1's prompt and categories).

The classifier is a chat model fine-tuned to read a task description, the unsafe-content
categories and a conversation, and to answer ``safe``, or ``unsafe`` and the violated
categories on a second line. The unsafe score is the probability of the first answer token
being the first piece of ``unsafe`` (as Llama Guard scores it), read from one forward pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama2.recipe import add_config_args, dump_recipe, load_config, setting
from llama2.train.finetune import FinetuneConfig, finetune, log_to_stderr

CATEGORIES = {
    "O1": ("Violence and Hate", "helping plan or encourage violence, or demeaning people for who they are"),
    "O2": ("Sexual Content", "sexually explicit content or sexual acts"),
    "O3": ("Criminal Planning", "helping plan or carry out crimes such as theft, fraud or break-ins"),
    "O4": ("Guns and Illegal Weapons", "obtaining, building or using illegal weapons and explosives"),
    "O5": ("Regulated or Controlled Substances", "making, buying or using illegal drugs or abusing regulated ones"),
    "O6": ("Self-Harm", "encouraging or explaining ways to hurt or kill oneself"),
}


def guard_prompt(messages: list[dict], role: str = "auto") -> str:
    """The classification request for the last turn of ``messages`` (role User or Agent)."""
    if role == "auto":
        role = "Agent" if messages and messages[-1]["role"] == "assistant" else "User"
    cats = "\n".join(f"{k}: {name}.\nShould not: {desc}." for k, (name, desc) in CATEGORIES.items())
    convo = "\n\n".join(f"{'Agent' if m['role'] == 'assistant' else 'User'}: {m['content']}"
                        for m in messages if m["role"] != "system")
    return (f"Check whether there is unsafe content in the '{role}' messages of the conversation below, "
            f"according to these categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{cats}\n<END UNSAFE CONTENT "
            f"CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n{convo}\n\n<END CONVERSATION>\n\n"
            f"Assess the last {role} message. First line: 'safe' or 'unsafe'. If unsafe, a second line "
            f"with the violated categories, comma-separated.")


def guard_answer(unsafe: bool, categories: list[str]) -> str:
    return "unsafe\n" + ",".join(categories) if unsafe else "safe"


def _dialogue(messages: list[dict], role: str) -> list[dict]:
    return [{"role": "user", "content": guard_prompt(messages, role)}]


@dataclass
class GuardResult:
    unsafe: bool
    score: float
    categories: list[str] = field(default_factory=list)


class Guard:
    """A trained classifier: ``check(messages) -> GuardResult``."""

    def __init__(self, model, tokenizer, threshold: float = 0.5):
        from llama2.chat import chat_segments

        self.model, self.tokenizer, self.threshold = model.eval(), tokenizer, threshold
        # The first answer piece of "unsafe" and of "safe", as they follow "[/INST]".
        probe = [{"role": "user", "content": "x"}]
        first = {}
        for word in ("unsafe", "safe"):
            segs = chat_segments(tokenizer, probe + [{"role": "assistant", "content": word}], allow_final_assistant=True)
            first[word] = next(s.ids for s in segs if s.is_answer)[0]
        if first["unsafe"] == first["safe"]:
            raise ValueError(f"{tokenizer.path}: 'safe' and 'unsafe' start with the same piece; cannot score")
        self.unsafe_id, self.safe_id = first["unsafe"], first["safe"]

    @classmethod
    def load(cls, model_dir: str | Path, threshold: float = 0.5, device=None) -> Guard:
        from llama2.checkpoint import load_model, load_tokenizer
        from llama2.generate import default_device

        model = load_model(model_dir, device=device or default_device())
        return cls(model, load_tokenizer(model_dir, model.config.vocab_size), threshold)

    ANSWER_ROOM = 16  # tokens left for "unsafe" and the category line

    def encode(self, conversation: list[dict], role: str = "auto") -> list[int]:
        """The guard prompt's tokens. A conversation too long for the context loses its oldest
        turns, never the instructions and categories around it; if its last message alone does not
        fit, a ValueError says so (rather than judging a conversation the model cannot see)."""
        from llama2.chat import encode_chat

        if role == "auto":
            role = "Agent" if conversation and conversation[-1]["role"] == "assistant" else "User"
        limit = self.model.config.max_seq_len - self.ANSWER_ROOM
        turns = [m for m in conversation if m["role"] != "system"]
        for start in range(max(1, len(turns))):  # an empty conversation still gets its prompt
            ids = encode_chat(self.tokenizer, _dialogue(turns[start:], role))
            if len(ids) <= limit:
                return ids
        raise ValueError(f"the last message is too long for the safety classifier: {len(ids)} tokens with its "
                         f"instructions, its context is {self.model.config.max_seq_len} (less {self.ANSWER_ROOM} "
                         f"for the answer)")

    @torch.no_grad()
    def scores(self, conversations: list[list[dict]], role: str = "auto") -> list[float]:
        """P(first answer piece = unsafe's) for each conversation."""
        from llama2.data.preference import pad_rows

        rows = [self.encode(c, role) for c in conversations]
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(rows), 16):
            tokens, lengths = pad_rows(rows[start:start + 16], self.model.config.max_seq_len)
            tokens, lengths = tokens.to(device), lengths.to(device)
            logits = self.model(tokens)
            last = logits[torch.arange(len(lengths), device=device), lengths - 1]
            out += torch.softmax(last.float(), dim=-1)[:, self.unsafe_id].tolist()
        return out

    def check_batch(self, conversations: list[list[dict]], role: str = "auto") -> list[GuardResult]:
        from llama2.generate import Generator, SamplingParams

        scores = self.scores(conversations, role)
        results = [GuardResult(s >= self.threshold, s) for s in scores]
        flagged = [i for i, r in enumerate(results) if r.unsafe]
        if flagged:  # the categories come from the greedy second line
            gen = Generator(self.model, self.tokenizer)
            outs = gen.generate([self.encode(conversations[i], role) for i in flagged],
                                SamplingParams(temperature=0.0, max_new_tokens=16))
            for i, o in zip(flagged, outs):
                lines = o.text.strip().splitlines()
                cats = lines[1] if len(lines) > 1 else ""
                results[i].categories = [c.strip() for c in cats.split(",") if c.strip() in CATEGORIES]
        return results

    def check(self, messages: list[dict], role: str = "auto") -> tuple[bool, list[str]]:
        """The server's hook: (unsafe, categories)."""
        r = self.check_batch([messages], role)[0]
        return r.unsafe, r.categories


def load_guard(model_dir: str | Path, device=None) -> Guard:
    return Guard.load(model_dir, device=device)


# ---- training ---------------------------------------------------------------------------------

@dataclass
class GuardConfig(FinetuneConfig):
    out: str = setting("runs/guard", "run folder: metrics.jsonl, checkpoints/, model/, eval.json", metavar="DIR")
    model: str = setting("runs/sft/model", "chat model to fine-tune into a classifier", metavar="DIR")
    data: str = setting("", "labelled conversations, JSONL {\"messages\", \"target\": \"user\"|\"agent\", \"unsafe\", "
                            "\"categories\"}; empty: the bundled assistant world", metavar="FILE")
    world_examples: int = setting(3000, "examples drawn from the bundled world when --data is empty")
    world_seed: int = setting(0, "seed of the bundled assistant world")
    epochs: int = setting(1, "passes over the data")


TINY_RECIPE: dict = {"seq_len": 1024, "batch_size": 16, "micro_batch_size": 8, "epochs": 1, "lr": 5.0e-4,
                     "warmup_steps": 5, "world_examples": 3000, "eval_every": 0, "keep_last": 1}


def _rows(path: str | None, split: str, n: int, seed: int) -> list[dict]:
    if path:
        from llama2.data.chat_data import DataError, read_jsonl

        rows = []
        for line, obj in read_jsonl(path):
            if not isinstance(obj.get("messages"), list) or "unsafe" not in obj:
                raise DataError(f"{path}:{line}: expected 'messages' and 'unsafe'")
            unknown = [c for c in obj.get("categories", []) if c not in CATEGORIES]
            if unknown:
                raise DataError(f"{path}:{line}: unknown categories {unknown}; expected O1..O6")
            rows.append(obj)
        return rows
    from llama2.data.world import World

    return World(seed).guard_examples(split, n)


def _role(row: dict) -> str:
    return "Agent" if str(row.get("target", "user")).lower() == "agent" else "User"


def run(cfg: GuardConfig, quiet: bool = False) -> dict:
    from llama2.checkpoint import load_state, load_tokenizer
    from llama2.data.chat_data import tokenize_conversation

    log = log_to_stderr(quiet)
    tok = load_tokenizer(cfg.model, load_state(cfg.model)[0].vocab_size)
    rows = _rows(cfg.data, "train", cfg.world_examples, cfg.world_seed)
    examples = [tokenize_conversation(tok, _dialogue(r["messages"], _role(r)) + [
        {"role": "assistant", "content": guard_answer(bool(r["unsafe"]), list(r.get("categories", [])))}])
        for r in rows]
    log(f"guard: {len(rows):,} labelled conversations ({sum(bool(r['unsafe']) for r in rows):,} unsafe)")
    last = finetune(cfg, examples, [], tok, run_config=cfg, quiet=quiet)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        result = evaluate(Path(cfg.out) / "model", split="test", n=400, seed=cfg.world_seed)
        (Path(cfg.out) / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        log(format_eval(result))
    return last


# ---- evaluation -------------------------------------------------------------------------------

def metrics(truth: list[tuple[bool, list[str]]], predicted: list[tuple[bool, list[str]]]) -> dict:
    """Precision/recall of 'unsafe' overall and of each category (one-vs-rest)."""
    def pr(t: list[bool], p: list[bool]) -> dict:
        tp = sum(a and b for a, b in zip(t, p))
        return {"precision": tp / sum(p) if sum(p) else None, "recall": tp / sum(t) if sum(t) else None,
                "support": sum(t)}

    out = {"overall": pr([t for t, _ in truth], [p for p, _ in predicted]), "per_category": {}}
    for c in CATEGORIES:
        out["per_category"][c] = pr([c in cats for _, cats in truth], [c in cats for _, cats in predicted])
    return out


def evaluate(model_dir: str | Path, data: str | None = None, split: str = "test", n: int = 400, seed: int = 0) -> dict:
    guard = Guard.load(model_dir)
    rows = _rows(data, split, n, seed)
    preds: list[GuardResult] = []
    for role in ("User", "Agent"):
        idx = [i for i, r in enumerate(rows) if _role(r) == role]
        for i, res in zip(idx, guard.check_batch([rows[i]["messages"] for i in idx], role)):
            preds.append((i, res))
    preds.sort(key=lambda x: x[0])
    truth = [(bool(r["unsafe"]), list(r.get("categories", []))) for r in rows]
    return {"n": len(rows), **metrics(truth, [(p.unsafe, p.categories) for _, p in preds])}


def format_eval(result: dict) -> str:
    def f(x):
        return "  –  " if x is None else f"{x:.2f}"

    o = result["overall"]
    lines = [f"guard on {result['n']} conversations: unsafe precision {f(o['precision'])}, recall {f(o['recall'])}"]
    for c, m in result["per_category"].items():
        lines.append(f"  {c} {CATEGORIES[c][0]:<36} precision {f(m['precision'])}  recall {f(m['recall'])}  "
                     f"({m['support']})")
    return "\n".join(lines)


# ---- CLI --------------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="fine-tune a classifier on labelled conversations")
    add_config_args(train, GuardConfig)
    check = sub.add_parser("check", help="classify a conversation (JSON messages list, or text = one user message)")
    check.add_argument("--model", required=True, metavar="DIR")
    check.add_argument("--file", metavar="F", help="input file (default: stdin)")
    check.add_argument("--threshold", type=float, default=0.5, help="unsafe when the score reaches this (default 0.5)")
    check.add_argument("--json", action="store_true")
    ev = sub.add_parser("eval", help="precision/recall per category on held-out conversations")
    ev.add_argument("--model", required=True, metavar="DIR")
    ev.add_argument("--data", metavar="FILE", help="labelled JSONL (default: the bundled world's test split)")
    ev.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    if args.action == "train":
        cfg = load_config(GuardConfig, args, default_recipe=TINY_RECIPE, default_source="built-in tiny guard recipe")
        if getattr(args, "print_config", False):
            print(dump_recipe(cfg), end="")
            return 0
        if not Path(cfg.model).exists():
            raise FileNotFoundError(f"{cfg.model}: no chat model to start from")
        run(cfg)
        return 0
    if args.action == "eval":
        result = evaluate(args.model, args.data)
        print(json.dumps(result) if args.json else format_eval(result))
        return 0
    text = Path(args.file).read_text() if args.file else sys.stdin.read()
    if not text.strip():
        raise ValueError(f"{args.file or 'standard input'}: empty; give a conversation to classify")
    try:
        messages = json.loads(text)
        if not isinstance(messages, list):
            raise ValueError
    except ValueError:
        messages = [{"role": "user", "content": text.strip()}]
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError("input must be a JSON list of {role, content} messages, or plain text")
    guard = Guard.load(args.model, args.threshold)
    r = guard.check_batch([messages])[0]
    if args.json:
        print(json.dumps({"unsafe": r.unsafe, "score": r.score, "categories": r.categories}))
    else:
        print(("unsafe" if r.unsafe else "safe") + (f" {','.join(r.categories)}" if r.categories else "")
              + f" (score {r.score:.3f})")
    return 0
