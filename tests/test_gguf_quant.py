"""Quantized GGUF export (``--dtype q8_0 | q4_0``), read back with gguf's own GGUFReader.

The blocks in the file are checked byte for byte against a reference written here from
llama.cpp's C code (ggml-quants.c: ``quantize_row_q8_0_ref`` and ``quantize_row_q4_0_ref``),
independently of the gguf package that writes them, on weights with the edge cases planted
(all-zero blocks, an abs-max tie of opposite signs, the 15 clamp of Q4_0, halves that round
away from zero, values too small for the fp16 scale). When llama-cpp-python is installed, the
last test runs the Q8_0 file in llama.cpp itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llama2.checkpoint import load_tokenizer, save_model
from llama2.checkpoint.gguf import export_gguf
from llama2.cli import main as cli

from .conftest import SMALL_VOCAB
from .test_checkpoint import FIXTURE, logits, random_model, tiny

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install 'llama2[gguf]') is not installed")

QK = 32  # the block of Q8_0 and Q4_0
HD = 16  # head_dim of tiny(): dim 64, 4 heads (2 kv)


# -- llama.cpp's reference quantizers (ggml-quants.c), transcribed block by block -------------

def _fp16_le(d: np.float32) -> bytes:
    """GGML_FP32_TO_FP16: round to nearest even, little-endian."""
    return np.array([d], dtype=np.float32).astype("<f2").tobytes()


def _roundf(v: np.float32) -> int:
    """C's roundf: halves away from zero (float64 holds v + 0.5 exactly)."""
    return int(math.copysign(math.floor(abs(float(v)) + 0.5), float(v)))


