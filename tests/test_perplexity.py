"""``llama2 evaluate --perplexity``: llama.cpp's perplexity rules (llama2.eval.perplexity).

Our reading of llama.cpp's ``perplexity()``: tokens = the whole text with BOS; at least
2 * n_ctx of them; ``len(tokens) // n_ctx`` non-overlapping chunks (``--chunks`` keeps the
first N); each chunk's first token becomes BOS; with ``first = n_ctx // 2`` the logits at
positions first .. n_ctx - 2 predict the tokens at first + 1 .. n_ctx - 1, so each chunk
scores ``n_ctx - first - 1`` tokens; PPL = exp(mean NLL), ± = PPL * sqrt(var / (count - 1))
with var the population variance of the per-token NLLs.
"""

import json
import math
import random

import pytest
import torch

from llama2 import Transformer, save_model
from llama2.checkpoint import load_model, load_tokenizer
from llama2.eval.perplexity import loss_by_position, perplexity, read_text

from .conftest import run_cli, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

CTX = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama_tokenizer):
    d = tmp_path_factory.mktemp("ppl")
    model = Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=128), seed=0)
    return save_model(model, d / "model", tokenizer=llama_tokenizer)


@pytest.fixture(scope="module")
def text() -> str:
    rng = random.Random(0)
    words = "the cat sat on a mat while llamas graze quietly near river banks under grey skies".split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(40)]
    return "\n".join(lines)


