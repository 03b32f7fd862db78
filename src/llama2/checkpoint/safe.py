"""Reading training state without running anything in it.

``torch.load`` with ``weights_only=False`` unpickles arbitrary Python objects, and unpickling
can call any function: a crafted checkpoint runs code the moment it is resumed. Everything we
write is tensors and plain values (dicts, lists, numbers, strings), so we read it back with
``weights_only=True``, whose unpickler refuses every other object; the rest of the training
state is plain JSON.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch

from .errors import CheckpointError

# Checkpoint layout version: 2 = trainer.json + tensors-only .pt files. Version 1 (trainer.pt,
# pickled Python objects) is refused, never loaded.
FORMAT = 2


def load_tensors(file: str | os.PathLike, map_location="cpu"):
    """``torch.load`` of a file that may hold only tensors and plain values; anything else is
    refused with one line naming the file, before a single object of it is built."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: missing from the checkpoint")
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{file}: refused: it holds Python objects, not only tensors (a checkpoint in the unsafe format "
            f"of an older llama2, or a crafted file); nothing in it was loaded") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: unreadable, truncated or not a torch file ({first})") from None


def read_state_json(file: str | os.PathLike) -> dict:
    """A checkpoint's ``trainer.json``, checked to be an object of this format version."""
    file = Path(file)
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{file}: unreadable or not valid JSON ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise CheckpointError(f"{file}: checkpoint format {found!r}, this llama2 reads format {FORMAT}")
    return state


def write_state_json(file: str | os.PathLike, state: dict) -> None:
    Path(file).write_text(json.dumps({"format": FORMAT, **state}, indent=1) + "\n", encoding="utf-8")


def refuse_legacy(ckpt: str | os.PathLike) -> None:
    """A checkpoint folder with the old pickled ``trainer.pt`` and no ``trainer.json`` is refused
    without opening the file: unpickling it is exactly what could run code."""
    ckpt = Path(ckpt)
    if (ckpt / "trainer.pt").is_file() and not (ckpt / "trainer.json").is_file():
        raise CheckpointError(
            f"{ckpt / 'trainer.pt'}: a checkpoint in the unsafe format of an older llama2 (pickled Python "
            f"objects, which can run code when loaded); it is not loaded: start the run again (--resume never "
            f"with a new --out) or resume from a checkpoint written by this version")


# -- torch.distributed.checkpoint (FSDP runs) -------------------------------------------------
# DCP itself unpickles its .metadata file with plain pickle and its non-tensor items with
# weights_only=False. We check the metadata with an unpickler that builds only DCP's own
# metadata classes and a few torch values first, and read the items with weights_only=True.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
                ("collections", "OrderedDict")}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _DCP_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type):  # a metadata class, never a function of those modules
                return obj
        elif (module, name) in _DCP_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def load_dcp(state_dict: dict, path: str | os.PathLike) -> None:
    """``torch.distributed.checkpoint.load`` into ``state_dict`` without unpickling anything but
    tensors, plain values and DCP's metadata classes."""
    # Imported here: torch.distributed.checkpoint takes most of a second to import, and only
    # resuming a sharded (FSDP) run needs it.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    path = Path(path)
    meta = path / ".metadata"
    try:
        with open(meta, "rb") as f:
            _DCPMetadataUnpickler(f).load()
    except OSError as e:
        raise CheckpointError(f"{meta}: cannot be read ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - unpickling a damaged file raises many types
        raise CheckpointError(f"{meta}: refused: not checkpoint metadata ({e}); nothing in it was loaded") from None

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError:
                raise CheckpointError(f"{path}: refused: item {read_item.dest_index.fqn!r} holds Python objects, "
                                      f"not only tensors and plain values") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    try:
        dcp.load(state_dict, checkpoint_id=str(path), planner=SafePlanner())
    except CheckpointException as e:  # DCP wraps each rank's exception with its traceback
        ours = [f[0] for f in e.failures.values() if isinstance(f, tuple) and isinstance(f[0], CheckpointError)]
        if ours:
            raise ours[0] from None
        raise
