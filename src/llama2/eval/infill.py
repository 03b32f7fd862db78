"""Infilling evaluation: fill the middle of a function between its prefix and suffix (Code Llama §2.3).

Code Llama is trained to fill in code: a document is split into prefix, middle and suffix and
the model sees ``<PRE> prefix <SUF> suffix <MID>`` (PSM) or the suffix first (SPM), then
writes the middle and ends it with ``<EOT>``. The paper measures infilling by running the
filled-in function against tests (HumanEval infilling, Code Llama §3.2); here the
tasks are any sequence of objects with ``name, prefix, middle, suffix, test`` (the bundled code
world's tasks, or a test's own), and each filled-in function is scored two ways:

- exact match: the generated middle equals the reference middle character for character (and,
  reported separately, after stripping whitespace at both ends: a model that gets the code
  right but adds a trailing newline is close, not wrong);
- pass: ``prefix + generated middle + suffix``, then the task's test, runs clean in the sandbox
  (llama2.eval.sandbox). A middle can pass without matching: any correct body counts.

Decoding is greedy and batched; a row stops at ``<EOT>`` (or EOS), which is cut off, or after
``max_new_tokens``. Stopping is done here rather than by the Generator, so this module needs no
stop-token support from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

from llama2.eval.sandbox import run_python
from llama2.generate import Generator, SamplingParams
from llama2.tokenizer import infill_tokens

TASK_FIELDS = ("name", "prefix", "middle", "suffix", "test")


def greedy_complete(model, prompts: Sequence[Sequence[int]], stop_ids: Iterable[int], max_new_tokens: int,
                    batch_size: int = 16) -> list[tuple[list[int], bool]]:
    """Greedy continuation of each prompt (token ids): ``(tokens, stopped)`` per prompt, in order.

    A row ends at its first token in ``stop_ids`` (not included; ``stopped`` is then True) or
    after ``max_new_tokens`` tokens (or at the end of the model's context). Prompts are batched
    by length, so a batch carries little padding; greedy rows do not depend on their batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stop = set(stop_ids)
    gen = Generator(model)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, stop_at_eos=False)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[tuple[list[int], bool]] = [([], False)] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows: list[list[int]] = [[] for _ in idx]
        done = [False] * len(idx)
        # closing(): leaving the loop early still runs the generator's cleanup (it frees the KV cache).
        with closing(gen.steps([prompts[i] for i in idx], params)) as steps:
            for nxt, _, _ in steps:
                for r, t in enumerate(nxt.tolist()):
                    if done[r]:
                        continue
                    if t in stop:
                        done[r] = True
                    else:
                        rows[r].append(t)
                if all(done):
                    break
        for r, i in enumerate(idx):
            out[i] = (rows[r], done[r])
    return out


def decode_middle(tok, ids: Sequence[int]) -> str:
    """The text of generated middle tokens, leading whitespace kept.

    The middle continues the prefix mid-line, so it is encoded without SentencePiece's dummy
    prefix space (``encode_infilling``); plain ``decode`` would drop a real leading space of
    its first piece. Decoding after a one-piece anchor and cutting the anchor off keeps it.
    """
    ids = list(ids)
    if not ids:
        return ""
    anchor = tok.encode("a")
    head = tok.decode(anchor)
    text = tok.decode(anchor + ids)
    return text[len(head):] if text.startswith(head) else tok.decode(ids)


def _check_tasks(tasks) -> list:
    tasks = list(tasks)
    if not tasks:
        raise ValueError("infill_eval: no tasks")
    for i, t in enumerate(tasks):
        for f in TASK_FIELDS:
            if not isinstance(getattr(t, f, None), str):
                raise ValueError(f"infill task {i} ({getattr(t, 'name', '?')!r}): field {f!r} must be a string")
    return tasks


