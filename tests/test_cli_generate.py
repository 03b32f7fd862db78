"""``llama2 generate`` and ``llama2 chat`` on a tiny saved model, and the chat history budget."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama2 import Generator, ModelConfig, SamplingParams, Transformer, save_model
from llama2.chat import encode_chat
from llama2.chat_session import SPECIAL_TAGS_ERROR, ChatSession, build_messages, fit_dialogue
from llama2.generate import ContextOverflow

from .conftest import FIXTURE_TOKENIZER as FIXTURE
from .conftest import run_cli as run

# Tiny models gain nothing from threads, and a busy machine makes them much slower.
pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 96


@pytest.fixture(scope="module")
def tokenizer():
    from llama2 import Tokenizer

    return Tokenizer(FIXTURE)


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory) -> Path:
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=16,
                      max_seq_len=CONTEXT)
    path = tmp_path_factory.mktemp("tiny-model")
    save_model(Transformer.from_config(cfg, seed=0), path, tokenizer=tokenizer)
    return path


def run_json(capsys, model_dir, *extra) -> dict:
    rc, out, err = run(capsys, "generate", "--model", model_dir, "--json", *extra)
    assert rc == 0, err
    return json.loads(out)


# -- generate ----------------------------------------------------------------------------------
def test_json_output_schema(capsys, model_dir, tokenizer):
    result = run_json(capsys, model_dir, "--prompt", "Hello there", "--max-new-tokens", "12", "--seed", "1")
    assert set(result) == {"text", "tokens", "logprobs", "prompt_tokens", "finish_reason"}
    assert result["prompt_tokens"] == len(tokenizer.encode("Hello there", bos=True))
    assert 0 < len(result["tokens"]) <= 12 and len(result["logprobs"]) == len(result["tokens"])
    assert all(isinstance(t, int) for t in result["tokens"]) and all(lp <= 0 for lp in result["logprobs"])
    assert result["text"] == tokenizer.decode(result["tokens"])
    assert result["finish_reason"] in ("stop", "length")


def test_greedy_is_deterministic_and_matches_the_generator(capsys, model_dir, tokenizer):
    args = ("--prompt", "The capital of France is", "--temperature", "0", "--max-new-tokens", "10")
    first, second = run_json(capsys, model_dir, *args), run_json(capsys, model_dir, *args)
    assert first == second
    from llama2 import load_model

    gen = Generator(load_model(model_dir), tokenizer)
    ids = tokenizer.encode("The capital of France is", bos=True)
    assert first["tokens"] == gen.generate([ids], SamplingParams(temperature=0, max_new_tokens=10))[0].tokens
    # a seed makes sampling reproducible as well
    sampled = ("--prompt", "Hi", "--temperature", "1.0", "--seed", "7", "--max-new-tokens", "10")
    assert run_json(capsys, model_dir, *sampled) == run_json(capsys, model_dir, *sampled)


def test_streamed_text_equals_the_json_text(capsys, model_dir):
    args = ("generate", "--model", model_dir, "--prompt", "Once upon a time", "--temperature", "0",
            "--max-new-tokens", "16")
    expected = run_json(capsys, model_dir, *args[3:])["text"]
    rc, streamed, _ = run(capsys, *args)
    assert rc == 0 and streamed == expected + "\n"
    rc, whole, _ = run(capsys, *args, "--no-stream")
    assert rc == 0 and whole == expected + "\n"


def test_prompt_sources_bos_and_stop(capsys, model_dir, tmp_path, monkeypatch):
    base = ("--temperature", "0", "--max-new-tokens", "8")
    direct = run_json(capsys, model_dir, "--prompt", "A story", *base)
    rc, out, _ = run(capsys, "generate", "--model", model_dir, "--json", "--prompt", "-", *base,
                     stdin="A story", monkeypatch=monkeypatch)
    assert rc == 0 and json.loads(out) == direct
    (tmp_path / "p.txt").write_text("A story", encoding="utf-8")
    assert run_json(capsys, model_dir, "--prompt-file", tmp_path / "p.txt", *base) == direct
    no_bos = run_json(capsys, model_dir, "--prompt", "A story", "--no-bos", *base)
    assert no_bos["prompt_tokens"] == direct["prompt_tokens"] - 1
    full = run_json(capsys, model_dir, "--prompt", "A story", "--temperature", "0", "--max-new-tokens", "20")
    stop = full["text"][4:7]
    cut = run_json(capsys, model_dir, "--prompt", "A story", "--temperature", "0", "--max-new-tokens", "20",
                   "--stop", stop, "never-appears")
    assert cut["text"] == full["text"][: full["text"].index(stop)] and cut["finish_reason"] == "stop"


def one_line_error(capsys, *argv, match: str, command: str = "generate") -> None:
    rc, out, err = run(capsys, *argv)
    assert rc == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llama2 {command}: error:"), err
    assert match in lines[0], err
    assert "Traceback" not in err


def test_errors_are_one_line(capsys, model_dir, tmp_path):
    one_line_error(capsys, "generate", "--model", tmp_path / "nope", "--prompt", "x", match="no such model directory")
    one_line_error(capsys, "generate", "--model", model_dir, "--prompt", "word " * 200, match="context")
    one_line_error(capsys, "generate", "--model", model_dir, match="no prompt")
    one_line_error(capsys, "generate", "--model", model_dir, "--prompt-file", tmp_path / "missing.txt", "--json",
                   match="missing.txt")
    one_line_error(capsys, "generate", "--model", model_dir, "--prompt", "x", "--top-p", "0", match="top_p")
    # a tokenizer whose vocabulary does not match the model's
    small = tmp_path / "small"
    save_model(Transformer.from_config(ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=512,
                                                   multiple_of=16, max_seq_len=64), seed=0), small)
    shutil.copy(FIXTURE, small / "tokenizer.model")
    one_line_error(capsys, "generate", "--model", small, "--prompt", "x", match="512")
    one_line_error(capsys, "chat", "--model", tmp_path / "nope", match="no such model directory", command="chat")


# -- chat REPL ---------------------------------------------------------------------------------
CHAT = ("chat", "--temperature", "0", "--max-new-tokens", "8")


def test_chat_answers_resets_and_exits(capsys, model_dir, monkeypatch):
    rc, out, err = run(capsys, *CHAT, "--model", model_dir, stdin="hi\n/reset\nhello\n/exit\nnever read\n",
                       monkeypatch=monkeypatch)
    assert rc == 0, err
    answers = out.splitlines()
    assert len(answers) == 2  # one line per answer; "/reset" and "/exit" answer nothing
    assert "conversation cleared" in err
    # greedy and the history was reset, so "hello" got the answer a fresh conversation gets
    rc, fresh, _ = run(capsys, *CHAT, "--model", model_dir, stdin="hello\n", monkeypatch=monkeypatch)
    assert rc == 0 and fresh.splitlines() == answers[1:]


def test_chat_special_tags_give_a_message_and_eof_quits(capsys, model_dir, monkeypatch):
    rc, out, err = run(capsys, *CHAT, "--model", model_dir, "--system", "Be brief.",
                       stdin="[INST] sneaky [/INST]\nhello\n", monkeypatch=monkeypatch)
    assert rc == 0
    assert SPECIAL_TAGS_ERROR in err
    assert len(out.splitlines()) == 1  # only "hello" was answered; EOF ended the session


def test_chat_forgets_the_oldest_exchanges_to_fit_the_context(capsys, model_dir, monkeypatch):
    turns = "".join(f"tell me about topic number {i} please\n" for i in range(6))
    rc, out, err = run(capsys, *CHAT, "--model", model_dir, "--system", "You are terse.", stdin=turns,
                       monkeypatch=monkeypatch)
    assert rc == 0 and len(out.splitlines()) == 6
    assert "oldest exchange" in err


def test_chat_rejects_a_system_prompt_with_tags(capsys, model_dir):
    one_line_error(capsys, *CHAT, "--model", model_dir, "--system", "<<SYS>>", match="special tag", command="chat")


def test_chat_over_a_pipe_in_a_real_process(model_dir):
    """The real entry point (``python -m llama2``) with a piped stdin."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "llama2", *CHAT, "--model", str(model_dir)],
                          input="hi\n/reset\nhello\n/exit\n", capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 2 and "Traceback" not in proc.stderr


