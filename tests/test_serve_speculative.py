"""Speculative decoding in the serving engine: a stream decoding alone is drafted for; its greedy
tokens are the plain engine's, its sampled tokens keep the model's distribution."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from llama2 import SamplingParams, Transformer

from .conftest import tiny_config
from .test_speculative import VOCAB, chi2_pvalue, marginals, peaked

pytest.importorskip("fastapi")

from llama2.serve.engine import Engine, Request  # noqa: E402

from .test_serve_chunked import _drive  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = SimpleNamespace(eos_id=2, decode=lambda ids: "".join(f"<{i}>" for i in ids))
PROMPTS = ([1, 5, 9], [1, 100, 200, 300, 7], [1] + list(range(20, 60)))


@pytest.fixture(scope="module")
def target():
    return Transformer.from_config(tiny_config(), seed=0).eval()


@pytest.fixture(scope="module")
def draft():
    return Transformer.from_config(tiny_config(dim=32, n_layers=1, n_heads=2, n_kv_heads=1), seed=1).eval()


def _greedy(prompt, n, **kw):
    return Request(list(prompt), SamplingParams(temperature=0, max_new_tokens=n, stop_at_eos=False, **kw))


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_tokens_and_logprobs_equal_the_plain_engines(target, draft, k):
    for prompt in PROMPTS:
        request = _greedy(prompt, 30, logprobs=True, top_logprobs=2)
        engine = Engine(target, TOKENIZER, draft=draft, draft_tokens=k)
        spec, plain = _drive(engine, {0: request})[0], _drive(Engine(target, TOKENIZER), {0: request})[0]
        assert spec.tokens == plain.tokens and spec.text == plain.text
        assert [t.logprob for t in spec.logprobs] == pytest.approx([t.logprob for t in plain.logprobs], abs=1e-4)
        assert [t.top.keys() for t in spec.logprobs] == [t.top.keys() for t in plain.logprobs]
        assert engine.stats["drafted"] > 0


def test_a_copy_of_the_model_as_draft_has_every_token_accepted(target):
    engine = Engine(target, TOKENIZER, draft=copy.deepcopy(target), draft_tokens=4)
    out = _drive(engine, {0: _greedy(PROMPTS[0], 21)})[0]
    assert len(out.tokens) == 21
    # 1 token from the prefill, then 4 rounds of 4 accepted drafts + 1 of the model's own.
    assert (engine.stats["drafted"], engine.stats["accepted"], engine.stats["steps"]) == (16, 16, 4)


def test_streams_decode_batched_together_and_the_last_one_alone_is_drafted_for(target, draft):
    requests = {0: _greedy(PROMPTS[0], 40), 1: _greedy(PROMPTS[1], 12), 2: _greedy(PROMPTS[2], 25)}
    engine = Engine(target, TOKENIZER, draft=draft, draft_tokens=3)
    results = _drive(engine, requests)
    plain = {i: _drive(Engine(target, TOKENIZER), {0: r})[0].tokens for i, r in requests.items()}
    assert {i: r.tokens for i, r in results.items()} == plain
    # The draft caught up on the 40-token stream's prompt and the tokens decoded in the batch.
    assert engine.stats["drafted"] > 0 and engine.stats["max_rows"] == 3


def test_a_stream_near_the_end_of_the_timeline_is_shifted_to_fit_its_drafts(target, draft):
    # The first stream pushes the cursor far right; the second then decodes alone near the end.
    requests = {0: _greedy([1] + list(range(30, 90)), 60), 1: _greedy(PROMPTS[0], 100)}
    engine = Engine(target, TOKENIZER, draft=draft, draft_tokens=4)
    results = _drive(engine, requests)
    assert results[1].tokens == _drive(Engine(target, TOKENIZER), {0: requests[1]})[0].tokens
    assert engine.stats["shifts"] > 0


def test_a_draft_that_is_not_usable_is_refused(target):
    with pytest.raises(ValueError, match="vocabulary has 600 tokens"):
        Engine(target, TOKENIZER, draft=Transformer.from_config(tiny_config(vocab_size=600), seed=2))
    with pytest.raises(ValueError, match="draft_tokens must be >= 1"):
        Engine(target, TOKENIZER, draft=copy.deepcopy(target), draft_tokens=0)
    with pytest.raises(ValueError, match="of its own"):
        Engine(target, TOKENIZER, draft=target)


def test_sampled_tokens_follow_the_models_distribution_not_the_drafts():
    target, draft = peaked(10), peaked(11)
    prompt, n = [1, 4], 1500
    engine = Engine(target, TOKENIZER, draft=draft, draft_tokens=2)  # tokens 2 and 3: the first round's drafts
    seconds, thirds = torch.zeros(VOCAB), torch.zeros(VOCAB)
    for seed in range(n):
        params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=4, stop_at_eos=False, seed=seed)
        tokens = _drive(engine, {0: Request(prompt, params)})[0].tokens
        seconds[tokens[1]] += 1
        thirds[tokens[2]] += 1
    want2, want3 = marginals(target, prompt, SamplingParams(temperature=0.9, top_p=0.95))
    draft2, _ = marginals(draft, prompt, SamplingParams(temperature=0.9, top_p=0.95))
    assert 0.1 < engine.stats["accepted"] / engine.stats["drafted"] < 0.9
    assert chi2_pvalue(seconds, want2) > 1e-3 and chi2_pvalue(thirds, want3) > 1e-3
    assert chi2_pvalue(seconds, draft2) < 1e-6


# ---- llama2 serve --draft-model ---------------------------------------------------------------

def test_serve_with_a_draft_model_streams_the_plain_greedy_text(model_dirs):
    import httpx

    from llama2.serve.app import create_app

    from .test_serve import running_server

    big, small = model_dirs
    body = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
    texts, health = [], None
    for draft in (None, small):
        with running_server(create_app(big, draft=draft, draft_tokens=3)) as url:
            plain = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
            chunks = []
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunks += [c["text"] for c in json.loads(line[6:])["choices"]]
            texts += [plain, "".join(chunks)]
            health = httpx.get(url + "/health").json()
    assert len(set(texts)) == 1 and texts[0]
    assert health["speculative"]["drafted"] > 0


def test_serve_draft_flags_are_refused_in_one_line(capsys, model_dirs, tmp_path):
    from llama2 import Tokenizer, save_model
    from llama2.tokenizer import train_tokenizer

    from .conftest import run_cli

    big, _ = model_dirs
    rc, _, err = run_cli(capsys, "serve", "--model", big, "--port", "0", "--draft-tokens", "2")
    assert rc != 0 and "--draft-tokens needs --draft-model" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(capsys, "serve", "--model", big, "--port", "0", "--draft-model", big, "--draft-tokens", "0")
    assert rc != 0 and "--draft-tokens must be >= 1" in err and len(err.strip().splitlines()) == 1
    text = tmp_path / "t.txt"
    text.write_text("a small corpus of words for a tokenizer with another vocabulary " * 50)
    train_tokenizer([text], tmp_path / "tok", vocab_size=300, verbose=False)
    other = save_model(Transformer.from_config(tiny_config(vocab_size=300), seed=3), tmp_path / "other",
                       tokenizer=Tokenizer(tmp_path / "tok" / "tokenizer.model"))
    rc, _, err = run_cli(capsys, "serve", "--model", big, "--port", "0", "--draft-model", other)
    assert rc != 0 and "a draft must share the model's tokenizer" in err and len(err.strip().splitlines()) == 1