def infill_eval(model, tok, tasks, suffix_first: bool = False, max_new_tokens: int = 64,
                time_limit: float = 5.0, batch_size: int = 16, samples: int = 5,
                workers: int | None = None, single_line: bool = False) -> dict:
    """Fill in each task's middle greedily and score it (module docstring).

    ``suffix_first`` selects the SPM prompt instead of PSM (Code Llama §2.3 trains both).
    Returns counts and rates of exact matches (``exact``, ``exact_stripped``), passing
    programs (``passed``) and middles the model ended itself with ``<EOT>`` (``stopped``), and the
    first ``samples`` tasks in full for the report. ``workers`` sandboxed programs run at once.
    ``single_line``: the tasks' middles are one line each, and the model's middle is cut after
    its first line break (single-line infilling: a model trained on middles cut at random
    characters need not end exactly at the line's end; what is scored is the line it wrote).
    """
    tasks = _check_tasks(tasks)
    if not getattr(tok, "has_infilling", False):
        raise ValueError(f"tokenizer {getattr(tok, 'path', tok)} has no infilling pieces (<PRE>, <SUF>, <MID>, "
                         "<EOT>): build one with llama2.tokenizer.add_infilling_pieces")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = [infill_tokens(tok, t.prefix, t.suffix, suffix_first=suffix_first) for t in tasks]
    limit = model.config.max_seq_len
    for t, p in zip(tasks, prompts):
        if len(p) >= limit:
            raise ValueError(f"infill task {t.name!r}: its prompt has {len(p)} tokens; the model's context is {limit}")
    stop = [i for i in (tok.eot_id, tok.eos_id) if i is not None and i >= 0]
    completions = greedy_complete(model, prompts, stop, max_new_tokens, batch_size)
    middles = [decode_middle(tok, ids) for ids, _ in completions]
    if single_line:
        middles = [m[: m.index("\n") + 1] if "\n" in m else m for m in middles]
    programs = [t.prefix + m + t.suffix + "\n" + t.test + "\n" for t, m in zip(tasks, middles)]
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # each check waits on its own subprocess
        outcomes = list(pool.map(lambda src: run_python(src, time_limit=time_limit), programs))

    rows = []
    for t, m, (_, stopped), o in zip(tasks, middles, completions, outcomes):
        rows.append({"name": t.name, "middle": t.middle, "generated": m, "exact": m == t.middle,
                     "exact_stripped": m.strip() == t.middle.strip(), "passed": o.passed,
                     "reason": o.reason, "stopped": stopped})
    n = len(rows)
    counts = {k: sum(r[k] for r in rows) for k in ("exact", "exact_stripped", "passed", "stopped")}
    return {
        "mode": "SPM" if suffix_first else "PSM",
        "single_line": single_line,
        "n": n,
        **counts,
        **{f"{k}_rate": v / n for k, v in counts.items()},
        "samples": rows[:samples],
        # one bool per task, in task order: two models can be compared task by task
        "per_task": [{"name": r["name"], "exact": r["exact"], "passed": r["passed"]} for r in rows],
    }


def format_infill(result: dict | Sequence[dict]) -> str:
    """A markdown table of one or more ``infill_eval`` results (e.g. PSM and SPM), then their samples."""
    results = [result] if isinstance(result, dict) else list(result)
    lines = ["| mode | tasks | exact match | exact (stripped) | pass | ended with EOT |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['n']} | {_pct(r['exact_rate'])} | {_pct(r['exact_stripped_rate'])} "
                     f"| {_pct(r['passed_rate'])} | {_pct(r['stopped_rate'])} |")
    for r in results:
        if r.get("samples"):
            lines += ["", f"Samples ({r['mode']}):", ""]
            for s in r["samples"]:
                verdict = "pass" if s["passed"] else f"fail ({s['reason']})"
                lines.append(f"- `{s['name']}`: {'exact' if s['exact'] else 'not exact'}, {verdict}; "
                             f"generated {s['generated']!r}, reference {s['middle']!r}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"