def reference(model_dir, tokenizer, text, ctx, max_chunks=None):
    """The llama.cpp rules written out once more, over transformers' LlamaForCausalLM."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    tokens = tokenizer.encode(text, bos=True)
    assert len(tokens) >= 2 * ctx
    n_chunks = len(tokens) // ctx if max_chunks is None else min(max_chunks, len(tokens) // ctx)
    first = ctx // 2
    nlls = []
    for c in range(n_chunks):
        chunk = list(tokens[c * ctx:(c + 1) * ctx])
        chunk[0] = tokenizer.bos_id
        with torch.no_grad():
            logits = hf(torch.tensor([chunk])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for pos in range(first, ctx - 1):
            nlls.append(-float(logp[pos, chunk[pos + 1]]))
    mean = sum(nlls) / len(nlls)
    var = sum(x * x for x in nlls) / len(nlls) - mean * mean
    ppl = math.exp(mean)
    return {"perplexity": ppl, "stderr": ppl * math.sqrt(var / (len(nlls) - 1)), "chunks": n_chunks,
            "tokens": len(nlls)}


def test_perplexity_matches_transformers_over_llama_cpp_chunks(model_dir, llama_tokenizer, text):
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir, model.config.vocab_size)
    ours = perplexity(model, tok, text, ctx=CTX, batch_size=3)  # 3: the last batch is a partial one
    ref = reference(model_dir, llama_tokenizer, text, CTX)
    assert ours["chunks"] == ref["chunks"] >= 3
    assert ours["tokens"] == ref["tokens"]
    assert ours["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    assert ours["stderr"] == pytest.approx(ref["stderr"], rel=1e-4)
    assert ours["text_tokens"] == len(llama_tokenizer.encode(text, bos=True))
    # Batching does not change the numbers.
    one = perplexity(model, tok, text, ctx=CTX, batch_size=1)
    assert one["perplexity"] == pytest.approx(ours["perplexity"], rel=1e-5)


def test_only_second_half_of_each_chunk_is_scored(model_dir, llama_tokenizer, text):
    model = load_model(model_dir)
    n = len(llama_tokenizer.encode(text, bos=True))
    for ctx in (CTX, 63):  # odd ctx: first = 31, 63 - 31 - 1 = 31 tokens per chunk
        r = perplexity(model, llama_tokenizer, text, ctx=ctx)
        assert r["chunks"] == n // ctx
        assert r["tokens"] == r["chunks"] * (ctx - ctx // 2 - 1)
    r = perplexity(model, llama_tokenizer, text, ctx=CTX, max_chunks=2)
    assert (r["chunks"], r["tokens"]) == (2, 2 * (CTX // 2 - 1))
    ref = reference(model_dir, llama_tokenizer, text, CTX, max_chunks=2)
    assert r["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)


class _Ids:
    """A stand-in tokenizer whose "text" is already a list of token ids."""
    bos_id = 1

    def encode(self, ids, bos=False):
        return ([self.bos_id] if bos else []) + list(ids)


def test_scored_positions_are_first_to_ctx_minus_2(tmp_path):
    """With attention and feed-forward zeroed, position p's logits depend on token p alone, so
    each scored NLL is a function of (token p, token p + 1): editing a pair llama.cpp does not
    score leaves the result unchanged, editing one it scores changes it."""
    model = Transformer.from_config(tiny_config(vocab_size=512, max_seq_len=128), seed=0).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
    ctx, first = 16, 8
    ids = [random.Random(1).randrange(3, 512) for _ in range(2 * ctx + 5)]  # + BOS: 2 chunks, 6 left over
    base = perplexity(model, _Ids(), ids, ctx=ctx)
    assert (base["chunks"], base["tokens"]) == (2, 2 * (ctx - first - 1))

    def edited(index):  # index into the token list with BOS (ids[index - 1])
        out = list(ids)
        out[index - 1] = 2 if out[index - 1] != 2 else 3
        return perplexity(model, _Ids(), out, ctx=ctx)["perplexity"]

    same = [1, first - 1, ctx + 1, ctx + first - 1, 2 * ctx, 2 * ctx + 4]  # first half, tail
    changed = [first, first + 1, ctx - 1, ctx + first, 2 * ctx - 1]  # scored inputs / targets
    for i in same:
        assert edited(i) == pytest.approx(base["perplexity"], rel=1e-6), i
    for i in changed:
        assert edited(i) != pytest.approx(base["perplexity"], rel=1e-6), i
    # Position 0 of each chunk becomes BOS whatever the text has there.
    assert edited(ctx) == pytest.approx(base["perplexity"], rel=1e-6)


def test_uniform_model_has_perplexity_vocab_size(llama_tokenizer, text):
    model = Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=128), seed=0).eval()
    with torch.no_grad():
        model.output.weight.zero_()  # every logit 0: the uniform distribution
    r = perplexity(model, llama_tokenizer, text, ctx=CTX)
    assert r["perplexity"] == pytest.approx(32000, rel=1e-5)
    assert r["stderr"] == pytest.approx(0.0, abs=1e-3)


def test_too_short_text_is_one_line_naming_the_file(model_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here\n")
    rc, out, err = run_cli(capsys, "evaluate", "--model", model_dir, "--perplexity", short, "--ctx", CTX)
    assert rc == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert str(short) in lines[0] and f"{2 * CTX}" in lines[0] and "tokens" in lines[0]


def test_ctx_longer_than_the_model_is_refused(model_dir, llama_tokenizer, text):
    model = load_model(model_dir)
    with pytest.raises(ValueError, match="longer than the model's context"):
        perplexity(model, llama_tokenizer, text, ctx=256)


def test_read_text_drops_one_trailing_newline_like_llama_cpp(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"a\r\nb\n\n")
    assert read_text(f) == "a\r\nb\n"
    f.write_bytes(b"\xff")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text(f)


def test_cli_perplexity_json_and_text(model_dir, llama_tokenizer, text, tmp_path, capsys):
    f = tmp_path / "held_out.txt"
    f.write_text(text + "\n")
    rc, out, err = run_cli(capsys, "evaluate", "--model", model_dir, "--perplexity", f, "--ctx", CTX,
                           "--max-chunks", 3, "--json")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["chunks"] == 3 and result["tokens"] == 3 * (CTX // 2 - 1) and result["ctx"] == CTX
    assert result["file"] == str(f)
    ref = reference(model_dir, llama_tokenizer, text, CTX, max_chunks=3)
    assert result["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)

    rc, out, err = run_cli(capsys, "evaluate", "--model", model_dir, "--perplexity", f, "--ctx", CTX)
    assert rc == 0, err
    assert out.startswith(f"{f}: PPL = ") and "+/-" in out and len(out.strip().splitlines()) == 1


def test_cli_perplexity_with_an_adapter_scores_the_merged_model(model_dir, llama_tokenizer, text, tmp_path,
                                                                capsys):
    from .test_adapter_inference import make_adapter

    adapter = make_adapter(model_dir, tmp_path / "run", "q,v", rank=2, seed=1)
    f = tmp_path / "held_out.txt"
    f.write_text(text)
    rc, out, err = run_cli(capsys, "evaluate", "--model", model_dir, "--adapter", adapter, "--perplexity", f,
                           "--ctx", CTX, "--max-chunks", 2, "--json")
    assert rc == 0, err
    got = json.loads(out)["perplexity"]
    merged = perplexity(load_model(model_dir, adapter=adapter), llama_tokenizer, text, ctx=CTX, max_chunks=2)
    plain = perplexity(load_model(model_dir), llama_tokenizer, text, ctx=CTX, max_chunks=2)
    assert got == pytest.approx(merged["perplexity"], rel=1e-6)
    assert got != pytest.approx(plain["perplexity"], rel=1e-3)


def test_cli_perplexity_of_the_int8_quantized_model(model_dir, llama_tokenizer, text, tmp_path, capsys):
    """What weight-only int8 costs, measured the same way: the quantized model's perplexity, close to
    the float model's."""
    from llama2.model.quant import quantize_model

    f = tmp_path / "held_out.txt"
    f.write_text(text)
    rc, out, err = run_cli(capsys, "evaluate", "--model", model_dir, "--perplexity", f, "--ctx", CTX,
                           "--max-chunks", 2, "--quantize", "int8", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["quantize"] == "int8"
    quantized = quantize_model(load_model(model_dir), "int8")
    expected = perplexity(quantized, llama_tokenizer, text, ctx=CTX, max_chunks=2)["perplexity"]
    assert result["perplexity"] == pytest.approx(expected, rel=1e-6)
    plain = perplexity(load_model(model_dir), llama_tokenizer, text, ctx=CTX, max_chunks=2)["perplexity"]
    assert result["perplexity"] == pytest.approx(plain, rel=0.02)


def test_cli_perplexity_in_bfloat16(model_dir, llama_tokenizer, text, tmp_path, capsys):
    """--dtype bf16 scores the model cast to bfloat16 (the bf16 row of the quantization table)."""
    f = tmp_path / "held_out.txt"
    f.write_text(text)
    rc, out, err = run_cli(capsys, "evaluate", "--model", model_dir, "--perplexity", f, "--ctx", CTX,
                           "--max-chunks", 2, "--dtype", "bf16", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["dtype"] == "bfloat16"
    expected = perplexity(load_model(model_dir, dtype=torch.bfloat16), llama_tokenizer, text, ctx=CTX, max_chunks=2)
    plain = perplexity(load_model(model_dir), llama_tokenizer, text, ctx=CTX, max_chunks=2)["perplexity"]
    assert result["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert result["perplexity"] != plain and result["perplexity"] == pytest.approx(plain, rel=0.02)


# -- loss by position (Code Llama §3.3, Figure 4a) ------------------------------------------------

def test_loss_by_position_is_each_buckets_mean_of_the_per_token_loss():
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=64, max_seq_len=32)).eval()
    chunks = [[random.Random(k).randrange(3, 64) for _ in range(40)] for k in range(3)]
    r = loss_by_position(model, chunks, [0, 4, 10, 32], bos_id=1)
    x = torch.tensor([c[:32] for c in chunks])
    x[:, 0] = 1
    with torch.no_grad():
        nll = -torch.log_softmax(model(x[:, :-1]), -1).gather(-1, x[:, 1:, None])[..., 0].double()
    # the token at position p (1..31) is predicted at p - 1: buckets [1, 4), [4, 10), [10, 32)
    expected = [nll[:, 0:3].mean(), nll[:, 3:9].mean(), nll[:, 9:31].mean()]
    assert r["nll"] == pytest.approx([float(e) for e in expected], rel=1e-6)
    assert r["tokens"] == [9, 18, 66] and r["chunks"] == 3
    assert r["perplexity"] == pytest.approx([math.exp(v) for v in r["nll"]])


def test_loss_by_position_reads_past_the_models_context():
    model = Transformer(tiny_config(vocab_size=64, max_seq_len=16)).eval()
    r = loss_by_position(model, [list(range(3, 51))], [0, 16, 48])
    assert r["tokens"] == [15, 32] and all(math.isfinite(v) for v in r["nll"])


@pytest.mark.parametrize("edges", [[0], [0, 8, 8], [-1, 8]])
def test_loss_by_position_refuses_bad_edges(edges):
    model = Transformer(tiny_config(vocab_size=64, max_seq_len=16)).eval()
    with pytest.raises(ValueError, match="edges must be increasing"):
        loss_by_position(model, [list(range(3, 40))], edges)


def test_loss_by_position_needs_a_chunk_as_long_as_the_last_edge():
    model = Transformer(tiny_config(vocab_size=64, max_seq_len=16)).eval()
    with pytest.raises(ValueError, match="no chunk of at least 64 tokens"):
        loss_by_position(model, [list(range(3, 40))], [0, 64])
