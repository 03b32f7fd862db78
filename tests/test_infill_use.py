"""Code Llama's infilling in use (Code Llama §2.3): ``llama2 generate --suffix``, the server's
``suffix`` field, generation that stops at ``<EOT>``, and chat left as it was.

The model is a tiny one rigged to be a bigram table: every layer's output projections are zero,
so the residual stream is the token's embedding, and the lm_head maps a few chosen tokens to
the next one. Greedy decoding after ``<MID>`` (or after the prefix's last token, for the
suffix-prefix-middle order) then writes " hello world" and ``<EOT>``, whatever the prompt was.
"""

from __future__ import annotations

import json

import openai
import pytest
import torch

from llama2 import Generator, ModelConfig, SamplingParams, Transformer, save_model
from llama2.chat import encode_chat
from llama2.tokenizer import Tokenizer, add_infilling_pieces, infill_tokens

from .conftest import FIXTURE_TOKENIZER
from .conftest import run_cli as run
from .test_cli_generate import one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")

PREFIX = "def greet():\n    print(\""
SUFFIX = "\")\n"
MIDDLE = " hello world"  # the middle starts with a real space: it must survive decoding


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    """The Llama 2 vocabulary with Code Llama's 16 extra pieces (32016)."""
    return add_infilling_pieces(FIXTURE_TOKENIZER, tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="module")
def plain_tok() -> Tokenizer:
    return Tokenizer(FIXTURE_TOKENIZER)


def rigged_model(tok: Tokenizer, table: dict[int, int]) -> Transformer:
    """A tiny model whose greedy next token after token ``a`` is ``table[a]`` (others: id 0)."""
    cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size, multiple_of=16,
                      max_seq_len=64)
    model = Transformer.from_config(cfg, seed=0)
    with torch.no_grad():
        for layer in model.layers:  # each block adds nothing: the stream stays the token's embedding
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.tok_embeddings.weight.zero_()
        model.output.weight.zero_()
        for i, (a, b) in enumerate(table.items()):
            model.tok_embeddings.weight[a, i] = 1.0
            model.output.weight[b, i] = 10.0
    return model.eval()


def chain(tok: Tokenizer) -> dict[int, int]:
    """<MID> (PSM's last prompt token) or the prefix's last token (SPM's) -> hello -> world -> <EOT>."""
    hello, world = tok.encode_infilling(MIDDLE)
    return {tok.middle_id: hello, tok.encode(PREFIX)[-1]: hello, hello: world, world: tok.eot_id}


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    return save_model(rigged_model(tok, chain(tok)), tmp_path_factory.mktemp("infill") / "tiny-code", tokenizer=tok)


@pytest.fixture
def prompts_seen(monkeypatch) -> list[list[int]]:
    """Every prompt the Generator decodes, as token ids."""
    seen: list[list[int]] = []
    steps = Generator.steps

    def recording(self, prompts, params, seeds=None):
        seen.extend(list(p) for p in prompts)
        return steps(self, prompts, params, seeds)

    monkeypatch.setattr(Generator, "steps", recording)
    return seen


# -- stop token ids in the Generator --------------------------------------------------------------
def test_generation_stops_at_a_stop_token_id_and_leaves_it_out(tok):
    gen = Generator(rigged_model(tok, chain(tok)), tok)
    prompt = infill_tokens(tok, PREFIX, SUFFIX)
    out = gen.generate([prompt], SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=(tok.eot_id,)))[0]
    assert out.tokens == tok.encode_infilling(MIDDLE) and out.finish_reason == "stop"
    streamed = gen.stream(prompt, SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=(tok.eot_id,)))
    assert "".join(streamed) == tok.decode(out.tokens)


def test_without_the_stop_token_id_generation_runs_past_eot(tok):
    gen = Generator(rigged_model(tok, chain(tok)), tok)
    out = gen.generate([infill_tokens(tok, PREFIX, SUFFIX)], SamplingParams(temperature=0, max_new_tokens=5))[0]
    assert tok.eot_id in out.tokens and out.finish_reason == "length"


def test_stop_token_ids_must_be_token_ids():
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=(-1,))


# -- llama2 generate --suffix ---------------------------------------------------------------------
def test_cli_prints_just_the_middle(capsys, model_dir):
    rc, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", PREFIX, "--suffix", SUFFIX,
                       "--temperature", "0")
    assert rc == 0, err
    assert out == MIDDLE + "\n"  # the leading space kept, no <EOT>, no prefix or suffix


def test_cli_json_gives_the_middle_and_stops_at_eot(capsys, model_dir, tok):
    rc, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", PREFIX, "--suffix", SUFFIX,
                       "--temperature", "0", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["text"] == MIDDLE and result["finish_reason"] == "stop"
    assert result["tokens"] == tok.encode_infilling(MIDDLE) and tok.eot_id not in result["tokens"]
    assert result["prompt_tokens"] == len(infill_tokens(tok, PREFIX, SUFFIX))


def test_cli_sends_the_prefix_suffix_middle_prompt(capsys, model_dir, tok, prompts_seen):
    rc, _, err = run(capsys, "generate", "--model", model_dir, "--prompt", PREFIX, "--suffix", SUFFIX,
                     "--temperature", "0", "--no-stream")
    assert rc == 0, err
    assert prompts_seen == [infill_tokens(tok, PREFIX, SUFFIX)]


