"""The world's data as files: :func:`write_world` writes every builder's rows for train/val/test
as JSON lines, with the fact sheet and a manifest (to inspect the data or train from files)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from llama2.data.world.content import SPLITS
from llama2.data.world.pools import World


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> Path:
    """Write rows as JSON lines (UTF-8), creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


DEFAULT_SIZES = {
    "sft": {"train": 10000, "val": 500, "test": 500},
    "pref_helpfulness": {"train": 4000, "val": 400, "test": 400},
    "pref_safety": {"train": 4000, "val": 400, "test": 400},
    "guard": {"train": 4000, "val": 400, "test": 400},
    "gatt": {"train": 2000, "val": 100, "test": 100},
    "rl": {"train": 2000, "val": 200, "test": 200},
    "eval": {"train": 200, "val": 200, "test": 200},  # per kind (task / unsafe / benign)
}


def write_world(out_dir: str | os.PathLike, seed: int = 0, sizes: Mapping[str, Mapping[str, int]] | None = None) -> dict:
    """Write the world's data for train/val/test as JSONL under ``out_dir``:
    ``sft_{split}``, ``pref_helpfulness_{split}``, ``pref_safety_{split}``, ``guard_{split}``,
    ``gatt_{split}``, ``rl_{split}``, ``eval_{split}`` (``.jsonl``), plus ``knowledge.txt`` and a
    ``manifest.json`` with the seed and row counts. Returns the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {name: {**DEFAULT_SIZES[name], **(sizes or {}).get(name, {})} for name in DEFAULT_SIZES}
    world = World(seed)
    makers = {
        "sft": world.sft_examples,
        "pref_helpfulness": lambda s, n: world.preference_pairs(s, n, "helpfulness"),
        "pref_safety": lambda s, n: world.preference_pairs(s, n, "safety"),
        "guard": world.guard_examples,
        "gatt": world.gatt_dialogues,
        "rl": world.rl_prompts,
        "eval": lambda s, n: [it.to_dict() for it in world.eval_prompts(s, n)],
    }
    files: dict[str, int] = {}
    for name, make in makers.items():
        for split in SPLITS:
            rows = make(split, sizes[name][split])
            path = write_jsonl(out_dir / f"{name}_{split}.jsonl", rows)
            files[path.name] = len(rows)
    (out_dir / "knowledge.txt").write_text(world.knowledge_text(), encoding="utf-8")
    manifest = {"seed": seed, "files": files}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest

