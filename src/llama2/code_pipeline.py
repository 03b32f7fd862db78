"""``llama2 run code``: Code Llama's recipe at tiny scale, stage after stage, with a report.

tokenizer -> data -> pretrain -> data-fim -> fim -> data-long -> long -> evaluate

* **tokenizer**: a SentencePiece BPE tokenizer trained on the bundled code corpus (CPython's
  standard library), the code world's training functions and the passkey probe's text, with
  Code Llama's 16 pieces (the infilling sentinels PRE/SUF/MID/EOT) appended (Code Llama §2.3).
* **data**, **pretrain**: plain next-token pretraining of a tiny model on that code, plus short
  passkey texts (64 and 128 tokens: the key is then 1 of few tokens, and the copy forms within the
  stage), so the base model knows the probe's task at its own length (Code Llama starts from
  Llama 2; here the base model is trained from scratch). With ``passkey_answer_only`` a data stage
  writes them as prompt/completion rows (the loss on the answer alone; ``completion_weight`` of
  the training stage weighs it against the code). Each data stage lays its passkey texts out so
  that no training window cuts one (:meth:`CodeDataConfig.passkey_lengths`).
* **data-fim**, **fim**: the code with the fill-in-the-middle transformation (Code Llama §2.3:
  90% of documents, half of them in SPM order; the tiny recipe cuts at line starts,
  ``fim_unit: line``, and gives the code world's functions without their tests), and pretraining
  continued from the base model on it (``llama2 pretrain --init``).
* **data-long**, **long**: long-context fine-tuning (Code Llama §2.4) continued from the FIM
  model on sequences 4x the pretraining length, with the RoPE base raised from 10⁴ to 10⁶, or
  with linear position interpolation (Chen et al. 2023) when the recipe sets
  ``model.rope_scaling``; the texts keep FIM, and passkey texts at the new length are added.
* **evaluate**: infilling of held-out code-world functions (PSM and SPM; exact match, and the
  filled-in function run against its test in the sandbox with a time limit) before FIM
  training (the base model), after it and after the extension; the loss by position on
  held-out code (Code Llama §3.3, Figure 4a) and the passkey probe by depth and length,
  including lengths past the training length, before the extension (the FIM model) and after
  it. Each model's results are cached in ``STAGE/code_eval.json``.

``OUT/report.md`` and ``OUT/report.html`` (llama2.code_report) show the results.

Every stage writes its own folder under ``--out`` and, once finished, a ``.done.json`` marker
with its wall time, as ``llama2 run`` does: re-running skips finished stages and an interrupted
training stage resumes from its last checkpoint; ``--from``/``--until`` work alike.

The passkey texts never get the FIM transformation: each data stage prepares the code texts
(with FIM when the stage asks for it) and the passkey texts (always plain, left to right, the
shape the probe asks) into two sub-folders and writes one index over both
(:func:`merge_prepared`), so the trainer reads them as one token stream.

A code recipe is a YAML file with ``pipeline: code`` and a ``stages:`` block whose stages are
:data:`CODE_STAGE_CONFIGS`' keys, each checked against its config when the recipe is read.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llama2.checkpoint import load_model, load_tokenizer
from llama2.commands import tokenizer as tokenizer_command
from llama2.commands.tokenizer import TokenizerConfig
from llama2.corpus import code_corpus_files
from llama2.data.code_world import code_documents, code_tasks
from llama2.data.shards import (
    INDEX,
    PrepareConfig,
    TokenStream,
    prepare,
    prepare_from_config,
    read_documents,
    read_index,
)
from llama2.eval.infill import infill_eval
from llama2.eval.passkey import (
    FILLER,
    HEADER,
    KEY_LINE,
    KEYS,
    QUESTION,
    passkey_eval,
    passkey_examples,
    read_answer,
)
from llama2.eval.perplexity import loss_by_position
from llama2.recipe import from_dict, read_recipe, setting, stage_settings
from llama2.stages import (
    CODE_INFILL_EVALUATED,
    CODE_PASSKEY_EVALUATED,
    CODE_STAGES,
    StageContext,
    run_stages,
    write_json,
)
from llama2.tokenizer import Tokenizer
from llama2.train import pretrain
from llama2.utils import default_device

__all__ = ["CODE_STAGE_CONFIGS", "CodeDataConfig", "CodeEvaluateConfig", "CodeTokenizerConfig", "merge_prepared",
           "passkey_rows", "read_code_recipe", "run_code_pipeline"]


# ---- the stages' configs ------------------------------------------------------------------------

@dataclass
class CodeTokenizerConfig(TokenizerConfig):
    """The ``tokenizer`` stage of a code recipe: ``llama2 tokenizer train``'s flags, trained on the
    code corpus, the code world and the passkey text, infilling pieces on."""

    infilling: bool = setting(True, "append Code Llama's 16 pieces (PRE/SUF/MID/EOT sentinels, Code Llama §2.3) "
                                    "after the vocab_size trained ones; the code recipe needs them")
    code_world_documents: int = setting(2000, "code-world training functions (with their tests) the tokenizer "
                                              "also learns from")
    corpus_documents: int | None = setting(None, "documents of the bundled code corpus to use, from its start "
                                                 "(none: all of it, about 2 MB of Python)")
    seed: int = setting(0, "seed of the code world's surface (names, docstrings, test inputs)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.infilling:
            raise ValueError("infilling must be true: the code recipe trains and asks infilling (Code Llama §2.3)")
        for name in ("code_world_documents", "corpus_documents"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def _halved(length: int, part: int) -> bool:
    """Whether ``part`` is ``length`` halved zero or more times (256 -> 128 -> 64)."""
    return 1 <= part <= length and length % part == 0 and (length // part) & (length // part - 1) == 0


@dataclass
class CodeDataConfig(PrepareConfig):
    """A data stage of a code recipe: ``llama2 prepare``'s flags for the code texts (the bundled
    code corpus and code-world functions; ``fim_rate`` applies to them), plus plain passkey texts."""

    code_world_documents: int = setting(2000, "code-world training functions (each with its test) added to the "
                                              "code corpus")
    corpus_documents: int | None = setting(None, "documents of the bundled code corpus to use, from its start "
                                                 "(none: all of it, about 2 MB of Python)")
    passkey_documents: int = setting(0, "passkey training texts (a key hidden in code-like filler, then the "
                                        "question and the answer), never FIM-transformed; 0: none")
    passkey_length: int = setting(256, "tokens of the longest passkey training texts (BOS to EOS): the next "
                                       "training stage's seq_len or that halved (texts fill its windows whole)")
    passkey_min_length: int | None = setting(None, "tokens of the shortest passkey training texts: passkey_length "
                                                   "halved one or more times (256 -> 128 -> 64), the documents dealt "
                                                   "evenly among those lengths; short texts teach the copy (the "
                                                   "key is 1 of 64 tokens, not 1 of 256), long ones the distance; "
                                                   "none: all passkey_length")
    passkey_answer_only: bool = setting(False, "train the passkey texts on their answer alone (prompt/completion "
                                               "rows, the loss on the key and EOS); off: the loss on every token, "
                                               "as plain text")
    seed: int = setting(0, "seed of the code world's surface and of the passkey texts")

    def __post_init__(self) -> None:
        for name in ("code_world_documents", "passkey_documents", "corpus_documents"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.world_seed != self.seed:  # (a recipe's top-level seed sets both)
            raise ValueError(f"world_seed {self.world_seed} differs from seed {self.seed}: in a code recipe the code "
                             "world's surface follows seed")
        if self.code_corpus:
            raise ValueError("code_corpus: a code recipe's data always has the bundled code corpus (limit it with "
                             "corpus_documents)")
        shortest = self.passkey_length if self.passkey_min_length is None else self.passkey_min_length
        if self.passkey_documents and shortest < 64:
            raise ValueError(f"passkey texts of {shortest} tokens are too short (>= 64 tokens)")
        if not _halved(self.passkey_length, shortest):
            raise ValueError(f"passkey_min_length {shortest} must be passkey_length {self.passkey_length} halved "
                             "zero or more times")

    def passkey_lengths(self) -> list[int]:
        """The length of each passkey training text, longest first: passkey_length, its half, ... down to
        passkey_min_length, the documents dealt evenly among them. Longest first, every length a power-of-two
        fraction of the window, each text starts at a multiple of its own length in the stream, so no
        window of passkey_length tokens ever cuts one (whatever texts the validation split takes)."""
        shortest = self.passkey_length if self.passkey_min_length is None else self.passkey_min_length
        levels = [self.passkey_length >> k for k in range((self.passkey_length // shortest).bit_length())]
        return [levels[i * len(levels) // self.passkey_documents] for i in range(self.passkey_documents)]


@dataclass
class CodeEvaluateConfig:
    """The ``evaluate`` stage of a code recipe: infilling and the passkey probe."""

    infill_tasks: int = setting(100, "held-out code-world functions (test split) whose middle line is infilled")
    max_new_tokens: int = setting(32, "most tokens of a generated middle")
    time_limit: float = setting(5.0, "seconds each filled-in function and its test may run in the sandbox")
    single_line: bool = setting(True, "single-line infilling: the code world's middles are one line, and a "
                                      "generated middle is cut after its first line break (a model trained on "
                                      "middles cut at random characters need not stop at the line's end)")
    batch_size: int = setting(16, "prompts decoded together")
    passkey_lengths: list[int] = setting(default_factory=lambda: [256, 512, 1024, 2048],
                                         help="prompt lengths of the passkey probe, in tokens (include some past "
                                              "the training lengths)")
    passkey_depths: list[float] = setting(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
                                          help="where the key sits in the filler: 0 = first line, 1 = last")
    passkey_per_cell: int = setting(4, "passkey prompts per (length, depth) cell")
    position_edges: list[int] = setting(default_factory=lambda: [0, 64, 128, 256, 512, 1024, 2048],
                                        help="buckets of token positions for the loss by position on held-out code "
                                             "(Code Llama §3.3, Figure 4a), read in windows of the last edge's length")
    position_windows: int = setting(16, "held-out code windows the loss by position averages over (fewer when the "
                                        "held-out code is shorter)")
    samples: int = setting(4, "infilled functions per model and mode kept for the report")
    seed: int = setting(0, "seed of the code-world surfaces and the passkey prompts")

    def __post_init__(self) -> None:
        for name in ("infill_tasks", "max_new_tokens", "batch_size", "passkey_per_cell"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.time_limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds, got {self.time_limit}")
        if not self.passkey_lengths or min(self.passkey_lengths) < 64:
            raise ValueError(f"passkey_lengths must be lengths of >= 64 tokens, got {self.passkey_lengths}")
        edges = self.position_edges
        if len(edges) < 2 or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"position_edges must rise from 0, at least two of them, got {edges}")
        if self.position_windows < 1:
            raise ValueError(f"position_windows must be >= 1, got {self.position_windows}")
        bad = [d for d in self.passkey_depths if not 0.0 <= d <= 1.0]
        if not self.passkey_depths or bad:
            raise ValueError(f"passkey_depths must be fractions in [0, 1], got {self.passkey_depths}")


CODE_STAGE_CONFIGS: dict[str, type] = {
    "tokenizer": CodeTokenizerConfig,
    "data": CodeDataConfig,
    "pretrain": pretrain.PretrainConfig,
    "data-fim": CodeDataConfig,
    "fim": pretrain.PretrainConfig,
    "data-long": CodeDataConfig,
    "long": pretrain.PretrainConfig,
    "evaluate": CodeEvaluateConfig,
}
# Each training stage: (its data stage, the model it continues from or None).
TRAINING = {"pretrain": ("data", None), "fim": ("data-fim", "pretrain"), "long": ("data-long", "fim")}
TOP_LEVEL = {"name", "description", "seed", "stages", "estimated_seconds", "pipeline"}


def read_code_recipe(path: str | os.PathLike) -> dict:
    """The code recipe at ``path`` (``pipeline: code``), every stage's block checked against its
    config, so a typo fails in one line naming the stage and the key before anything runs."""
    recipe = read_recipe(path)
    if recipe.get("pipeline") != "code":
        raise ValueError(f"{path}: not a code recipe (it needs `pipeline: code`)")
    extra = sorted(set(recipe) - TOP_LEVEL)
    if extra:
        raise ValueError(f"{path}: unknown field(s) {', '.join(extra)}")
    stages = recipe.get("stages") or {}
    if not stages:
        raise ValueError(f"{path}: the recipe lists no stages (src/llama2/resources/recipes/code.yaml shows the shape)")
    unknown = sorted(set(stages) - set(CODE_STAGES))
    if unknown:
        raise ValueError(f"{path}: unknown stage(s) {', '.join(unknown)}; the code recipe's stages are "
                         f"{', '.join(CODE_STAGES)}")
    missing = [s for s in CODE_STAGES if s not in stages]
    if missing:  # each block says something a default cannot (sizes that chain, the lengths)
        raise ValueError(f"{path}: stage(s) {', '.join(missing)} missing; a code recipe sets every stage")
    configs = {stage: from_dict(cls, stage_settings(recipe, stage, cls), f"{path}: stage {stage!r}")
               for stage, cls in CODE_STAGE_CONFIGS.items()}
    for stage, (data, _) in TRAINING.items():
        if {"init", "data", "out"} & set(stages[stage] or {}):
            raise ValueError(f"{path}: stage {stage!r}: init, data and out are wired by the pipeline, not set")
        d, seq_len = configs[data], configs[stage].seq_len
        if d.passkey_documents and not _halved(seq_len, d.passkey_length):
            raise ValueError(f"{path}: stage {data!r}: passkey_length {d.passkey_length} must be the seq_len "
                             f"{seq_len} of stage {stage!r}, halved zero or more times (the texts fill its "
                             "windows whole)")
    return recipe


# ---- the run ------------------------------------------------------------------------------------

class Context(StageContext):
    """The code recipe's stages need nothing beyond the run folder, the recipe and the log."""


