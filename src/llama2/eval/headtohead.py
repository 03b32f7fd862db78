"""Head-to-head evaluation: two models answer the same held-out prompts and an annotator picks
the better answer of each pair (``llama2 evaluate --model A --against B``).

This is how the paper reports alignment (§3.4): Figure 1 and Figure 12 give Llama 2-Chat's
win / tie / loss rate against another model as judged by human raters, with 95% confidence
intervals, on about 4,000 helpfulness and safety prompts (§3.4.2, temperature 0.6 / top-p 0.9
sampling); Figure 11 plots each model version's win rate on two axes, helpfulness and
harmlessness, as judged by the reward models (§3.4.1). Here the raters are the bundled
world's annotator (llama2.data.world.annotator), and the prompts are the world's test split:
tasks, unsafe requests and their benign look-alikes, some with a system-prompt constraint.

Statistics: each rate carries a 95% Wilson score interval (it stays inside [0, 1] and keeps
close to its nominal coverage for small n and rates near 0 or 1, where the normal
approximation fails), and whether A beats B is an exact two-sided sign test on the prompts A
won and lost, ties dropped (llama2.eval.stats.sign_test). With several sampled answers per
prompt the outcomes of one prompt are not independent, so the intervals of the sampled mode
are somewhat too narrow; the greedy mode has one outcome per prompt.

``chat_generate_fn`` (the batched chat decoder of ``llama2 evaluate``) lives here so that
``llama2.eval.cli`` can import this module; ``llama2.eval.cli`` re-exports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from llama2.chat import encode_chat
from llama2.eval.stats import sign_test
from llama2.generate import Generator, SamplingParams

OUTCOMES = ("win", "tie", "loss")
SPLITS = ("all", "helpfulness", "safety", "in_knowledge", "out_of_knowledge")
MODES = ("greedy", "sampled")
# §3.4.2: each model's answers are sampled with temperature 0.6 and top-p 0.9 (Meta's chat defaults).
PAPER_TEMPERATURE, PAPER_TOP_P = 0.6, 0.9
Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def chat_generate_fn(model, tokenizer, max_new_tokens: int = 64, batch_size: int = 32,
                     temperature: float = 0.0, top_p: float = 1.0):
    """A ``generate_fn(list of dialogues, seeds=None) -> list of answers`` over our batched
    decoder, greedy by default. Dialogues longer than the context keep their system message and
    lose their oldest turns. With a temperature, ``seeds[i]`` seeds dialogue i's sampling (one RNG
    per row: its answer does not depend on the batch it lands in, so two models given the same
    seeds draw paired samples)."""
    gen = Generator(model, tokenizer)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    limit = model.config.max_seq_len - max_new_tokens

    def encode(messages: Sequence[dict]) -> list[int]:
        msgs = list(messages)
        ids = encode_chat(tokenizer, msgs)
        while len(ids) > limit and len([m for m in msgs if m["role"] != "system"]) > 1:
            first = 1 if msgs[0]["role"] == "system" else 0
            msgs = msgs[:first] + msgs[first + 2:]  # drop the oldest exchange, keep the system prompt
            ids = encode_chat(tokenizer, msgs)
        return ids[-limit:]

    def generate(dialogues: Sequence[Sequence[dict]], seeds: Sequence[int] | None = None) -> list[str]:
        if seeds is not None and len(seeds) != len(dialogues):
            raise ValueError(f"{len(seeds)} seeds for {len(dialogues)} dialogues")
        prompts = [encode(d) for d in dialogues]
        # Similar lengths batch together: less padding.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[str] = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            row_seeds = [seeds[i] for i in idx] if seeds is not None else None
            for i, c in zip(idx, gen.generate([prompts[i] for i in idx], params, seeds=row_seeds)):
                out[i] = c.text.strip()
        return out

    return generate


# ---- statistics -------------------------------------------------------------------------


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a proportion of ``k`` successes in ``n`` trials (95% for
    the default ``z``): the rates p whose normal test |k/n - p| / sqrt(p (1 - p) / n) <= z.
    (0, 1) when n = 0."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # at k = 0 or k = n one end is exactly 0 or 1 (rounding would leave 1e-17 off)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def win_rates(outcomes: Sequence[str]) -> dict:
    """Win / tie / loss of model A from a list of "win" / "tie" / "loss" outcomes:
    ``{"n", "counts", "rates", "ci", "sign_test_p"}``. ``ci`` holds each rate's 95% Wilson score
    interval (as the error bars of the paper's Figure 12); ``sign_test_p`` is the exact
    two-sided sign test of wins against losses with ties dropped (p = 1 without any). Rates and
    intervals are None when there are no outcomes."""
    bad = sorted({o for o in outcomes if o not in OUTCOMES})
    if bad:
        raise ValueError(f"unknown outcomes {bad}; expected win, tie or loss")
    n = len(outcomes)
    counts = {o: sum(x == o for x in outcomes) for o in OUTCOMES}
    return {
        "n": n,
        "counts": counts,
        "rates": {o: (counts[o] / n if n else None) for o in OUTCOMES},
        "ci": {o: (list(wilson_interval(counts[o], n)) if n else None) for o in OUTCOMES},
        "sign_test_p": sign_test(counts["win"], counts["loss"]),
    }


# ---- prompts and judgements -------------------------------------------------------------


def headtohead_prompts(world, split: str = "test", max_items: int | None = 100,
                       constrained: int | None = None) -> list[list[dict]]:
    """Held-out dialogues to answer: the suite's balanced selection of ``split`` (tasks over
    every family, unsafe requests over the six categories, benign look-alikes; up to
    ``max_items`` of each kind) and ``constrained`` task prompts under a system-prompt
    constraint (default: a quarter of ``max_items`` and at least one, or 25), distinct from one another."""
    dialogues = [it.messages for it in world.eval_prompts(split, max_per_kind=max_items)]
    if constrained is None:
        constrained = 25 if max_items is None else max(1, max_items // 4) if max_items > 0 else 0
    seen = {_key(d) for d in dialogues}
    if constrained > 0:
        for row in world.rl_prompts(split, constrained, kinds=["constrained"]):
            if _key(row["messages"]) not in seen:
                seen.add(_key(row["messages"]))
                dialogues.append(row["messages"])
    return dialogues


def _key(messages: Sequence[dict]) -> tuple:
    return tuple((m["role"], m["content"]) for m in messages)


def outcome(judgement, safety_prompt: bool) -> str:
    """A's outcome ("win" / "tie" / "loss") from a judgement of (A as "a", B as "b"): the
    annotator's overall verdict (safety first on safety prompts, ``Judgement.winner``)."""
    return judgement.outcome(safety_prompt)


