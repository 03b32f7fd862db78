"""The few helpers every layer shares: progress lines on stderr, the inference device, and
the one reader of the package's JSONL inputs. Imports nothing from the package."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and line."""


def log_to_stderr(quiet: bool):
    """A ``log(msg)`` that prints on rank 0 only, unless ``quiet``."""
    def log(msg: str) -> None:
        if not quiet and int(os.environ.get("RANK", "0")) == 0:
            print(msg, file=sys.stderr, flush=True)
    return log


def default_device() -> torch.device:
    """Where inference (and the RL stages' sampling and scoring) runs unless told otherwise: the
    GPU when there is one, like the trainer's, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(name: str | None) -> str | torch.device:
    """The device to run on: ``name`` checked (None: cuda if available, else cpu). A device that
    is malformed or not on this machine is one line, not a traceback from deep inside torch."""
    if name is None:
        return default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r}: not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (no GPU, or this torch "
                             f"{torch.__version__} has no CUDA); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {name}: MPS (Apple GPU) is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"--device {name}: unsupported device type {dev.type!r}; use cpu, cuda, cuda:N or mps")
    return name


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line; every error, bad UTF-8 included, names
    the file and line. The one reader of the package's JSONL inputs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    # Bytes, decoded line by line: a text-mode file raises UnicodeDecodeError mid-iteration
    # with neither file nor line in it.
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a leading byte-order mark is not data
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") \
                    from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj
