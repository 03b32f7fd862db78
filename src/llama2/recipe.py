"""Typed configs <-> YAML recipe files <-> command-line flags, for every training stage.

A stage declares one dataclass whose defaults are the paper's values, with a help text per
field::

    @dataclass
    class PretrainConfig(TrainConfig):
        seq_len: int = setting(4096, "tokens per training sequence (§2.2)")
        model: ModelConfig = setting(default_factory=ModelConfig, help="model shape")

``add_config_args(parser, PretrainConfig)`` then adds ``--config FILE`` and one flag per field
(``--seq-len``, nested dataclasses as ``--model.dim``), and ``load_config(PretrainConfig, args)``
merges, in increasing priority: the dataclass defaults < the recipe file (``--config``) <
flags given explicitly on the command line. Unknown or ill-typed fields in a file fail with
one line naming the file and the field, before anything expensive happens.

The tiny values live in one file, ``resources/recipes/tiny.yaml`` (what ``llama2 run`` uses by
default): a stage command run without ``--config`` takes that stage's block from it
(``load_config(SFTConfig, args, stage="sft")``), through the same :func:`stage_settings` the
pipeline uses; the paper's values stay the dataclass defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = [
    "setting", "add_config_args", "load_config", "from_dict", "to_dict", "read_recipe",
    "write_recipe", "dump_recipe", "config_diff", "stage_settings", "tiny_settings", "TINY_RECIPE",
]

TINY_RECIPE = Path(__file__).resolve().parent / "resources" / "recipes" / "tiny.yaml"

_DEST = "cfg__"  # argparse dest prefix: keeps config flags apart from the CLI's own attributes


def setting(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
            choices: typing.Sequence | None = None, const: Any = dataclasses.MISSING,
            metavar: str | None = None) -> Any:
    """A dataclass field with a help text (and optional choices, or ``const``: the value a bare
    flag takes, e.g. ``--resume`` alone = ``"latest"``)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if const is not dataclasses.MISSING:
        meta["const"] = const
    if metavar is not None:
        meta["metavar"] = metavar
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