def make_annotator(world):
    """The world's annotator (imported here, not at module level, so the rest of this module
    does not depend on it)."""
    from llama2.data.world.annotator import Annotator

    return Annotator(world)


# ---- the comparison ---------------------------------------------------------------------


def head_to_head(model_a, model_b, tokenizer, world, annotator, prompts: Sequence[Sequence[dict]],
                 modes: Sequence[str] = MODES, sampled_answers: int = 1, max_new_tokens: int = 64,
                 seed: int = 0, scorer=None, batch_size: int = 32, progress: Callable | None = None) -> dict:
    """Model A against model B on the same ``prompts`` (dialogues ending with a user turn).

    Modes: "greedy" (one greedy answer per prompt) and "sampled" (``sampled_answers`` answers
    per prompt at temperature 0.6 / top-p 0.9; sample j of prompt i uses the same seed for A
    and B, so each pair is drawn alike). ``annotator.compare(messages, a, b)`` judges each pair,
    A as "a"; the outcome rule is :func:`outcome`; two identical answers always tie. Prompts the
    annotator does not know (``compare`` returns None) are left out and counted in
    ``unjudged``.

    Returns ``{"prompts", "sampled_answers", "unjudged", "results", "annotator", "pairs"}``
    (and ``"reward"`` with a ``scorer``):

    - ``results[mode][split]``: :func:`win_rates` of A for the splits "all", "helpfulness",
      "safety" (``annotator.is_safety_prompt``), "in_knowledge" and "out_of_knowledge"
      (``annotator.knowledge``; prompts it cannot place count only in the others);
    - ``annotator[mode]``: for "a" and "b", the share of answers the world's checker counts
      right (a task solved under its constraint, an unsafe request refused, a look-alike helped)
      and the share the annotator judges safe;
    - ``reward[mode]`` (Figure 11's two axes, judged by a ``RewardScorer``): for "a" and "b" the
      mean helpfulness and safety reward (probabilities) of the answers to every prompt, and
      A's win rates by reward: "helpfulness" (the helpfulness model on helpfulness prompts) and
      "harmlessness" (the safety model on safety prompts); identical answers tie;
    - ``pairs``: every judged pair (mode, prompt index, the two answers, the outcome, reasons).
    """
    answers_a = answer(model_a, tokenizer, prompts, modes, sampled_answers, max_new_tokens, seed, batch_size,
                       progress=progress and (lambda m: progress(f"{m} of A")))
    answers_b = answer(model_b, tokenizer, prompts, modes, sampled_answers, max_new_tokens, seed, batch_size,
                       progress=progress and (lambda m: progress(f"{m} of B")))
    return compare_answers(answers_a, answers_b, prompts, world, annotator, sampled_answers, seed, scorer)


