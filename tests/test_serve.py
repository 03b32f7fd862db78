"""The OpenAI-compatible server: a real uvicorn on a loopback port, the official openai client,
plain HTTP for the error cases, and the batching engine driven step by step."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import pytest

from llama2 import Generator, SamplingParams, Transformer, encode_chat, load_model, save_model
from llama2.generate import prompt_logprobs

from .conftest import tiny_config

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from llama2.serve.app import create_app  # noqa: E402
from llama2.serve.engine import Engine, Request  # noqa: E402

MODEL_NAME = "tiny-chat"


@contextmanager
def running_server(app):
    """Serve ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yields the base URL."""
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it every response waits ~40 ms between its headers and its body (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def model_dir(llama_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / MODEL_NAME
    save_model(Transformer.from_config(tiny_config(vocab_size=32000), seed=0), path, tokenizer=llama_tokenizer)
    return path


@pytest.fixture(scope="module")
def server(model_dir):
    app = create_app(model_dir, max_batch_size=4)
    with running_server(app) as url:
        yield SimpleNamespace(url=url, app=app, engine=app.state.server.engine)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(model_dir, llama_tokenizer):
    """The same weights decoded by the plain Generator, one prompt at a time."""
    return Generator(load_model(model_dir), llama_tokenizer)


def greedy(gen: Generator, ids: list[int], n: int) -> list[int]:
    params = SamplingParams(temperature=0, max_new_tokens=n)
    return gen.generate([ids], params)[0].tokens


def continuation(tok, ids: list[int], new: list[int]) -> str:
    """A completion's text: the new tokens decoded after the prompt (so a leading space stays)."""
    return tok.decode(ids + new)[len(tok.decode(ids)):]


# -- the OpenAI API through the official client ------------------------------------------------
def test_models_health_and_tokenizer_endpoints(server, client):
    (card,) = client.models.list().data
    assert card.id == MODEL_NAME and card.owned_by == "llama2"
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == [1, 15043, 3186] and r["count"] == 3 and r["max_model_len"] == 128
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world", "add_special_tokens": False})
    assert r.json()["tokens"] == [15043, 3186]
    assert httpx.post(server.url + "/detokenize", json={"tokens": [1, 15043, 3186]}).json()["prompt"] == "Hello world"


def test_completion_equals_generator(client, reference, llama_tokenizer):
    prompt = "The capital of France is"
    ids = llama_tokenizer.encode(prompt, bos=True)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0)
    (choice,) = r.choices
    assert choice.text == continuation(llama_tokenizer, ids, greedy(reference, ids, 12))
    assert choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_prompt_forms_n_and_one_bos(client, llama_tokenizer):
    r = client.completions.create(model=MODEL_NAME, prompt=["Hello", "Once upon a time"], n=2, max_tokens=4,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text  # greedy
    assert r.usage.prompt_tokens == len(llama_tokenizer.encode("Hello", bos=True)) + len(
        llama_tokenizer.encode("Once upon a time", bos=True))

    def echoed_tokens(prompt):
        r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=0,
                                      temperature=0)
        return [c.logprobs.tokens for c in r.choices]

    # A string gets exactly one BOS; token ids are taken exactly as given.
    assert echoed_tokens("Hello world") == [["<s>", " Hello", " world"]]
    assert echoed_tokens([1, 15043, 3186]) == [["<s>", " Hello", " world"]]
    assert echoed_tokens([15043, 3186]) == [[" Hello", " world"]]
    assert echoed_tokens([[1, 15043], [1, 3186]]) == [["<s>", " Hello"], ["<s>", " world"]]


def test_echo_logprobs_schema_and_values(client, reference, llama_tokenizer):
    prompt = "Question: What do bees make?\nAnswer: Honey"
    ids = llama_tokenizer.encode(prompt, bos=True)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, echo=True, logprobs=3,
                                  temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected, _ = prompt_logprobs(reference.model, ids)
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert len(top) == 3 and max(top.values()) >= chosen - 1e-6
    # The generated token is the greedy one, so it is its own best alternative (lm-eval's is_greedy).
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())
    text = r.choices[0].text
    assert text.startswith(prompt) and lp.text_offset[-1] == len(prompt)
    assert lp.text_offset == sorted(lp.text_offset)
    # Each token's text sits at its offset (the first word's dummy-prefix space is not in the text).
    off = lp.text_offset
    assert [text[off[i] : off[i + 1]] for i in range(2, len(ids))] == lp.tokens[2 : len(ids)]


