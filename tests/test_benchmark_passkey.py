"""benchmarks/passkey_extension.py: its completion-only batches, its compact vocabulary, and a
few-step run's results for the three models (seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from llama2 import Tokenizer
from llama2.eval.passkey import KEYS

from .conftest import FIXTURE_TOKENIZER, load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("passkey_extension")


@pytest.fixture(scope="module")
def compact(bench):
    return bench.compact_tokenizer(Tokenizer(FIXTURE_TOKENIZER), [128])


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_only_the_answer_is_a_label(bench, compact):
    texts = bench.completion_texts(compact, 128, 3, seed=0)
    x, y = bench.completion_batch(texts)
    for row, (ids, n_prompt) in zip(y, texts):
        labels = [int(t) for t in row if t >= 0]
        assert compact.decode(labels).strip() in KEYS
        assert labels[-1] == compact.eos_id and labels == ids[n_prompt:]
    assert x.shape == y.shape


def test_compact_vocabulary_round_trips_the_probe(bench, compact):
    from llama2.eval.passkey import passkey_prompts

    assert compact.vocab_size < 200  # the probe's fixed lines and keys, not 32k pieces
    for p in passkey_prompts(compact, 128, [0.5], 2):
        assert compact.decode(compact.encode(p.text)) == p.text
    with pytest.raises(ValueError, match="outside the compact vocabulary"):
        compact.encode("Quokka")


def test_a_short_run_probes_three_models(bench, tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(["--short", "64", "--long", "128", "--steps", "3", "--long-steps", "2", "--lengths", "64",
                       "128", "--depths", "0.5", "--per-cell", "1", "--threads", "1", "--json", str(out)]) == 0
    models = json.loads(out.read_text())["models"]
    assert list(models) == ["trained at 64, θ 10000", "+2 steps at 128, θ 10000", "+2 steps at 128, θ 1e+06"]
    for m in models.values():
        assert set(m["by_length"]) == {"64", "128"} and all(0 <= a <= 1 for a in m["by_length"].values())
