"""GGUF export for llama.cpp (its GGUF spec), written with the ``gguf`` package.

llama.cpp's ``llama`` architecture keeps wq/wk in Meta's adjacent-pair RoPE layout, so their
rows are permuted back from our rotate-half layout. 1-D norm weights stay float32 (as
llama.cpp's own converter does); the matrices are written as float32, float16 or bfloat16, or
quantized to Q8_0, Q4_0, Q6_K or Q4_K (``quant``).

Quantized export follows ``llama-quantize --pure``: every 2-D weight (attention, FFN,
``token_embd`` and ``output``, which llama-quantize without ``--pure`` would bump to Q6_K for
Q4_0) is in the chosen type, the 1-D norms stay F32, and a matrix whose rows are not a
multiple of the type's block (32 values; 256 for the k-quants) falls back with a log line the
way llama.cpp's ``tensor_type_fallback`` does: Q6_K to Q8_0, Q4_K to Q5_0, and to F16 when
those 32-value blocks do not fit either (Q8_0 and Q4_0 go straight to F16).
``general.file_type`` is what llama-quantize writes for the type's name: MOSTLY_Q8_0,
MOSTLY_Q4_0, MOSTLY_Q6_K, and MOSTLY_Q4_K_M for Q4_K (llama-quantize's ``Q4_K`` is an alias of
``Q4_K_M``; with ``--pure`` Q4_K_S and Q4_K_M give the same tensors). The 32-value blocks come
from the ``gguf`` package's quantizer (``gguf.quants.quantize``, which matches ggml's
``quantize_row_q8_0_ref`` / ``q4_0`` / ``q5_0`` bit for bit), the k-quants from our port of
``quantize_row_q6_K_ref`` / ``quantize_row_q4_K_ref`` (:mod:`.kquants`; what llama-quantize
runs without an importance matrix), applied to the source weights' float32 values. One
difference from llama.cpp's usual route: llama-quantize run on an f16 GGUF starts from
f16-rounded values, so for a float32 or bfloat16 checkpoint its blocks can differ slightly
from ours (ours start from the exact weights).

Tensors are read one at a time (memory-mapped where the source allows) and streamed into the
file after the header, so an export never holds more than one tensor in memory. A LoRA adapter
(PEFT's format) is folded into each weight as that weight is read, the same way
``checkpoint.load_state`` merges one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from llama2.chat import CHAT_TEMPLATE
from llama2.model import ModelConfig, Transformer

from . import hf, kquants, meta, peft
from .errors import CheckpointError
from .locate import detect_format, load_tokenizer

GGUF_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# --dtype name -> (GGMLQuantizationType, LlamaFileType) member names in the gguf package
GGUF_QUANTS = {"q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
               "q6_k": ("Q6_K", "MOSTLY_Q6_K"), "q4_k": ("Q4_K", "MOSTLY_Q4_K_M")}
# llama.cpp's tensor_type_fallback (llama-quant.cpp) for rows not a multiple of the block: a
# k-quant goes to a 32-value type; a 32-value type (or a fallback that still does not fit) to F16
_FALLBACK = {"Q6_K": "Q8_0", "Q4_K": "Q5_0"}
# the quantizers the gguf package lacks
_OUR_QUANTIZERS = {"Q6_K": kquants.quantize_q6_k, "Q4_K": kquants.quantize_q4_k}

# our parameter name -> llama.cpp's tensor name (llama.cpp's convert_hf_to_gguf.py)
_TO_GGUF = [
    (r"^tok_embeddings\.weight$", "token_embd.weight"),
    (r"^norm\.weight$", "output_norm.weight"),
    (r"^output\.weight$", "output.weight"),
    (r"^layers\.(\d+)\.attention_norm\.weight$", r"blk.\1.attn_norm.weight"),
    (r"^layers\.(\d+)\.attention\.wq\.weight$", r"blk.\1.attn_q.weight"),
    (r"^layers\.(\d+)\.attention\.wk\.weight$", r"blk.\1.attn_k.weight"),
    (r"^layers\.(\d+)\.attention\.wv\.weight$", r"blk.\1.attn_v.weight"),
    (r"^layers\.(\d+)\.attention\.wo\.weight$", r"blk.\1.attn_output.weight"),
    (r"^layers\.(\d+)\.ffn_norm\.weight$", r"blk.\1.ffn_norm.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w1\.weight$", r"blk.\1.ffn_gate.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w2\.weight$", r"blk.\1.ffn_down.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w3\.weight$", r"blk.\1.ffn_up.weight"),
]


def gguf_name(name: str) -> str:
    """llama.cpp's name for one of our parameters."""
    for pattern, repl in _TO_GGUF:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    raise CheckpointError(f"tensor {name!r} has no GGUF counterpart in llama.cpp's 'llama' architecture")


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("GGUF export needs the gguf package: pip install 'llama2[gguf]'") from None
    return gguf


