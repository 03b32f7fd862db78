"""Load and save models: our Hugging Face-compatible directory, Meta's release format, GGUF."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from llama2.model import ModelConfig, Transformer
from llama2.model.heads import ScalarModel

from . import hf, meta, peft, quantized
from .errors import CheckpointError
from .gguf import export_gguf
from .locate import detect_format, load_tokenizer

__all__ = ["CheckpointError", "load_model", "model_config", "save_model", "load_state", "load_tokenizer", "convert", "detect_format",
           "parse_dtype", "DTYPES", "load_scalar_model", "save_scalar_model", "quantize_dir", "quantized_spec"]


def load_state(path: str | os.PathLike, verify: bool = True, adapter: str | os.PathLike | None = None,
               allow_quantized: bool = False) -> tuple[ModelConfig, dict, Iterator[tuple[str, torch.Tensor]]]:
    """(config, raw config dict, lazy iterator of (our name, tensor)) for any format. With
    ``verify``, each weight file is checked against the directory's ``checksums.json`` (when it
    has one) as the iterator reaches it; a config-only call reads no weights.

    A LoRA adapter directory (PEFT's format) is a model too: its base with the adapter folded
    in, tensor by tensor. ``adapter`` applies an adapter directory to the model at ``path``
    (which then stands in for the adapter's recorded base).

    A directory written by ``llama2 quantize`` is refused with one line unless ``allow_quantized``: its
    tensors are then the stored int8/int4 weights with their scales (checkpoint/quantized.py)."""
    path = Path(path)
    if adapter is not None or detect_format(path) == "peft":
        apath = Path(adapter if adapter is not None else path)
        acfg, layers, others = peft.read_adapter(apath)
        base = peft.resolve_base(apath, acfg, path if adapter is not None else None)
        # A base that is itself an adapter (a LoRA stage after a LoRA stage) is merged first, recursively.
        cfg, raw, tensors = load_state(base, verify)
        scalar = acfg.get("task_type") == "SEQ_CLS"
        raw = dict(raw, **acfg.get(peft.OURS, {}).get("config", {}))
        if scalar:
            raw.update(architectures=["LlamaForSequenceClassification"], num_labels=1)
        return cfg, raw, peft.merge_stream(tensors, layers, others, apath, scalar)
    if detect_format(path) == "hf":
        raw = hf.read_config(path)
        qcfg = quantized.quantization(raw)
        if qcfg is not None:
            spec = quantized.spec_of(qcfg, path / "config.json")
            if not allow_quantized:
                raise CheckpointError(
                    f"{path}: a model quantized to {spec} by llama2 quantize; generate, chat, serve and evaluate "
                    f"load it, but training, convert and adapters need the float model it was made from")
        cfg = hf.config_from_hf(dict(raw, model_type="llama") if qcfg is not None else raw, path / "config.json")
        return cfg, raw, ((hf.from_hf_name(n), t) for n, t in hf.iter_hf_tensors(path, verify))
    cfg = meta.read_params(path)
    return cfg, {"params": meta.meta_params(cfg)}, meta.iter_meta_tensors(path, cfg)


def model_config(path: str | os.PathLike) -> dict:
    """The raw config (config.json's keys) of a model directory, adapter and quantized
    directories included."""
    return load_state(path, verify=False, allow_quantized=True)[1]


def quantized_spec(path: str | os.PathLike) -> str | None:
    """"int8" / "int4:GROUP" for a directory written by ``llama2 quantize``, else None."""
    path = Path(path)
    if detect_format(path) != "hf":
        return None
    qcfg = quantized.quantization(hf.read_config(path))
    return None if qcfg is None else quantized.spec_of(qcfg, path / "config.json")


def _locate(path: Path, name: str) -> tuple[Path, Path, str]:
    """(weight file holding ``name`` or the best guess, config file, name as stored) for messages."""
    if (path / "config.json").is_file():
        key = hf.to_hf_name(name)
        index = path / hf.INDEX
        if index.is_file():
            try:
                return path / json.loads(index.read_text())["weight_map"][key], path / "config.json", key
            except (KeyError, TypeError, ValueError):
                return index, path / "config.json", key
        return path / hf.SAFETENSORS, path / "config.json", key
    files = sorted(path.glob("consolidated.*.pth"))
    return (files[0] if files else path), path / "params.json", name


def _checked(tensors: Iterator[tuple[str, torch.Tensor]], expected: dict, source: Path):
    """``tensors`` as they come, each checked against ``expected`` ({name: shape}): an unknown name
    or a wrong shape is one line naming the file and the tensor as stored there."""
    for name, t in tensors:
        if name not in expected:
            file, _, stored = _locate(source, name)
            raise CheckpointError(f"{file}: unexpected tensor {stored!r} (not part of this model)")
        if tuple(t.shape) != tuple(expected[name]):
            file, config, stored = _locate(source, name)
            raise CheckpointError(
                f"{file}: tensor {stored!r} has shape {tuple(t.shape)}, but {config.name} implies "
                f"{tuple(expected[name])}"
            )
        yield name, t


def load_into(module: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], source: Path, dtype=None) -> None:
    """Assign checkpoint tensors to a module built on the meta device, checking names and shapes.
    ``source`` is the model directory; messages name the file and tensor as stored there."""
    expected = dict(module.state_dict())
    state = {}
    for name, t in _checked(tensors, {k: v.shape for k, v in expected.items()}, source):
        state[name] = t.to(dtype) if dtype is not None else t
    missing = sorted(set(expected) - set(state))
    if missing:
        file, _, _ = _locate(source, missing[0])
        shown = [_locate(source, m)[2] for m in missing[:3]]
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{file}: missing tensor(s) {', '.join(shown)}{more}")
    module.load_state_dict(state, assign=True)


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None, device="cpu",
               verify: bool = True, adapter: str | os.PathLike | None = None,
               quantize: str | None = None, training: bool = False) -> Transformer:
    """Load a Llama model from our/HF directory, Meta's format or a LoRA adapter directory;
    weights keep their dtype unless ``dtype`` is given. ``verify=False`` skips the checksum
    check of the weight files (one extra read of them; see ``hf.CHECKSUMS``). ``adapter``: a LoRA
    adapter directory merged into the model at ``path``. ``quantize`` ("int8", "int4[:GROUP]"):
    each linear weight is quantized on ``device`` as it is read (model/quant.py), so the peak
    memory is the quantized model plus one tensor, never the float model (70B in int4 on one GPU).

    A directory written by ``llama2 quantize`` loads as the quantized model it holds (``dtype``
    then applies to the embeddings and norms); ``training=True`` refuses it, with one line."""
    path = Path(path)
    spec = quantized_spec(path) if adapter is None else None
    if spec is not None:
        return _load_prequantized(path, spec, dtype, device, verify, quantize, training).eval()
    cfg, _, tensors = load_state(path, verify, adapter)
    with torch.device("meta"):
        model = Transformer(cfg)
    if quantize:
        return _load_quantized(model, tensors, path, dtype, device, quantize).eval()
    load_into(model, tensors, path, dtype)
    return model.to(device).eval()


def _load_prequantized(path: Path, spec: str, dtype, device, verify: bool, quantize: str | None,
                       training: bool) -> Transformer:
    from llama2.model.quant import parse_quantize

    if training:
        raise CheckpointError(f"{path}: a model quantized to {spec} by llama2 quantize cannot be trained; "
                              f"train the float model it was made from (QLoRA: --lora.method qlora quantizes it)")
    if quantize and parse_quantize(quantize) != parse_quantize(spec):
        raise CheckpointError(f"{path}: already quantized to {spec}; --quantize {quantize} would quantize it twice "
                              f"(quantize the float model instead, or drop --quantize)")
    cfg, _, tensors = load_state(path, verify, allow_quantized=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    want = quantized.expected(model, spec)
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for name, t in tensors:
        if name not in want:
            file, _, stored = _locate(path, name)
            raise CheckpointError(f"{file}: unexpected tensor {stored!r} (not part of this {spec} model)")
        shape, kind = want.pop(name)
        if tuple(t.shape) != shape or (kind is not None and t.dtype != kind) or (kind is None and not t.is_floating_point()):
            file, _, stored = _locate(path, name)
            raise CheckpointError(f"{file}: tensor {stored!r} is {str(t.dtype).removeprefix('torch.')} "
                                  f"{tuple(t.shape)}, but a {spec} model has {str(kind or 'float').removeprefix('torch.')} "
                                  f"{shape} there")
        module, _, part = name.rpartition(".")
        if module not in linears:
            rest[name] = _own(t.to(device=device, dtype=dtype) if dtype is not None else t.to(device))
            continue
        parts = pending.setdefault(module, {})
        parts[part] = _own(t)
        if len(parts) == (2 if spec == "int8" else 3):  # the layer is complete: build it, drop the parts
            parent, _, attr = module.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr,
                    quantized.build_layer(pending.pop(module), spec, module, device))
    if want:
        left = sorted(want)
        file, _, _ = _locate(path, left[0])
        more = f" (+{len(left) - 3} more)" if len(left) > 3 else ""
        raise CheckpointError(f"{file}: missing tensor(s) {', '.join(_locate(path, m)[2] for m in left[:3])}{more}")
    model.load_state_dict(rest, strict=False, assign=True)
    return model


def _own(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in memory of its own. A tensor read from a safetensors file keeps the memory
    map of its whole file alive: holding on to one small norm weight would keep every page of
    its shard that was read, and quantizing on load would hold the float model after all
    (measured: 241 MiB instead of 51 for a 210 MB model in int8)."""
    return t.clone() if t.device.type == "cpu" else t


def _load_quantized(model: Transformer, tensors, source: Path, dtype, device, spec: str) -> Transformer:
    from llama2.model.quant import parse_quantize, quantized_linear

    parse_quantize(spec)
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    all_linears = set(linears)
    rest: dict[str, torch.Tensor] = {}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    for name, t in _checked(tensors, expected, source):
        t = t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)
        module = name.removesuffix(".weight")
        if module in linears:
            parent, _, attr = module.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, quantized_linear(t, spec, module))
            linears.discard(module)
        else:
            rest[name] = _own(t)
        del t
    plain = {k for k in expected if k.removesuffix(".weight") not in all_linears}
    left = sorted({f"{m}.weight" for m in linears} | (plain - rest.keys()))
    if left:
        file, _, _ = _locate(source, left[0])
        more = f" (+{len(left) - 3} more)" if len(left) > 3 else ""
        raise CheckpointError(f"{file}: missing tensor(s) {', '.join(_locate(source, m)[2] for m in left[:3])}{more}")
    model.load_state_dict(rest, strict=False, assign=True)
    return model



def load_scalar_model(path: str | os.PathLike, dtype: torch.dtype | None = None, device="cpu",
                      verify: bool = True, adapter: str | os.PathLike | None = None):
    """Load a reward (or value) model directory (or a reward model's LoRA adapter): a Llama
    trunk with a scalar ``score`` head."""
    path = Path(path)
    cfg, raw, tensors = load_state(path, verify, adapter)
    if "LlamaForSequenceClassification" not in (raw.get("architectures") or []):
        raise CheckpointError(f"{path}: not a reward model (config.json architectures is "
                              f"{raw.get('architectures')}, expected LlamaForSequenceClassification)")
    with torch.device("meta"):
        model = ScalarModel(cfg)
    load_into(model, tensors, path, dtype)
    return model.to(device).eval()


def save_scalar_model(model: nn.Module, path: str | os.PathLike, tokenizer=None, **extra_config) -> Path:
    """Save a reward/value model so transformers' LlamaForSequenceClassification reads it."""
    return save_model(model, path, tokenizer=tokenizer, architecture="LlamaForSequenceClassification",
                      extra_config={"num_labels": 1, "pad_token_id": 0, **extra_config})


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES,
    architecture: str = "LlamaForCausalLM",
    extra_config: dict | None = None,
) -> Path:
    """Write a Hugging Face-compatible model directory. ``model`` is a Transformer or any module
    whose ``config`` is a ModelConfig and whose parameter names are ours (plus e.g. ``score``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = model.config
    sd = model.state_dict()
    store_dtype = dtype or next(iter(sd.values())).dtype

    def tensors():
        for name, t in sd.items():
            yield hf.to_hf_name(name), t.detach().to("cpu", store_dtype)

    if tokenizer is not None and tokenizer.vocab_size != cfg.vocab_size:
        raise CheckpointError(
            f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} pieces, model vocabulary is {cfg.vocab_size}"
        )
    hf.write_safetensors(path, tensors(), max_shard_bytes)
    _write_metadata(path, cfg, store_dtype, tokenizer, architecture, extra_config)
    return path


def _write_metadata(path: Path, cfg: ModelConfig, dtype, tokenizer, architecture="LlamaForCausalLM",
                    extra_config: dict | None = None) -> None:
    hf.write_json(path / "config.json", hf.hf_config(cfg, architecture, dtype, **(extra_config or {})))
    hf.write_json(path / "generation_config.json", {
        "bos_token_id": 1, "eos_token_id": 2, "do_sample": True,
        "temperature": 0.6, "top_p": 0.9, "max_length": cfg.max_seq_len,  # Meta's chat defaults
    })
    if tokenizer is not None:
        hf.write_tokenizer_files(path, tokenizer, cfg.max_seq_len)


@contextlib.contextmanager
def staged(dst: Path, directory: bool) -> Iterator[Path]:
    """A hidden temporary directory (or file) beside ``dst`` to write into; it is renamed to
    ``dst`` only once the block completes, and removed (with any parent folders made for it)
    if the block fails or is interrupted, so a failed conversion leaves nothing behind."""
    made = [p for p in (dst.parent, *dst.parent.parents) if not p.exists()]
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir() if directory else tmp.touch()
    except OSError as e:
        if made:
            shutil.rmtree(made[-1], ignore_errors=True)
        blocker = next((p for p in dst.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else e.strerror or str(e)
        raise CheckpointError(f"{dst}: cannot be written ({why})") from None
    try:
        yield tmp
        os.replace(tmp, dst)  # an empty directory at dst is replaced too
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if made:
            shutil.rmtree(made[-1], ignore_errors=True)
        raise


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, n_shards: int = 1,
            max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None,
            tokenizer: str | os.PathLike | None = None,
            progress: Callable[[str], None] | None = None, verify: bool = True,
            adapter: str | os.PathLike | None = None) -> Path:
    """Convert between formats without materialising two copies of the weights.

    ``to='hf'``: Meta (or HF) -> our HF-compatible directory. ``to='meta'``: -> Meta's format
    with ``n_shards`` model-parallel files. ``to='gguf'``: -> one llama.cpp GGUF file ``dst``.
    ``dtype`` casts the weights (default: keep them); ``tokenizer`` overrides the
    ``tokenizer.model`` found beside (or one folder above) the source; ``progress(name)`` is
    called after each tensor is written. ``verify`` checks the source's weight files against
    its ``checksums.json``, if any. ``adapter``: a LoRA adapter directory merged into ``src`` on
    the way (as ``src`` being an adapter directory merges it into its recorded base).

    All or nothing: the output is written beside ``dst`` under a hidden name and renamed to
    ``dst`` once complete; a failure removes it. A directory target must be new or empty.
    """
    src, dst = Path(src), Path(dst)
    if to not in ("hf", "meta", "gguf"):
        raise ValueError(f"unknown target format {to!r}; use 'hf', 'meta' or 'gguf'")
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"{dst}: output must differ from the input")
    if to == "gguf":
        if dst.is_dir():
            raise CheckpointError(f"{dst}: is a directory; a GGUF target is a file")
        with staged(dst, directory=False) as tmp:
            export_gguf(src, tmp, dtype=dtype, tokenizer_path=tokenizer, progress=progress, verify=verify,
                        adapter=adapter)
        return dst
    if n_shards < 1:
        raise ValueError(f"--shards must be at least 1, got {n_shards}")
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()):
        raise CheckpointError(f"{dst}: already exists and is not empty; convert into a new directory")

    def stream(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in tensors:
            yield name, (t.to(dtype) if dtype is not None else t)
            if progress is not None:
                progress(name)

    cfg, _, tensors = load_state(src, verify, adapter)
    if tokenizer is not None:
        tok_file = Path(tokenizer)
    else:  # an adapter saved without a tokenizer ships its base's
        from .gguf import tokenizer_file

        tok_file = tokenizer_file(src) or (tokenizer_file(Path(adapter)) if adapter is not None else None)
    tok = load_tokenizer(tok_file, cfg.vocab_size) if tok_file is not None else None
    with staged(dst, directory=True) as out:
        if to == "hf":
            dtypes: set[torch.dtype] = set()

            def renamed():
                for n, t in stream(tensors):
                    dtypes.add(t.dtype)  # not the tensor itself: nothing may outlive its shard
                    yield hf.to_hf_name(n), t

            hf.write_safetensors(out, renamed(), max_shard_bytes)
            if not dtypes:
                raise CheckpointError(f"{src}: no tensors found")
            store = dtype or (torch.float32 if torch.float32 in dtypes else next(iter(dtypes)))
            _write_metadata(out, cfg, store, tok)
        else:
            meta.save_meta(lambda: stream(load_state(src, verify, adapter)[2]), cfg, out, n_shards, tok_file)
    return dst


def quantize_dir(src: str | os.PathLike, dst: str | os.PathLike, spec: str, dtype: torch.dtype | None = None,
                 max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES, tokenizer: str | os.PathLike | None = None,
                 progress: Callable[[str], None] | None = None, verify: bool = True,
                 adapter: str | os.PathLike | None = None) -> Path:
    """``llama2 quantize``: write ``src`` (any format; ``adapter`` merged on the way) as a
    quantized model directory (checkpoint/quantized.py) that reloads without quantizing again.
    Streams one tensor at a time, so the peak memory is one shard of the output plus one float
    tensor; ``dtype`` casts the unquantized embeddings and norms. All or nothing, as ``convert``."""
    from .gguf import tokenizer_file

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"{dst}: output must differ from the input")
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()):
        raise CheckpointError(f"{dst}: already exists and is not empty; quantize into a new directory")
    cfg, _, tensors = load_state(src, verify, adapter)
    quantized.check_shapes(cfg, spec)
    tok_file = Path(tokenizer) if tokenizer is not None else (
        tokenizer_file(src) or (tokenizer_file(Path(adapter)) if adapter is not None else None))
    tok = load_tokenizer(tok_file, cfg.vocab_size) if tok_file is not None else None
    with staged(dst, directory=True) as out:
        dtypes: set[torch.dtype] = set()

        def stored():
            for name, t in quantized.quantize_tensors(tensors, cfg, spec, dtype):
                if t.is_floating_point() and not name.endswith((quantized.SCALE, quantized.ZERO)):
                    dtypes.add(t.dtype)
                yield hf.to_hf_name(name), t
                if progress is not None and not name.endswith((quantized.SCALE, quantized.ZERO)):
                    progress(name)

        hf.write_safetensors(out, stored(), max_shard_bytes)
        rest = dtype or (torch.float32 if torch.float32 in dtypes or not dtypes else next(iter(dtypes)))
        _write_metadata(out, cfg, rest, tok, architecture=quantized.ARCHITECTURE,
                        extra_config={"model_type": quantized.MODEL_TYPE,
                                      "quantization_config": quantized.quantization_config(spec, rest)})
    return dst


DTYPES = {
    "f32": torch.float32, "fp32": torch.float32, "float32": torch.float32,
    "f16": torch.float16, "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """'bf16' / 'float16' / ... -> torch dtype; None and 'auto' -> None (keep the checkpoint's)."""
    if name is None or name == "auto":
        return None
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of: f32, f16, bf16") from None
