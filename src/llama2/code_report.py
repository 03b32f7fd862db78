"""The report of ``llama2 run code``: infilling before and after fill-in-the-middle training (Code
Llama §2.3), the loss by position on held-out code (Code Llama §3.3, Figure 4a) and the passkey
probe by depth and length before and after long-context fine-tuning
(Code Llama §2.4; the shape of the key-retrieval figures of position interpolation, Chen et al.
2023, and Llama 2 Long, Xiong et al. 2023), as Markdown and HTML with PNG figures beside them.
Every number shown is read from the run's own files (evaluate/results.json, metrics.jsonl,
index.json, .done.json); the document blocks and their rendering are the Llama 2 report's.
"""

from __future__ import annotations

from pathlib import Path

from llama2.eval.stats import SIGNIFICANCE, paired_changes, sign_test
from llama2.report import (
    Answer,
    Block,
    Bullets,
    Code,
    Heading,
    Image,
    Paragraph,
    Table,
    figure_losses,
    pct,
    read_json,
    read_metrics,
    save_figure,
    section_time,
    write_documents,
)
from llama2.stages import CODE_INFILL_EVALUATED, CODE_PASSKEY_EVALUATED, CODE_STAGES

MODEL_LABELS = {"pretrain": "base (before FIM)", "fim": "FIM (before the extension)",
                "long": "long context (after the extension)"}
TRAINING_STAGES = ("pretrain", "fim", "long")
DATA_STAGES = ("data", "data-fim", "data-long")


def collect(run: Path) -> dict:
    """Everything the report shows, gathered from the run folder."""
    data: dict = {"stages": {}, "metrics": {}, "data": {}}
    for stage in CODE_STAGES:
        done = read_json(run / stage / ".done.json")
        if done:
            data["stages"][stage] = done
    for stage in TRAINING_STAGES:
        m = read_metrics(run / stage / "metrics.jsonl")
        if m:
            data["metrics"][stage] = m
    for stage in DATA_STAGES:
        index = read_json(run / stage / "index.json")
        if index:
            data["data"][stage] = index
    data["results"] = read_json(run / "evaluate" / "results.json") or {}
    return data


# ---- comparisons ------------------------------------------------------------------------------------

def _infill_mode(result: dict | None, mode: str) -> dict | None:
    for r in (result or {}).get("infill") or []:
        if r["mode"] == mode:
            return r
    return None


def _change(before: list[bool], after: list[bool]) -> str:
    """'a% -> b% (g gained, l lost; sign test p = x: verdict)' of paired right/wrong flags."""
    gained, lost = paired_changes([float(x) for x in before], [float(x) for x in after])
    p = sign_test(gained, lost)
    if gained == lost == 0:
        verdict = "no item changed"
    elif p < SIGNIFICANCE:
        verdict = "a real improvement" if gained > lost else "a real loss"
    else:
        verdict = "not distinguishable from noise"
    rate = lambda flags: sum(flags) / len(flags)  # noqa: E731
    return (f"{pct(rate(before))} -> {pct(rate(after))} ({gained} gained, {lost} lost; sign test p = {p:.2g}: "
            f"{verdict})")


def infill_verdicts(results: dict) -> list[str]:
    """Plain sentences: infilling before and after FIM training, then after the extension."""
    lines = []
    for before, after, label in (("pretrain", "fim", "before -> after FIM training"),
                                 ("fim", "long", "before -> after long-context fine-tuning")):
        for mode in ("PSM", "SPM"):
            a, b = _infill_mode(results.get(before), mode), _infill_mode(results.get(after), mode)
            if not a or not b or [t["name"] for t in a["per_task"]] != [t["name"] for t in b["per_task"]]:
                continue
            flags = {key: ([t[key] for t in a["per_task"]], [t[key] for t in b["per_task"]])
                     for key in ("exact", "passed")}
            lines.append(f"{mode} infilling of {b['n']} held-out functions, {label} ({before} -> {after} model): "
                         f"exact match {_change(*flags['exact'])}; pass rate {_change(*flags['passed'])}.")
    return lines


def _by_length(passkey: dict) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for row in passkey.get("per_prompt") or []:
        out.setdefault(row["length"], []).append(row)
    return out


def _length_note(length: int, trained: dict[str, int]) -> str:
    base, long = trained.get("fim") or 0, trained.get("long") or 0
    if base and length <= base:
        return "within both training lengths"
    if long and length <= long:
        return f"past the pretraining length ({base}), within the long-context fine-tuning length ({long})"
    return f"past both training lengths ({base} and {long})"


