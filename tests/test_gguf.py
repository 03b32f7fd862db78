"""GGUF export for llama.cpp (its GGUF spec), read back with gguf's own GGUFReader.

The exported tensors are fed to the independent Meta-convention forward pass of
test_checkpoint, which is what llama.cpp's "llama" architecture computes with Q/K in Meta's
interleaved layout. When llama-cpp-python is installed (it compiles llama.cpp, so it is not a
test dependency), the last test runs the file in llama.cpp itself and compares logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llama2.checkpoint import CheckpointError, convert, load_model, load_tokenizer, save_model
from llama2.cli import main as cli

from .conftest import SMALL_VOCAB
from .test_checkpoint import FIXTURE, META_PARAMS, logits, meta_weights, random_model, reference_forward, tiny
from .test_checkpoint import write_meta as write_meta_dir

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install 'llama2[gguf]') is not installed")

VOCAB = 32000
TO_GGUF = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
           "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
           "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def gguf_key(meta_name: str) -> str:
    top = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "output.weight": "output.weight"}
    if meta_name in top:
        return top[meta_name]
    _, i, rest = meta_name.split(".", 2)
    return f"blk.{i}.{TO_GGUF[rest.removesuffix('.weight')]}.weight"


def field(reader, key):
    f = reader.get_field(key)
    assert f is not None, f"missing GGUF key {key}"
    return f.contents()


def tensors(reader) -> dict[str, torch.Tensor]:
    out = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            x = torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16)
        else:
            x = torch.from_numpy(data.copy())
        out[t.name] = x.reshape([int(n) for n in reversed(t.shape)])
    return out


@pytest.fixture(scope="module")
def meta_src(tmp_path_factory):
    """A Meta-layout checkpoint (2 model-parallel shards, GQA, theta 1e6) beside the tokenizer."""
    root = tmp_path_factory.mktemp("gguf")
    weights = meta_weights(META_PARAMS, VOCAB, seed=7)
    src = write_meta_dir(root / "meta", META_PARAMS, weights, 2)
    (root / "tokenizer.model").write_bytes(FIXTURE.read_bytes())
    out = convert(src, root / "model.gguf", "gguf")
    return weights, gguf.GGUFReader(out), out


def test_metadata(meta_src):
    _, reader, _ = meta_src
    from llama2.chat import CHAT_TEMPLATE

    expected = {
        "general.architecture": "llama", "general.file_type": 0,
        "llama.vocab_size": VOCAB, "llama.context_length": 4096, "llama.embedding_length": 64,
        "llama.block_count": 2, "llama.feed_forward_length": 224, "llama.rope.dimension_count": 8,
        "llama.attention.head_count": 8, "llama.attention.head_count_kv": 4, "llama.rope.freq_base": 1e6,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False, "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    for key, value in expected.items():
        assert field(reader, key) == value, key
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert reader.get_field("tokenizer.ggml.padding_token_id") is None  # Llama 2 has no pad token


def test_tokenizer_pieces_scores_and_types(meta_src):
    _, reader, _ = meta_src
    sp = load_tokenizer(FIXTURE).sp
    tokens = field(reader, "tokenizer.ggml.tokens")
    scores = field(reader, "tokenizer.ggml.scores")
    types = field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(scores) == len(types) == VOCAB
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3]
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)] and set(types[3:259]) == {6}
    assert set(types[259:]) == {1}
    for i in (0, 1, 300, 15043, 31999):
        assert tokens[i] == sp.id_to_piece(i)
        assert scores[i] == pytest.approx(sp.get_score(i))


def test_tensors_are_metas_own_layout(meta_src):
    """From a Meta checkpoint, every GGUF tensor equals Meta's merged original exactly (Q/K included)."""
    weights, reader, _ = meta_src
    got = tensors(reader)
    assert sorted(got) == sorted(gguf_key(n) for n in weights)
    for name, w in weights.items():
        t = got[gguf_key(name)]
        assert t.dtype == torch.float32 and torch.equal(t, w), name