def token_types(sp) -> list[int]:
    """llama.cpp's token types for a SentencePiece model: 1 normal, 2 unknown, 3 control,
    5 unused, 6 byte."""
    types = []
    for i in range(sp.vocab_size()):
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_unused(i):
            types.append(5)
        elif sp.is_byte(i):
            types.append(6)
        else:
            types.append(1)
    return types


def _ggml_type(gguf, dtype: torch.dtype):
    return {
        torch.float32: (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
        torch.float16: (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        torch.bfloat16: (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    }[dtype]


def _to_numpy(t: torch.Tensor):
    """A contiguous CPU tensor as the numpy array gguf writes: bf16 travels as raw int16 bits."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def write_gguf(
    path: str | os.PathLike,
    cfg: ModelConfig,
    get_tensor: Callable[[str], torch.Tensor],
    tokenizer,
    dtype: torch.dtype = torch.float16,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
    quant: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write a llama.cpp GGUF file. ``get_tensor(our_name)`` returns a weight in our
    (rotate-half) layout; it is called once per tensor, in llama.cpp's usual order.

    ``quant`` (a :data:`GGUF_QUANTS` name: 'q8_0', 'q4_0', 'q6_k', 'q4_k') quantizes the 2-D
    weights from their float32 values instead of casting them to ``dtype`` (see the module
    docstring); ``log`` receives the line about each matrix that falls back to another type
    (default: this module's logger)."""
    gguf = _import_gguf()
    path = Path(path)
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF export writes float32, float16 or bfloat16, not {dtype}")
    if quant is not None and quant not in GGUF_QUANTS:
        raise ValueError(f"GGUF export quantizes to {', '.join(GGUF_QUANTS)}, not {quant!r}")
    if tokenizer is None:
        raise CheckpointError(f"{path}: a GGUF file needs the tokenizer; no tokenizer.model was found")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise CheckpointError(
            f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary is "
            f"{cfg.vocab_size}"
        )
    matrix_type, file_type = _ggml_type(gguf, dtype)
    if quant is not None:
        qname, fname = GGUF_QUANTS[quant]
        matrix_type, file_type = gguf.GGMLQuantizationType[qname], gguf.LlamaFileType[fname]
        block = gguf.GGML_QUANT_SIZES[matrix_type][0]
    if log is None:
        log = logging.getLogger(__name__).warning

    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in Transformer(cfg).state_dict().items()}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(name or path.stem)
        writer.add_file_type(int(file_type))
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.dim)
        writer.add_block_count(cfg.n_layers)
        writer.add_feed_forward_length(cfg.hidden_dim)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_head_count(cfg.n_heads)
        writer.add_head_count_kv(cfg.n_kv_heads)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_freq_base(cfg.rope_theta)
        if cfg.rope_scaling is not None:  # llama.cpp divides positions by the factor, as we do
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(cfg.rope_scaling)
        _add_tokenizer(writer, tokenizer)

        plan = []
        for ours, shape in shapes.items():
            is_matrix = len(shape) > 1
            if is_matrix and quant is not None:
                qtype = matrix_type
                if shape[-1] % block:  # tensor_type_fallback: a 32-value type, else F16
                    qtype = _FALLBACK.get(matrix_type.name)
                    if qtype is not None:
                        qtype = gguf.GGMLQuantizationType[qtype]
                        if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                            qtype = None
                    log(f"{gguf_name(ours)}: rows of {shape[-1]} values are not a multiple of {quant}'s "
                        f"{block}-value block; writing it as {qtype.name if qtype else 'F16'} (as llama.cpp does)")
                if qtype is not None:
                    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
                    writer.add_tensor_info(gguf_name(ours), byte_shape, np.dtype("uint8"),
                                           int(np.prod(byte_shape)), raw_dtype=qtype)
                    plan.append((ours, shape, qtype))
                    continue
                ggml_type, store = gguf.GGMLQuantizationType.F16, torch.float16
            else:
                ggml_type = matrix_type if is_matrix else gguf.GGMLQuantizationType.F32
                store = dtype if is_matrix else torch.float32
            np_dtype = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "int16"}[store]
            nbytes = torch.Size(shape).numel() * (4 if store == torch.float32 else 2)
            writer.add_tensor_info(gguf_name(ours), shape, np.dtype(np_dtype), nbytes, raw_dtype=ggml_type)
            plan.append((ours, shape, store))

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for ours, shape, store in plan:
            t = get_tensor(ours)
            if tuple(t.shape) != shape:
                raise CheckpointError(
                    f"tensor {ours!r} has shape {tuple(t.shape)}, the config implies {shape}"
                )
            if ours.endswith("attention.wq.weight"):
                t = meta.hf_to_meta_rows(t, cfg.n_heads)
            elif ours.endswith("attention.wk.weight"):
                t = meta.hf_to_meta_rows(t, cfg.n_kv_heads)
            if isinstance(store, torch.dtype):
                writer.write_tensor_data(_to_numpy(t.to(store)))
            else:  # a quantization type: blocks from the float32 values
                quantize = _OUR_QUANTIZERS.get(store.name)
                values = _to_numpy(t.to(torch.float32))
                writer.write_tensor_data(quantize(values) if quantize else gguf.quants.quantize(values, store))
            del t
            if progress is not None:
                progress(ours)
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()  # a no-op once closed
        tmp.unlink(missing_ok=True)
    return path


