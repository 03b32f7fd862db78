"""Weight-only int8 / int4 quantized inference (``llama2.model.quant``) and ``--quantize``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama2 import Generator, SamplingParams, Transformer, save_model
from llama2.model.quant import (
    Int4Linear,
    Int8Linear,
    cpu_has_vnni,
    int4_dequantize,
    int4_quantize,
    parse_quantize,
    quantize_model,
)

from .conftest import run_cli, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

# Measured on these random models (N(0, 0.02) weights, 40 tokens x 2): int8 logits max |err|
# 0.012 and relative (Frobenius) error 1.0%, with logits up to 0.91; int4 max |err| 0.11-0.14 and
# relative error 12-15% (group 32-128). Random Gaussian weights are the worst case for int4
# (trained weights quantize better); the bounds below leave about 2x margin.
INT8_MAX_ABS, INT8_MAX_REL = 0.03, 0.02
INT4_MAX_ABS, INT4_MAX_REL = 0.3, 0.25


def make_model(multiple_of: int = 32) -> Transformer:
    # dim 128, 4 heads (wk/wv: 64 outputs), hidden 352 (multiple_of 32) or 384 (multiple_of 128),
    # vocab 512: every out_features % 16 == 0 and every in_features % group == 0.
    return Transformer.from_config(tiny_config(dim=128, multiple_of=multiple_of, vocab_size=512), seed=0).eval()


def logit_errors(model: Transformer, spec: str) -> tuple[float, float, Transformer]:
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(tokens)
        q = quantize_model(copy.deepcopy(model), spec)
        out = q(tokens)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    return (out - ref).abs().max().item(), ((out - ref).norm() / ref.norm()).item(), q


def test_parse_quantize():
    assert parse_quantize("int8") == ("int8", None)
    assert parse_quantize("w8a8") == ("w8a8", None)
    assert parse_quantize("int4") == ("int4", 128)
    assert parse_quantize("INT4:32") == ("int4", 32)
    for bad, match in (("int3", "expected int8, w8a8, int4"), ("int4:16", "group size"), ("int4:x", "group size"),
                       ("int8:32", "expected int8"), ("w8a8:32", "expected int8"), ("", "expected")):
        with pytest.raises(ValueError, match=match) as e:
            parse_quantize(bad)
        assert "\n" not in str(e.value)


def test_int8_weights_within_half_a_step():
    lin = nn.Linear(96, 48, bias=False)
    m = Int8Linear.from_linear(lin)
    assert m.weight.dtype == torch.int8 and m.weight.shape == (48, 96) and m.scales.shape == (48,)
    err = (m.dequantize() - lin.weight).abs()
    assert (err <= m.scales[:, None] / 2 + 1e-7).all()
    assert (m.weight.abs().amax(1) == 127).all()  # symmetric: each row's largest |w| maps to +-127


def test_int8_logits_close_to_float():
    model = make_model()
    max_abs, rel, q = logit_errors(model, "int8")
    assert max_abs < INT8_MAX_ABS and rel < INT8_MAX_REL, (max_abs, rel)
    kinds = {type(m) for m in q.modules()}
    assert nn.Linear not in kinds and Int8Linear in kinds
    assert isinstance(q.tok_embeddings, nn.Embedding) and q.tok_embeddings.weight.dtype == torch.float32
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == 2 * 7 + 1  # 7 per block + the head


def test_w8a8_quantizes_activations_too_and_stays_close_to_float():
    """fbgemm's int8 x int8 GEMM: the product equals the int8 weights times the activations
    rounded to 8 bits (per tensor, asymmetric), and the whole model stays near the float one."""
    lin = nn.Linear(96, 48, bias=False)
    x = torch.randn(3, 96)
    m = Int8Linear.from_linear(lin, dynamic_activations=True)
    xq = torch.quantize_per_tensor_dynamic(x, torch.quint8, not cpu_has_vnni()).dequantize()  # PyTorch's own rounding
    want = F.linear(xq, m.dequantize())
    assert torch.allclose(m(x), want, atol=2e-3 * want.abs().max().item())
    assert not torch.allclose(m(x), F.linear(x, m.dequantize()), atol=1e-6)  # activations were rounded
    max_abs, rel, q = logit_errors(make_model(), "w8a8")
    assert max_abs < 2 * INT8_MAX_ABS and rel < 2 * INT8_MAX_REL, (max_abs, rel)
    assert all(m.dynamic_activations for m in q.modules() if isinstance(m, Int8Linear))


def test_a_w8a8_layer_compiles_in_one_graph_to_its_eager_product():
    # fbgemm's packed weight is opaque to torch.compile: the product is our op
    # llama2::w8a8_linear, one kernel inside the graph (fullgraph: no break around it).
    layer = Int8Linear.from_linear(nn.Linear(64, 48, bias=False), dynamic_activations=True)
    x = torch.randn(3, 64)
    with torch.no_grad():
        eager, compiled = layer(x), torch.compile(layer, fullgraph=True)(x)
    assert torch.equal(compiled, eager)
    assert torch.equal(eager, torch.ops.llama2.w8a8_linear(x, layer._layer, 48))


def test_a_copied_w8a8_layer_computes_with_its_own_weight():
    layer = Int8Linear.from_linear(nn.Linear(64, 48, bias=False), dynamic_activations=True)
    x = torch.randn(2, 64)
    want = layer(x)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        layer.weight.zero_()
        layer._packed = None
    assert twin._layer != layer._layer
    del layer
    assert torch.equal(twin(x), want)


def test_w8a8_is_refused_off_the_cpu():
    with pytest.raises(ValueError, match="w8a8 runs on the CPU only"):
        Int8Linear(torch.zeros(4, 4, dtype=torch.int8, device="meta"), torch.ones(4, device="meta"),
                   dynamic_activations=True)


@pytest.mark.parametrize("group", [32, 128])
def test_int4_logits_close_to_float(group):
    model = make_model(multiple_of=128 if group == 128 else 32)
    max_abs, rel, q = logit_errors(model, f"int4:{group}")
    assert max_abs < INT4_MAX_ABS and rel < INT4_MAX_REL, (max_abs, rel)
    assert sum(isinstance(m, Int4Linear) and m.group_size == group for m in q.modules()) == 15


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_equals_dequantized_weight(group):
    torch.manual_seed(0)
    lin = nn.Linear(256, 80, bias=False)
    m = Int4Linear.from_linear(lin, group)
    q, sz = int4_quantize(lin.weight, group)
    assert q.min() >= 0 and q.max() <= 15 and sz.shape == (256 // group, 80, 2) and sz.dtype == torch.bfloat16
    w = int4_dequantize(q, sz, group)
    # Within half a step of the original (plus the bfloat16 rounding of scale and zero).
    step = sz[..., 0].float().t().repeat_interleave(group, dim=1)
    assert ((w - lin.weight).abs() <= step * 0.5 + step * 2**-7 + 1e-6).all()
    x = torch.randn(3, 5, 256)
    with torch.no_grad():
        # The packed layout and scales_and_zeros: the kernel on float32 input is exact to rounding.
        exact = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, 256), m.weight, group,
                                                           m.scales_and_zeros.float())
        torch.testing.assert_close(exact, F.linear(x.reshape(-1, 256), w), atol=1e-5, rtol=1e-5)
        # The module (bfloat16 activations): bfloat16 rounding of the input and the output.
        y = m(x)
        ref = F.linear(x.bfloat16().float(), w)
    assert y.shape == (3, 5, 80) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, atol=2e-2, rtol=1e-2)


def test_int4_unsupported_shapes_name_the_layer():
    model = make_model(multiple_of=32)  # hidden 352: not a multiple of 128
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"layers\.0\.feed_forward\.w2 \[128, 352\].*group size 128"):
        quantize_model(model, "int4")
    assert [type(m) for m in model.modules()] == before  # checked before anything was replaced
    with pytest.raises(ValueError, match=r"head \[40, 64\].*divisible by 16"):
        quantize_model(nn.ModuleDict({"head": nn.Linear(64, 40, bias=False)}), "int4:32")


def test_int8_greedy_generation_through_the_kv_cache(llama_tokenizer):
    cfg = tiny_config(dim=128, multiple_of=32, vocab_size=32000)
    model = quantize_model(Transformer.from_config(cfg, seed=0).eval(), "int8")
    gen = Generator(model, llama_tokenizer)
    prompt = llama_tokenizer.encode("The capital of France is", bos=True)
    out = gen.generate([prompt], SamplingParams(temperature=0, max_new_tokens=12))[0]
    assert 0 < len(out.tokens) <= 12
    # Each greedy token from cached decoding is the argmax of one full forward pass over the
    # whole sequence (up to bfloat16 near-ties: the kernel sees other row counts there).
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.tokens]))[0, len(prompt) - 1: -1]
    chosen = logits.gather(1, torch.tensor(out.tokens)[:, None])[:, 0]
    assert (logits.amax(1) - chosen).max() < 1e-2


@pytest.fixture(scope="module")
def quant_model_dir(llama_tokenizer, tmp_path_factory):
    cfg = tiny_config(dim=128, n_layers=1, multiple_of=128, vocab_size=32000, max_seq_len=96)
    path = tmp_path_factory.mktemp("quant-model")
    save_model(Transformer.from_config(cfg, seed=0), path, tokenizer=llama_tokenizer)
    return path


@pytest.mark.parametrize("spec", ["int8", "w8a8", "int4:64"])
def test_generate_cli_quantized_json(capsys, quant_model_dir, spec):
    rc, out, err = run_cli(capsys, "generate", "--model", quant_model_dir, "--quantize", spec, "--json",
                           "--prompt", "Hello there", "--temperature", "0", "--max-new-tokens", "6")
    assert rc == 0, err
    result = json.loads(out)
    assert 0 < len(result["tokens"]) <= 6 and result["finish_reason"] in ("stop", "length")


def test_generate_cli_bad_quantize_is_one_line(capsys, quant_model_dir):
    rc, out, err = run_cli(capsys, "generate", "--model", quant_model_dir, "--quantize", "int3", "--prompt", "Hi")
    assert rc != 0 and out == ""
    assert err.strip().count("\n") == 0 and "--quantize 'int3'" in err, err


def test_serve_quantize(quant_model_dir, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from llama2.serve.app import create_app

    app = create_app(quant_model_dir, quantize="int4:64", model_name="q")
    model = app.state.server.engine.model
    assert isinstance(model.output, Int4Linear) and isinstance(model.layers[0].feed_forward.w2, Int4Linear)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "q", "prompt": "Hello", "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 5
    with pytest.raises(ValueError, match="--quantize cannot be combined with --adapter") as e:
        create_app(quant_model_dir, quantize="int8", adapters={"a": tmp_path})
    assert "\n" not in str(e.value)


# -- quantized as it is read --------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["int8", "int4:32"])
def test_loading_quantized_streams_to_the_same_model_as_quantizing_after(tmp_path, spec):
    from llama2 import save_model
    from llama2.checkpoint import load_model

    cfg = tiny_config(dim=128, multiple_of=32, vocab_size=512)
    path = save_model(Transformer.from_config(cfg, seed=0), tmp_path / "m", max_shard_bytes=200_000)
    streamed = load_model(path, quantize=spec)
    after = quantize_model(load_model(path), spec)
    x = torch.randint(0, 512, (2, 9))
    assert torch.equal(streamed(x), after(x))
    assert not any(isinstance(m, torch.nn.Linear) for m in streamed.modules())
