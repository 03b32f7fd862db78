"""benchmarks/decode.py on a tiny saved model, in-process (seconds): the quantized side, and
llama.cpp's greedy tokens against ours when llama-cpp-python is installed."""

from __future__ import annotations

import json
import math

import pytest

from llama2.checkpoint import load_tokenizer, save_model

from .conftest import load_benchmark
from .test_checkpoint import FIXTURE, random_model, tiny

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("decode")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model with the Llama 2 vocabulary and its tokenizer.model (GGUF needs one);
    unit-scale weights, so greedy tokens are not decided by rounding. dim 64 and a feed-forward of
    192: rows of whole 32-value blocks for q8_0/q4_0 and int4:32."""
    tok = load_tokenizer(FIXTURE)
    model = random_model(tiny(vocab_size=32000, multiple_of=32, rope_theta=1e6, max_seq_len=128))
    return save_model(model, tmp_path_factory.mktemp("decode") / "model", tokenizer=tok)


def run(bench, capsys, model_dir, *args) -> dict:
    assert bench.main(["--model", str(model_dir), *args, "--threads", "1", "--prompt-len", "8", "--repeats", "1",
                       "--pause", "0", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_quantized_side(bench, model_dir, capsys):
    res = run(bench, capsys, model_dir, "--new-tokens", "4", "--quantize", "int8,w8a8", "--no-llama-cpp")
    assert res["quantized"]["w8a8"]["activations"] == "float32" and res["quantized"]["w8a8"]["tok_s"] > 0
    q = res["quantized"]["int8"]
    assert q["tok_s"] > 0 and math.isfinite(q["tok_s"])
    k, n = map(int, q["same_tokens"].split("/"))
    assert n == 4 and 0 <= k <= 4
    assert res["llama_cpp"] is None
    # the existing keys keep working
    assert res["ours_tok_s"] > 0 and res["transformers_tok_s"] > 0 and res["same_tokens"] == "4/4"
    sides = {r["side"]: r for r in res["sides"]}
    assert set(sides) == {"ours", "transformers", "ours int8", "ours w8a8"}
    assert sides["ours int8"]["same_tokens"] == q["same_tokens"]


def test_llama_cpp_greedy_tokens_equal_ours(bench, model_dir, capsys):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional llama.cpp check)")
    res = run(bench, capsys, model_dir, "--new-tokens", "8", "--quantize", "int8,w8a8,int4:32", "--llama-cpp",
              "--bf16")
    assert res["llama_cpp_note"] is None
    assert set(res["llama_cpp"]) == {"f32", "f16", "q8_0", "q4_0"}
    assert all(v["tok_s"] > 0 for v in res["llama_cpp"].values())
    assert res["tokens"]["llama.cpp f32"] == res["tokens"]["ours"]
    assert res["llama_cpp"]["f32"]["same_tokens"] == "8/8"
    # q8_0's peer: the faster of our two 8-bit sides
    faster = max(("w8a8", "int8"), key=lambda s: res["quantized"][s]["tok_s"])
    assert set(res["ratios"]) == {"ours / transformers", "ours / llama.cpp f32", "ours bfloat16 / llama.cpp f16",
                                  f"ours {faster} / llama.cpp q8_0", "ours int4:32 / llama.cpp q4_0"}


def test_bf16_side_is_ours_with_bfloat16_weights(bench, model_dir, capsys):
    res = run(bench, capsys, model_dir, "--new-tokens", "4", "--bf16", "--no-llama-cpp")
    sides = {r["side"]: r for r in res["sides"]}
    assert set(sides) == {"ours", "transformers", "ours bfloat16"}
    assert sides["ours bfloat16"]["precision"] == "bfloat16" and sides["ours bfloat16"]["tok_s"] > 0
    k, n = map(int, sides["ours bfloat16"]["same_tokens"].split("/"))
    assert n == 4 and 0 <= k <= 4


def test_a_batch_and_the_bandwidth_roofline(bench, model_dir, capsys):
    res = run(bench, capsys, model_dir, "--new-tokens", "4", "--batch", "3", "--copy-bytes", str(1 << 20))
    assert res["batch"] == 3 and res["llama_cpp"] is None and "batch 1 only" in res["llama_cpp_note"]
    assert res["copy_bandwidth_gb_s"] > 0 and 0 < res["ours_bandwidth_fraction"]
    ours = next(r for r in res["sides"] if r["side"] == "ours")
    # every weight but the embeddings, in float32; the fraction follows from the row's own numbers
    assert ours["weight_bytes"] == 4 * (res["params"] - 32000 * 64)
    steps = ours["tok_s"] / 3
    assert ours["bandwidth_fraction"] == pytest.approx(ours["weight_bytes"] * steps / (res["copy_bandwidth_gb_s"] * 1e9))
    assert res["same_tokens"] == "4/4"  # the first row, against transformers' first row


def test_a_llama_cpp_build_that_crashes_is_probed_in_a_child_process(bench, monkeypatch, tmp_path):
    # A llama.cpp build can die on a CPU that advertises what it cannot run (AMX in a VM): the
    # benchmark asks a child process first and leaves that GGUF type out, with why.
    monkeypatch.setattr(bench, "PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert bench.probe_llama_cpp(tmp_path / "m.gguf", 1, 0) == "killed by signal 11"
    monkeypatch.setattr(bench, "PROBE", "import sys; sys.exit('no such file: ' + sys.argv[1])")
    assert bench.probe_llama_cpp(tmp_path / "m.gguf", 1, 0) == f"exit status 1: no such file: {tmp_path / 'm.gguf'}"
    monkeypatch.setattr(bench, "PROBE", "import sys; assert sys.argv[2:] == ['2', '0']")
    assert bench.probe_llama_cpp(tmp_path / "m.gguf", 2, 0) is None