def _config(cls, ctx: Context, stage: str, **paths):
    return from_dict(cls, {**stage_settings(ctx.recipe, stage, cls), **paths}, f"recipe stage {stage!r}")


def _write_rows(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def _write_jsonl(path: Path, texts: Sequence[str]) -> Path:
    return _write_rows(path, [{"text": t} for t in texts])


def _code_texts(cfg, folder: Path) -> list[Path]:
    """The code texts of a stage: the bundled code corpus (or its first ``corpus_documents``
    documents) and ``code_world_documents`` functions of the code world's train split, each
    followed by its test unless the stage sets ``code_world_tests: false``."""
    files = list(code_corpus_files())
    if cfg.corpus_documents is not None:
        docs = (d for f in files for d in read_documents(f))
        files = [_write_jsonl(folder / "corpus.jsonl", list(itertools.islice(docs, cfg.corpus_documents)))]
    if cfg.code_world_documents:
        files.append(_write_jsonl(folder / "code_world.jsonl",
                                  code_documents(cfg.seed, "train", cfg.code_world_documents,
                                                 tests=getattr(cfg, "code_world_tests", True))))
    return files


def stage_tokenizer(ctx: Context) -> dict:
    """A BPE tokenizer on the code corpus, the code world and the probe's text, infilling pieces appended."""
    cfg = _config(CodeTokenizerConfig, ctx, "tokenizer")
    folder = ctx.folder("tokenizer")
    inputs = _code_texts(cfg, folder)
    # The probe's fixed lines (header, key line with each key, filler, question), so they are a
    # few pieces each and most keys one piece.
    probe = "\n".join([HEADER, *(KEY_LINE.format(key=k) for k in KEYS), *FILLER, QUESTION])
    inputs.append(_write_jsonl(folder / "passkey.jsonl", [probe] * 20))
    tok = tokenizer_command.train(cfg, inputs, folder)
    return {"vocab_size": tok.vocab_size}


def merge_prepared(parts: dict[str, Path], out: Path) -> dict:
    """One data directory over several prepared with the same tokenizer: ``out/index.json`` lists
    every part's shards by their path under ``out`` (``code/train-00000.bin``), so the trainer
    reads them as one token stream. Records each part's token counts under ``"parts"`` and the
    first part's FIM settings (the part that has them)."""
    if not parts:
        raise ValueError("merge_prepared: no parts")
    indexes = {name: read_index(folder) for name, folder in parts.items()}
    first = next(iter(indexes.values()))
    for name, index in indexes.items():
        if (index["tokenizer_sha256"], index["dtype"]) != (first["tokenizer_sha256"], first["dtype"]):
            raise ValueError(f"{parts[name]}: prepared with another tokenizer than {next(iter(parts.values()))}")
    shutil.copyfile(next(iter(parts.values())) / first["tokenizer"], out / "tokenizer.model")
    merged = {k: first[k] for k in ("format", "version", "dtype", "vocab_size", "bos_id", "eos_id",
                                    "tokenizer_sha256", "val_fraction")}
    merged["tokenizer"] = "tokenizer.model"
    merged["splits"] = {s: [{**m, "file": f"{parts[name].relative_to(out).as_posix()}/{m['file']}"}
                            for name, index in indexes.items() for m in index["splits"][s]]
                        for s in first["splits"]}
    merged["tokens"] = {s: sum(i["tokens"][s] for i in indexes.values()) for s in first["tokens"]}
    merged["documents"] = {s: sum(i["documents"][s] for i in indexes.values()) for s in first["documents"]}
    merged["inputs"] = [x for i in indexes.values() for x in i["inputs"]]
    merged["malformed"] = sum(i["malformed"] for i in indexes.values())
    if any(i.get("completions") for i in indexes.values()):
        merged["completions"] = {s: sum((i.get("completions") or {}).get(s, 0) for i in indexes.values())
                                 for s in first["tokens"]}
    fim = [i["fim"] for i in indexes.values() if i.get("fim")]
    if fim:
        merged["fim"] = fim[0]
    merged["parts"] = {name: {"tokens": i["tokens"], "documents": i["documents"], "fim": (i.get("fim") or {}).get(
        "rate", 0.0)} | ({"completions": i["completions"]} if i.get("completions") else {})
        for name, i in indexes.items()}
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1), encoding="utf-8")
    os.replace(tmp, out / INDEX)
    return merged