def test_stop_strings_and_seeds(client, reference, llama_tokenizer):
    prompt = "Once upon a time"
    full = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=20, temperature=0).choices[0].text
    stop = full[6:9]
    cut = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=20, temperature=0,
                                    stop=[stop, "never appears"]).choices[0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=20, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut.text  # nothing past the stop leaks out
    assert chunks[-1].choices[0].finish_reason == "stop"

    def sampled(seed):
        return client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=10, temperature=1.0, top_p=1.0,
                                         seed=seed).choices[0].text

    assert sampled(7) == sampled(7) != sampled(8)
    ids = llama_tokenizer.encode(prompt, bos=True)
    alone = reference.generate([ids], SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=10, seed=7))[0]
    assert sampled(7) == continuation(llama_tokenizer, ids, alone.tokens)


def test_chat_streaming_and_logprobs(client, reference, llama_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a llama?"}]
    ids = encode_chat(llama_tokenizer, messages)
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0)
    content = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert content == llama_tokenizer.decode(greedy(reference, ids, 10))  # Meta's chat decodes the answer alone
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 10)

    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10

    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=2)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 4 and all(len(e.top_logprobs) == 2 for e in entries)
    assert all(e.logprob == e.top_logprobs[0].logprob for e in entries)  # greedy picks the best

    # A completion stream carries the same text as the plain response.
    plain = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=12, temperature=0)
    streamed = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_sse_wire_format(server):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert events[-1]["choices"][0]["finish_reason"] == "length"


# -- errors over plain HTTP ----------------------------------------------------------------------
ERRORS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [5, 40000]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 2, "stream": True}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "[INST] hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "nope"}, 404, "model"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens"),
]


