"""Training state on disk: checkpoint folders, ``--resume``, RNG states and the metrics log.

What the :class:`~llama2.train.core.Trainer`, PPO and every stage built on them share, so that a
checkpoint is written, found and resumed the same way everywhere:

- a checkpoint is ``OUT/checkpoints/step-N``; it is written into ``.tmp-step-N``, flushed to
  disk and renamed only once complete (:func:`checkpoint_folder`), so a crash never leaves a
  half-written ``step-N``; the newest ``keep_last`` are kept;
- ``--resume`` means the same in every stage (:func:`resolve_resume`): ``auto`` continues from
  the newest checkpoint if any, ``latest`` requires one, ``never`` refuses a folder that has
  one, a directory resumes that checkpoint;
- RNG states are tensors and plain numbers (:func:`rng_state`), so checkpoints are read with
  ``torch.load(weights_only=True)`` and cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

RESUME_HELP = ("auto: continue from the newest checkpoint in the run folder if any; latest (what a bare --resume "
               "means): the same, but one must exist; never: start fresh (refused if the run folder has "
               "checkpoints); or a checkpoint directory")


# ---- ranks ------------------------------------------------------------------------------------

def barrier(info=None) -> None:
    """Wait for every rank (``info``: a :class:`~llama2.train.core.DistInfo`; None or one rank: no-op)."""
    if info is not None and info.enabled and dist.is_initialized():
        dist.barrier()


def _is_main(info) -> bool:
    return info is None or info.is_main


# ---- checkpoint folders ------------------------------------------------------------------------

def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first. A checkpoint exists only once its
    temporary folder has been renamed to ``step-N``, so a half-written one is never listed."""
    root = Path(out) / "checkpoints"
    found = []
    for p in root.glob("step-*") if root.is_dir() else []:
        suffix = p.name[len("step-"):]
        # trainer.json is written last, so its presence marks a complete checkpoint; an old
        # run's trainer.pt is listed too, so that resuming it is refused rather than ignored.
        if p.is_dir() and suffix.isdigit() and ((p / "trainer.json").is_file() or (p / "trainer.pt").is_file()):
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def fsync_tree(path: Path) -> None:
    """Flush a folder's files to disk before the rename publishes it."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def checkpoint_folder(out: str | Path, step: int, keep_last: int, info=None) -> Iterator[Path]:
    """Write ``OUT/checkpoints/step-N`` atomically: the body writes into the yielded temporary
    folder (``.tmp-step-N``, on every rank); on a normal exit the main rank flushes it, renames it
    to ``step-N`` and deletes all but the newest ``keep_last`` (0 = keep all). An exception in
    the body leaves the previous checkpoints as they were. Collective: call on every rank."""
    root = Path(out) / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if _is_main(info):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    yield tmp
    barrier(info)
    if _is_main(info):
        fsync_tree(tmp)
        if final.exists():  # re-saving a step (after resuming from an older checkpoint DIR)
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last:
            for old in list_checkpoints(out)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(info)


def check_resume(out: str | Path, how: str) -> Path | None:
    """The checkpoint a run in ``out`` resumes from under ``--resume how``, or None for a fresh
    start, touching nothing: ``never`` on a folder with checkpoints and ``latest`` on one
    without are refused, as is a checkpoint directory that does not exist. Stages call it first
    thing, so that a refusal comes before minutes of sampling."""
    out = Path(out)
    if how in ("auto", "latest"):
        path = latest_checkpoint(out)
        if path is None and how == "latest":
            raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'}")
        return path
    if how == "never":
        if latest_checkpoint(out) is not None:
            raise ValueError(f"--resume never: {out} already has checkpoints; use another --out "
                             f"or delete {out / 'checkpoints'}")
        return None
    if not Path(how).is_dir():
        raise FileNotFoundError(f"--resume {how}: no such checkpoint directory")
    return Path(how)


def resolve_resume(out: str | Path, how: str, info=None) -> Path | None:
    """:func:`check_resume`, once the temporary folders a crash may have left (never
    checkpoints) are cleared. Collective: call on every rank."""
    if _is_main(info):
        for tmp in (Path(out) / "checkpoints").glob(".tmp-step-*"):
            shutil.rmtree(tmp, ignore_errors=True)
    barrier(info)
    return check_resume(out, how)


# ---- RNG states ----------------------------------------------------------------------------------

def rng_state() -> dict:
    """Every RNG state as tensors and plain numbers, so that ``torch.load(weights_only=True)``
    reads it back (Python's and numpy's own state objects are tuples with an ndarray inside)."""
    version, words, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the metrics log -----------------------------------------------------------------------------

def truncate_metrics(file: Path, key: str, upto: int, warn: Callable[[str], None]) -> None:
    """Keep the records of ``file`` (JSON lines) whose ``key`` is at most ``upto``: a resumed run
    forgets what an interrupted one logged after its checkpoint. A torn last line (the process
    was killed mid-write) is dropped with a warning; a bad line before it is an error naming
    the file and line, since deleting it would lose records silently."""
    if not file.is_file():
        return
    if upto < 0:  # a fresh start keeps nothing, whatever state the old log is in
        file.write_text("", encoding="utf-8")
        return
    lines = file.read_bytes().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    keep = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if n == len(lines):
                warn(f"warning: {file}:{n}: dropped a torn last line (the run was interrupted mid-write)")
                break
            raise ValueError(f"{file}:{n}: not a JSON record ({e}); fix or delete that line to resume") from None
        if record.get(key, 0) <= upto:
            keep.append(raw.decode("utf-8"))
    file.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def last_record(file: Path) -> dict:
    """The last record of a metrics file (read after :func:`truncate_metrics`), or {} if none."""
    lines = file.read_text(encoding="utf-8").splitlines() if file.is_file() else []
    return json.loads(lines[-1]) if lines and lines[-1].strip() else {}