def passkey_rows(cfg: CodeDataConfig, tok) -> list[dict]:
    """A data stage's passkey texts as JSONL rows, each exactly its length of ``cfg.passkey_lengths()``
    tokens, longest first. With ``passkey_answer_only``, prompt/completion rows: the loss on the key
    alone (a one-word copy is ~1% of a text's tokens, which the filler's loss drowns); otherwise
    plain texts."""
    lengths = cfg.passkey_lengths()
    examples = [e for length in dict.fromkeys(lengths)
                for e in passkey_examples(length, lengths.count(length), cfg.seed, tok)]
    return [{"prompt": p, "completion": a} if cfg.passkey_answer_only else {"text": p + a} for p, a in examples]


def _data(stage: str):
    def run(ctx: Context) -> dict:
        cfg = _config(CodeDataConfig, ctx, stage)
        folder = ctx.folder(stage)
        tok_file = ctx.folder("tokenizer") / "tokenizer.model"
        parts = {}
        # The passkey texts first, each exactly its length, longest first: the trainer cuts its stream
        # into windows of seq_len tokens from token 0, so each window of this part holds whole texts
        # (CodeDataConfig.passkey_lengths). A text cut at a window's edge would ask for a key the
        # window does not hold: noise, not a lesson.
        if cfg.passkey_documents:
            parts["passkey"] = folder / "passkey"
            rows = passkey_rows(cfg, Tokenizer(tok_file))
            prepare([_write_rows(folder / "passkey.jsonl", rows)], tok_file, parts["passkey"],
                    val_fraction=cfg.val_fraction, workers=cfg.workers, progress=cfg.progress, log=ctx.log)
        parts["code"] = folder / "code"
        # The code world's functions come from _code_texts (seeded by the stage's seed), so
        # prepare_from_config must not add its own copy of them.
        prepare_from_config(dataclasses.replace(cfg, code_world_documents=0), _code_texts(cfg, folder), tok_file,
                            parts["code"], log=ctx.log)
        index = merge_prepared(parts, folder)
        return {"tokens": index["tokens"], "parts": index["parts"]}
    run.__doc__ = {
        "data": "Token shards of the code and of passkey texts up to the pretraining length.",
        "data-fim": "The same texts, the code turned into fill-in-the-middle examples (Code Llama §2.3).",
        "data-long": "Code with FIM and passkey texts up to the long-context length (Code Llama §2.4).",
    }[stage]
    return run