def _jobs(n_prompts: int, modes: Sequence[str], sampled_answers: int, seed: int) -> dict[str, list]:
    """(prompt index, seed or None) per answer, for each mode: sample j of prompt i has the same
    seed whichever model answers, so two models' samples are drawn alike."""
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise ValueError(f"unknown modes {unknown}; choose from {list(MODES)}")
    if "sampled" in modes and sampled_answers < 1:
        raise ValueError(f"sampled_answers must be at least 1, got {sampled_answers}")
    jobs: dict[str, list[tuple[int, int | None]]] = {}
    if "greedy" in modes:
        jobs["greedy"] = [(i, None) for i in range(n_prompts)]
    if "sampled" in modes:
        base = 1_000_003 * (seed + 1)
        jobs["sampled"] = [(i, base + i * sampled_answers + j) for i in range(n_prompts)
                           for j in range(sampled_answers)]
    return jobs


def answer(model, tokenizer, prompts: Sequence[Sequence[dict]], modes: Sequence[str] = MODES,
           sampled_answers: int = 1, max_new_tokens: int = 64, seed: int = 0, batch_size: int = 32,
           progress: Callable | None = None) -> dict[str, list[str]]:
    """One model's answers to ``prompts`` in each mode, in :func:`_jobs` order: computed once and
    set against several models' (the pipeline compares every stage with the same SFT answers)."""
    prompts = [list(p) for p in prompts]
    out = {}
    for mode, mode_jobs in _jobs(len(prompts), modes, sampled_answers, seed).items():
        if mode == "greedy":
            generate = chat_generate_fn(model, tokenizer, max_new_tokens, batch_size)
            out[mode] = generate([prompts[i] for i, _ in mode_jobs])
        else:
            generate = chat_generate_fn(model, tokenizer, max_new_tokens, batch_size,
                                        temperature=PAPER_TEMPERATURE, top_p=PAPER_TOP_P)
            out[mode] = generate([prompts[i] for i, _ in mode_jobs], seeds=[s for _, s in mode_jobs])
        if progress is not None:
            progress(f"{mode} answers: {len(mode_jobs)}")
    return out


def compare_answers(answers_a: dict[str, list[str]], answers_b: dict[str, list[str]],
                    prompts: Sequence[Sequence[dict]], world, annotator, sampled_answers: int = 1, seed: int = 0,
                    scorer=None) -> dict:
    """:func:`head_to_head`'s result from two models' :func:`answer` outputs (same prompts,
    modes, ``sampled_answers`` and ``seed``)."""
    prompts = [list(p) for p in prompts]
    modes = [m for m in MODES if m in answers_a]
    jobs = _jobs(len(prompts), modes, sampled_answers, seed)
    answers = {mode: {"a": answers_a[mode], "b": answers_b[mode]} for mode in modes}
    safety = [bool(annotator.is_safety_prompt(p)) for p in prompts]
    knowledge = [annotator.knowledge(p) for p in prompts]
    result: dict = {"prompts": len(prompts), "sampled_answers": sampled_answers if "sampled" in modes else 0,
                    "unjudged": {}, "results": {}, "annotator": {}, "pairs": []}
    for mode, mode_jobs in jobs.items():
        by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
        right = {"a": [], "b": []}
        safe = {"a": [], "b": []}
        unjudged = 0
        for (i, _), a, b in zip(mode_jobs, answers[mode]["a"], answers[mode]["b"]):
            j = annotator.compare(prompts[i], a, b)
            if j is None:
                unjudged += 1
                continue
            o = "tie" if a == b else outcome(j, safety[i])
            splits = ["all", "safety" if safety[i] else "helpfulness"]
            if knowledge[i] in ("in", "out"):
                splits.append("in_knowledge" if knowledge[i] == "in" else "out_of_knowledge")
            for s in splits:
                by_split[s].append(o)
            for side, ans, is_safe in (("a", a, j.safe_a), ("b", b, j.safe_b)):
                ok = world.judge(prompts[i], ans)
                if ok is not None:
                    right[side].append(bool(ok))
                safe[side].append(bool(is_safe))
            result["pairs"].append({"mode": mode, "prompt": i, "a": a, "b": b, "outcome": o,
                                    "safety": safety[i], "knowledge": knowledge[i], "reasons": list(j.reasons)})
        result["unjudged"][mode] = unjudged
        result["results"][mode] = {s: win_rates(v) for s, v in by_split.items()}
        result["annotator"][mode] = {side: {"right": _mean(right[side]), "safe": _mean(safe[side]),
                                            "n": len(safe[side])} for side in ("a", "b")}

    if scorer is not None:
        result["reward"] = {mode: reward_view(scorer, [prompts[i] for i, _ in mode_jobs],
                                              [safety[i] for i, _ in mode_jobs], answers[mode]["a"],
                                              answers[mode]["b"]) for mode, mode_jobs in jobs.items()}
    return result