def passkey_verdicts(results: dict) -> list[str]:
    """Plain sentences: passkey accuracy per length before and after the extension, paired prompt
    by prompt (the same prompts for both models)."""
    a, b = (results.get(s, {}).get("passkey") for s in CODE_PASSKEY_EVALUATED)
    if not a or not b:
        return []
    trained = {s: results[s].get("trained_length") for s in CODE_PASSKEY_EVALUATED}
    before, after = _by_length(a), _by_length(b)
    lines = []
    for length in sorted(set(before) & set(after)):
        x, y = before[length], after[length]
        if len(x) != len(y):
            continue
        lines.append(f"Passkey retrieval at {length:,} tokens ({_length_note(length, trained)}), {len(x)} "
                     f"prompts, before -> after the extension: {_change([r['right'] for r in x], [r['right'] for r in y])}.")
    return lines


def _bucket_labels(edges: list[int]) -> list[str]:
    return [f"{a:,}-{b:,}" for a, b in zip(edges, edges[1:])]


def position_verdicts(results: dict) -> list[str]:
    """Plain sentences: the loss by position of the model before and after the extension, bucket
    by bucket past the shorter training length."""
    a, b = (results.get(s, {}).get("positions") for s in CODE_PASSKEY_EVALUATED)
    if not a or not b or a["edges"] != b["edges"]:
        return []
    trained = results[CODE_PASSKEY_EVALUATED[0]].get("trained_length") or 0
    parts = [f"{label}: {x:.2f} -> {y:.2f}" for label, lo, x, y in
             zip(_bucket_labels(a["edges"]), a["edges"], a["nll"], b["nll"]) if lo >= trained]
    if not parts:
        return []
    return [f"Loss (nats per token) on held-out code by position, past the pretraining length ({trained}), before "
            f"-> after the extension, over {b['chunks']} windows: " + "; ".join(parts) + "."]


# ---- figures ----------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(passkey: dict) -> tuple[list[int], list[float], list[list[float]]]:
    cells = passkey["cells"]
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in cells}
    return lengths, depths, [[acc.get((n, d), float("nan")) for n in lengths] for d in depths]