def _add_tokenizer(writer, tokenizer) -> None:
    sp = tokenizer.sp
    n = sp.vocab_size()
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([float(sp.get_score(i)) for i in range(n)])
    writer.add_token_types(token_types(sp))
    if tokenizer.bos_id >= 0:
        writer.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eos_id >= 0:
        writer.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.unk_id >= 0:
        writer.add_unk_token_id(tokenizer.unk_id)
    if tokenizer.pad_id >= 0:
        writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    # SentencePiece's add_dummy_prefix (true for Llama 2): "a" encodes as the piece "▁a".
    pieces = sp.encode_as_pieces("a")
    writer.add_add_space_prefix(bool(pieces) and pieces[0].startswith("\u2581"))
    writer.add_chat_template(CHAT_TEMPLATE)


@contextlib.contextmanager
def open_tensors(path: Path, verify: bool = True) -> Iterator[tuple[ModelConfig, Callable[[str], torch.Tensor]]]:
    """Random access to a model directory's tensors by our name, in our layout, without
    reading anything until asked (safetensors and Meta's .pth files are memory-mapped).
    ``verify`` first checks the weight files against ``checksums.json``, if there is one."""
    if detect_format(path) == "hf":
        cfg = hf.config_from_hf(hf.read_config(path), path / "config.json")
        checksums = hf.read_checksums(path) if verify else None
        with contextlib.ExitStack() as stack:
            where: dict[str, tuple[object, str, Path]] = {}
            for file in hf.weight_files(path):
                hf.verify_file(file, checksums)
                try:
                    f = stack.enter_context(safe_open(str(file), framework="pt"))
                except Exception as e:  # noqa: BLE001 - safetensors raises several types
                    raise CheckpointError(f"{file}: cannot read safetensors ({str(e).splitlines()[0]})") from None
                for key in f.keys():
                    where[hf.from_hf_name(key)] = (f, key, file)

            def get(name: str) -> torch.Tensor:
                if name not in where:
                    raise CheckpointError(f"{path}: missing tensor {hf.to_hf_name(name)!r}")
                f, key, file = where[name]
                try:
                    return f.get_tensor(key)
                except Exception as e:  # noqa: BLE001
                    raise CheckpointError(f"{file}: cannot read tensor {key!r} ({str(e).splitlines()[0]})") from None

            yield cfg, get
        return

    cfg = meta.read_params(path)
    files = meta.shard_files(path)
    shards = [meta._load_shard(f) for f in files]

    def get_meta(name: str) -> torch.Tensor:
        parts = []
        for f, shard in zip(files, shards):
            if name not in shard:
                raise CheckpointError(f"{f}: missing tensor {name!r}")
            parts.append(shard[name])
        dim = meta.shard_dim(name)
        t = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
        if name.endswith("attention.wq.weight"):
            t = meta.meta_to_hf_rows(t, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = meta.meta_to_hf_rows(t, cfg.n_kv_heads)
        return t

    yield cfg, get_meta


def tokenizer_file(path: Path) -> Path | None:
    """The ``tokenizer.model`` beside a model directory (or one folder up, as in Meta's downloads);
    for a LoRA adapter directory saved without one, its base model's."""
    seen = set()
    while path not in seen:
        seen.add(path)
        found = meta.find_tokenizer(path)
        if found is not None or not peft.is_adapter_dir(path):
            return found
        try:
            path = peft.resolve_base(path, peft.read_adapter_config(path))
        except CheckpointError:
            return None
    return None  # adapters that name each other as their base


@contextlib.contextmanager
def open_merged(path: Path, verify: bool = True, adapter: str | os.PathLike | None = None,
                ) -> Iterator[tuple[ModelConfig, Callable[[str], torch.Tensor]]]:
    """:func:`open_tensors` with a LoRA adapter folded into each weight as it is read: ``adapter``
    applied to the model at ``path``, or ``path`` itself an adapter directory (over its recorded
    base). Random access, like ``open_tensors``: GGUF wants the tensors in its own order."""
    path = Path(path)
    if adapter is None and detect_format(path) != "peft":
        with open_tensors(path, verify) as opened:
            yield opened
        return
    apath = Path(adapter if adapter is not None else path)
    acfg, layers, others = peft.read_adapter(apath)
    if acfg.get("task_type") == "SEQ_CLS":
        raise CheckpointError(f"{apath / peft.ADAPTER_CONFIG}: a reward model's adapter (task_type SEQ_CLS) has "
                              "no GGUF form (llama.cpp's llama architecture has no score head)")
    base = peft.resolve_base(apath, acfg, path if adapter is not None else None)
    with open_merged(base, verify) as (cfg, get):  # a base that is itself an adapter merges first
        with torch.device("meta"):
            names = set(Transformer(cfg).state_dict())
        # Checked before the header is written, with load_state's message: merge_stream only
        # notices a target the base lacks after the last tensor.
        stray = sorted({f"{n}.weight" for n in layers} - names) + sorted(set(others) - names)
        if stray:
            raise CheckpointError(f"{apath / peft.ADAPTER_WEIGHTS}: adapter targets "
                                  f"{stray[0].removesuffix('.weight')}, which the base model has not")

        def merged(name: str) -> torch.Tensor:
            linear = name.removesuffix(".weight")
            one = {linear: layers[linear]} if linear in layers else {}
            replaced = {name: others[name]} if name in others else {}
            # peft.merge_stream over one tensor: the same arithmetic and shape check as load_state.
            return dict(peft.merge_stream(iter([(name, get(name))]), one, replaced, apath, scalar=False))[name]

        yield cfg, merged


def export_gguf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: torch.dtype | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    verify: bool = True,
    adapter: str | os.PathLike | None = None,
    quant: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Convert a model directory (ours/Hugging Face, Meta's, or a LoRA adapter directory) to one
    GGUF file; ``adapter``: a LoRA adapter directory merged into ``src`` on the way.

    ``dtype`` None keeps the checkpoint's floating-point type. ``quant`` ('q8_0', 'q4_0', 'q6_k'
    or 'q4_k') quantizes the matrices instead (:func:`write_gguf`, with its fallbacks). The
    tokenizer is the directory's ``tokenizer.model`` (or the one a folder up, as in Meta's
    downloads; an adapter's base's) unless given."""
    src, dst = Path(src), Path(dst)
    with open_merged(src, verify, adapter) as (cfg, get):
        if tokenizer_path is not None:
            tok_file = Path(tokenizer_path)
        else:
            tok_file = tokenizer_file(src) or (tokenizer_file(Path(adapter)) if adapter is not None else None)
        if tok_file is None:
            raise CheckpointError(f"{src}: no tokenizer.model found (GGUF needs one); pass the tokenizer path")
        tokenizer = load_tokenizer(tok_file, cfg.vocab_size)
        if quant is not None:
            dtype = torch.float16  # not used for matrices: those not quantized are F16, as in llama.cpp
        elif dtype is None:
            first = get("tok_embeddings.weight").dtype
            dtype = first if first in GGUF_DTYPES else torch.float16
        return write_gguf(dst, cfg, get, tokenizer, dtype, name=src.resolve().name, progress=progress,
                          quant=quant, log=log)
