"""Multiple-choice evaluation in-process, scored the way lm-evaluation-harness scores it.

The task is the one the package ships in lm-eval's YAML format (``lm_eval_task/``), so the
same questions can be run through ``llama2 serve`` with lm-eval's ``local-completions``
model and the two accuracies compared. For each question, every choice is scored by the
summed log-probability of its tokens after the context; the prediction is the best choice
(``acc``) or the best per character of the choice (``acc_norm``).

Tokenization follows lm-eval's ``_encode_pair`` for causal models with ``add_bos_token``:
trailing spaces of the context move to the continuation, context+continuation is encoded
as one string with one BOS, and the continuation is whatever follows the context's tokens.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jinja2
import torch
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from llama2.checkpoint import load_model, load_tokenizer

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_task"
DEFAULT_TASK = TASK_DIR / "llama2_assistant_mc.yaml"


class _TaskLoader(yaml.SafeLoader):
    """Reads lm-eval task YAML; ``!function module.name`` stays a string we do not call."""


_TaskLoader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))


@dataclass
class MultipleChoiceTask:
    name: str
    docs: list[dict]
    doc_to_text: str
    doc_to_choice: str
    doc_to_target: str
    target_delimiter: str = " "

    @classmethod
    def load(cls, path: str | os.PathLike = DEFAULT_TASK) -> MultipleChoiceTask:
        path = Path(path)
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader)
        if cfg.get("output_type") != "multiple_choice":
            raise ValueError(f"{path}: output_type must be multiple_choice, got {cfg.get('output_type')!r}")
        data_file = (cfg.get("dataset_kwargs") or {}).get("data_file")
        if not data_file:
            raise ValueError(f"{path}: dataset_kwargs.data_file (the JSONL beside the YAML) is missing")
        for key in ("doc_to_text", "doc_to_choice", "doc_to_target"):
            if not isinstance(cfg.get(key), str) or cfg[key].startswith("!function"):
                raise ValueError(f"{path}: {key} must be a Jinja template or a field name")
        docs = _read_docs(path.parent / data_file)
        return cls(cfg["task"], docs, cfg["doc_to_text"], cfg["doc_to_choice"], cfg["doc_to_target"],
                   cfg.get("target_delimiter", " "))

    # The doc_to_* rules of lm-eval's ConfigurableTask: a field name, or a Jinja template
    # rendered with StrictUndefined and kept trailing newlines (a list literal for choices).
    def _render(self, template: str, doc: dict):
        if template in doc:
            return doc[template]
        # A task file is someone else's file: its templates render in Jinja's sandbox, where
        # attribute walks such as ``cycler.__init__.__globals__`` are refused, not executed.
        env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        try:
            return env.from_string(template).render(**doc)
        except SecurityError as e:
            raise ValueError(f"task {self.name}: template {template!r} is not allowed: {e}") from None

    def context(self, doc: dict) -> str:
        return self._render(self.doc_to_text, doc)

    def choices(self, doc: dict) -> list[str]:
        value = self._render(self.doc_to_choice, doc)
        return list(value) if isinstance(value, list) else list(ast.literal_eval(value))

    def target(self, doc: dict) -> int:
        value = self._render(self.doc_to_target, doc)
        if isinstance(value, str):
            value = int(value) if value.isdigit() else self.choices(doc).index(value)
        return int(value)


def _read_docs(path: Path) -> list[dict]:
    """The task's JSONL, one document per line; a bad line is named by file and line."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the task's data file ({e.strerror})") from None
    docs = []
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
            if line.strip():
                docs.append(json.loads(line))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{number}: not UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if docs and not isinstance(docs[-1], dict):
            raise ValueError(f"{path}:{number}: each line must be a JSON object")
    return docs


@dataclass
class ItemResult:
    index: int
    gold: int
    pred: int
    pred_norm: int
    loglikelihoods: list[float]


@dataclass
class MultipleChoiceResult:
    task: str
    n: int
    acc: float
    acc_norm: float
    items: list[ItemResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's context/continuation split, with one BOS in front of the context."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, bos=True)
    ctx = tokenizer.encode(context, bos=True)
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def loglikelihoods(model, pairs: Sequence[tuple[list[int], list[int]]]) -> list[float]:
    """Summed log-prob of each continuation after its context, in one right-padded batch.

    Right padding is harmless here: attention is causal, so no real position sees it.
    """
    device = next(model.parameters()).device
    seqs = [ctx + cont for ctx, cont in pairs]
    width = max(len(s) for s in seqs)
    tokens = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    logp = torch.log_softmax(model(tokens).float(), dim=-1)
    out = []
    for i, (ctx, cont) in enumerate(pairs):
        # Token t is predicted at position t - 1.
        positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=device)
        targets = torch.tensor(cont, dtype=torch.long, device=device)
        out.append(float(logp[i, positions, targets].sum()))
    return out


def evaluate(model, tokenizer, task: str | os.PathLike | MultipleChoiceTask = DEFAULT_TASK,
             limit: int | None = None) -> MultipleChoiceResult:
    """Accuracy of ``model`` on a multiple-choice task (default: the shipped lm-eval task)."""
    if not isinstance(task, MultipleChoiceTask):
        task = MultipleChoiceTask.load(task)
    model.eval()
    items = []
    for index, doc in enumerate(task.docs[:limit]):
        context, choices = task.context(doc), task.choices(doc)
        pairs = [encode_pair(tokenizer, context, task.target_delimiter + c) for c in choices]
        lls = loglikelihoods(model, pairs)
        pred = max(range(len(lls)), key=lls.__getitem__)
        pred_norm = max(range(len(lls)), key=lambda i: lls[i] / len(choices[i]))
        items.append(ItemResult(index, task.target(doc), pred, pred_norm, lls))
    n = len(items)
    return MultipleChoiceResult(
        task=task.name, n=n,
        acc=sum(it.pred == it.gold for it in items) / n if n else 0.0,
        acc_norm=sum(it.pred_norm == it.gold for it in items) / n if n else 0.0,
        items=items,
    )


def evaluate_task(model_dir: str | os.PathLike, task: str | os.PathLike = DEFAULT_TASK,
                  limit: int | None = None, device: str = "cpu") -> dict:
    """``llama2 evaluate --task``: score a model directory on a task; a JSON-ready dict."""
    model = load_model(model_dir, device=device)
    tokenizer = load_tokenizer(model_dir, model.config.vocab_size)
    return evaluate(model, tokenizer, task, limit).to_dict()