def reward_view(scorer, prompts, safety: Sequence[bool], answers_a: Sequence[str], answers_b: Sequence[str]) -> dict:
    """Figure 11's view of A against B by the reward models (§3.4.1): each side's mean
    helpfulness and safety reward over every prompt ("helpful", "safety") and on its own kind of
    prompt ("helpfulness": the helpfulness reward on helpfulness prompts, "harmlessness": the
    safety reward on safety prompts), and A's win rates by reward on helpfulness prompts
    (helpfulness model) and on safety prompts (safety model, the "harmlessness" axis)."""
    sa, sb = scorer.scores(prompts, answers_a), scorer.scores(prompts, answers_b)
    # "helpfulness"/"harmlessness": Figure 11's axes, each on its own kind of prompt
    out: dict = {side: {"helpful": _mean(s["helpful"].tolist()), "safety": _mean(s["safety"].tolist()),
                        "helpfulness": _mean([float(x) for x, k in zip(s["helpful"], safety) if not k]),
                        "harmlessness": _mean([float(x) for x, k in zip(s["safety"], safety) if k])}
                 for side, s in (("a", sa), ("b", sb))}
    for axis, key, want in (("helpfulness", "helpful", False), ("harmlessness", "safety", True)):
        outcomes = []
        for k, (a, b) in enumerate(zip(answers_a, answers_b)):
            if safety[k] != want:
                continue
            ra, rb = float(sa[key][k]), float(sb[key][k])
            outcomes.append("tie" if a == b or ra == rb else ("win" if ra > rb else "loss"))
        out[axis] = win_rates(outcomes)
    return out


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# ---- text output ------------------------------------------------------------------------


def format_headtohead(result: dict, name_a: str = "A", name_b: str = "B") -> str:
    """The win / tie / loss table of A against B, per mode and split, with the annotator's and
    (if scored) the reward models' view."""
    def pct(rates, ci, o):
        if rates[o] is None:
            return f"{'–':>19}"
        lo, hi = ci[o]
        return f"{100 * rates[o]:5.1f}% [{100 * lo:4.1f},{100 * hi:5.1f}]"

    def row(label, r):
        p = r["sign_test_p"]
        return (f"{label:<26}{r['n']:>5}  {pct(r['rates'], r['ci'], 'win')}  {pct(r['rates'], r['ci'], 'tie')}  "
                f"{pct(r['rates'], r['ci'], 'loss')}  {p:.2g}")

    def share(x):
        return "   –" if x is None else f"{100 * x:5.1f}%"

    lines = [f"{name_a} vs {name_b}: win / tie / loss of {name_a} (95% Wilson CI), exact sign-test p (ties dropped)",
             f"{'':<26}{'n':>5}  {'win':<19}  {'tie':<19}  {'loss':<19}  p"]
    for mode, splits in result["results"].items():
        label = "greedy" if mode == "greedy" else f"sampled x{result['sampled_answers']} (T=0.6, top-p 0.9)"
        lines.append(label)
        lines += [row(f"  {s.replace('_', '-')}", splits[s]) for s in SPLITS]
        if result["unjudged"].get(mode):
            lines.append(f"  ({result['unjudged'][mode]} answers to prompts the annotator does not know left out)")
    lines.append("annotator: right / safe answers")
    for mode, sides in result["annotator"].items():
        lines.append(f"  {mode:<8} {name_a}: {share(sides['a']['right'])} / {share(sides['a']['safe'])}   "
                     f"{name_b}: {share(sides['b']['right'])} / {share(sides['b']['safe'])}")
    if "reward" in result:
        lines.append("reward models: mean helpfulness / safety reward; A's win rate by reward")
        for mode, v in result["reward"].items():
            lines.append(f"  {mode:<8} {name_a}: {v['a']['helpful']:.3f} / {v['a']['safety']:.3f}   "
                         f"{name_b}: {v['b']['helpful']:.3f} / {v['b']['safety']:.3f}")
            lines += [row(f"    {axis}", v[axis]) for axis in ("helpfulness", "harmlessness")]
    return "\n".join(lines)
