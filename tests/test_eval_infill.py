"""Infilling evaluation and the sandbox that runs the filled-in functions."""

import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

import llama2.eval.infill as infill
from llama2.eval.infill import decode_middle, format_infill, greedy_complete, infill_eval
from llama2.eval.sandbox import run_python

from .conftest import FIXTURE_TOKENIZER, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Task:
    name: str
    prefix: str
    middle: str
    suffix: str
    test: str


CLAMP = Task("clamp", "def clamp(x, lo, hi):\n    if x < lo:\n        return lo\n",
             "    if x > hi:\n        return hi\n", "    return x\n",
             "assert clamp(5, 0, 3) == 3\nassert clamp(-1, 0, 3) == 0\nassert clamp(2, 0, 3) == 2")
ADD = Task("add", "def add(a, b):\n    total = ", "a + b", "\n    return total\n", "assert add(2, 3) == 5")
TASKS = [CLAMP, ADD]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The Llama 2 vocabulary plus Code Llama's four infilling pieces."""
    from llama2.tokenizer import add_infilling_pieces

    return add_infilling_pieces(FIXTURE_TOKENIZER, tmp_path_factory.mktemp("fim") / "tokenizer.model")


@pytest.fixture
def model(tok):
    from llama2 import Transformer

    return Transformer.from_config(tiny_config(vocab_size=tok.vocab_size, max_seq_len=256), seed=0).eval()


def context_only():
    """Enough of a model for a rigged generator: only its context length is read."""
    return SimpleNamespace(config=SimpleNamespace(max_seq_len=1024))


def rig(monkeypatch, tok, middles: dict[str, str], seen: list | None = None):
    """Replace decoding: the prompt of each task is answered with ``middles[task name]`` then EOT."""
    from llama2.tokenizer import infill_tokens

    def fake(model, prompts, stop_ids, max_new_tokens, batch_size=16):
        assert tok.eot_id in stop_ids
        out = []
        for p in prompts:
            if seen is not None:
                seen.append(p)
            task = next(t for t in TASKS if p in (infill_tokens(tok, t.prefix, t.suffix),
                                                  infill_tokens(tok, t.prefix, t.suffix, suffix_first=True)))
            out.append((tok.encode_infilling(middles[task.name]), True))
        return out

    monkeypatch.setattr(infill, "greedy_complete", fake)


# ---- the sandbox ------------------------------------------------------------------------


def test_a_clean_program_passes():
    assert run_python("x = sorted([3, 1, 2])\nassert x == [1, 2, 3]\n") == (True, "ok")


def test_a_failing_assert_fails_with_its_message():
    passed, reason = run_python("assert 1 + 1 == 3, 'bad sum'\n")
    assert not passed and "AssertionError: bad sum" in reason


def test_an_infinite_loop_is_killed_at_the_time_limit():
    start = time.monotonic()
    passed, reason = run_python("while True:\n    pass\n", time_limit=1.0)
    assert not passed and "timeout" in reason
    assert time.monotonic() - start < 3.0


def test_a_memory_bomb_is_stopped():
    start = time.monotonic()
    passed, reason = run_python("x = bytearray(64 * 2**30)\n", time_limit=5.0, memory_mb=256)
    assert not passed and "MemoryError" in reason
    assert time.monotonic() - start < 4.0


def test_endless_output_is_stopped():
    passed, reason = run_python("while True:\n    print('x' * 1000)\n", time_limit=2.0)
    assert not passed and reason.startswith("output limit")


