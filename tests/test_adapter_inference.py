"""LoRA adapters at inference: ``--adapter`` on generate / chat / evaluate (merged as the model
loads), several adapters over one base in the server (unmerged, chosen per request and per batch
row), and ``llama2 convert --merge-adapter`` (or an adapter directory as the source)."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from llama2 import Generator, SamplingParams, Transformer, load_model, save_model
from llama2.checkpoint import CheckpointError, convert, load_tokenizer
from llama2.model.lora import adapter_state_dict, apply_lora, stack_adapters
from llama2.train.lora import LoraConfig, export_adapter

from .conftest import run_cli as run
from .conftest import tiny_config

# Tiny models gain nothing from threads, and a busy machine makes them much slower.
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(atol=1e-5, rtol=1e-5)
BASE_NAME = "tiny-base"


def make_adapter(base_dir, out, targets: str, rank: int, seed: int):
    """A trained-looking adapter directory (PEFT's format, no tokenizer of its own) over ``base_dir``;
    B starts at zero in training, so it is drawn at random here or every comparison would be trivial."""
    model = load_model(base_dir)
    apply_lora(model, targets, rank=rank, alpha=8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return export_adapter(adapter_state_dict(model), LoraConfig(method="lora", rank=rank, alpha=8, targets=targets),
                          base_dir, out)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, llama_tokenizer):
    """A base model directory and two adapters of different targets and ranks, each in a LoRA
    run's layout (RUN/model)."""
    root = tmp_path_factory.mktemp("adapters")
    base = save_model(Transformer.from_config(tiny_config(vocab_size=32000), seed=0), root / BASE_NAME,
                      tokenizer=llama_tokenizer)
    a = make_adapter(base, root / "run-a", "q,v", rank=4, seed=1)
    b = make_adapter(base, root / "run-b", "all", rank=2, seed=2)
    assert a.name == "model" and not (a / "tokenizer.model").exists()
    return base, a, b


def greedy_tokens(model, tok, ids: list[int], n: int, stop_at_eos: bool = True) -> list[int]:
    params = SamplingParams(temperature=0, max_new_tokens=n, stop_at_eos=stop_at_eos)
    return Generator(model, tok).generate([ids], params)[0].tokens


# -- generate / chat / evaluate: merged as the model loads ----------------------------------------
def test_generate_with_an_adapter_decodes_the_merged_model(capsys, dirs, llama_tokenizer):
    base, a, _ = dirs
    prompt = "The capital of France is"
    rc, out, err = run(capsys, "generate", "--model", base, "--adapter", a, "--prompt", prompt, "--temperature", "0",
                       "--max-new-tokens", "12", "--json")
    assert rc == 0, err
    ids = llama_tokenizer.encode(prompt, bos=True)
    merged = greedy_tokens(load_model(base, adapter=a), llama_tokenizer, ids, 12)
    assert json.loads(out)["tokens"] == merged
    assert merged != greedy_tokens(load_model(base), llama_tokenizer, ids, 12)  # the adapter matters


def test_chat_with_an_adapter_answers_as_the_merged_model(capsys, dirs, monkeypatch, tmp_path):
    base, a, _ = dirs
    merged = convert(base, tmp_path / "merged", "hf", adapter=a)
    chat = ("chat", "--temperature", "0", "--max-new-tokens", "8")
    rc, with_adapter, err = run(capsys, *chat, "--model", base, "--adapter", a, stdin="hi\nhello\n",
                                monkeypatch=monkeypatch)
    assert rc == 0, err
    rc, plain, _ = run(capsys, *chat, "--model", merged, stdin="hi\nhello\n", monkeypatch=monkeypatch)
    assert rc == 0 and with_adapter == plain and len(with_adapter.splitlines()) == 2
    rc, from_base, _ = run(capsys, *chat, "--model", base, stdin="hi\nhello\n", monkeypatch=monkeypatch)
    assert rc == 0 and from_base != with_adapter


def test_an_adapter_that_does_not_fit_is_one_line(capsys, dirs, tmp_path, llama_tokenizer):
    _, a, _ = dirs
    wide = save_model(Transformer.from_config(tiny_config(vocab_size=32000, dim=128), seed=0), tmp_path / "wide",
                      tokenizer=llama_tokenizer)
    for command, extra in (("generate", ("--prompt", "hi")), ("chat", ()), ("evaluate", ("--task", "x.yaml"))):
        rc, out, err = run(capsys, command, "--model", wide, "--adapter", a, *extra)
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1, (command, err)
        assert lines[0].startswith(f"llama2 {command}: error: ") and "adapter_model.safetensors" in lines[0]
        assert "adapter for layers.0.attention.wq is (64, 64) but the base weight is (128, 128)" in lines[0]
    rc, _, err = run(capsys, "generate", "--model", wide, "--adapter", tmp_path / "nope", "--prompt", "hi")
    assert rc == 1 and "adapter_config.json: not found" in err and len(err.strip().splitlines()) == 1


def test_evaluate_with_an_adapter_scores_the_merged_model(capsys, dirs, llama_tokenizer):
    from llama2.eval.cli import evaluate_model
    from llama2.eval.multiple_choice import DEFAULT_TASK, evaluate

    base, a, _ = dirs
    rc, out, err = run(capsys, "evaluate", "--model", base, "--adapter", a, "--task", DEFAULT_TASK, "--json")
    assert rc == 0, err
    expected = evaluate(load_model(base, adapter=a), llama_tokenizer, DEFAULT_TASK).to_dict()
    assert json.loads(out) == json.loads(json.dumps(expected))
    plain = evaluate(load_model(base), llama_tokenizer, DEFAULT_TASK).to_dict()
    assert json.loads(out)["items"] != json.loads(json.dumps(plain))["items"]
    # the suite: --model BASE --adapter DIR is the adapter directory loaded as a model (its base + it)
    small = dict(max_items=2, gatt_turns=(1,), gatt_dialogues=1, max_new_tokens=4)
    assert evaluate_model(str(base), adapter=str(a), **small) == evaluate_model(str(a), **small)


# -- convert: a plain model of base + adapter -------------------------------------------------------
@pytest.mark.parametrize("to", ["hf", "meta"])
def test_convert_merges_an_adapter_into_a_plain_model(capsys, dirs, tmp_path, to):
    base, a, _ = dirs
    x = torch.randint(0, 32000, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = load_model(base, adapter=a)(x)
    rc, _, err = run(capsys, "convert", base, tmp_path / "merged", "--merge-adapter", a, "-q",
                     *(("--to", to) if to == "meta" else ()))
    assert rc == 0, err
    out = tmp_path / "merged"
    assert (out / ("config.json" if to == "hf" else "params.json")).is_file()  # hf unless --to says otherwise
    assert (out / "tokenizer.model").is_file()  # the base's (the adapter has none)
    assert not list(out.glob("adapter_*"))
    torch.testing.assert_close(load_model(out)(x), expected, **TOL)
    # the adapter directory as the source merges it into its recorded base
    rc, _, err = run(capsys, "convert", a, tmp_path / "from-adapter", "-q", *(("--to", to) if to == "meta" else ()))
    assert rc == 0, err
    torch.testing.assert_close(load_model(tmp_path / "from-adapter")(x), expected, **TOL)


def test_convert_merges_an_adapter_into_gguf(capsys, tmp_path):
    """GGUF from base + adapter (--merge-adapter) and from the adapter directory alone, read back
    with gguf's own reader. A 320-piece vocabulary: GGUFReader parses 32k pieces slowly."""
    gguf = pytest.importorskip("gguf", reason="the gguf package (pip install 'llama2[gguf]') is not installed")
    import sentencepiece as spm

    from llama2.checkpoint import meta
    from llama2.checkpoint.gguf import gguf_name
    from llama2.tokenizer import LLAMA2_TRAINER_SETTINGS

    vocab = 320
    text = "\n".join(f"The quick brown fox {i} jumps over the lazy dog {i * 7}. Hello world!" for i in range(300))
    (tmp_path / "text.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=vocab, minloglevel=2, **LLAMA2_TRAINER_SETTINGS)
    base = save_model(Transformer.from_config(tiny_config(vocab_size=vocab), seed=0), tmp_path / "base",
                      tokenizer=load_tokenizer(tmp_path / "tokenizer.model", vocab))
    a = make_adapter(base, tmp_path / "run-a", "q,v", rank=4, seed=1)
    b = make_adapter(base, tmp_path / "run-b", "all", rank=2, seed=2)
    x = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    for src, extra, adapter in ((base, ("--merge-adapter", b), b), (a, (), a)):
        out = tmp_path / f"{adapter.parent.name}.gguf"
        rc, _, err = run(capsys, "convert", src, out, "--dtype", "f32", "-q", *extra)
        assert rc == 0, err
        stored = {t.name: torch.from_numpy(t.data.copy()).reshape([int(n) for n in reversed(t.shape)])
                  for t in gguf.GGUFReader(out).tensors}
        expected = load_model(base, adapter=adapter)
        cfg = expected.config
        state = {}
        for name in expected.state_dict():
            t = stored[gguf_name(name)]
            if name.endswith("attention.wq.weight"):  # GGUF keeps Meta's Q/K row order
                t = meta.meta_to_hf_rows(t, cfg.n_heads)
            elif name.endswith("attention.wk.weight"):
                t = meta.meta_to_hf_rows(t, cfg.n_kv_heads)
            state[name] = t
        model = Transformer(cfg)
        model.load_state_dict(state)
        torch.testing.assert_close(model.eval()(x), expected(x), **TOL)


def test_convert_refuses_an_adapter_that_does_not_fit_and_leaves_nothing(capsys, dirs, tmp_path, llama_tokenizer):
    _, a, _ = dirs
    wide = save_model(Transformer.from_config(tiny_config(vocab_size=32000, dim=128), seed=0), tmp_path / "wide",
                      tokenizer=llama_tokenizer)
    for dst in ("out", "out.gguf"):
        rc, _, err = run(capsys, "convert", wide, tmp_path / dst, "--merge-adapter", a, "-q")
        assert rc == 1 and "adapter for layers.0.attention.wq is (64, 64)" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / dst).exists()


# -- the server: several adapters over one base ------------------------------------------------------
serve = pytest.importorskip("llama2.serve.app")
httpx = pytest.importorskip("httpx")


def test_adapter_flags_name_the_adapters(tmp_path):
    run_dir = tmp_path / "sft-lora" / "model"
    run_dir.mkdir(parents=True)
    plain = tmp_path / "my-adapter"
    plain.mkdir()
    assert serve.parse_adapters([f"x={plain}", str(run_dir), str(plain)]) == {
        "x": plain, "sft-lora": run_dir, "my-adapter": plain}
    with pytest.raises(ValueError, match="two adapters are named 'my-adapter'"):
        serve.parse_adapters([str(plain), f"my-adapter={run_dir}"])
    odd = tmp_path / "a=b"  # an existing folder whose name has '=' is a DIR
    odd.mkdir()
    assert serve.parse_adapters([str(odd)]) == {"a=b": odd}
    from llama2.cli import build_parser

    args = build_parser("serve").parse_args(["serve", "--model", "m", "--adapter", "a=x", "--adapter", "y"])
    assert args.adapter == ["a=x", "y"]


def test_server_refuses_adapters_that_cannot_be_served(dirs, tmp_path, llama_tokenizer):
    base, a, _ = dirs
    with pytest.raises(ValueError, match="the base model is served under that name"):
        serve.create_app(base, adapters={BASE_NAME: a})
    wide = save_model(Transformer.from_config(tiny_config(vocab_size=32000, dim=128), seed=0), tmp_path / "wide",
                      tokenizer=llama_tokenizer)
    with pytest.raises(CheckpointError, match=r"adapter for layers.0.attention.wq is \(64, 64\) but the base"):
        serve.create_app(wide, adapters={"a": a})
    with pytest.raises(CheckpointError, match="adapter_config.json: not found"):
        serve.create_app(base, adapters={"a": tmp_path / "nope"})


def test_engine_gives_each_row_its_adapter(dirs, llama_tokenizer):
    """Requests for two adapters and the base join one running batch at different steps and each
    decodes exactly as its merged model alone."""
    from llama2.checkpoint import peft
    from llama2.serve.engine import Engine, Request

    base, a, b = dirs
    tok = llama_tokenizer
    model = load_model(base)
    stack_adapters(model, [peft.read_adapter(d)[1] for d in (a, b)])
    engine = Engine(model, tok, max_batch_size=3)
    merged = {0: load_model(base), 1: load_model(base, adapter=a), 2: load_model(base, adapter=b)}
    specs = [(0, "Hi", 1, 20), (0, "Once upon a time", 0, 15), (3, "The capital of France is", 2, 12),
             (5, "A llama", 1, 10), (6, "Numbers: 1 2 3", 0, 5)]  # (arrival step, prompt, adapter, tokens)

    async def drive():
        handles = {}
        for step in range(200):
            for i, (when, text, adapter, n) in enumerate(specs):
                if when == step:
                    params = SamplingParams(temperature=0, max_new_tokens=n, stop_at_eos=False)
                    (handles[i],) = engine.submit([Request(tok.encode(text, bos=True), params, adapter=adapter)])
            engine.step()
            await asyncio.sleep(0)
            if step > specs[-1][0] and not engine.running and not engine.queued:
                break
        return {i: await h.result() for i, h in handles.items()}

    results = asyncio.run(drive())
    for i, (_, text, adapter, n) in enumerate(specs):
        ids = tok.encode(text, bos=True)
        assert results[i].tokens == greedy_tokens(merged[adapter], tok, ids, n, stop_at_eos=False), i
    assert engine.stats["max_rows"] == 3

    async def unknown():
        (h,) = engine.submit([Request([1, 15043], SamplingParams(max_new_tokens=2), adapter=3)])
        engine.step()
        return await h.result()

    with pytest.raises(Exception, match="adapter 3 does not exist"):
        asyncio.run(unknown())


def test_server_serves_each_request_its_adapter_in_one_batch(dirs, llama_tokenizer):
    from .test_serve import running_server

    base, a, b = dirs
    tok = llama_tokenizer
    app = serve.create_app(base, max_batch_size=4, adapters=serve.parse_adapters([f"sql={a}", str(b)]))
    engine = app.state.server.engine
    merged = {BASE_NAME: load_model(base), "sql": load_model(base, adapter=a), "run-b": load_model(base, adapter=b)}
    prompt, n = "The capital of France is", 40
    ids = tok.encode(prompt, bos=True)
    expected = {name: tok.decode(ids + greedy_tokens(m, tok, ids, n))[len(tok.decode(ids)):]
                for name, m in merged.items()}
    assert len(set(expected.values())) == 3  # three different models
    with running_server(app) as url:
        cards = httpx.get(url + "/v1/models").json()["data"]
        assert [c["id"] for c in cards] == [BASE_NAME, "sql", "run-b"]
        assert [c.get("parent") for c in cards] == [None, BASE_NAME, BASE_NAME]
        assert httpx.get(url + "/v1/models/sql").json()["id"] == "sql"

        def ask(name):
            body = {"model": name, "prompt": prompt, "max_tokens": n, "temperature": 0}
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        with ThreadPoolExecutor(3) as pool:
            answers = dict(zip(merged, pool.map(ask, merged)))
        for name, r in answers.items():
            assert r["model"] == name and r["choices"][0]["text"] == expected[name], name
        assert engine.stats["max_rows"] > 1  # decoded together, each row with its own adapter

        # chat picks its adapter the same way; a stream carries the adapter's name
        messages = [{"role": "user", "content": "hello"}]
        r = httpx.post(url + "/v1/chat/completions", json={"model": "sql", "messages": messages, "max_tokens": 6,
                                                            "temperature": 0, "stream": True})
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert {e["model"] for e in events} == {"sql"}

        # an unknown model: the same 404 as a server without adapters gives, listing what there is
        r = httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "hi"})
        error = r.json()["error"]
        assert r.status_code == 404 and (error["code"], error["param"]) == ("model_not_found", "model")
        assert error["message"] == "the model 'nope' does not exist; this server serves 'tiny-base', 'sql', 'run-b'"


def test_chat_over_an_adapter_equals_the_merged_model(dirs, llama_tokenizer):
    from llama2 import encode_chat

    from .test_serve import running_server

    base, a, _ = dirs
    tok = llama_tokenizer
    model = load_model(base)
    app = serve.create_app((model, tok), model_name="base", adapters={"a": a})
    messages = [{"role": "user", "content": "hello"}]
    ids = encode_chat(tok, messages)
    expected = greedy_tokens(load_model(base, adapter=a), tok, ids, 8)
    with running_server(app) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"model": "a", "messages": messages, "max_tokens": 8,
                                                            "temperature": 0}).json()
        assert r["model"] == "a"
        assert r["choices"][0]["message"]["content"] == tok.decode([t for t in expected if t != tok.eos_id])
