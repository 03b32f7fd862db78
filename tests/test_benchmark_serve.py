"""benchmarks/serve.py on a tiny saved model (a real server subprocess, seconds): one row per
stream count, latency percentiles, and every streamed text equal to its one-at-a-time answer."""

from __future__ import annotations

import json

import pytest

from llama2.checkpoint import load_tokenizer, save_model

from .conftest import load_benchmark
from .test_checkpoint import FIXTURE, random_model, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = random_model(tiny(vocab_size=32000, max_seq_len=128))
    return save_model(model, tmp_path_factory.mktemp("serve") / "model", tokenizer=load_tokenizer(FIXTURE))


def test_rows_per_stream_count_with_latencies_and_identical_text(capsys, model_dir):
    bench = load_benchmark("serve")
    assert bench.main(["--model", str(model_dir), "--clients", "1,3", "--max-tokens", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["clients"] for r in result["runs"]] == [1, 3] and result["max_batch_size"] == 3
    for r in result["runs"]:
        s = r["concurrent_streaming"]
        assert r["streamed_equals_alone"] == f"{r['clients']}/{r['clients']}"
        assert s["requests"] == r["clients"] and s["tokens"] == 6 * r["clients"]
        assert 0 < s["ttft_p50_s"] <= s["ttft_p99_s"] <= s["p99_s"]
        assert 0 <= s["itl_p50_s"] <= s["itl_p99_s"]


def test_bad_stream_counts_are_refused():
    bench = load_benchmark("serve")
    with pytest.raises(SystemExit, match="expected counts"):
        bench.main(["--clients", "1,x"])


def test_stall_test_compares_chunked_with_whole_prompt_prefill(capsys, model_dir):
    bench = load_benchmark("serve")
    argv = ["--model", str(model_dir), "--clients", "1", "--max-tokens", "12", "--json",
            "--long-prompt", "100", "--prefill-chunk", "16", "--stall-streams", "2"]
    assert bench.main(argv) == 0
    stall = json.loads(capsys.readouterr().out)["stall"]
    assert stall["prefill_chunk"] == 16 and stall["streamed_equals_alone"] == "2/2"
    for side in ("chunked", "whole_prompt"):
        r = stall[side]
        assert r["long_prompt_tokens"] == 100 and r["streams"] == 2
        assert 0 < r["itl_p50_s"] <= r["itl_p99_s"] <= r["max_gap_s"] and r["long_ttft_s"] > 0
    assert stall["max_gap_ratio"] == stall["whole_prompt"]["max_gap_s"] / stall["chunked"]["max_gap_s"]


def test_a_draft_model_is_passed_to_the_server_and_its_acceptance_reported(capsys, model_dir):
    bench = load_benchmark("serve")
    argv = ["--model", str(model_dir), "--clients", "1,2", "--max-tokens", "8", "--json",
            "--draft-model", str(model_dir), "--draft-tokens", "3"]
    assert bench.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    # The model drafting for itself: every streamed text still equals its answer, drafts are accepted.
    assert all(r["streamed_equals_alone"] == f"{r['clients']}/{r['clients']}" for r in result["runs"])
    sp = result["speculative"]
    assert sp["draft_tokens"] == 3 and 0 < sp["accepted"] <= sp["drafted"]