def _train(stage: str):
    data, init = TRAINING[stage]

    def run(ctx: Context) -> dict:
        settings = stage_settings(ctx.recipe, stage, pretrain.PretrainConfig)
        paths = {"out": str(ctx.folder(stage)), "data": str(ctx.folder(data))}
        if init:
            paths["init"] = ctx.model(init)
        cfg = from_dict(pretrain.PretrainConfig, {**settings, **paths}, f"recipe stage {stage!r}")
        if init:  # the shape is the model's it continues; the recipe may set only RoPE and the context
            given = {k: getattr(cfg.model, k) for k in settings.get("model") or {}}
            cfg = dataclasses.replace(cfg, model=pretrain.init_model_config(cfg.init, given))
        return pretrain.run(cfg, quiet=ctx.quiet)
    run.__doc__ = {
        "pretrain": "Pretraining of a tiny model on the code (no FIM).",
        "fim": "Continued pretraining with fill-in-the-middle (Code Llama §2.3).",
        "long": "Long-context fine-tuning at 4x the length, RoPE base raised (Code Llama §2.4).",
    }[stage]
    return run


def _file_stamp(path: Path) -> str | None:
    return f"{path.stat().st_size}:{path.stat().st_mtime_ns}" if path.is_file() else None


def _trained_length(ctx: Context, stage: str) -> int:
    return int(stage_settings(ctx.recipe, stage, pretrain.PretrainConfig).get("seq_len", 0))