def test_a_program_runs_in_a_fresh_directory_that_is_removed_afterwards(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    passed, reason = run_python("import os\nopen('out.txt', 'w').write('x')\nraise SystemExit(os.getcwd())\n")
    assert not passed
    where = Path(reason.split(": ", 1)[1])
    assert where != tmp_path and not where.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_program_sees_none_of_the_callers_environment(monkeypatch):
    monkeypatch.setenv("LLAMA2_TEST_SECRET", "hunter2")
    assert run_python("import os\nassert 'LLAMA2_TEST_SECRET' not in os.environ\n").passed


def test_exiting_early_is_not_passing():
    passed, reason = run_python("import sys\nsys.exit(0)\nassert False\n")
    assert not passed and "exited before" in reason


# ---- decoding ---------------------------------------------------------------------------


def test_a_middle_decodes_with_its_leading_whitespace(tok):
    for text in ("    return a + b\n", " x", "a + b", "\n    y = 1\n"):
        assert decode_middle(tok, tok.encode_infilling(text)) == text


def test_greedy_decoding_stops_at_a_stop_token_and_drops_it(tok, model):
    prompt = tok.encode("def f(x):", bos=True)
    free = greedy_complete(model, [prompt], [], max_new_tokens=5)
    assert len(free[0][0]) == 5 and free[0][1] is False
    first = free[0][0][0]
    assert greedy_complete(model, [prompt], [first], max_new_tokens=5) == [([], True)]


def test_greedy_rows_do_not_depend_on_their_batch(tok, model):
    prompts = [tok.encode("def f(x):", bos=True), tok.encode("x = 1\nreturn", bos=True)]
    alone = [greedy_complete(model, [p], [], max_new_tokens=4)[0] for p in prompts]
    assert greedy_complete(model, prompts, [], max_new_tokens=4, batch_size=2) == alone


# ---- scoring ----------------------------------------------------------------------------


def test_the_right_middle_matches_and_passes(tok, monkeypatch):
    rig(monkeypatch, tok, {t.name: t.middle for t in TASKS})
    r = infill_eval(context_only(), tok, TASKS)
    assert (r["exact_rate"], r["exact_stripped_rate"], r["passed_rate"]) == (1.0, 1.0, 1.0)
    assert r["n"] == 2 and r["stopped_rate"] == 1.0 and r["mode"] == "PSM"


def test_a_wrong_middle_neither_matches_nor_passes(tok, monkeypatch):
    rig(monkeypatch, tok, {"clamp": "    if x > hi:\n        return lo\n", "add": "a - b"})
    r = infill_eval(context_only(), tok, TASKS)
    assert (r["exact"], r["passed"]) == (0, 0)
    assert all("AssertionError" in s["reason"] for s in r["samples"])


def test_a_different_middle_that_works_passes_without_matching(tok, monkeypatch):
    rig(monkeypatch, tok, {"clamp": "    if hi < x:\n        return hi\n", "add": "b + a"})
    r = infill_eval(context_only(), tok, TASKS)
    assert (r["exact_rate"], r["passed_rate"]) == (0.0, 1.0)


def test_a_middle_off_only_by_surrounding_whitespace_counts_as_stripped_match(tok, monkeypatch):
    rig(monkeypatch, tok, {"clamp": CLAMP.middle, "add": "a + b  "})
    r = infill_eval(context_only(), tok, TASKS)
    assert (r["exact"], r["exact_stripped"], r["passed"]) == (1, 2, 2)


def test_suffix_first_asks_with_the_spm_prompt(tok, monkeypatch):
    from llama2.tokenizer import infill_tokens

    seen: list = []
    rig(monkeypatch, tok, {t.name: t.middle for t in TASKS}, seen)
    r = infill_eval(context_only(), tok, TASKS, suffix_first=True)
    assert seen == [infill_tokens(tok, t.prefix, t.suffix, suffix_first=True) for t in TASKS]
    assert r["mode"] == "SPM" and r["passed_rate"] == 1.0


def test_a_tokenizer_without_infilling_pieces_is_refused(llama_tokenizer):
    with pytest.raises(ValueError, match="infilling"):
        infill_eval(context_only(), llama_tokenizer, TASKS)


def test_a_task_missing_a_field_is_refused(tok):
    @dataclass
    class NoTest:
        name: str = "t"
        prefix: str = "def f():\n"
        middle: str = "    return 1\n"
        suffix: str = ""

    with pytest.raises(ValueError, match="'test'"):
        infill_eval(context_only(), tok, [NoTest()])


def test_the_report_shows_each_mode_and_its_samples(tok, monkeypatch):
    rig(monkeypatch, tok, {t.name: t.middle for t in TASKS})
    text = format_infill([infill_eval(context_only(), tok, TASKS), infill_eval(context_only(), tok, TASKS, suffix_first=True)])
    assert "| PSM | 2 | 100.0% |" in text and "| SPM | 2 |" in text
    assert "`clamp`" in text


def test_a_tiny_random_model_runs_end_to_end(tok, model):
    r = infill_eval(model, tok, TASKS, max_new_tokens=8, time_limit=5.0)
    assert r["n"] == 2
    for k in ("exact_rate", "exact_stripped_rate", "passed_rate", "stopped_rate"):
        assert 0.0 <= r[k] <= 1.0
    assert [s["name"] for s in r["samples"]] == ["clamp", "add"]


def test_single_line_scores_the_first_line_the_model_wrote(tok, monkeypatch):
    one_line = Task("inc", "def inc(x):\n", "    result = x + 1\n", "    return result\n", "assert inc(2) == 3")
    TASKS.append(one_line)
    try:
        rig(monkeypatch, tok, {"inc": "    result = x + 1\n    ret"})  # ran on past the line's end
        assert infill_eval(context_only(), tok, [one_line])["passed"] == 0
        r = infill_eval(context_only(), tok, [one_line], single_line=True)
        assert (r["exact"], r["passed"], r["single_line"]) == (1, 1, True)
    finally:
        TASKS.remove(one_line)