def figure_passkey(results: dict, path: Path) -> bool:
    """Accuracy by depth (rows) and length (columns), one panel per model; a dashed line marks
    each model's training length."""
    panels = [(s, results[s]) for s in CODE_PASSKEY_EVALUATED if (results.get(s) or {}).get("passkey")]
    if not panels:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (stage, r) in zip(axes[0], panels):
        lengths, depths, grid = _grid(r["passkey"])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "–" if v != v else f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)))
        ax.set_xticklabels([str(n) for n in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)))
        ax.set_yticklabels([f"{d:.2f}" for d in depths], fontsize=8)
        ax.set_xlabel("prompt length (tokens)")
        trained = r.get("trained_length") or 0
        inside = sum(n <= trained for n in lengths)
        if 0 < inside < len(lengths):
            ax.axvline(inside - 0.5, color="black", ls="--", lw=1)
        scaling = f", PI x{r['rope_scaling']:g}" if r.get("rope_scaling") else ""
        ax.set_title(f"{MODEL_LABELS[stage]}\ntrained at {trained}, θ={r.get('rope_theta', 0):,.0f}{scaling}",
                     fontsize=9)
    axes[0][0].set_ylabel("depth of the key")
    fig.colorbar(im, ax=list(axes[0]), fraction=0.03, label="accuracy")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def figure_positions(results: dict, path: Path) -> bool:
    """Loss by position, one line per model, each model's training length marked."""
    lines = [(s, results[s]) for s in CODE_PASSKEY_EVALUATED if (results.get(s) or {}).get("positions")]
    if not lines:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for stage, r in lines:
        edges = r["positions"]["edges"]
        mids = [(a * b) ** 0.5 if a else b / 2 for a, b in zip(edges, edges[1:])]  # the middle on a log axis
        line, = ax.plot(mids, r["positions"]["nll"], marker="o", label=MODEL_LABELS[stage])
        if r.get("trained_length"):
            ax.axvline(r["trained_length"], color=line.get_color(), ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ticks = lines[0][1]["positions"]["edges"][1:]
    ax.set_xticks(ticks, [f"{e:,}" for e in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("position in the window (tokens; dashed: training length)")
    ax.set_ylabel("loss (nats per token)")
    ax.legend(fontsize=8)
    ax.set_title("Loss on held-out code by position")
    return save_figure(fig, path)


def figure_infill(results: dict, path: Path) -> bool:
    """Exact match and pass rate per model and mode."""
    rows = [(s, m) for s in CODE_INFILL_EVALUATED for m in ("PSM", "SPM") if _infill_mode(results.get(s), m)]
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    width = 0.38
    for j, (key, label) in enumerate((("exact_rate", "exact match"), ("passed_rate", "pass"))):
        ax.bar([i + j * width for i in range(len(rows))],
               [100 * _infill_mode(results[s], m)[key] for s, m in rows], width, label=label)
    ax.set_xticks([i + width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{s}\n{m}" for s, m in rows], fontsize=8)
    ax.set_ylabel("% of held-out functions")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.set_title("Infilling of held-out functions before and after FIM training")
    return save_figure(fig, path)


# ---- the sections -----------------------------------------------------------------------------------

def section_title(run: Path, data: dict) -> list[Block]:
    results = data["results"]
    facts = []
    for stage in TRAINING_STAGES:
        r = results.get(stage)
        if r:
            scaling = f", position interpolation x{r['rope_scaling']:g}" if r.get("rope_scaling") else ""
            facts.append(f"{stage}: trained at {r.get('trained_length')} tokens, RoPE θ={r.get('rope_theta'):,.0f}"
                         f"{scaling}")
    out: list[Block] = [
        Heading(1, "Code Llama recipe at tiny scale: run report"),
        Paragraph(["Run folder: ", Code(str(run)), ". A tiny model pretrained on code, then trained on "
                   "fill-in-the-middle examples (Code Llama §2.3), then fine-tuned on sequences 4x as long with "
                   "the RoPE base raised (Code Llama §2.4). Every number below is read from the run's own files."])]
    if facts:
        out.append(Bullets([[f] for f in facts]))
    return out


def section_verdicts(data: dict) -> list[Block]:
    lines = infill_verdicts(data["results"]) + position_verdicts(data["results"]) + passkey_verdicts(data["results"])
    if not lines:
        return []
    return [Heading(2, "What improved and what did not"),
            Paragraph(["Each change is paired item by item (the same held-out functions, the same passkey prompts) "
                       f"and called real when an exact two-sided sign test gives p < {SIGNIFICANCE}."]),
            Bullets([[line] for line in lines])]


def section_infill(data: dict, figdir: Path) -> list[Block]:
    results = data["results"]
    rows = []
    for stage in CODE_INFILL_EVALUATED:
        for mode in ("PSM", "SPM"):
            r = _infill_mode(results.get(stage), mode)
            if r:
                rows.append([MODEL_LABELS[stage], mode, str(r["n"]), pct(r["exact_rate"]),
                             pct(r["exact_stripped_rate"]), pct(r["passed_rate"]), pct(r["stopped_rate"])])
    if not rows:
        return []
    single = any((_infill_mode(results.get(s), "PSM") or {}).get("single_line") for s in CODE_INFILL_EVALUATED)
    cut = (" and cut after its first line break (single-line infilling: a model trained on middles cut at random "
           "characters need not stop at the line's end)") if single else ""
    out: list[Block] = [
        Heading(2, "Infilling held-out functions"),
        Paragraph(["Functions of the code world's test split (behaviours never trained on): the model sees the "
                   "signature and docstring (prefix) and the rest of the body (suffix) in Code Llama's PSM or SPM "
                   "prompt and writes the missing line, greedily, until ", Code("<EOT>"), f"{cut}. Exact: the line "
                   "character for character; pass: the filled-in function runs its test clean in a sandboxed "
                   "subprocess with a time limit (llama2.eval.sandbox). In SPM order the middle continues the "
                   "prefix, so a model that never saw FIM can still write it left to right."]),
        Table(["model", "mode", "functions", "exact match", "exact (stripped)", "pass", "ended with EOT"], rows)]
    if figure_infill(results, figdir / "infill.png"):
        out.append(Image("infill.png", "Infilling exact match and pass rate per model and prompt order"))
    samples = []
    for stage in CODE_INFILL_EVALUATED:
        r = _infill_mode(results.get(stage), "PSM")
        for s in (r or {}).get("samples", [])[:3]:
            verdict = "pass" if s["passed"] else "fail"
            samples.append([f"{stage}, ", Code(s["name"]), f" ({'exact' if s['exact'] else 'not exact'}, {verdict}): "
                            "wrote ", Answer(s["generated"]), ", reference ", Answer(s["middle"])])
    if samples:
        out += [Paragraph(["Samples (PSM):"]), Bullets(samples)]
    return out


def section_passkey(data: dict, figdir: Path) -> list[Block]:
    results = data["results"]
    models = [s for s in CODE_PASSKEY_EVALUATED if (results.get(s) or {}).get("passkey")]
    if not models:
        return []
    out: list[Block] = [
        Heading(2, "Passkey retrieval by depth and length"),
        Paragraph(["A key (one of 64 words; chance 1 in 64) hidden in code-like filler at a depth from 0 (first line) "
                   "to 1 (last line); "
                   "the prompt ends with the words that introduced the key and the model must write it (greedy). "
                   "Lengths past a model's training length show whether its context reaches beyond it "
                   "(the dashed line in the figure)."])]
    if figure_passkey(results, figdir / "passkey.png"):
        out.append(Image("passkey.png", "Passkey accuracy by depth and length, before and after the extension"))
    for stage in models:
        p = results[stage]["passkey"]
        lengths, depths, grid = _grid(p)
        n = {c["length"]: c["n"] for c in p["cells"]}
        out += [Paragraph([f"{MODEL_LABELS[stage]}, trained at {results[stage].get('trained_length')} tokens: "
                           f"{pct(p['accuracy'])} of {p['n']} prompts ({n[lengths[0]]} per cell)."]),
                Table(["depth \\ length"] + [str(x) for x in lengths],
                      [[f"{d:.2f}"] + [pct(v) if v == v else "–" for v in row] for d, row in zip(depths, grid)])]
    shown = []
    for stage in models:
        for s in results[stage]["passkey"].get("samples", [])[:4]:
            shown.append([f"{stage}, {s['length']} tokens, depth {s['depth']:.2f}: key {s['key']}, answered ",
                          Answer(s["answer"])])
    if shown:
        out += [Paragraph(["Answers:"]), Bullets(shown)]
    return out


def section_positions(data: dict, figdir: Path) -> list[Block]:
    results = data["results"]
    models = [s for s in CODE_PASSKEY_EVALUATED if (results.get(s) or {}).get("positions")]
    if not models:
        return []
    edges = results[models[0]]["positions"]["edges"]
    out: list[Block] = [
        Heading(2, "Loss by position on held-out code"),
        Paragraph([f"Windows of {edges[-1]:,} tokens of held-out code (the validation split of the plain code "
                   "data), each read whole; the loss of each token counted by its position in the window (Code "
                   "Llama §3.3, Figure 4a). A model used past the length it was trained at meets relative "
                   "distances it never saw, and its loss rises there; a context that works keeps the loss flat "
                   "or falling."])]
    if figure_positions(results, figdir / "positions.png"):
        out.append(Image("positions.png", "Loss by position, before and after the extension"))
    rows = []
    for stage in models:
        r = results[stage]
        if r["positions"]["edges"] != edges:
            continue
        rows.append([MODEL_LABELS[stage], str(r.get("trained_length")), f"{r.get('rope_theta', 0):,.0f}"]
                    + [f"{v:.2f}" for v in r["positions"]["nll"]])
    out.append(Table(["model", "trained at", "RoPE θ"] + _bucket_labels(edges), rows))
    return out


def section_training(data: dict, figdir: Path) -> list[Block]:
    out: list[Block] = []
    rows = []
    for stage in DATA_STAGES:
        index = data["data"].get(stage)
        if not index:
            continue
        for part, facts in (index.get("parts") or {}).items():
            rows.append([stage, part + (" (loss on the answer only)" if facts.get("completions") else ""),
                         f"{facts['tokens']['train']:,}", f"{facts['documents']['train']:,}",
                         pct(facts.get("fim") or 0.0)])
    if rows:
        out += [Heading(2, "Training data"),
                Paragraph(["Code: the bundled CPython standard-library subset and code-world training functions; "
                           "passkey: probe-shaped texts of the next stage's training length or halves of it, laid out so "
                           "that no training window cuts one, never FIM-transformed."]),
                Table(["data stage", "part", "train tokens", "train documents", "FIM rate"], rows)]
    if figure_losses(data, figdir / "losses.png"):
        out.append(Image("losses.png", "Loss curves of the training stages"))
    return out


def write_code_report(run: str | Path) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` in the run folder."""
    run = Path(run)
    data = collect(run)
    figdir = run / "figures"
    figdir.mkdir(exist_ok=True)
    blocks = (section_title(run, data) + section_verdicts(data) + section_infill(data, figdir)
              + section_positions(data, figdir) + section_passkey(data, figdir) + section_training(data, figdir)
              + section_time(data))
    return write_documents(run, blocks)