def test_cli_spm_sends_the_suffix_prefix_middle_prompt(capsys, model_dir, tok, prompts_seen):
    rc, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", PREFIX, "--suffix", SUFFIX,
                       "--infill-format", "spm", "--temperature", "0")
    assert rc == 0, err
    assert prompts_seen == [infill_tokens(tok, PREFIX, SUFFIX, suffix_first=True)]
    assert out == MIDDLE + "\n"


def test_cli_suffix_on_a_model_without_infilling_pieces_is_one_line(capsys, chat_dir):
    one_line_error(capsys, "generate", "--model", chat_dir, "--prompt", PREFIX, "--suffix", SUFFIX,
                   match="no infilling pieces")


def test_cli_infill_format_without_suffix_is_one_line(capsys, model_dir):
    one_line_error(capsys, "generate", "--model", model_dir, "--prompt", PREFIX, "--infill-format", "spm",
                   match="--infill-format needs --suffix")


def test_cli_no_bos_with_suffix_is_one_line(capsys, model_dir):
    one_line_error(capsys, "generate", "--model", model_dir, "--prompt", PREFIX, "--suffix", SUFFIX, "--no-bos",
                   match="--no-bos cannot be combined with --suffix")


# -- the server's suffix --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(model_dir):
    from llama2.serve.app import create_app

    from .test_serve import running_server

    app = create_app(model_dir, max_batch_size=2)
    with running_server(app) as url:
        yield app, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


@pytest.fixture
def engine_prompts(server, monkeypatch) -> list[list[int]]:
    """Every prompt the server's engine is handed, as token ids."""
    engine = server[0].state.server.engine
    seen: list[list[int]] = []
    submit = engine.submit

    def recording(requests):
        seen.extend(list(r.prompt) for r in requests)
        return submit(requests)

    monkeypatch.setattr(engine, "submit", recording)
    return seen


def test_server_suffix_returns_the_middle_stopping_at_eot(server, tok, engine_prompts):
    _, client = server
    r = client.completions.create(model="tiny-code", prompt=PREFIX, suffix=SUFFIX, max_tokens=8, temperature=0)
    (choice,) = r.choices
    assert choice.text == MIDDLE and choice.finish_reason == "stop"
    assert engine_prompts == [infill_tokens(tok, PREFIX, SUFFIX)]


def test_server_suffix_streams_the_middle(server):
    _, client = server
    chunks = list(client.completions.create(model="tiny-code", prompt=PREFIX, suffix=SUFFIX, max_tokens=8,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == MIDDLE
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_server_spm_is_the_infill_format_extension_field(server, tok, engine_prompts):
    _, client = server
    r = client.completions.create(model="tiny-code", prompt=PREFIX, suffix=SUFFIX, max_tokens=8, temperature=0,
                                  extra_body={"infill_format": "spm"})
    assert r.choices[0].text == MIDDLE
    assert engine_prompts == [infill_tokens(tok, PREFIX, SUFFIX, suffix_first=True)]


def test_server_infill_format_without_suffix_is_a_400(server):
    _, client = server
    with pytest.raises(openai.BadRequestError, match="infill_format needs a non-empty suffix"):
        client.completions.create(model="tiny-code", prompt=PREFIX, max_tokens=4, extra_body={"infill_format": "spm"})


def test_server_suffix_with_token_id_prompts_is_a_400(server, tok):
    _, client = server
    with pytest.raises(openai.BadRequestError, match="suffix needs the prompt as text"):
        client.completions.create(model="tiny-code", prompt=tok.encode(PREFIX, bos=True), suffix=SUFFIX, max_tokens=4)


def test_server_suffix_with_echo_is_a_400(server):
    _, client = server
    with pytest.raises(openai.BadRequestError, match="echo cannot be combined with suffix"):
        client.completions.create(model="tiny-code", prompt=PREFIX, suffix=SUFFIX, max_tokens=4, echo=True)


def test_server_suffix_on_a_model_without_infilling_pieces_is_a_400(chat_dir):
    from llama2.serve.app import create_app

    from .test_serve import running_server

    with running_server(create_app(chat_dir, max_batch_size=1)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="infilling pieces") as e:
            client.completions.create(model=chat_dir.name, prompt=PREFIX, suffix=SUFFIX, max_tokens=4)
        assert e.value.body["param"] == "suffix"


# -- chat stays Llama 2's format --------------------------------------------------------------------
def test_chat_encoding_is_the_same_on_an_infilling_tokenizer(tok, plain_tok):
    """Code Llama - Instruct uses Llama 2's chat format; the infilling pieces never appear in it.
    (Text that spells a sentinel or its start after a space, " <EOT>" or " <M", is the exception:
    it encodes to the new pieces, as in Code Llama's own vocabulary.)"""
    dialog = [{"role": "system", "content": "Answer with code."},
              {"role": "user", "content": "Write a function that adds two numbers (a<b or not)."},
              {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
              {"role": "user", "content": "Now subtract."}]
    ids = encode_chat(tok, dialog)
    assert ids == encode_chat(plain_tok, dialog)
    assert max(ids) < plain_tok.vocab_size