def test_gguf_tensors_compute_the_same_logits(meta_src):
    weights, reader, _ = meta_src
    got = tensors(reader)
    tokens = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    from_gguf = reference_forward(META_PARAMS, {n: got[gguf_key(n)] for n in weights}, tokens)
    ours = logits(load_model(Path(reader.data.filename).parent / "meta"), tokens)
    torch.testing.assert_close(from_gguf, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype,ggml", [("f16", "F16"), ("bf16", "BF16"), ("f32", "F32")])
def test_hf_source_and_dtypes(tmp_path, small_tokenizer, dtype, ggml):
    """From our HF layout, wq/wk rows go back to Meta's interleaved order; 1-D norms stay F32."""
    model = random_model(tiny(vocab_size=SMALL_VOCAB, rope_theta=1e6))
    save_model(model, tmp_path / "hf", tokenizer=small_tokenizer)
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--dtype", dtype, "-q"]) == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert types["token_embd.weight"] == types["blk.1.ffn_down.weight"] == ggml
    torch_dtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[dtype]
    got = tensors(reader)
    sd = model.state_dict()
    hd = 16
    for i in range(2):
        for kind, heads in (("wq", 4), ("wk", 2)):
            w = sd[f"layers.{i}.attention.{kind}.weight"]
            # rotate-half row c*hd/2 + j  ->  Meta row 2j + c, within each head
            meta_rows = w.view(heads, 2, hd // 2, 64).permute(0, 2, 1, 3).reshape(heads * hd, 64)
            assert torch.equal(got[f"blk.{i}.attn_{kind[1]}.weight"], meta_rows.to(torch_dtype))
    assert torch.equal(got["token_embd.weight"], sd["tok_embeddings.weight"].to(torch_dtype))
    assert torch.equal(got["blk.0.attn_norm.weight"], sd["layers.0.attention_norm.weight"])
    assert field(reader, "general.file_type") == {"f32": 0, "f16": 1, "bf16": 32}[dtype]
    assert field(reader, "tokenizer.ggml.tokens")[SMALL_VOCAB - 1] == small_tokenizer.id_to_piece(SMALL_VOCAB - 1)


def test_output_directory_and_default_dtype(tmp_path, small_tokenizer):
    model = random_model(tiny(vocab_size=SMALL_VOCAB))
    save_model(model, tmp_path / "hf", tokenizer=small_tokenizer, dtype=torch.bfloat16)
    (tmp_path / "out").mkdir()
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--to", "gguf", "-q"]) == 0
    files = list((tmp_path / "out").glob("*.gguf"))
    assert [f.name for f in files] == ["hf.gguf"]
    reader = gguf.GGUFReader(files[0])
    assert field(reader, "general.file_type") == 32  # bf16 checkpoint -> bf16 GGUF, losslessly


def test_gguf_needs_a_matching_tokenizer(tmp_path, small_tokenizer):
    model = random_model(tiny(vocab_size=SMALL_VOCAB))
    save_model(model, tmp_path / "hf")  # no tokenizer saved
    with pytest.raises(CheckpointError, match="tokenizer"):
        convert(tmp_path / "hf", tmp_path / "a.gguf", "gguf")
    assert not (tmp_path / "a.gguf").exists() and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(CheckpointError, match="32000.*320"):
        convert(tmp_path / "hf", tmp_path / "b.gguf", "gguf", tokenizer=FIXTURE)
    assert not (tmp_path / "b.gguf").exists()
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "c.gguf"), "--tokenizer", str(small_tokenizer.path),
                "-q"]) == 0
    assert json.loads((tmp_path / "hf/config.json").read_text())["vocab_size"] == SMALL_VOCAB


def test_llama_cpp_computes_the_same_logits(tmp_path):
    """Runs the exported file in llama.cpp itself, when llama-cpp-python is installed (it builds
    llama.cpp from source, ~20 minutes on 2 cores, so it is not a test dependency)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional llama.cpp check)")
    tok = load_tokenizer(FIXTURE)
    model = random_model(tiny(vocab_size=VOCAB, rope_theta=1e6, max_seq_len=128))
    save_model(model, tmp_path / "hf", tokenizer=tok)
    out = convert(tmp_path / "hf", tmp_path / "m.gguf", "gguf", dtype=torch.float32)
    text = "Hello world, this is llama.cpp"
    ids = tok.encode(text, bos=True)
    # type_k/type_v 0 = an F32 KV cache (llama.cpp's default F16 cache rounds K and V)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)
    assert llm.tokenize(text.encode(), add_bos=True) == ids
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    torch.testing.assert_close(theirs, logits(model, torch.tensor([ids]))[0], atol=1e-4, rtol=0)
    llm.close()
