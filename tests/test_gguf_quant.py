"""Quantized GGUF export (``--dtype q8_0 | q4_0 | q6_k | q4_k``), read back with gguf's own GGUFReader.

The blocks in the file are checked byte for byte against a reference written here from
llama.cpp's C code (ggml-quants.c: ``quantize_row_q8_0_ref`` and ``quantize_row_q4_0_ref``),
independently of the gguf package that writes them, on weights with the edge cases planted
(all-zero blocks, an abs-max tie of opposite signs, the 15 clamp of Q4_0, halves that round
away from zero, values too small for the fp16 scale). When llama-cpp-python is installed, the
last test runs the Q8_0 file in llama.cpp itself.

The k-quants (Q6_K, Q4_K: our numpy port in ``llama2.checkpoint.kquants``, the gguf package
only dequantizes them) are checked against bytes llama.cpp's C code wrote for a fixed array
(``fixtures/kquants/reference.npz``, from ``fixtures/kquants/make_reference.py``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llama2.checkpoint import kquants, load_tokenizer, save_model
from llama2.checkpoint.gguf import GGUF_QUANTS, export_gguf
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


def gguf_originals(model, hd: int = HD) -> dict[str, np.ndarray]:
    """Our float32 weights under llama.cpp's names, wq/wk rows in Meta's interleaved order
    (``hd``: head_dim)."""
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
                heads = w.shape[0] // hd  # rotate-half row c*hd/2 + j -> Meta row 2j + c, within each head
                w = w.view(heads, 2, hd // 2, w.shape[1]).permute(0, 2, 1, 3).reshape(w.shape)
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


# -- k-quants (Q6_K, Q4_K) --------------------------------------------------------------------

KQUANT_REF = Path(__file__).resolve().parent / "fixtures" / "kquants" / "reference.npz"
KQUANTS = {"q6_k": (kquants.quantize_q6_k, 210), "q4_k": (kquants.quantize_q4_k, 144)}


@pytest.fixture(scope="module")
def kquant_ref():
    with np.load(KQUANT_REF) as ref:
        return {k: ref[k] for k in ref.files}


@pytest.mark.parametrize("quant", sorted(KQUANTS))
def test_kquant_bytes_match_llama_cpp(kquant_ref, quant):
    """Every block equals what ggml's quantize_row_*_K_ref wrote (edge cases and random rows)."""
    fn, nbytes = KQUANTS[quant]
    x = kquant_ref["x"]
    ours = fn(x)
    assert ours.dtype == np.uint8 and ours.shape == (x.shape[0], x.shape[1] // 256 * nbytes)
    bad = np.nonzero((ours.reshape(-1, nbytes) != kquant_ref[quant].reshape(-1, nbytes)).any(1))[0]
    assert len(bad) == 0, f"{len(bad)} blocks differ, first {bad[:8]}"


def test_kquant_reference_covers_special_cases(kquant_ref):
    """The reference array hits what the byte test is meant to cover."""
    q6 = kquant_ref["q6_k"].reshape(-1, 210)
    d = q6[:, 208:].copy().view(np.float16)[:, 0]
    scales = q6[:, 192:208].view(np.int8)
    assert not q6[0].any() and not q6[8].any()  # all-zero and 1e-30 super-blocks: memset to 0
    assert ((d == 0) & q6[:, :128].any(1)).any()  # fp16 d underflowed: make_qx_quants's L kept
    assert ((scales == 0).any(1) & (d != 0)).any()  # a sub-block scale rounded to 0 beside a huge one
    assert (scales == -128).any(1).sum() > 64  # the largest scale stored as -128
    assert np.isinf(d).any()  # 1e8 values: d overflows fp16, as in C
    q4 = kquant_ref["q4_k"].reshape(-1, 144)
    assert (q4[:, 2:4].copy().view(np.float16)[:, 0] == 0).any()  # dmin 0: no negative values
    assert len(str(kquant_ref["source"])) == 40  # the llama.cpp commit the bytes came from


@pytest.mark.parametrize("quant,rel_rms", [("q6_k", 0.025), ("q4_k", 0.1)])
def test_kquant_dequantize_round_trip(kquant_ref, quant, rel_rms):
    """gguf's own dequantizer reads our blocks back close to the input: on the random rows,
    relative RMS error about 2% for Q6_K and 7% for Q4_K (6 and 4 bits), and no value off by
    more than a nominal step of its sub-block (max|x|/32 of Q6_K's 16 values, max|x|/7.5 of
    Q4_K's 32: their range over 15 levels; rounding makes it about half that)."""
    fn, _ = KQUANTS[quant]
    x = kquant_ref["x"][11:]  # random normals at 0.02 and 1
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    back = gguf.quants.dequantize(fn(x), qtype)
    assert back.shape == x.shape
    rms = np.sqrt(((back - x) ** 2).mean(1) / (x**2).mean(1))
    assert (rms < rel_rms).all(), rms.max()
    sub = 16 if quant == "q6_k" else 32
    step = np.abs(x).reshape(-1, sub).max(1, keepdims=True) / (32 if quant == "q6_k" else 7.5)
    assert (np.abs(back - x).reshape(-1, sub) <= step).all()


def test_kquant_refuses_odd_rows_and_non_finite():
    for fn, _ in KQUANTS.values():
        with pytest.raises(ValueError, match="multiple of 256"):
            fn(np.zeros((2, 320), np.float32))
        x = np.zeros((1, 512), np.float32)
        x[0, 300] = np.nan
        with pytest.raises(ValueError, match="non-finite"):
            fn(x)


@pytest.fixture(scope="module")
def kquant_files(tmp_path_factory, small_tokenizer):
    """(model, {quant: GGUFReader}): a float32 model whose rows are all multiples of 256 (dim 256,
    hidden 768), exported as Q6_K and Q4_K."""
    root = tmp_path_factory.mktemp("gguf_kquant")
    model = random_model(tiny(dim=256, vocab_size=SMALL_VOCAB, multiple_of=256))
    assert model.config.hidden_dim == 768
    save_model(model, root / "hf", tokenizer=small_tokenizer)
    readers = {q: gguf.GGUFReader(export_gguf(root / "hf", root / f"m.{q}.gguf", quant=q)) for q in KQUANTS}
    return model, readers


@pytest.mark.parametrize("quant,file_type", [("q6_k", "MOSTLY_Q6_K"), ("q4_k", "MOSTLY_Q4_K_M")])
def test_kquant_export_types(kquant_files, quant, file_type):
    """Every matrix in the k-quant (token_embd and output too), norms F32; general.file_type as
    llama-quantize writes for Q6_K / Q4_K (its alias of Q4_K_M)."""
    _, readers = kquant_files
    reader = readers[quant]
    assert reader.get_field("general.file_type").contents() == int(gguf.LlamaFileType[file_type])
    for t in reader.tensors:
        assert t.tensor_type.name == ("F32" if len(t.shape) == 1 else quant.upper()), t.name


@pytest.mark.parametrize("quant,rel_rms", [("q6_k", 0.025), ("q4_k", 0.1)])
def test_kquant_export_blocks_and_values(kquant_files, quant, rel_rms):
    """The file's blocks are kquants' of the (Meta-ordered) float32 weights, and dequantize close to them."""
    model, readers = kquant_files
    fn, _ = KQUANTS[quant]
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    tensors = by_name(readers[quant])
    originals = gguf_originals(model, hd=64)
    assert sorted(tensors) == sorted(originals)
    for name, w in originals.items():
        if w.ndim == 1:
            np.testing.assert_array_equal(np.asarray(tensors[name].data), w)
            continue
        data = np.asarray(tensors[name].data)
        np.testing.assert_array_equal(data, fn(w), err_msg=name)
        back = gguf.quants.dequantize(data, qtype)
        assert back.shape == w.shape
        assert np.sqrt(((back - w) ** 2).mean() / (w**2).mean()) < rel_rms, name


@pytest.mark.parametrize("quant,fallback", [("q6_k", "Q8_0"), ("q4_k", "Q5_0")])
def test_cli_kquant_falls_back_for_small_rows(tmp_path, small_tokenizer, capsys, quant, fallback):
    """dim 64, hidden 176: rows of 64 are not 256-value blocks, so (as llama.cpp's
    tensor_type_fallback) Q6_K matrices become Q8_0 and Q4_K ones Q5_0; ffn_down's rows of 176
    fit no 32-value block either: F16. One log line per matrix."""
    model = random_model(tiny(vocab_size=SMALL_VOCAB))
    save_model(model, tmp_path / "hf", tokenizer=small_tokenizer)
    out = tmp_path / "m.gguf"
    assert cli(["convert", str(tmp_path / "hf"), str(out), "--dtype", quant]) == 0
    lines = [line.strip() for line in capsys.readouterr().err.splitlines() if "as llama.cpp does" in line]
    assert len(lines) == 16  # 7 matrices a layer, token_embd, output
    assert f"token_embd.weight: rows of 64 values are not a multiple of {quant}'s 256-value block; writing it " \
           f"as {fallback} (as llama.cpp does)" in lines
    assert f"blk.1.ffn_down.weight: rows of 176 values are not a multiple of {quant}'s 256-value block; " \
           "writing it as F16 (as llama.cpp does)" in lines
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["output_norm.weight"] == "F32"
    assert types["blk.0.ffn_gate.weight"] == types["token_embd.weight"] == types["output.weight"] == fallback
    assert reader.get_field("general.file_type").contents() == int(gguf.LlamaFileType[GGUF_QUANTS[quant][1]])
    w = gguf_originals(model)["blk.1.attn_v.weight"]
    np.testing.assert_array_equal(np.asarray(by_name(reader)["blk.1.attn_v.weight"].data),
                                  gguf.quants.quantize(w, gguf.GGMLQuantizationType[fallback]))
