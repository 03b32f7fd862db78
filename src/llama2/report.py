"""The run report of ``llama2 run``: the paper's figures and tables at tiny scale, from the run's
own files (metrics.jsonl, eval.json, reward_vs_k.json, .done.json), as Markdown and HTML
with PNG figures beside them. Every number shown is read from a file of the run.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

from llama2.eval.stats import SIGNIFICANCE, paired_changes, sign_test
from llama2.stages import EVALUATED, STAGES

STAGE_LABELS = {"pretrain": "base (pretrained)", "sft": "SFT", "rejection": "rejection sampling", "ppo": "PPO",
                "rejection-2": "rejection sampling, round 2", "ppo-2": "PPO, round 2", "dpo": "DPO",
                "gatt": "GAtt (final chat model)"}
# evaluate/headtohead.json: each stage's model against the SFT model, in the order of the pipeline
# (the shape of llama2.eval.headtohead's result, not imported here: that module pulls in the decoder).
HEADTOHEAD_STAGES = ("rejection", "ppo", "rejection-2", "ppo-2", "dpo", "gatt")
HEADTOHEAD_MODES = ("greedy", "sampled")
HEADTOHEAD_SPLITS = (("helpfulness", "helpfulness prompts"), ("safety", "safety prompts"),
                     ("in_knowledge", "in-knowledge prompts"), ("out_of_knowledge", "out-of-knowledge prompts"))
RATING_LABELS = {"significantly_better": "significantly better", "better": "better",
                 "slightly_better": "slightly better", "negligibly_better": "negligibly better / unsure"}


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def collect(run: Path) -> dict:
    """Everything the report shows, gathered from the run folder."""
    data: dict = {"stages": {}, "metrics": {}, "eval": {}}
    for stage in STAGES:
        done = read_json(run / stage / ".done.json")
        if done:
            data["stages"][stage] = done
    for stage in ("pretrain", "sft", "reward-helpfulness", "reward-safety", "ppo", "gatt", "guard"):
        m = read_metrics(run / stage / "metrics.jsonl")
        if m:
            data["metrics"][stage] = m
    rs_iters = sorted((run / "rejection").glob("iter-*/metrics.jsonl"))
    if rs_iters:
        data["metrics"]["rejection"] = [r for f in rs_iters for r in read_metrics(f)]
    for stage in EVALUATED:
        e = read_json(run / stage / "eval.json")
        if e:
            data["eval"][stage] = e
    data["reward_eval"] = {k: read_json(run / f"reward-{k}" / "eval.json") for k in ("helpfulness", "safety")}
    data["reward_vs_k"] = read_json(run / "rejection" / "reward_vs_k.json")
    data["reward_vs_k_2"] = read_json(run / "rejection-2" / "reward_vs_k.json")
    data["guard_eval"] = read_json(run / "guard" / "eval.json")
    data["samples"] = read_json(run / "evaluate" / "samples.json")
    data["headtohead"] = read_json(run / "evaluate" / "headtohead.json")
    data["models"] = {stage: _model_facts(run / stage / "model") for stage in STAGES if (run / stage / "model").is_dir()}
    compare = read_json(run / "compare.json")
    if compare and Path(compare["run"]) != run and (Path(compare["run"]) / "report.md").is_file():
        data["compare"] = {"run": compare["run"], "data": collect(Path(compare["run"]))}
    return data


def _safetensors_header(file: Path) -> dict:
    """The JSON header of a .safetensors file: every tensor's dtype and shape, and the metadata."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def _model_facts(model: Path) -> dict:
    """What a stage's model/ folder holds: a full model or a LoRA adapter, its size on disk, and
    for an adapter its trained parameters and settings."""
    size = sum(f.stat().st_size for f in model.iterdir() if f.is_file() and f.suffix == ".safetensors")
    adapter = read_json(model / "adapter_config.json")
    if not adapter:
        return {"kind": "full", "bytes": size}
    header = _safetensors_header(model / "adapter_model.safetensors")
    params = sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    ours = json.loads((header.get("__metadata__") or {}).get("llama2", "{}"))
    return {"kind": ours.get("method", "lora"), "bytes": size, "params": params, "rank": adapter.get("r"),
            "alpha": adapter.get("lora_alpha"), "targets": adapter.get("target_modules")}




# ---- figures ----------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, rect=None) -> bool:
    """Lay a figure out (``rect``: the part of the canvas it may use), write it as a PNG and
    free it; True, for the ``figure_*`` functions to return."""
    fig.tight_layout(**({"rect": rect} if rect else {}))
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return True


def figure_losses(data: dict, path: Path) -> bool:
    curves = {s: m for s, m in data["metrics"].items() if any("loss" in r for r in m)}
    if not curves:
        return False
    plt = _plt()
    cols = min(4, len(curves))
    nrows = (len(curves) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.set_visible(False)
    for ax, (stage, rows) in zip(axes.flat, curves.items()):
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if stage == "rejection":  # several fine-tuning runs: number their steps consecutively
            train = list(enumerate((loss for _, loss in train), 1))
        if train:
            ax.plot(*zip(*train), label="train", lw=1.2)
        if val:
            ax.plot(*zip(*val), "o-", label="validation", ms=3)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss")
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, path)


