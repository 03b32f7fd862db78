"""One-token products as inductor compiles them on a CPU (model/matvec.py, the compiled decode step)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llama2 import Generator, SamplingParams, Transformer
from llama2.model.matvec import MAX_ROWS, MatVecMode, attend, matvec
from llama2.model.quant import Int8Linear, quantize_model

from .conftest import tiny_config


class OpLog(TorchDispatchMode):
    """Records the aten ops that run underneath."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


MATRIX_KERNELS = {"mm", "addmm", "mv", "bmm", "matmul", "linear", "_weight_int8pack_mm"}


@pytest.mark.parametrize("shape", [(1, 1, 64), (4, 1, 64), (2, 3, 64)])
def test_matvec_is_linear(shape):
    torch.manual_seed(0)
    x, w, b = torch.randn(shape), torch.randn(48, 64), torch.randn(48)
    torch.testing.assert_close(matvec(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(matvec(x, w, bias=b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_matvec_of_an_int8_weight_is_the_int8_kernels_product():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 48, bias=False))
    x = torch.randn(3, 64)
    got = matvec(x, layer.weight, scales=layer.scales)
    torch.testing.assert_close(got, F.linear(x, layer.dequantize()), rtol=1e-5, atol=1e-5)
    # the eager kernel rounds its activations to bfloat16: equal to that precision
    torch.testing.assert_close(got, layer(x), rtol=2e-2, atol=2e-2)


def test_the_mode_rewrites_products_of_a_few_rows_and_leaves_longer_ones():
    w = torch.randn(48, 64)
    with MatVecMode(), OpLog() as few:
        F.linear(torch.randn(MAX_ROWS, 1, 64), w)
    with MatVecMode(), OpLog() as many:
        F.linear(torch.randn(1, MAX_ROWS + 1, 64), w)
    assert not MATRIX_KERNELS & set(few.ops) and {"mul", "sum"} <= set(few.ops)
    assert MATRIX_KERNELS & set(many.ops)


def test_the_mode_rewrites_an_int8_layers_product():
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 48, bias=False))
    x = torch.randn(1, 1, 64)
    with MatVecMode(), OpLog() as log:
        y = layer(x)
    assert "_weight_int8pack_mm" not in log.ops
    torch.testing.assert_close(y, F.linear(x, layer.dequantize()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("batch, heads, kv_heads, queries", [(1, 4, 4, 1), (3, 4, 2, 1), (2, 6, 2, 3)])
@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
def test_attend_is_scaled_dot_product_attention(batch, heads, kv_heads, queries, mask):
    torch.manual_seed(0)
    q = torch.randn(batch, heads, queries, 16)
    k, v = torch.randn(batch, kv_heads, 20, 16), torch.randn(batch, kv_heads, 20, 16)
    m = None
    if mask != "none":  # each row sees its own prefix of the keys; a query never sees nothing
        m = torch.arange(20).view(1, 1, 1, -1) < torch.randint(1, 21, (batch, 1, queries, 1))
        if mask == "additive":
            m = torch.zeros(m.shape).masked_fill(~m, float("-inf"))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(attend(q, k, v, m), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), m), want.bfloat16(), rtol=2e-2,
                               atol=2e-2)


def test_the_mode_rewrites_decodings_attention_and_leaves_a_prompts():
    k, v = torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    with MatVecMode(), OpLog() as decode:
        F.scaled_dot_product_attention(torch.randn(1, 2, 1, 16), k, v)
    with MatVecMode(), OpLog() as prompt:
        F.scaled_dot_product_attention(torch.randn(1, 2, 12, 16), k, v, is_causal=True)
    assert not any("attention" in op for op in decode.ops) and {"mul", "sum"} <= set(decode.ops)
    assert any("attention" in op for op in prompt.ops)


def peaked_model(**kw) -> Transformer:
    # Peaked logits: no near-tie decides a greedy token, whatever the summation order.
    model = Transformer.from_config(tiny_config(**{"max_seq_len": 128, **kw}), seed=0).eval()
    with torch.no_grad():
        model.output.weight.mul_(8)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("form", ["float32", "int8", "w8a8"])
def test_compiled_decoding_on_cpu_gives_the_eager_tokens(form):
    # Every product of the compiled step is a matvec (batch 1 and a batch of 3 with padding);
    # the eager step runs the matrix kernels. (w8a8's products are fbgemm's in both.)
    model = peaked_model()
    if form != "float32":
        quantize_model(model, form)
    eager, compiled = Generator(model), Generator(model, compile=True)
    params = SamplingParams(temperature=0, max_new_tokens=20, stop_at_eos=False, logprobs=True)
    for prompts in ([[1, 7, 8, 100, 200, 3]], [[1, 5, 9], [1, 7, 8, 100, 200, 3], [1, 2]]):
        a, b = eager.generate(prompts, params), compiled.generate(prompts, params)
        for x, y in zip(a, b):
            assert y.tokens == x.tokens
            assert y.logprobs == pytest.approx(x.logprobs, abs=1e-4 if form == "float32" else 0.05)
    model.clear_cache()


def test_timeline_buckets_double_from_128_up_to_the_capacity():
    from llama2.generate import timeline_bucket, timeline_buckets

    assert timeline_buckets(1024) == [128, 256, 512, 1024] and timeline_buckets(300) == [128, 256, 300]
    assert timeline_buckets(100) == [100]
    assert [timeline_bucket(s, 300) for s in (0, 127, 128, 255, 256, 299)] == [128, 128, 256, 256, 300, 300]


@pytest.mark.slow
def test_compiled_decoding_across_a_timeline_bucket_gives_the_eager_tokens():
    # A 120-token prompt and 20 new tokens: the compiled step attends over 128 slots, then 256.
    model = peaked_model(max_seq_len=256)
    eager, compiled = Generator(model), Generator(model, compile=True)
    params = SamplingParams(temperature=0, max_new_tokens=20, stop_at_eos=False, logprobs=True)
    prompt = [1] + [(7 * i) % 500 + 3 for i in range(119)]
    a, b = eager.generate([prompt], params)[0], compiled.generate([prompt], params)[0]
    assert b.tokens == a.tokens and b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
    model.clear_cache()