def ref_q8_0(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_0_ref for each row: per block, d = amax/127, q = roundf(x/d); fp16 d, 32 int8."""
    out = bytearray()
    for row in x.astype(np.float32):
        for b in range(0, len(row), QK):
            blk = row[b:b + QK]
            amax = np.float32(0)
            for v in blk:
                amax = max(amax, np.float32(abs(v)))
            d = np.float32(amax / np.float32(127))
            id_ = np.float32(np.float32(1) / d) if d else np.float32(0)
            out += _fp16_le(d)
            out += bytes(np.array([_roundf(np.float32(v * id_)) for v in blk], dtype=np.int8).view(np.uint8))
    return np.frombuffer(bytes(out), dtype=np.uint8).reshape(x.shape[0], -1)


def ref_q4_0(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_0_ref for each row: per block, ``max`` the (signed) value of largest |x|
    (the first one), d = max/-8, q = min(15, (int8)(x/d + 8.5)); fp16 d, then 16 bytes with
    q[j] in the low nibble of byte j and q[j+16] in its high nibble."""
    out = bytearray()
    for row in x.astype(np.float32):
        for b in range(0, len(row), QK):
            blk = row[b:b + QK]
            amax, mx = np.float32(0), np.float32(0)
            for v in blk:
                if amax < abs(v):
                    amax, mx = np.float32(abs(v)), v
            d = np.float32(mx / np.float32(-8))
            id_ = np.float32(np.float32(1) / d) if d else np.float32(0)
            q = [min(15, int(np.float32(np.float32(v * id_) + np.float32(8.5)))) for v in blk]  # int(): truncation
            out += _fp16_le(d)
            out += bytes(q[j] | (q[j + 16] << 4) for j in range(QK // 2))
    return np.frombuffer(bytes(out), dtype=np.uint8).reshape(x.shape[0], -1)


def test_reference_on_hand_computed_blocks():
    """The transcription itself, on blocks worked out by hand."""
    x = np.zeros((1, QK), np.float32)
    x[0, :4] = [127 / 128, 2.5 / 128, -2.5 / 128, 0.5 / 128]  # d = 1/128: q = 127, 3, -3, 1
    q8 = ref_q8_0(x)[0]
    assert q8[:2].tobytes() == np.float16(1 / 128).tobytes()
    assert list(q8[2:6].view(np.int8)) == [127, 3, -3, 1] and not q8[6:].any()
    x = np.zeros((1, QK), np.float32)
    x[0, :3] = [-1.0, 0.4375, 1.0]  # max -1 (first of the tie): d = 1/8; 0.4375*8 + 8.5 = 12; 1*8 + 8.5 -> 15
    q4 = ref_q4_0(x)[0]
    assert q4[:2].tobytes() == np.float16(0.125).tobytes()
    assert list(q4[2:5] & 15) == [0, 12, 15] and set(q4[5:18] & 15) == {8} and set(q4[2:18] >> 4) == {8}
    assert not ref_q8_0(np.zeros((1, QK), np.float32)).any() and ref_q4_0(np.zeros((1, QK), np.float32))[0, 2] == 0x88


# -- fixtures -------------------------------------------------------------------------------

def plant_edge_cases(w: torch.Tensor) -> None:
    """Rows 0-3 of a [*, 64] weight (two blocks a row) get the cases the quantizers special-case."""
    w[0] = 0  # all-zero blocks: d = 0, id = 0
    w[1, :32] = 0.01 * torch.arange(32) / 32
    w[1, 5], w[1, 20] = 0.3, -0.3  # |max| tie, positive first: Q4_0 max = +0.3, and -0.3 hits the 15 clamp
    w[1, 32:] = -0.01 * torch.arange(32) / 32
    w[1, 40], w[1, 50] = -0.3, 0.3  # the same tie, negative first
    w[2, :32] = torch.tensor([127.0, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 126.5] + [0.0] * 24) / 128  # Q8_0 halves
    w[2, 32:] = torch.tensor([-8.0, 3.5, -0.5, 7.49, 7.5, 8.0, -7.99, 0.0] + [1.0] * 24) / 16  # Q4_0 on .5 and the clamp
    w[3] = 1e-30 * torch.linspace(-1, 1, 64)  # d underflows to fp16 0


@pytest.fixture(scope="module")
def quant_files(tmp_path_factory, small_tokenizer):
    """(model, {quant: GGUFReader}): a tiny float32 model (every row a multiple of 32: hidden 192)
    with edge cases planted in layers.0.feed_forward.w1, exported as Q8_0 and Q4_0."""
    root = tmp_path_factory.mktemp("gguf_quant")
    model = random_model(tiny(vocab_size=SMALL_VOCAB, multiple_of=32))
    assert model.config.hidden_dim == 192
    with torch.no_grad():
        plant_edge_cases(model.layers[0].feed_forward.w1.weight)
    save_model(model, root / "hf", tokenizer=small_tokenizer)
    readers = {q: gguf.GGUFReader(export_gguf(root / "hf", root / f"m.{q}.gguf", quant=q)) for q in ("q8_0", "q4_0")}
    return model, readers


def gguf_originals(model) -> dict[str, np.ndarray]:
    """Our float32 weights under llama.cpp's names, wq/wk rows in Meta's interleaved order."""
    sd = model.state_dict()
    names = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
             "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
             "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
    out = {"token_embd.weight": sd["tok_embeddings.weight"], "output.weight": sd["output.weight"],
           "output_norm.weight": sd["norm.weight"]}
    for i in range(2):
        for ours, theirs in names.items():
            w = sd[f"layers.{i}.{ours}.weight"]
            if ours in ("attention.wq", "attention.wk"):
                heads = w.shape[0] // HD  # rotate-half row c*hd/2 + j -> Meta row 2j + c, within each head
                w = w.view(heads, 2, HD // 2, w.shape[1]).permute(0, 2, 1, 3).reshape(w.shape)
            out[f"blk.{i}.{theirs}.weight"] = w
    return {n: w.detach().float().numpy() for n, w in out.items()}


def by_name(reader):
    return {t.name: t for t in reader.tensors}


# -- tests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("quant,ref", [("q8_0", ref_q8_0), ("q4_0", ref_q4_0)])
def test_blocks_match_llama_cpp_reference(quant_files, quant, ref):
    model, readers = quant_files
    tensors = by_name(readers[quant])
    originals = gguf_originals(model)
    edge = tensors["blk.0.ffn_gate.weight"]
    assert edge.tensor_type.name == quant.upper()
    np.testing.assert_array_equal(np.asarray(edge.data)[:4], ref(originals["blk.0.ffn_gate.weight"][:4]))
    for name in ("blk.0.ffn_gate.weight", "blk.1.attn_k.weight", "blk.1.ffn_down.weight", "output.weight"):
        got = np.asarray(tensors[name].data)
        assert got.dtype == np.uint8 and got.shape == (originals[name].shape[0], originals[name].shape[1] // QK * (
            34 if quant == "q8_0" else 18)), name
        np.testing.assert_array_equal(got, ref(originals[name]), err_msg=name)


def test_edge_cases_as_planted(quant_files):
    """The planted rows hit the cases they are meant to (so the byte test covers them)."""
    _, readers = quant_files
    q8 = np.asarray(by_name(readers["q8_0"])["blk.0.ffn_gate.weight"].data)
    q4 = np.asarray(by_name(readers["q4_0"])["blk.0.ffn_gate.weight"].data)
    assert not q8[0].any()  # zero blocks: d 0, q 0
    assert list(q8[2, 2:10].view(np.int8)) == [127, 3, -3, 1, -1, 2, -2, 127]
    assert q8[3, :2].view(np.float16)[0] == 0  # the fp16 scale underflowed
    assert set(q4[0, 2:18]) == {0x88} and set(q4[0, 20:36]) == {0x88}  # zero block: 8 | 8 << 4
    assert (q4[1, 2 + 4] >> 4) == 15 and (q4[1, 20 + 2] >> 4) == 15  # -0.3 (j 20, 18) against max +0.3 and mirror
    assert (q4[1, 2 + 5] & 15) == 0 and (q4[1, 20 + 8] & 15) == 0  # the max itself: x/d = -8 -> 0
    assert q4[1, :2].view(np.float16)[0] < 0 < q4[1, 18:20].view(np.float16)[0]  # d = max / -8


@pytest.mark.parametrize("quant,steps,qmax", [("q8_0", 0.5, 127), ("q4_0", 1.0, 8)])
def test_dequantized_within_error_and_types(quant_files, quant, steps, qmax):
    """Each value is within ``steps`` of the block's step d of the original (Q8_0 rounds to half a
    step; Q4_0 too, except the clamp, a whole step), plus up to qmax times the fp16 rounding of d
    (relative 2**-11, or 2**-25 absolute below fp16's normal range, where the 1e-30 row's d
    becomes 0). Norms are F32, exact; general.file_type is MOSTLY_Q8_0/Q4_0."""
    model, readers = quant_files
    reader = readers[quant]
    originals = gguf_originals(model)
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    assert reader.get_field("general.file_type").contents() == int(gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"])
    tensors = by_name(reader)
    assert sorted(tensors) == sorted(originals)
    for name, w in originals.items():
        t = tensors[name]
        if w.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_array_equal(np.asarray(t.data), w)
            continue
        assert t.tensor_type == qtype, name
        got = gguf.quants.dequantize(np.asarray(t.data), qtype)
        assert got.shape == w.shape, name
        blocks = w.reshape(-1, QK)
        d = np.abs(blocks).max(1, keepdims=True).astype(np.float64) / qmax
        err = np.abs(got.reshape(-1, QK) - blocks)
        bound = steps * d * (1 + 1e-6) + qmax * np.maximum(d * 2.0**-11, 2.0**-25)
        assert (err <= bound).all(), (name, float((err - bound).max()))
        if name != "blk.0.ffn_gate.weight":  # typical error: a fraction of the bound
            assert err.mean() < 0.3 * d.mean(), name


def test_cli_q8_0_falls_back_to_f16_for_odd_rows(tmp_path, small_tokenizer, capsys):
    """hidden 176 (multiple_of 16): ffn_down's rows of 176 are not blocks of 32, so it is F16 with a
    log line, as llama.cpp does; ffn_gate/up ([176, 64]) are quantized."""
    model = random_model(tiny(vocab_size=SMALL_VOCAB))
    save_model(model, tmp_path / "hf", tokenizer=small_tokenizer)
    (tmp_path / "out").mkdir()
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--to", "gguf", "--dtype", "q8_0"]) == 0
    err = capsys.readouterr().err
    assert [line.strip() for line in err.splitlines() if "F16" in line] == [
        f"blk.{i}.ffn_down.weight: rows of 176 values are not a multiple of q8_0's 32-value block; "
        "writing it as F16 (as llama.cpp does)" for i in range(2)]
    out = tmp_path / "out" / "hf.q8_0.gguf"
    assert [p.name for p in (tmp_path / "out").iterdir()] == [out.name]
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == types["blk.1.ffn_down.weight"] == "F16"
    assert types["blk.0.ffn_gate.weight"] == types["token_embd.weight"] == types["output.weight"] == "Q8_0"
    assert types["output_norm.weight"] == types["blk.1.ffn_norm.weight"] == "F32"
    assert reader.get_field("general.file_type").contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    down = by_name(reader)["blk.1.ffn_down.weight"]
    np.testing.assert_array_equal(np.asarray(down.data),
                                  model.layers[1].feed_forward.w2.weight.detach().half().numpy())
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "q.gguf"), "--dtype", "q4_0", "-q"]) == 0
    assert gguf.GGUFReader(tmp_path / "q.gguf").get_field("general.file_type").contents() == 2
    assert capsys.readouterr().err == ""  # -q: not even the fallback lines


def test_cli_refuses_quant_for_other_targets_and_lists_it(tmp_path, small_tokenizer, capsys):
    save_model(random_model(tiny(vocab_size=SMALL_VOCAB, multiple_of=32)), tmp_path / "hf", tokenizer=small_tokenizer)
    for argv in (["convert", str(tmp_path / "hf"), str(tmp_path / "meta"), "--dtype", "q4_0"],
                 ["convert", str(tmp_path / "hf"), str(tmp_path / "x.gguf"), "--to", "hf", "--dtype", "q8_0"]):
        assert cli(argv) != 0
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "needs a GGUF target" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    with pytest.raises(SystemExit):
        cli(["convert", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "q8_0" in help_text and "q4_0" in help_text and "llama-quantize --pure" in help_text


def test_llama_cpp_greedy_tokens_match(tmp_path):
    """Runs the Q8_0 file in llama.cpp itself, when llama-cpp-python is installed (it builds
    llama.cpp from source, so it is not a test dependency): at each step of our greedy
    continuation, llama.cpp's top token is ours wherever our top-2 margin exceeds Q8_0's error."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional llama.cpp check)")
    tok = load_tokenizer(FIXTURE)
    model = random_model(tiny(vocab_size=32000, rope_theta=1e6, max_seq_len=128, multiple_of=32))
    save_model(model, tmp_path / "hf", tokenizer=tok)
    out = export_gguf(tmp_path / "hf", tmp_path / "m.q8_0.gguf", quant="q8_0")
    ids = tok.encode("Hello world, this is llama.cpp", bos=True)
    steps = 6
    for _ in range(steps):  # our greedy continuation, from the float32 weights
        ids.append(int(logits(model, torch.tensor([ids]))[0, -1].argmax()))
    ours = logits(model, torch.tensor([ids]))[0]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    llm.close()
    top2 = ours.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.25
    gen = slice(len(ids) - steps - 1, len(ids) - 1)  # the positions that chose the generated tokens
    assert clear[gen].sum() >= 3, "too few clear greedy choices to compare"
    assert torch.equal(theirs.argmax(-1)[gen][clear[gen]], ours.argmax(-1)[gen][clear[gen]])
    torch.testing.assert_close(theirs, ours, atol=0.25, rtol=0)
