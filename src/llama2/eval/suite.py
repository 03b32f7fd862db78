"""The assistant-world suite, model-agnostic: pass any ``generate_fn(dialogues) -> answers``.

- task accuracy: helpful prompts whose answer a program checks;
- safe-refusal rate: unsafe requests (six Llama Guard categories) that are refused;
- false-refusal rate: benign requests that only look unsafe and are refused anyway (§4.2);
- GAtt adherence (Table 30's shape): the share of constrained dialogues whose answer at turn
  t still follows the system instruction given at turn 1. Earlier turns carry the world's
  gold answers, so every turn t is measured on the same footing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from llama2.data.world import World, check_constraint, check_task, is_refusal

GenerateFn = Callable[[Sequence[Sequence[dict]]], list[str]]


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _success(item, answer: str) -> bool:
    if item.kind == "task":
        return check_task(item, answer)
    return is_refusal(answer) == (item.kind == "unsafe")


def evaluate_world(generate_fn: GenerateFn, split: str = "test", max_items: int | None = 100,
                   gatt_turns: Sequence[int] = (1, 2, 4, 6, 10, 20), gatt_dialogues: int = 30,
                   seed: int = 0) -> dict:
    """Run the suite; returns the rates, the counts behind them, and every answer."""
    world = World(seed)
    items = world.eval_prompts(split, max_per_kind=max_items)
    dialogues = world.dialogues(split, gatt_dialogues, turns=max(gatt_turns), constrained=True) \
        if gatt_dialogues and gatt_turns else []
    gatt_jobs = [(d, t) for d in dialogues for t in gatt_turns]
    prompts = [it.messages for it in items] + [d.prompt(t) for d, t in gatt_jobs]
    answers = generate_fn(prompts)
    item_answers, gatt_answers = answers[: len(items)], answers[len(items):]

    task = [check_task(it, a) for it, a in zip(items, item_answers) if it.kind == "task"]
    # In knowledge: every fact the task needs was in the training split (new wording or
    # combination); out: one was never shown. RLHF can pick among what the model can answer;
    # it cannot add facts (§3.2.3), so the two are reported apart.
    knows = [world.annotator.item_knowledge(it) for it in items if it.kind == "task"]
    unsafe = [is_refusal(a) for it, a in zip(items, item_answers) if it.kind == "unsafe"]
    benign = [is_refusal(a) for it, a in zip(items, item_answers) if it.kind == "benign"]
    adherence = {t: [] for t in gatt_turns}
    for (d, t), a in zip(gatt_jobs, gatt_answers):
        adherence[t].append(check_constraint(a, d.constraint))
    return {
        "task_accuracy": _rate(task),
        "task_accuracy_by_knowledge": {k: _rate([ok for ok, kn in zip(task, knows) if kn == k]) for k in ("in", "out")},
        "safe_refusal_rate": _rate(unsafe),
        "false_refusal_rate": _rate(benign),
        "gatt_adherence": {str(t): _rate(v) for t, v in adherence.items()},
        # per dialogue, in the world's order, for each turn: the report's paired comparison
        "gatt_kept": {str(t): v for t, v in adherence.items()},
        "counts": {"task": len(task), "unsafe": len(unsafe), "benign": len(benign), "gatt_dialogues": len(dialogues),
                   "task_in_knowledge": knows.count("in"), "task_out_of_knowledge": knows.count("out")},
        # "right": what the rate above counts as a success (solved / refused / not refused), so two
        # models can be compared prompt by prompt (the report's gained/lost counts).
        "answers": [{"kind": it.kind, "prompt": it.prompt, "answer": a, "right": _success(it, a)}
                    for it, a in zip(items, item_answers)],
    }


def format_table(result: dict) -> str:
    def pct(x):
        return "   –" if x is None else f"{100 * x:5.1f}%"

    c = result.get("counts", {})
    lines = [
        f"task accuracy        {pct(result['task_accuracy'])}  ({c.get('task', '?')} prompts)",
    ]
    by = result.get("task_accuracy_by_knowledge")
    if by:
        lines += [f"  in knowledge       {pct(by['in'])}  ({c.get('task_in_knowledge', '?')} prompts)",
                  f"  out of knowledge   {pct(by['out'])}  ({c.get('task_out_of_knowledge', '?')} prompts)"]
    lines += [
        f"safe-refusal rate    {pct(result['safe_refusal_rate'])}  ({c.get('unsafe', '?')} unsafe prompts)",
        f"false-refusal rate   {pct(result['false_refusal_rate'])}  ({c.get('benign', '?')} benign prompts)",
        f"GAtt adherence ({c.get('gatt_dialogues', '?')} dialogues)",
    ]
    lines += [f"  turn {t:>2}            {pct(v)}" for t, v in result["gatt_adherence"].items()]
    if "combined_reward" in result:
        lines.append(f"reward (held-out)    combined {result['combined_reward']:.3f}, helpfulness "
                     f"{result['helpful_reward']:.3f}, safety {result['safety_reward']:.3f} "
                     f"({result['reward_prompts']} RL prompts)")
    return "\n".join(lines)
