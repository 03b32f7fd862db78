"""benchmarks/passkey_extension.py: its completion-only batches, its compact vocabulary, and a
few-step run's results for the three models (seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from llama2 import Tokenizer

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
        assert compact.decode(labels).strip().isdigit() and len(compact.decode(labels).strip()) == 5
        assert labels[-1] == compact.eos_id and labels == ids[n_prompt:]
    assert x.shape == y.shape


def test_compact_vocabulary_round_trips_the_probe(bench, compact):
    from llama2.eval.passkey import passkey_prompts

    assert compact.vocab_size < 100  # the probe's fixed lines and digits, not 32k pieces
    for p in passkey_prompts(compact, 128, [0.5], 2):
        assert compact.decode(compact.encode(p.text)) == p.text
    with pytest.raises(ValueError, match="outside the compact vocabulary"):
        compact.encode("Zebra")


def test_a_short_run_probes_three_models(bench, tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(["--short", "64", "--long", "128", "--steps", "3", "--long-steps", "2", "--lengths", "64",
                       "128", "--depths", "0.5", "--per-cell", "1", "--threads", "1", "--json", str(out)]) == 0
    models = json.loads(out.read_text())["models"]
    assert list(models) == ["trained at 64, θ 10000", "+2 steps at 128, θ 10000", "+2 steps at 128, θ 1e+06"]
    for m in models.values():
        assert set(m["by_length"]) == {"64", "128"} and all(0 <= a <= 1 for a in m["by_length"].values())


# ---- benchmarks/passkey_phases.py: the recipe's own trainer and prompt/completion rows -----------

@pytest.fixture(scope="module")
def code_smoke(tmp_path_factory):
    from llama2.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("code-smoke")
    run_pipeline("code-smoke", out, until="fim", quiet=True)
    return out


def test_phases_teach_then_extend_two_ways_from_a_recipe_model(code_smoke, tmp_path):
    phases = load_benchmark("passkey_phases")
    out = tmp_path / "r.json"
    assert phases.main(["--init", str(code_smoke / "fim" / "model"), "--code", str(code_smoke / "data-fim" / "code"),
                        "--out", str(tmp_path / "runs"), "--teach-steps", "2", "--extend-steps", "1", "--per-cell", "1",
                        "--teach-min", "96", "--extend-min", "96", "--short-lengths", "128", "256",
                        "--long-lengths", "256", "1024", "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["models"]) == ["init", "taught", "extended, mixed", "extended, mixed, answers x50",
                                      "extended, passkey"]
    assert set(result["models"]["taught"]["by_length"]) == {"128", "256"}
    assert set(result["models"]["extended, mixed"]["by_length"]) == {"256", "1024"}
    extended = json.loads((tmp_path / "runs" / "mixed" / "model" / "config.json").read_text())
    assert extended["rope_theta"] == 1e6 and extended["max_position_embeddings"] == 512
    # the teaching data is answer-only passkey texts; the mixed extension adds the recipe's FIM code
    teach = json.loads((tmp_path / "runs" / "teach-data" / "index.json").read_text())
    mixed = json.loads((tmp_path / "runs" / "mixed-data" / "index.json").read_text())
    assert teach["completions"]["train"] > 0 and set(teach["parts"]) == {"passkey"}
    assert set(mixed["parts"]) == {"passkey", "code"} and mixed["fim"]["rate"] == 0.9


def test_phases_refuse_a_missing_model_in_one_line(tmp_path, capsys):
    phases = load_benchmark("passkey_phases")
    assert phases.main(["--init", str(tmp_path / "none"), "--code", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("passkey_phases:") and "none" in err and "\n" not in err