def held_out_windows(data_dir: Path, cfg: CodeEvaluateConfig) -> list[list[int]]:
    """Up to ``position_windows`` windows of ``position_edges[-1]`` tokens of the held-out code
    (the validation split of a data stage's plain code), one after the other."""
    stream = TokenStream(data_dir, "val")
    length = cfg.position_edges[-1]
    n = min(cfg.position_windows, len(stream) // length)
    return [stream.read(k * length, (k + 1) * length).tolist() for k in range(n)]


def evaluate_model(model_dir: str, infill: bool, passkey: bool, cfg: CodeEvaluateConfig,
                   windows: Sequence[Sequence[int]] = ()) -> dict:
    """Infilling (PSM and SPM) of held-out code-world functions and/or the passkey grid, greedy;
    with ``windows``, the loss by position over them too."""
    model = load_model(model_dir, device=default_device()).eval()
    tok = load_tokenizer(model_dir, model.config.vocab_size)
    out: dict = {"rope_theta": model.config.rope_theta, "rope_scaling": model.config.rope_scaling,
                 "max_seq_len": model.config.max_seq_len}
    if infill:
        tasks = code_tasks(cfg.seed, "test", cfg.infill_tasks)
        out["infill"] = [infill_eval(model, tok, tasks, suffix_first=spm, max_new_tokens=cfg.max_new_tokens,
                                     time_limit=cfg.time_limit, batch_size=cfg.batch_size, samples=cfg.samples,
                                     single_line=cfg.single_line)
                         for spm in (False, True)]
    if passkey:
        answer_tokens = 8
        # max_seq_len sizes the KV cache only (RoPE is computed from positions), so the probe can
        # ask past the length the model was trained at, which is what it measures.
        model.config.max_seq_len = max(model.config.max_seq_len, max(cfg.passkey_lengths) + answer_tokens)
        result = passkey_eval(model, tok, cfg.passkey_lengths, cfg.passkey_depths, cfg.passkey_per_cell, cfg.seed,
                              batch_size=max(1, cfg.batch_size // 4), max_new_tokens=answer_tokens,
                              samples=len(cfg.passkey_depths) * cfg.passkey_per_cell)
        # Every prompt's outcome, in order (the same prompts for every model: a paired comparison).
        result["per_prompt"] = [{"length": s["length"], "depth": s["depth"],
                                 "right": read_answer(s["answer"]) == s["key"]} for s in result["samples"]]
        result["samples"] = [s for s in result["samples"] if s["depth"] in (0.0, 0.5, 1.0)][:3 * len(
            cfg.passkey_lengths)]
        out["passkey"] = result
    if windows:
        out["positions"] = loss_by_position(model, windows, cfg.position_edges, tok.bos_id)
    return out


def stage_evaluate(ctx: Context) -> dict:
    """Infilling before and after FIM, the passkey probe before and after the extension."""
    cfg = _config(CodeEvaluateConfig, ctx, "evaluate")
    setting_ = dataclasses.asdict(cfg)
    results = {}
    # The loss by position reads the plain (never FIM-transformed) held-out code of the first data stage.
    windows = held_out_windows(ctx.folder("data") / "code", cfg)
    if not windows:
        ctx.log(f"the held-out code is shorter than {cfg.position_edges[-1]} tokens: no loss by position")
    for stage in dict.fromkeys([*CODE_INFILL_EVALUATED, *CODE_PASSKEY_EVALUATED]):
        infill, passkey = stage in CODE_INFILL_EVALUATED, stage in CODE_PASSKEY_EVALUATED
        stamp = _file_stamp(Path(ctx.model(stage)) / "model.safetensors")
        cache = ctx.folder(stage) / "code_eval.json"
        if cache.is_file():
            cached = json.loads(cache.read_text())
            if cached.get("setting") == setting_ and cached.get("weights") == stamp:
                results[stage] = cached
                continue
        what = " and ".join(w for w, on in (("infilling", infill), ("the passkey probe", passkey)) if on)
        ctx.log(f"evaluating the {stage} model: {what} ...")
        results[stage] = {"setting": setting_, "weights": stamp, "trained_length": _trained_length(ctx, stage),
                          **evaluate_model(ctx.model(stage), infill, passkey, cfg, windows if passkey else ())}
        write_json(cache, results[stage])
    folder = ctx.folder("evaluate")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "results.json", results)
    summary = {}
    for stage, r in results.items():
        s = {}
        for mode in r.get("infill") or []:
            s[mode["mode"]] = {"exact": mode["exact_rate"], "passed": mode["passed_rate"]}
        if "passkey" in r:
            s["passkey"] = r["passkey"]["accuracy"]
        summary[stage] = s
    return summary


RUNNERS: dict[str, Callable[[Context], dict]] = {
    "tokenizer": stage_tokenizer,
    "data": _data("data"),
    "pretrain": _train("pretrain"),
    "data-fim": _data("data-fim"),
    "fim": _train("fim"),
    "data-long": _data("data-long"),
    "long": _train("long"),
    "evaluate": stage_evaluate,
}


# ---- orchestration ------------------------------------------------------------------------------

def run_code_pipeline(recipe_path: str | os.PathLike, out: str | os.PathLike = "runs/code",
                      from_stage: str | None = None, until: str | None = None, quiet: bool = False) -> Path:
    """Run the code recipe at ``recipe_path`` into ``out`` (module docstring); returns ``out``."""
    recipe_path = Path(recipe_path)
    recipe = read_code_recipe(recipe_path)
    for name in (from_stage, until):
        if name is not None and name not in CODE_STAGES:
            raise ValueError(f"unknown stage {name!r} for the code recipe; its stages are {', '.join(CODE_STAGES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kept = out / "recipe.yaml"
    if not (kept.exists() and kept.samefile(recipe_path)):
        shutil.copyfile(recipe_path, kept)

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    ctx = Context(out, recipe, log, quiet)
    run_stages(CODE_STAGES, RUNNERS, ctx, recipe.get("estimated_seconds"), from_stage, until)
    if until is None or until == "evaluate":
        from llama2.code_report import write_code_report

        report = write_code_report(out)
        log(f"\nreport: {report} (and {report.with_suffix('.md')})")
        log(f"infill with the result:   llama2 generate --model {out / 'long' / 'model'} "
            f"--prompt 'def add(a, b):' --suffix '    return result'")
    return out