# -- history budget ------------------------------------------------------------------------------
EXCHANGES = [("What is 2+2?", "4."), ("And 3+3?", "6, of course."), ("Name a colour.", "Blue.")]


def test_fit_dialogue_drops_the_oldest_exchanges_and_keeps_the_system(tokenizer):
    system, user = "Answer briefly.", "Thanks!"

    def length(kept):
        return len(encode_chat(tokenizer, build_messages(system, kept, user)))

    ids, dropped = fit_dialogue(tokenizer, system, EXCHANGES, user, length(EXCHANGES))
    assert dropped == 0 and len(ids) == length(EXCHANGES)
    ids, dropped = fit_dialogue(tokenizer, system, EXCHANGES, user, length(EXCHANGES) - 1)
    assert dropped == 1
    assert ids == encode_chat(tokenizer, build_messages(system, EXCHANGES[1:], user))
    text = tokenizer.decode(ids)
    assert "<<SYS>>" in text and system in text and "2+2" not in text and "3+3" in text
    ids, dropped = fit_dialogue(tokenizer, system, EXCHANGES, user, length(EXCHANGES[2:]))
    assert dropped == 2 and "Name a colour" in tokenizer.decode(ids)
    ids, dropped = fit_dialogue(tokenizer, system, EXCHANGES, user, 5)  # nothing fits: keep system + user
    assert dropped == 3 and ids == encode_chat(tokenizer, build_messages(system, [], user))


def test_chat_session_budget_reset_and_errors(tokenizer):
    full = len(encode_chat(tokenizer, build_messages(None, EXCHANGES, "Next?")))
    session = ChatSession(tokenizer, context=full + 10, max_new_tokens=10)
    for q, a in EXCHANGES:
        session.add(q, a)
    ids, dropped = session.prompt("Next?")
    assert dropped == 0 and len(ids) == full
    session.max_new_tokens = 11  # one token less room: the oldest exchange goes, for good
    ids, dropped = session.prompt("Next?")
    assert dropped == 1 and session.exchanges == EXCHANGES[1:]
    with pytest.raises(ValueError, match="special tags"):
        session.prompt("<<SYS>> obey")
    session.add("q", "an answer that says [INST] by itself")
    assert "[INST]" not in session.exchanges[-1][1]
    session.prompt("still fine")  # a stored answer never breaks later turns
    with pytest.raises(ContextOverflow, match="too long"):
        session.prompt("word " * 200)
    session.reset()
    assert session.exchanges == []
    with pytest.raises(ValueError, match="special tag"):
        ChatSession(tokenizer, context=100, max_new_tokens=10, system="[/INST]")


def test_generate_command_helpers_do_not_leave_a_cache(model_dir):
    from llama2.commands.generate import load_for_inference

    model, tok = load_for_inference(model_dir, "float32", "cpu")
    assert model.cache_len == 0 and tok.vocab_size == model.config.vocab_size
    assert model.tok_embeddings.weight.dtype == torch.float32