# -- types ---------------------------------------------------------------------------------

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _is_config(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML or flag value to the field's type; ValueError names ``where``."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{where}: must not be empty (expected {_type_name(base)})")
    origin = typing.get_origin(base)
    if origin is Literal:
        allowed = typing.get_args(base)
        if value not in allowed:
            raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin in (list, tuple) or base in (list, tuple):
        (item,) = typing.get_args(base)[:1] or (str,)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        out = [_coerce(v, item, where) for v in value]
        return tuple(out) if (origin or base) is tuple else out
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:  # "4_194_304", "4e6", 4.0 are fine if they are whole numbers
            f = float(str(value).replace("_", ""))
        except ValueError:
            raise ValueError(f"{where}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if base is float:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        try:  # PyYAML reads "3e-4" as a string (YAML 1.1): accept it
            return float(str(value).replace("_", "")) if isinstance(value, str) else float(value)
        except ValueError:
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if base is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _type_name(tp) -> str:
    base, optional = _unwrap_optional(tp)
    if typing.get_origin(base) is Literal:
        name = "|".join(map(str, typing.get_args(base)))
    else:
        name = getattr(base, "__name__", str(base))
    return name + (" or none" if optional else "")


# -- dict <-> dataclass ----------------------------------------------------------------------

def from_dict(cls, data: Mapping, source: str = "config", prefix: str = ""):
    """Build ``cls`` from a (nested) dict; unknown fields and bad values raise a one-line
    ValueError naming ``source`` and the dotted field."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: {prefix.rstrip('.') or 'recipe'} must be a mapping of field: value")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            near = [n for n in fields if n.replace("_", "") == str(key).replace("-", "").replace("_", "")]
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"{source}: unknown field {prefix}{key!r} for {cls.__name__}{hint}")
        tp = hints[key]
        base, _ = _unwrap_optional(tp)
        if _is_config(base) and value is not None:
            if not isinstance(value, Mapping):
                raise ValueError(f"{source}: field {prefix}{key} is a group of fields (a mapping), got {value!r}")
            kwargs[key] = from_dict(base, value, source, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{source}: field {prefix}{key}")
            choices = fields[key].metadata.get("choices")
            if choices is not None and kwargs[key] not in choices:
                raise ValueError(f"{source}: field {prefix}{key} must be one of {', '.join(map(str, choices))}, "
                                 f"got {kwargs[key]!r}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # a config's own validation (__post_init__)
        raise ValueError(f"{source}: {e}") from None


def to_dict(cfg) -> dict:
    """A plain nested dict (tuples as lists), ready for YAML/JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def read_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a mapping of field: value, got {type(data).__name__}")
    return data


def dump_recipe(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def write_recipe(cfg, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_recipe(cfg), encoding="utf-8")
    tmp.replace(path)
    return path


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two ``to_dict`` results."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def merge_recipes(base: dict, over: Mapping) -> dict:
    """``over`` laid over ``base``: nested mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_recipes(out[key], value)
        else:
            out[key] = value
    return out



# -- argparse ------------------------------------------------------------------------------

def _walk(cls, prefix: str = ""):
    """(dotted name, field, type) for every leaf field, nested dataclasses flattened."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        base, _ = _unwrap_optional(tp)
        if _is_config(base):
            yield from _walk(base, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default) if isinstance(f.default, str) else str(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return str(f.default_factory())
    return "required"


def add_config_args(parser: argparse.ArgumentParser, cls, config_flag: bool = True) -> None:
    """``--config FILE``, ``--print-config`` and one flag per field of ``cls`` (``--max-steps``,
    ``--model.dim``); a field's help comes from its ``setting(help=...)``."""
    if config_flag:
        parser.add_argument("--config", metavar="FILE", default=None,
                            help="YAML recipe; its fields override the defaults, flags override it")
        parser.add_argument("--print-config", action="store_true",
                            help="print the resolved recipe as YAML and exit")
    group = parser.add_argument_group(f"{cls.__name__} fields (each also settable in the recipe file)")
    for name, f, tp in _walk(cls):
        flag = "--" + name.replace("_", "-")
        meta = f.metadata
        text = meta.get("help", "")
        base, optional = _unwrap_optional(tp)
        # The default shown is the dataclass's (nested: the nested class's own default).
        shown = _default_text(f)
        if "default" not in text:
            text = f"{text} (default: {shown})".strip()
        kw: dict[str, Any] = dict(dest=_DEST + name, default=argparse.SUPPRESS, help=text.replace("%", "%%"))
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            origin = typing.get_origin(base)
            if origin is Literal:
                kw["choices"] = typing.get_args(base)
            elif "choices" in meta:
                kw["choices"] = meta["choices"]
            if origin in (list, tuple) or base in (list, tuple):
                kw["nargs"] = "*"
            elif "const" in meta:
                kw["nargs"] = "?"
                kw["const"] = meta["const"]
            kw["metavar"] = meta.get("metavar") or (None if "choices" in kw else _type_name(base).upper())
            kw["type"] = str  # converted (with the field's name in any error) by load_config
        group.add_argument(flag, **kw)


def stage_settings(recipe: Mapping, stage: str, cls) -> dict:
    """The fields of ``stage`` in a pipeline recipe (its ``stages:`` block, or ``standalone:`` for
    the commands ``llama2 run`` does not chain), with the recipe's ``seed`` as the stage's seed
    and world seed: what the pipeline runs, before it adds the paths between stages."""
    blocks = {**(recipe.get("standalone") or {}), **(recipe.get("stages") or {})}
    values = dict(blocks.get(stage) or {})
    names = {f.name for f in dataclasses.fields(cls)}
    for name in ("seed", "world_seed"):
        if name in names:
            values.setdefault(name, recipe.get("seed", 0))
    if "progress" in names:
        values.setdefault("progress", True)
    return values


def tiny_settings(stage: str, cls) -> dict:
    """``stage``'s block of the built-in tiny recipe (tiny.yaml), as :func:`stage_settings`."""
    return stage_settings(read_recipe(TINY_RECIPE), stage, cls)


def load_config(cls, args: argparse.Namespace | None = None, default_recipe: Mapping | None = None,
                default_source: str = "built-in recipe", stage: str | None = None):
    """Defaults < recipe (``args.config``; when no file is given, ``stage``'s block of tiny.yaml
    or ``default_recipe``) < the flags given explicitly. Raises a one-line
    ValueError/FileNotFoundError on bad input."""
    merged: dict = {}
    source = "command line"
    config_file = getattr(args, "config", None) if args is not None else None
    if config_file:
        merged = read_recipe(config_file)
        source = str(config_file)
    elif stage is not None:
        merged = tiny_settings(stage, cls)
        source = f"{TINY_RECIPE.name} stage {stage!r}"
    elif default_recipe is not None:
        merged = dict(default_recipe)
        source = default_source
    # Validate the file on its own first, so its errors name the file.
    from_dict(cls, merged, source)
    flags: dict = {}
    hints = {name: tp for name, _, tp in _walk(cls)}
    for dest, value in vars(args or argparse.Namespace()).items():
        if not dest.startswith(_DEST):
            continue
        name = dest[len(_DEST):]
        value = _coerce(value, hints[name], f"--{name.replace('_', '-')}")
        node = flags
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(cls, merge_recipes(merged, flags), source if not flags else f"{source} + flags")