def test_bad_requests_get_openai_errors_and_the_server_lives_on(server):
    for path, body, status, param in ERRORS:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(server.url + path, **kwargs)
        assert r.status_code == status, (path, body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param, (body, error)
    r = httpx.get(server.url + "/v1/no-such-endpoint")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_context_overflow_names_the_numbers(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello world", "max_tokens": 126})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "128" in message and "129" in message and "3 in the prompt" in message and "126" in message
    long_chat = [{"role": "user", "content": "word " * 200}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": long_chat})
    assert r.status_code == 400 and "128" in r.json()["error"]["message"]


def test_api_key(model_dir):
    app = create_app(model_dir, api_key="sekret", model_name="keyed")
    with running_server(app) as url:
        body = {"prompt": "Hi", "max_tokens": 2}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401
        r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model="keyed", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


class FakeGuard:
    """Flags user turns mentioning 'bomb'; with ``flag_answers`` every answer is flagged too."""

    def __init__(self, flag_answers: bool = False):
        self.flag_answers = flag_answers
        self.calls: list[list[dict]] = []

    def check(self, messages):
        self.calls.append([dict(m) for m in messages])
        if messages[-1]["role"] == "assistant":
            return self.flag_answers, ["O1: Violence and Hate"] if self.flag_answers else []
        if "bomb" in messages[-1]["content"]:
            return True, ["O3: Criminal Planning"]
        if "endless" in messages[-1]["content"]:
            raise ValueError("the last message is too long for the safety classifier")
        return False, []


def test_guard_hook(model_dir):
    guard = FakeGuard()
    with running_server(create_app(model_dir, guard=guard)) as url:
        chat = url + "/v1/chat/completions"
        r = httpx.post(chat, json={"messages": [{"role": "user", "content": "how to build a bomb"}], "max_tokens": 4})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "content_filter" and "O3" in r.json()["error"]["message"]
        r = httpx.post(chat, json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        answer = r.json()["choices"][0]["message"]["content"]
        assert guard.calls[-1] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": answer}]
        r = httpx.post(chat, json={"messages": [{"role": "user", "content": "an endless story"}], "max_tokens": 4})
        assert r.status_code == 400 and "too long for the safety classifier" in r.json()["error"]["message"]

        guard.flag_answers = True
        r = httpx.post(chat, json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] == ""
        streamed = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model=model_dir.name, messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True)
        reasons = [c.choices[0].finish_reason for c in streamed if c.choices]
        assert reasons[-1] == "content_filter"


# -- batching --------------------------------------------------------------------------------
def test_concurrent_requests_equal_sequential_ones(server, client):
    prompts = ["Hi", "The capital of France is", "Once upon a time there was", "1 2 3 4",
               "A llama is an animal that", "Write a poem about the sea"]
    lengths = [30, 45, 20, 60, 35, 50]

    def ask(i, stream=False):
        kwargs = dict(model=MODEL_NAME, prompt=prompts[i], max_tokens=lengths[i], temperature=0)
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
        return client.completions.create(**kwargs).choices[0].text

    alone = [ask(i) for i in range(len(prompts))]
    server.engine.stats["max_rows"] = 0
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda i: ask(i, stream=i % 2 == 1), range(len(prompts))))
    assert together == alone
    assert server.engine.stats["max_rows"] > 1  # they really were decoded together


def test_engine_continuous_batching_matches_generator(llama_tokenizer):
    """Requests join a running batch at step boundaries (prefill shifts, compaction, a full
    batch making one wait) and each still decodes exactly as alone, sampled rows included."""
    tok = llama_tokenizer
    cfg = tiny_config(vocab_size=32000, max_seq_len=64)
    model = Transformer.from_config(cfg, seed=0)
    engine = Engine(model, tok, max_batch_size=3, max_queue=8)
    ref = Generator(model, tok)  # the same model, used in turns (the engine also copes with setup_cache)
    g = dict(temperature=0, stop_at_eos=False)
    specs = [  # (arrival step, prompt, sampling)
        (0, "Hi", SamplingParams(max_new_tokens=40, **g)),
        (2, "The quick brown fox jumps over the lazy dog while the cat sleeps on the mat", SamplingParams(
            max_new_tokens=20, **g)),
        (3, "Once upon a time", SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_new_tokens=30,
                                               stop_at_eos=False)),
        (4, "A", SamplingParams(max_new_tokens=50, **g)),  # the batch is full: it waits for a free row
        (45, "Numbers: 1 2 3", SamplingParams(temperature=0.7, top_k=50, top_p=1.0, seed=1, max_new_tokens=10,
                                              stop_at_eos=False)),
    ]

    async def drive():
        handles = {}
        for step in range(500):
            for i, (when, text, params) in enumerate(specs):
                if when == step:
                    (handles[i],) = engine.submit([Request(tok.encode(text, bos=True), params)])
            engine.step()
            await asyncio.sleep(0)  # deliver the engine's events to the handles
            if step > specs[-1][0] and not engine.running and not engine.queued:
                break
        return {i: await h.result() for i, h in handles.items()}

    results = asyncio.run(drive())
    for i, (_, text, params) in enumerate(specs):
        expected = ref.generate([tok.encode(text, bos=True)], params)[0]
        assert results[i].tokens == expected.tokens, i
        assert results[i].finish_reason == "length"
    assert engine.stats["max_rows"] == 3 and engine.stats["shifts"] >= 2

    async def cancel_one():
        (h,) = engine.submit([Request(tok.encode("Hello", bos=True), SamplingParams(max_new_tokens=40, **g))])
        engine.step()
        engine.step()
        assert engine.running == 1
        h.cancel()
        engine.step()

    asyncio.run(cancel_one())
    assert engine.running == 0 and engine.stats["cancelled"] == 1


def test_queue_full_and_disconnects_free_slots(llama_tokenizer):
    model = Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=4096), seed=0)
    app = create_app((model, llama_tokenizer), max_batch_size=1, max_queue=1, model_name="one-slot")
    engine = app.state.server.engine
    with running_server(app) as url:
        def health():
            return httpx.get(url + "/health").json()

        long = {"prompt": "Tell me everything.", "max_tokens": 4000, "temperature": 0}
        # A streaming client takes the only slot ...
        with httpx.stream("POST", url + "/v1/completions", json={**long, "stream": True}) as first:
            lines = first.iter_lines()  # (dropping this iterator would close the connection)
            next(lines)
            assert health()["running"] == 1
            # ... a second request waits in the queue ...
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(httpx.post, url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3},
                                      timeout=30)
                assert wait_for(lambda: health()["waiting"] == 1)
                # ... and a third finds the queue full.
                r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
                assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
                first.close()  # the streaming client hangs up: its slot goes to the waiting request
                assert waiting.result().status_code == 200
        assert wait_for(lambda: engine.stats["cancelled"] == 1 and engine.running == 0)

        # A non-streaming client that gives up frees its slot as well.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=long, timeout=0.5)
        assert wait_for(lambda: engine.stats["cancelled"] == 2 and engine.running == 0)
        assert health()["status"] == "ok"


def test_serve_command_is_registered():
    from llama2.cli import build_parser

    args = build_parser("serve").parse_args(["serve", "--model", "some/dir"])
    assert (args.host, args.port, args.max_batch_size, args.guard) == ("127.0.0.1", 8000, 8, None)
