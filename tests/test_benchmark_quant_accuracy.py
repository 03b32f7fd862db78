"""benchmarks/quant_accuracy.py on a tiny random model: every precision's perplexity row and the
chat model's suite quantized beside unquantized, in-process (seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from llama2 import Transformer, save_model

from .conftest import load_benchmark, tiny_config


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("quant_accuracy")


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_perplexity_rows_and_chat_rows(bench, tmp_path, small_tokenizer):
    # dim 128, hidden 352: int4 groups 32 fit, 64 and 128 do not (352 inputs) and are reported as n/a
    cfg = tiny_config(dim=128, multiple_of=32, vocab_size=320, max_seq_len=256)
    model = save_model(Transformer.from_config(cfg, seed=0), tmp_path / "m", tokenizer=small_tokenizer)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"The lazy dog {i} jumps over the quick brown fox." for i in range(60)))
    out = tmp_path / "r.json"
    assert bench.main(["--model", str(model), "--text", str(text), "--ctx", "64", "--llama-perplexity", "",
                       "--chat", str(model), "--max-items", "2", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["precision"]: r for r in result["perplexity"]}
    assert list(rows) == ["float32", "bfloat16", "int8", "int4:32", "int4:64", "int4:128"]
    assert "group size 64" in rows["int4:64"]["error"] and "error" in rows["int4:128"]
    base = rows["float32"]["perplexity"]
    for name in ("bfloat16", "int8", "int4:32"):
        assert rows[name]["perplexity"] == pytest.approx(base, rel=0.1) and rows[name]["perplexity"] != base
    chat = result["chat"]
    assert [r["quantize"] for r in chat] == ["float32", "int8", "int4:32"]
    assert chat[0]["vs_float32"] == {"gained": 0, "lost": 0, "sign_test_p": 1.0}
    assert all(0 <= r["task_accuracy"] <= 1 and r["mc_n"] > 0 for r in chat)
