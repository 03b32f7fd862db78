"""Chunked prefill in the serving engine: a long prompt joins a few chunks per step while the
running streams keep decoding, and every answer is still its one-at-a-time answer."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from llama2 import SamplingParams, Transformer

from .conftest import tiny_config

pytest.importorskip("fastapi")

from llama2.serve.engine import Engine, Request  # noqa: E402

CTX = 256
CHUNK = 16


@pytest.fixture(scope="module")
def model(llama_tokenizer):
    return Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=CTX), seed=0), llama_tokenizer


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 32000) for _ in range(n - 1)]


def _greedy(prompt: list[int], n: int, echo: int | None = None) -> Request:
    return Request(prompt, SamplingParams(temperature=0, max_new_tokens=n, stop_at_eos=False), prompt_logprobs=echo)


def _drive(engine: Engine, submissions: dict[int, Request], watch=None, cancel_at: dict[int, int] | None = None):
    """Submit request i at step i and step until idle; ``watch(engine)`` is called after each
    step; ``cancel_at`` = {step: request key} cancels that request at that step. Returns the
    Results (None for a cancelled request)."""
    cancel_at = cancel_at or {}

    async def run():
        handles = {}
        for step in range(1000):
            if step in submissions:
                (handles[step],) = engine.submit([submissions[step]])
            if step in cancel_at:
                handles[cancel_at[step]].cancel()
            engine.step()
            if watch is not None:
                watch(engine)
            await asyncio.sleep(0)
            if step > max(submissions) and not engine.running and not engine.queued and engine.pending is None:
                break
        return {i: None if h.cancelled else await h.result() for i, h in handles.items()}

    return asyncio.run(run())


def _alone(tm, tok, request: Request):
    return _drive(Engine(tm, tok, prefill_chunk=None), {0: request})[0]


def test_a_long_prompt_is_prefilled_a_chunk_per_step_while_a_stream_decodes(model):
    tm, tok = model
    engine = Engine(tm, tok, max_batch_size=4, prefill_chunk=CHUNK)
    seen = []  # (a prefill is pending, tokens of the running stream) after each step

    def watch(e):
        if e.rows:
            seen.append((e.pending is not None, len(e.rows[0].tokens)))

    _drive(engine, {0: _greedy(_prompt(8, 0), 60), 2: _greedy(_prompt(100, 1), 5)}, watch)
    during = [n for pending, n in seen if pending]
    assert len(during) == 100 // CHUNK  # 7 chunks: 6 steps with the prefill pending, the 7th joins
    assert during == list(range(during[0], during[0] + len(during)))  # the stream gained a token every step
    assert engine.stats["prefill_chunks"] == 1 + 7


def test_without_chunking_the_long_prompt_goes_in_one_step(model):
    tm, tok = model
    engine = Engine(tm, tok, max_batch_size=4, prefill_chunk=None)
    _drive(engine, {0: _greedy(_prompt(8, 0), 20), 2: _greedy(_prompt(100, 1), 5)})
    assert engine.stats["prefill_chunks"] == 2


def test_a_prompt_arriving_when_nothing_decodes_is_prefilled_whole(model):
    tm, tok = model
    engine = Engine(tm, tok, prefill_chunk=CHUNK)
    _drive(engine, {0: _greedy(_prompt(100, 1), 5)})
    assert engine.stats["prefill_chunks"] == 1


def test_chunked_answers_equal_one_at_a_time_answers(model):
    tm, tok = model
    requests = {0: _greedy(_prompt(12, 0), 70), 3: _greedy(_prompt(90, 1), 30), 5: _greedy(_prompt(40, 2), 25),
                20: _greedy(_prompt(150, 3), 20)}
    results = _drive(Engine(tm, tok, max_batch_size=4, prefill_chunk=CHUNK), requests)
    assert {i: r.tokens for i, r in results.items()} == {i: _alone(tm, tok, r).tokens for i, r in requests.items()}


def test_streams_finishing_during_a_chunked_prefill_do_not_disturb_it(model):
    tm, tok = model
    # Two short streams end while the 200-token prompt is staged past them: it then moves to row 0.
    requests = {0: _greedy(_prompt(10, 0), 4), 1: _greedy(_prompt(10, 4), 6), 2: _greedy(_prompt(200, 5), 30)}
    engine = Engine(tm, tok, max_batch_size=4, prefill_chunk=CHUNK)
    results = _drive(engine, requests)
    assert engine.stats["prefill_chunks"] > 3  # it was chunked, and finished in one go once alone
    assert results[2].tokens == _alone(tm, tok, requests[2]).tokens


def test_chunked_prefill_keeps_the_prompts_log_probs(model):
    tm, tok = model
    request = _greedy(_prompt(70, 6), 5, echo=2)
    chunked = _drive(Engine(tm, tok, prefill_chunk=CHUNK), {0: _greedy(_prompt(8, 0), 40), 1: request})[1]
    whole = _alone(tm, tok, request)
    assert chunked.prompt_logprobs[0] is None and len(chunked.prompt_logprobs) == 70
    for a, b in zip(chunked.prompt_logprobs[1:], whole.prompt_logprobs[1:]):
        assert a.token == b.token and a.top.keys() == b.top.keys()
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_a_request_cancelled_while_its_prompt_is_prefilled_is_dropped(model):
    tm, tok = model
    engine = Engine(tm, tok, prefill_chunk=CHUNK)
    requests = {0: _greedy(_prompt(8, 0), 30), 2: _greedy(_prompt(120, 7), 10)}
    results = _drive(engine, requests, cancel_at={4: 2})
    assert results[2] is None and engine.pending is None
    assert results[0].tokens == _alone(tm, tok, requests[0]).tokens
    assert engine.stats["prefill_chunks"] < 1 + 120 // CHUNK


def test_a_failed_chunk_fails_only_its_joiner(model, monkeypatch):
    tm, tok = model
    engine = Engine(tm, tok, prefill_chunk=CHUNK)
    real, calls = tm.hidden_states, []

    def flaky(tokens, *args, **kwargs):
        calls.append(tokens.shape)
        if tokens.shape[1] == CHUNK and sum(shape[1] == CHUNK for shape in calls) == 3:
            raise RuntimeError("chunk exploded")
        return real(tokens, *args, **kwargs)

    monkeypatch.setattr(tm, "hidden_states", flaky)
    requests = {0: _greedy(_prompt(8, 0), 40), 1: _greedy(_prompt(100, 8), 10)}

    async def run():
        handles = {}
        for step in range(60):
            if step in requests:
                (handles[step],) = engine.submit([requests[step]])
            engine.step()
            await asyncio.sleep(0)
        first = await handles[0].result()
        with pytest.raises(Exception, match="chunk exploded"):
            await handles[1].result()
        return first

    first = asyncio.run(run())
    monkeypatch.undo()
    assert first.tokens == _alone(tm, tok, requests[0]).tokens


def test_prefill_chunk_must_be_positive(model):
    tm, tok = model
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(tm, tok, prefill_chunk=0)


@torch.inference_mode()
def test_serve_refuses_a_negative_prefill_chunk_in_one_line(capsys, tmp_path):
    from llama2.cli import main

    code = main(["serve", "--model", str(tmp_path), "--prefill-chunk", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "--prefill-chunk" in err[0]


# ---- the compiled decode step (Engine(compile=True), llama2 serve --compile) -------------------

@pytest.mark.slow
def test_the_compiled_engine_gives_the_eager_engines_tokens(model):
    _, tok = model
    # float32: on a CPU the graphs' products are sums over the input features (model/matvec.py),
    # eager's are MKL's; the same values but for the order of the additions. (bf16 logits tie
    # exactly now and then, and the two orders break a tie differently.) Peaked logits.
    tm = Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=CTX), seed=0).eval()
    with torch.no_grad():
        tm.output.weight.mul_(8)
    # Three streams join at once (bucket 4: one padding row), two end together, the last decodes
    # alone (bucket 1) past slot 128 (the second timeline bucket): three graphs.
    requests = [_greedy(_prompt(12, 0), 10), _greedy(_prompt(30, 1), 10), _greedy(_prompt(20, 2), 120)]
    alone = [_alone(tm, tok, r).tokens for r in requests]
    engine = Engine(tm, tok, max_batch_size=4, compile=True)

    async def run():
        handles = engine.submit(requests)
        while engine.running or engine.queued or not handles[0].finished:
            engine.step()
            await asyncio.sleep(0)
        return [(await h.result()).tokens for h in handles]

    assert asyncio.run(run()) == alone
    assert engine.stats["compiled_steps"] == engine.stats["steps"] > 0 and engine.stats["max_rows"] == 3
    assert engine.buckets == [1, 2, 4] and engine.timeline_buckets == [128, 256]
    assert sorted(engine._bucket_views) == [(1, 128), (1, 256), (4, 128)]


def test_the_compiled_engine_has_a_graph_per_batch_and_timeline_bucket(model):
    _, tok = model
    tm = Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=1000), seed=0).eval()
    engine = Engine(tm, tok, max_batch_size=8, compile=True)  # (nothing compiles before the first step)
    assert engine.buckets == [1, 2, 4, 8] and engine.timeline_buckets == [128, 256, 512, 1000]
    assert torch._dynamo.config.recompile_limit >= 4 * 4  # else the step would fail past 8 graphs


def test_compile_is_refused_with_stacked_adapters(model):
    from llama2.model.lora import stack_adapters

    tm, tok = model
    stacked = Transformer.from_config(tiny_config(vocab_size=32000), seed=0)
    A, B = torch.zeros(2, 64), torch.zeros(64, 2)
    stack_adapters(stacked, [{"layers.0.attention.wq": (A, B, 1.0)}])
    with pytest.raises(ValueError, match="LoRA adapters"):
        Engine(stacked, tok, compile=True)


def test_serve_compiles_a_w8a8_model(model, tmp_path):
    from llama2 import save_model
    from llama2.model.quant import Int8Linear
    from llama2.serve.app import create_app

    tm, tok = model
    path = save_model(tm, tmp_path / "m", tokenizer=tok)
    engine = create_app(path, compile=True, quantize="w8a8").state.server.engine
    assert engine.compile and isinstance(engine.model.output, Int8Linear) and engine.model.output.dynamic_activations