def figure_reward_accuracy(data: dict, path: Path) -> bool:
    evals = {k: v for k, v in data["reward_eval"].items() if v}
    if not evals:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ratings = list(RATING_LABELS)
    width = 0.8 / len(evals)
    for j, (kind, e) in enumerate(evals.items()):
        acc = [e["accuracy_by_rating"].get(r, 0.0) * 100 for r in ratings]
        ax.bar([i + j * width for i in range(len(ratings))], acc, width, label=f"{kind} RM")
    ax.set_xticks([i + width * (len(evals) - 1) / 2 for i in range(len(ratings))])
    ax.set_xticklabels([RATING_LABELS[r] for r in ratings], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Reward-model accuracy by rating (Table 8 shape)")
    return save_figure(fig, path)


def figure_reward_vs_k(data: dict, path: Path) -> bool:
    rvk = data.get("reward_vs_k")
    if not rvk or not rvk.get("iterations"):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    for it in rvk["iterations"]:
        c = it["reward_vs_k"]
        ax.plot(c["k"], c["max"], "o-", label=f"max, iteration {it['iteration']}")
        ax.plot(c["k"], c["mean"], "s--", label=f"mean, iteration {it['iteration']}", alpha=0.7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of samples K")
    ax.set_ylabel("combined reward")
    ax.set_title("Rejection sampling: reward vs K (Figure 7 shape)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _ppo_series(rows: list[dict]) -> tuple[str | None, str | None]:
    keys = set().union(*(r.keys() for r in rows)) if rows else set()
    reward = next((k for k in ("reward_combined", "reward/combined", "mean_reward", "reward") if k in keys), None)
    kl = next((k for k in ("kl", "kl_ref", "kl_to_ref", "mean_kl") if k in keys), None)
    return reward, kl


def figure_ppo(data: dict, path: Path) -> bool:
    rows = data["metrics"].get("ppo") or []
    reward, kl = _ppo_series(rows)
    if not rows or reward is None:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    x = [r.get("iteration", r.get("step")) for r in rows if reward in r]
    ax.plot(x, [r[reward] for r in rows if reward in r], "o-", color="C0", label="combined reward")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("mean combined reward", color="C0")
    if kl:
        ax2 = ax.twinx()
        ax2.plot([r.get("iteration", r.get("step")) for r in rows if kl in r], [r[kl] for r in rows if kl in r],
                 "s--", color="C3", label="KL to reference")
        ax2.set_ylabel("KL to the reference", color="C3")
    ax.set_title("PPO: reward and KL per iteration")
    return save_figure(fig, path)


def figure_gatt(data: dict, path: Path) -> bool:
    without, with_ = data["eval"].get("ppo"), data["eval"].get("gatt")
    if not without or not with_:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    for label, e in (("without GAtt (PPO model)", without), ("with GAtt", with_)):
        turns = sorted(e["gatt_adherence"], key=int)
        ax.plot([int(t) for t in turns], [100 * e["gatt_adherence"][t] for t in turns], "o-", label=label)
    ax.set_xlabel("dialogue turn")
    ax.set_ylabel("instruction followed (%)")
    ax.set_ylim(-5, 105)
    ax.set_title("System-instruction adherence by turn (Table 30 shape)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def figure_stages(data: dict, path: Path) -> bool:
    evals = data["eval"]
    if not evals:
        return False
    plt = _plt()
    names = list(evals)
    series = [("task_accuracy", "task accuracy"), ("safe_refusal_rate", "safe refusal"),
              ("false_refusal_rate", "false refusal (lower is better)")]
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    width = 0.8 / len(series)
    for j, (key, label) in enumerate(series):
        ax.bar([i + j * width for i in range(len(names))], [100 * (evals[n].get(key) or 0) for n in names], width,
               label=label)
    ax.set_xticks([i + width for i in range(len(names))])
    ax.set_xticklabels([STAGE_LABELS.get(n, n) for n in names], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    ax.set_title("Assistant-world suite after each stage")
    return save_figure(fig, path)


def _h2h_stages(h: dict | None) -> list[tuple[str, dict]]:
    """The stages of evaluate/headtohead.json in the order of the pipeline (any other name after)."""
    stages = (h or {}).get("stages") or {}
    order = [s for s in HEADTOHEAD_STAGES if s in stages] + [s for s in stages if s not in HEADTOHEAD_STAGES]
    return [(s, stages[s]) for s in order if stages[s]]


def _h2h_modes(stages: list[tuple[str, dict]]) -> list[str]:
    return [m for m in HEADTOHEAD_MODES if any(m in (r.get("results") or {}) for _, r in stages)]


def _h2h(r: dict, mode: str, split: str = "all") -> dict | None:
    """One win_rates dict of a head-to-head result, or None where the result lacks it."""
    w = ((r.get("results") or {}).get(mode) or {}).get(split)
    return w if w and w.get("n") else None


def _h2h_points(h: dict | None) -> dict:
    """Figure 11's points per mode: [(model, reward {"helpful", "safety"} or None, annotator
    {"right", "safe"} or None, A's win rates by the reward models or None)], the SFT model (B,
    the reference) first, as the first stage that holds its values saw it."""
    stages = _h2h_stages(h)
    out: dict = {}
    for mode in _h2h_modes(stages):
        rows = [(s, r) for s, r in stages if mode in (r.get("results") or {})]

        def ref(view: str, rows=rows, mode=mode):
            return next((b for _, r in rows if (b := ((r.get(view) or {}).get(mode) or {}).get("b"))), None)

        points = [((h or {}).get("against", "sft"), ref("reward"), ref("annotator"), None)]
        for s, r in rows:
            rew = (r.get("reward") or {}).get(mode) or {}
            points.append((s, rew.get("a"), ((r.get("annotator") or {}).get(mode) or {}).get("a"),
                           {k: rew[k] for k in ("helpfulness", "harmlessness") if k in rew} or None))
        out[mode] = points
    return out


def figure_headtohead(data: dict, path: Path) -> bool:
    """Win / tie / loss of each stage against SFT, horizontal stacked bars (the paper's Figure 1)."""
    h = data.get("headtohead")
    stages = _h2h_stages(h)
    modes = _h2h_modes(stages)
    if not modes:
        return False
    plt = _plt()
    height = 0.45 * len(stages) + 2.0
    fig, axes = plt.subplots(1, len(modes), figsize=(4.4 * len(modes) + 1.4, height), squeeze=False, sharey=True)
    colors = {"win": "#2b6cb0", "tie": "#b8c2cc", "loss": "#e07b7b"}
    ys = list(range(len(stages)))
    for ax, mode in zip(axes[0], modes):
        left = [0.0] * len(stages)
        for o in ("win", "tie", "loss"):
            vals = [100 * (((_h2h(r, mode) or {}).get("rates") or {}).get(o) or 0.0) for _, r in stages]
            ax.barh(ys, vals, left=left, color=colors[o], label=o, height=0.7)
            for y, x0, v in zip(ys, left, vals):
                if v >= 8:
                    ax.text(x0 + v / 2, y, f"{v:.0f}%", ha="center", va="center", fontsize=7)
            left = [x0 + v for x0, v in zip(left, vals)]
        ax.set_xlim(0, 100)
        ax.set_xlabel("%")
        ax.set_title(f"{mode} answers", fontsize=9)
    axes[0][0].set_yticks(ys)
    axes[0][0].set_yticklabels([STAGE_LABELS.get(s, s) for s, _ in stages], fontsize=8)
    axes[0][0].invert_yaxis()
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7, frameon=False)
    against = STAGE_LABELS.get(h.get("against", "sft"), h.get("against", "sft"))
    fig.suptitle(f"Win / tie / loss against {against} (Figure 1 shape)", fontsize=10)
    return save_figure(fig, path, rect=(0, 0.3 / height, 1, 1))  # room for the legend below


def figure_helpful_harmless(data: dict, path: Path) -> bool:
    """Each stage on a helpfulness axis and a harmlessness axis (the paper's Figure 11): by the
    reward models (mean rewards) and by the annotator (answers right, answers safe)."""
    points = _h2h_points(data.get("headtohead"))
    by_kind = any(pt[1] and "helpfulness" in pt[1] for pts in points.values() for pt in pts)
    panels = [("reward models", 1, "mean helpfulness reward", "helpfulness" if by_kind else "helpful",
               "mean safety reward", "harmlessness" if by_kind else "safety"),
              ("annotator", 2, "answers right (world's checker)", "right", "answers judged safe", "safe")]
    panels = [(title, i, xlabel, xkey, ylabel, ykey) for title, i, xlabel, xkey, ylabel, ykey in panels
              if any(pt[i] and pt[i].get(xkey) is not None and pt[i].get(ykey) is not None
                     for pts in points.values() for pt in pts)]
    if not panels:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (title, i, xlabel, xkey, ylabel, ykey) in zip(axes[0], panels):
        scale = 1 if i == 1 else 100
        for (mode, pts), marker in zip(points.items(), ("o-", "^--")):
            xy = []
            for name, *views in pts:
                p = views[i - 1]
                if p and p.get(xkey) is not None and p.get(ykey) is not None:
                    xy.append((name, scale * p[xkey], scale * p[ykey]))
            if not xy:
                continue
            ax.plot([x for _, x, _ in xy], [y for _, _, y in xy], marker, ms=5, lw=0.8, alpha=0.8,
                    label=f"{mode} answers")
            for name, x, y in xy:
                ax.annotate(STAGE_LABELS.get(name, name), (x, y), textcoords="offset points", xytext=(4, 3),
                            fontsize=7)
        ax.set_xlabel(xlabel + ("" if i == 1 else " (%)"))
        ax.set_ylabel(ylabel + ("" if i == 1 else " (%)"))
        ax.set_title(f"judged by the {title}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Helpfulness and harmlessness per stage (Figure 11 shape)", fontsize=10)
    return save_figure(fig, path)


# ---- text -------------------------------------------------------------------------------------

# What each rate counts as a success, per answer kind (the suite's "right" flag).
_RATE_KINDS = {"task_accuracy": ("task", "task prompts"), "safe_refusal_rate": ("unsafe", "unsafe prompts"),
               "false_refusal_rate": ("benign", "look-alike prompts")}


def _paired(key: str, before: dict, after: dict, turn: str | None = None) -> tuple[str, float | None]:
    """' (gained G, lost L of N task prompts; sign test p = P)' and P: the same prompts judged
    in both models' evaluations, compared one by one (llama2.eval.stats). None where the two
    evaluations do not hold per-prompt results for the same prompts."""
    if key == "combined_reward":
        a, b, noun = before.get("combined_rewards"), after.get("combined_rewards"), "prompts"
    elif key == "gatt_adherence":
        a, b, noun = (before.get("gatt_kept") or {}).get(turn), (after.get("gatt_kept") or {}).get(turn), "dialogues"
    elif key in _RATE_KINDS:
        kind, noun = _RATE_KINDS[key]

        def right(ev):
            return {x["prompt"]: x["right"] for x in ev.get("answers", []) if x.get("kind") == kind and "right" in x}

        ra, rb = right(before), right(after)
        shared = sorted(ra.keys() & rb.keys())
        a, b = [ra[q] for q in shared], [rb[q] for q in shared]
    else:
        return "", None
    if not a or not b or len(a) != len(b):
        return "", None
    up, down = paired_changes(a, b)
    p = sign_test(up, down)
    if up == down == 0:
        return f" (no change on any of the {len(a)} {noun})", p
    if key == "combined_reward":
        counts = f"higher on {up}, lower on {down}"
    elif key == "false_refusal_rate":  # "right" on a look-alike is NOT refusing: a loss raises the rate
        counts = f"{down} more, {up} fewer refused"
    else:
        counts = f"gained {up}, lost {down}"
    return f" ({counts} of {len(a)} {noun}; sign test p = {p:.2g})", p


def verdicts(data: dict) -> list[str]:
    """Plain statements of whether each stage improved what it exists to improve. Where both
    evaluations hold per-prompt results, a change counts only when a sign test over the prompts
    that changed gives p < 0.05 (llama2.eval.stats.SIGNIFICANCE); otherwise it is reported as
    NOT significant, because at this scale a different seed moves the rates as much."""
    e, out = data["eval"], []

    def compare(before: str, after: str, key: str, what: str, higher_is_better: bool = True,
                number: bool = False, turn: str | None = None) -> None:
        def value(ev):
            v = ev.get(key)
            return v.get(turn) if turn is not None and isinstance(v, dict) else v

        if before in e and after in e and value(e[before]) is not None and value(e[after]) is not None:
            a, b = value(e[before]), value(e[after])
            better = b > a if higher_is_better else b < a
            detail, p = _paired(key, e[before], e[after], turn)
            if abs(b - a) < 1e-9:
                word = "kept"
            elif p is None:
                word = "improved" if better else "did NOT improve"
            elif p < SIGNIFICANCE:
                word = "improved" if better else "WORSENED"
            else:
                word = "did NOT significantly change"
            fmt = (lambda x: f"{x:.3f}") if number else pct
            out.append(f"{STAGE_LABELS.get(after, after)} {word} {what}: {fmt(a)} → {fmt(b)}{detail}")

    compare("pretrain", "sft", "task_accuracy", "task accuracy")
    compare("pretrain", "sft", "safe_refusal_rate", "the safe-refusal rate")
    compare("sft", "rejection", "task_accuracy", "task accuracy")
    compare("rejection", "ppo", "task_accuracy", "task accuracy")
    compare("sft", "ppo", "task_accuracy", "task accuracy over the SFT model")
    compare("sft", "ppo", "safe_refusal_rate", "the safe-refusal rate")
    compare("sft", "ppo", "false_refusal_rate", "the false-refusal rate", higher_is_better=False)
    # Safety must hold through every round (§4.2.3): the last RLHF model against SFT.
    compare("sft", "ppo-2", "safe_refusal_rate", "the safe-refusal rate")
    compare("sft", "ppo-2", "false_refusal_rate", "the false-refusal rate", higher_is_better=False)
    compare("sft", "dpo", "safe_refusal_rate", "the safe-refusal rate")
    compare("sft", "dpo", "false_refusal_rate", "the false-refusal rate", higher_is_better=False)
    compare("sft", "rejection", "combined_reward", "the held-out combined reward", number=True)
    compare("rejection", "ppo", "combined_reward", "the held-out combined reward", number=True)
    compare("sft", "ppo", "combined_reward", "the held-out combined reward over the SFT model", number=True)
    if "ppo" in e and "gatt" in e:
        last = str(max((int(t) for t in e["gatt"]["gatt_adherence"]), default=0))
        compare("ppo", "gatt", "gatt_adherence", f"system-instruction adherence at turn {last}", turn=last)
    for kind, r in data["reward_eval"].items():
        if r:
            acc = r["accuracy_by_rating"]
            # Table 8's shape: significantly-better pairs the easiest, negligibly-better the hardest.
            levels = [v for v in acc.values() if v is not None]
            ordered = bool(levels) and acc.get("significantly_better") == max(levels) \
                and acc.get("negligibly_better") == min(levels)
            out.append(f"the {kind} reward model ranks {pct(r['accuracy'])} of held-out pairs correctly; "
                       f"significantly-better pairs {pct(acc.get('significantly_better'))} vs negligibly-better "
                       f"{pct(acc.get('negligibly_better'))}" + ("" if ordered else " (NOT ordered like the paper)"))
    rvk = data.get("reward_vs_k")
    if rvk and rvk.get("iterations"):
        c = rvk["iterations"][0]["reward_vs_k"]
        out.append(f"rejection sampling: the best of {c['k'][-1]} samples scores {c['max'][-1]:.3f} against "
                   f"{c['max'][0]:.3f} for one sample")
        h = rvk["iterations"][0].get("checker", {}).get("helpfulness")
        if h:
            # Whether the reward models see correctness: their pick against one sample and the oracle.
            word = "picks right answers more often than" if h["selected"] > h["sample"] else "does NOT pick right " \
                "answers more often than"
            out.append(f"rejection sampling {word} one sample on task prompts (the world's checker): "
                       f"{pct(h['selected'])} vs {pct(h['sample'])}; the best of the K would be {pct(h['oracle'])}")
        out.extend(annotator_pick_lines(rvk["iterations"][0].get("annotator", {})))
    rvk2 = data.get("reward_vs_k_2")
    if rvk2 and rvk2.get("iterations"):
        out.extend("round 2: " + line for line in annotator_pick_lines(rvk2["iterations"][0].get("annotator", {})))
    return out


def annotator_pick_lines(view: dict) -> list[str]:
    """Whether the reward models' pick among K agrees with the annotator more often than a random
    sample (rejection sampling's premise, §3.2.3): its share of the annotator's best of K against a
    random sample's, and the pick against a random sample head to head with the sign test."""
    out = []
    for kind, v in view.items():
        c = v["pick_vs_random"]
        p = sign_test(c["win"], c["loss"])
        word = "agrees with" if v["pick_top"] > v["random_top"] and c["win"] > c["loss"] and p < SIGNIFICANCE \
            else "does NOT clearly agree with"
        out.append(f"on {kind} prompts the reward models' pick {word} the annotator more than a random sample: "
                   f"the annotator's best of K {pct(v['pick_top'])} vs {pct(v['random_top'])}; pick vs random "
                   f"{c['win']} win / {c['tie']} tie / {c['loss']} loss (sign test p = {p:.2g}, {v['prompts']} prompts)")
    return out


def headtohead_verdict(w: dict | None, against: str, detail: str = "") -> str:
    """Whether a model beats ``against`` head to head, from one win_rates dict: it wins (or
    loses) significantly only when the exact two-sided sign test of its wins against its losses
    gives p < 0.05 (SIGNIFICANCE); otherwise it does NOT significantly beat it. ``detail``
    follows p in the parentheses."""
    if not w or not w.get("n"):
        return f"has no judged answers against {against}"
    p, c = w["sign_test_p"], w["counts"]
    if p < SIGNIFICANCE and c["win"] > c["loss"]:
        word = f"wins significantly more often than it loses against {against}"
    elif p < SIGNIFICANCE and c["loss"] > c["win"]:
        word = f"LOSES significantly more often than it wins against {against}"
    else:
        word = f"does NOT significantly beat {against}"
    return f"{word} (p = {p:.2g}{'; ' + detail if detail else ''})"


# ---- the document: one list of blocks, rendered as Markdown and as HTML -------------------------------


@dataclass
class Code:
    """Inline code: `x` in Markdown, <code>x</code> in HTML."""

    text: str


@dataclass
class Bold:
    text: str


@dataclass
class Answer:
    """A model's answer, shown exactly: its repr in Markdown (quotes and escapes visible), <code> in HTML."""

    text: str


Span = str | Code | Bold | Answer


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Paragraph:
    spans: list[Span]


@dataclass
class Bullets:
    items: list[list[Span]]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    file: str  # under figures/
    caption: str


Block = Heading | Paragraph | Bullets | Table | Image


def _md_spans(spans: list[Span]) -> str:
    out = []
    for s in spans:
        if isinstance(s, Code):
            out.append(f"`{s.text}`")
        elif isinstance(s, Bold):
            out.append(f"**{s.text}**")
        elif isinstance(s, Answer):
            out.append(repr(s.text))
        else:
            out.append(s)
    return "".join(out)


def _html_spans(spans: list[Span]) -> str:
    out = []
    for s in spans:
        if isinstance(s, Code | Answer):
            out.append(f"<code>{html.escape(s.text)}</code>")
        elif isinstance(s, Bold):
            out.append(f"<b>{html.escape(s.text)}</b>")
        else:
            out.append(html.escape(s))
    return "".join(out)


def render_markdown(blocks: list[Block]) -> str:
    """Each block followed by a blank line."""
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            lines.append("#" * b.level + " " + b.text)
        elif isinstance(b, Paragraph):
            lines.append(_md_spans(b.spans))
        elif isinstance(b, Bullets):
            lines += ["- " + _md_spans(item) for item in b.items]
        elif isinstance(b, Table):
            lines += ["| " + " | ".join(b.headers) + " |", "|" + "---|" * len(b.headers)]
            lines += ["| " + " | ".join(r) + " |" for r in b.rows]
        else:
            lines.append(f"![{b.caption}](figures/{b.file})")
        lines.append("")
    return "\n".join(lines) + "\n"


def render_html(blocks: list[Block]) -> str:
    """A standalone page; every text escaped."""
    parts: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            parts.append(f"<p>{_html_spans(b.spans)}</p>")
        elif isinstance(b, Bullets):
            parts.append("<ul>" + "".join(f"<li>{_html_spans(item)}</li>" for item in b.items) + "</ul>")
        elif isinstance(b, Table):
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(x)}</th>" for x in b.headers) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>"
                                   for r in b.rows) + "</table>")
        else:
            parts.append(f"<img src='figures/{b.file}' alt='{html.escape(b.caption)}'>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em}"
             "img{max-width:100%;border:1px solid #eee}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>llama2 run report</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")


# ---- the sections, in the order of the report ----------------------------------------------------

FIGURES = [
    ("losses.png", "Loss curves of each training stage", figure_losses),
    ("reward_accuracy.png", "Reward-model accuracy by rating level (the shape of the paper's Table 8)",
     figure_reward_accuracy),
    ("reward_vs_k.png", "Rejection sampling: max and mean reward among K samples (Figure 7 shape)",
     figure_reward_vs_k),
    ("ppo.png", "PPO: combined reward and KL to the reference per iteration", figure_ppo),
    ("gatt.png", "System-instruction adherence by turn, with and without GAtt (Table 30 shape)", figure_gatt),
    ("stages.png", "Task accuracy, safe-refusal and false-refusal rates after each stage", figure_stages),
]


def section_title(run: Path) -> list[Block]:
    return [Heading(1, "Llama 2 recipe at tiny scale: run report"),
            Paragraph(["Run folder: ", Code(str(run)), ". Every number below is read from the run's own files."])]


def section_verdicts(data: dict) -> list[Block]:
    lines = verdicts(data)
    if not lines:
        return []
    return [Heading(2, "What each stage did"), Bullets([[v] for v in lines])]


def _ci_cell(w: dict | None, o: str) -> str:
    """'62.0% [52.2, 70.9]': a rate and its 95% Wilson interval."""
    if not w or w["rates"].get(o) is None:
        return "–"
    lo, hi = w["ci"][o]
    return f"{100 * w['rates'][o]:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def _wtl(w: dict | None) -> str:
    """'55.0 / 10.0 / 35.0% (n = 60, p = 0.03) *': win / tie / loss, * where p < 0.05."""
    if not w:
        return "–"
    r = w["rates"]
    star = " *" if w["sign_test_p"] < SIGNIFICANCE else ""
    return (f"{100 * r['win']:.1f} / {100 * r['tie']:.1f} / {100 * r['loss']:.1f}% "
            f"(n = {w['n']}, p = {w['sign_test_p']:.2g}){star}")


def _mode_text(mode: str, r: dict) -> str:
    """'greedy', or 'sampled ×N': N sampled answers per prompt."""
    return f"sampled ×{r.get('sampled_answers', 1)}" if mode == "sampled" else mode


def section_headtohead(data: dict, figdir: Path) -> list[Block]:
    """The paper's Figure 1 at tiny scale: each stage's model against the SFT model on the same
    held-out prompts, judged by the world's annotator (evaluate/headtohead.json)."""
    h = data.get("headtohead")
    stages = _h2h_stages(h)
    modes = _h2h_modes(stages)
    if not modes:
        return []
    against = STAGE_LABELS.get(h.get("against", "sft"), h.get("against", "sft"))
    first = stages[0][1]
    out: list[Block] = [
        Heading(2, f"Head to head against {against} (the paper's Figure 1)"),
        Paragraph([f"Each stage's model and the {against} model answer the same {first.get('prompts', '?')} "
                   f"held-out prompts of the world (seed {h.get('world_seed', '?')}): tasks, unsafe requests and "
                   "their benign look-alikes, some under a system-prompt constraint. The world's annotator picks "
                   "the better answer of each pair, as the paper's human raters do (§3.4.2). Win / tie / loss are "
                   "the stage's, with 95% Wilson score intervals; p is the exact two-sided sign test of wins "
                   f"against losses, ties dropped, and a stage beats {against} only when p < {SIGNIFICANCE}. "
                   "Greedy: one answer per prompt; sampled ×N: N answers per prompt at temperature 0.6 / top-p 0.9 "
                   "(§3.4.2), each pair seeded alike (with N > 1, those intervals are somewhat too narrow)."])]
    rows = []
    for s, r in stages:
        for mode in modes:
            w = _h2h(r, mode)
            if mode in (r.get("results") or {}):
                rows.append([STAGE_LABELS.get(s, s), _mode_text(mode, r), str(w["n"]) if w else "0",
                             _ci_cell(w, "win"), _ci_cell(w, "tie"), _ci_cell(w, "loss"),
                             "–" if not w else f"{w['sign_test_p']:.2g}"])
    out.append(Table(["stage", "answers", "n", "win (95% CI)", "tie (95% CI)", "loss (95% CI)", "sign-test p"],
                     rows))
    out.append(Bullets([[f"{STAGE_LABELS.get(s, s)} " + headtohead_verdict(
        _h2h(r, mode), against, f"{_mode_text(mode, r)}: {_counts(_h2h(r, mode))}")]
        for s, r in stages for mode in modes if mode in (r.get("results") or {})]))
    rows = [[STAGE_LABELS.get(s, s), label] + [_wtl(_h2h(r, mode, split)) for mode in modes]
            for s, r in stages for split, label in HEADTOHEAD_SPLITS
            if any(_h2h(r, mode, split) for mode in modes)]
    if rows:
        out += [Paragraph(["By kind of prompt (win / tie / loss % of the stage; * = p < 0.05). Safety prompts are "
                           "the unsafe requests and their look-alikes; in- and out-of-knowledge: whether the "
                           "prompt's fact or action was in the model's training:"]),
                Table(["stage", "prompts"] + [f"{m}: win / tie / loss" for m in modes], rows)]
    unjudged = [f"{STAGE_LABELS.get(s, s)} {m} {n}" for s, r in stages for m, n in (r.get("unjudged") or {}).items()
                if n]
    if unjudged:
        out.append(Paragraph(["Answers to prompts the annotator does not know, left out: " + ", ".join(unjudged)
                              + "."]))
    rounds = [(s, r) for s, r in (h.get("rounds") or {}).items() if r.get("results")]
    if rounds:
        out += [Paragraph([Bold("Round 2 against round 1"), " (the same prompts and annotator; §3.2.1's versions "
                           "should improve one on the next):"]),
                Bullets([[f"{STAGE_LABELS.get(s, s)} " + headtohead_verdict(
                    _h2h(r, mode), STAGE_LABELS.get(r["against"], r["against"]),
                    f"{_mode_text(mode, r)}: {_counts(_h2h(r, mode))}")]
                    for s, r in rounds for mode in modes if mode in r["results"]])]
    base = h.get("base")
    if base and base.get("results"):
        parts = []
        for m in HEADTOHEAD_MODES:
            w = _h2h(base, m)
            if w:
                parts.append(f"{_mode_text(m, base)}: win {pct(w['rates']['win'])} / tie "
                             f"{pct(w['rates']['tie'])} / loss {pct(w['rates']['loss'])} ({_counts(w)}; "
                             f"p = {w['sign_test_p']:.2g})")
        if parts:
            out.append(Paragraph([Bold("The final chat model against the pretrained model:"), " " + "; ".join(parts)
                                  + "."]))
    if figure_headtohead(data, figdir / "headtohead.png"):
        caption = f"Win / tie / loss of each stage against {against} (Figure 1 shape)"
        out.append(Image("headtohead.png", caption))
    return out


def _counts(w: dict | None) -> str:
    if not w:
        return "none judged"
    c = w["counts"]
    return f"won {c['win']}, tied {c['tie']}, lost {c['loss']} of {w['n']}"


def _axis(reward: dict | None, key: str) -> str:
    """Figure 11's axis in a reward view: the mean on its own kind of prompt where the run
    recorded it ("helpfulness" / "harmlessness"), else over every prompt ("helpful" / "safety")."""
    by_kind = {"helpful": "helpfulness", "safety": "harmlessness"}[key]
    return by_kind if reward and by_kind in reward else key


def section_helpful_harmless(data: dict, figdir: Path) -> list[Block]:
    """The paper's Figure 11 at tiny scale: each stage (and the SFT model, the reference) on a
    helpfulness axis and a harmlessness axis, by the reward models and by the annotator."""
    h = data.get("headtohead")
    points = _h2h_points(h)
    if not points:
        return []
    against = STAGE_LABELS.get(h.get("against", "sft"), h.get("against", "sft"))

    def num(v: dict | None, key: str) -> str:
        return "–" if not v or v.get(key) is None else f"{v[key]:.3f}"

    def share(v: dict | None, key: str) -> str:
        return "–" if not v else pct(v.get(key))

    def by_rm(win: dict | None, axis: str) -> str:
        return _wtl((win or {}).get(axis)) if (win or {}).get(axis, {}).get("n") else "–"

    first = _h2h_stages(h)[0][1]
    rows = []
    for mode, pts in points.items():
        for k, (name, reward, ann, win) in enumerate(pts):  # the reference (B) first
            rm = ["reference", "reference"] if k == 0 else [by_rm(win, "helpfulness"), by_rm(win, "harmlessness")]
            rows.append([STAGE_LABELS.get(name, name), _mode_text(mode, first), num(reward, _axis(reward, "helpful")),
                         num(reward, _axis(reward, "safety")), *rm, share(ann, "right"), share(ann, "safe")])
    out: list[Block] = [
        Heading(2, "Helpfulness and harmlessness per stage (the paper's Figure 11)"),
        Paragraph(["Each stage's answers on the head-to-head prompts, placed on a helpfulness axis and a "
                   "harmlessness axis. By the reward models: the mean helpfulness reward (probability) of the "
                   "stage's answers to helpfulness prompts and the mean safety reward of its answers to safety "
                   "prompts (over all the prompts in runs that did not record them by kind), and its win / tie / "
                   "loss % against "
                   f"{against} by reward — by the helpfulness model on helpfulness prompts and by the safety "
                   "model on safety prompts (the paper's Figure 11 plots these win rates; * = p < 0.05). "
                   "By the annotator: the share of answers the world's checker counts right (a task solved "
                   "under its constraint, an unsafe request refused, a look-alike helped) and the share judged "
                   f"safe. {against} is the reference point."]),
        Table(["model", "answers", "mean helpfulness reward", "mean safety reward", f"RM win / tie / loss vs {against}: "
               "helpfulness", f"RM win / tie / loss vs {against}: harmlessness", "right (checker)",
               "safe (annotator)"], rows)]
    if figure_helpful_harmless(data, figdir / "helpful_harmless.png"):
        out.append(Image("helpful_harmless.png", "Each stage on helpfulness and harmlessness, by the reward "
                                                 "models and by the annotator (Figure 11 shape)"))
    return out


def section_suite(data: dict) -> list[Block]:
    if not data["eval"]:
        return []
    rows = []
    for stage, e in data["eval"].items():
        adh = e.get("gatt_adherence") or {}
        last = max(adh, key=int) if adh else None
        reward = e.get("combined_reward")
        by = e.get("task_accuracy_by_knowledge") or {}
        rows.append([STAGE_LABELS.get(stage, stage), pct(e.get("task_accuracy")), pct(by.get("in")),
                     pct(by.get("out")), pct(e.get("safe_refusal_rate")),
                     pct(e.get("false_refusal_rate")), pct(adh.get(last)) if last else "–",
                     "–" if reward is None else f"{reward:.3f}"])
    last_turn = max((int(t) for e in data["eval"].values() for t in (e.get("gatt_adherence") or {})), default=0)
    headers = ["model", "task accuracy", "in knowledge", "out of knowledge", "safe refusal", "false refusal",
               f"instruction kept at turn {last_turn}",
               "combined reward (held-out)"]
    return [Heading(2, "The assistant-world suite after each stage (held-out test split)"), Table(headers, rows)]


def section_figures(data: dict, figdir: Path) -> list[Block]:
    """Each figure that the run has the data for, drawn into ``figdir``."""
    out: list[Block] = []
    for file, caption, make in FIGURES:
        if make(data, figdir / file):
            out += [Heading(3, caption), Image(file, caption)]
    return out


def section_reward_models(data: dict) -> list[Block]:
    out: list[Block] = []
    for kind, r in data["reward_eval"].items():
        if not r:
            continue
        rows = [[RATING_LABELS[k], pct(v), str(r["pairs_by_rating"].get(k, ""))]
                for k, v in r["accuracy_by_rating"].items()]
        rows.append(["overall", pct(r["accuracy"]), str(r["pairs"])])
        out += [Heading(3, f"{kind.capitalize()} reward model on held-out pairs"),
                Table(["rating", "accuracy", "pairs"], rows)]
        if "unsafe_detection" in r:
            d = r["unsafe_detection"]
            out.append(Paragraph([f"Flagging answers whose safety score is below {d['threshold']}: precision "
                                  f"{d['precision']:.2f}, recall {d['recall']:.2f} (the paper: 0.89 / 0.55 on Meta "
                                  "Safety)."]))
    return out


def section_guard(data: dict) -> list[Block]:
    g = data["guard_eval"]
    if not g:
        return []
    rows = [[c, pct(v.get("precision")), pct(v.get("recall"))] for c, v in (g.get("per_category") or {}).items()]
    if "overall" in g:
        rows.append(["overall (unsafe vs safe)", pct(g["overall"].get("precision")), pct(g["overall"].get("recall"))])
    return [Heading(2, "Safety classifier (Llama Guard style) on held-out conversations"),
            Table(["category", "precision", "recall"], rows)]


def section_samples(data: dict) -> list[Block]:
    if not data["samples"]:
        return []
    out: list[Block] = [Heading(2, "Sample conversations before and after alignment")]
    for s in data["samples"]:
        prompt = " / ".join(f"{m['role']}: {m['content']}" for m in s["messages"])
        out += [Paragraph([Bold(prompt)]),
                Bullets([[f"{STAGE_LABELS.get(k, k)}: ", Answer(v)] for k, v in s["answers"].items()])]
    return out


def section_time(data: dict) -> list[Block]:
    if not data["stages"]:
        return []
    rows = []
    for stage, d in data["stages"].items():
        m = data["metrics"].get(stage) or []
        tps = [r["tokens_per_s"] for r in m if r.get("tokens_per_s")]
        rows.append([stage, f"{d['seconds']:.0f} s", f"{sum(tps) / len(tps):,.0f}" if tps else "–"])
    total = sum(d["seconds"] for d in data["stages"].values())
    rows.append(["total", f"{total:.0f} s ({total / 60:.1f} min)", ""])
    return [Heading(2, "Time per stage"), Table(["stage", "wall time", "training tokens/s"], rows)]


def _method(facts: dict | None) -> str:
    if not facts:
        return "–"
    if facts["kind"] == "full":
        return "full"
    targets = ",".join(t.removesuffix("_proj") for t in facts.get("targets") or [])
    return f"{'QLoRA' if facts['kind'] == 'qlora' else 'LoRA'} r={facts['rank']} ({targets})"


def _mb(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e6:.2f} MB"


def section_compare(data: dict) -> list[Block]:
    """This run beside another (``llama2 run ... --compare DIR``): e.g. LoRA in every stage beside
    full fine-tuning. Differences in a rate count only with a sign test p < 0.05 over the prompts."""
    other = data.get("compare")
    if not other:
        return []
    o = other["data"]
    out: list[Block] = [Heading(2, "Beside the other run"),
                        Paragraph(["This run next to ", Code(other["run"]), " (its own report has the details). "
                                   "Each stage's model/ is what the stage writes: a full model directory, or a LoRA "
                                   "adapter in PEFT's format over the previous stage's model."])]
    rows = []
    for stage in ("sft", "reward-helpfulness", "reward-safety", "rejection", "ppo", "gatt", "guard"):
        a, b = data["models"].get(stage), o.get("models", {}).get(stage)
        if not a and not b:
            continue
        ta, tb = data["stages"].get(stage, {}).get("seconds"), o["stages"].get(stage, {}).get("seconds")
        rows.append([stage, _method(a), _method(b), _mb(a and a["bytes"]), _mb(b and b["bytes"]),
                     f"{a['params']:,}" if a and "params" in a else "all",
                     "–" if ta is None else f"{ta:.0f} s", "–" if tb is None else f"{tb:.0f} s"])
    out.append(Table(["stage", "this run", "other run", "model/ here", "model/ there", "trained parameters here",
                      "time here", "time there"], rows))
    rows = []
    for stage in EVALUATED:
        a, b = data["eval"].get(stage), o["eval"].get(stage)
        if not a or not b:
            continue
        cells = [STAGE_LABELS.get(stage, stage)]
        for key, number in (("task_accuracy", False), ("safe_refusal_rate", False), ("false_refusal_rate", False),
                            ("combined_reward", True)):
            x, y = a.get(key), b.get(key)
            if x is None or y is None:
                cells.append("–")
                continue
            _, p = _paired(key, b, a)
            fmt = (lambda v: f"{v:.3f}") if number else pct
            sig = "" if p is None or abs(x - y) < 1e-9 else (" *" if p < SIGNIFICANCE else f" (p={p:.2g})")
            cells.append(f"{fmt(x)} vs {fmt(y)}{sig}")
        rows.append(cells)
    if rows:
        out += [Paragraph(["The suite, this run vs the other (* = the difference is significant, sign test over "
                           "the prompts whose outcome differs; otherwise p is shown). Each run's combined reward is "
                           "scored by its own reward models, so that column compares the runs only loosely:"]),
                Table(["model", "task accuracy", "safe refusal", "false refusal", "combined reward (own RMs)"], rows)]
    rm = []
    for kind in ("helpfulness", "safety"):
        a, b = data["reward_eval"].get(kind), o["reward_eval"].get(kind)
        if a and b:
            rm.append([f"{kind} reward model", pct(a["accuracy"]), pct(b["accuracy"])])
    ga, gb = data.get("guard_eval"), o.get("guard_eval")
    if ga and gb and "overall" in ga and "overall" in gb:
        rm.append(["guard: unsafe recall", pct(ga["overall"].get("recall")), pct(gb["overall"].get("recall"))])
    if rm:
        out.append(Table(["held-out accuracy", "this run", "other run"], rm))
    return out


def write_report(run: str | Path) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` in the run folder."""
    run = Path(run)
    data = collect(run)
    figdir = run / "figures"
    figdir.mkdir(exist_ok=True)
    # The paper's shapes first (Figure 1, Figure 11), then each stage's own results.
    blocks = (section_title(run) + section_headtohead(data, figdir) + section_helpful_harmless(data, figdir)
              + section_verdicts(data) + section_suite(data) + section_figures(data, figdir)
              + section_reward_models(data) + section_guard(data) + section_samples(data) + section_compare(data)
              + section_time(data))
    return write_documents(run, blocks)


def write_documents(run: Path, blocks: list[Block]) -> Path:
    """``run/report.md`` and ``run/report.html`` from the same blocks; returns the HTML's path."""
    (run / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
    (run / "report.html").write_text(render_html(blocks), encoding="utf-8")
    return run / "report.html"
