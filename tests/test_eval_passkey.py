"""The passkey probe: where the key sits, how long the prompts are, and how answers are scored."""

import re
from types import SimpleNamespace

import pytest

import llama2.eval.passkey as passkey
from llama2.eval.passkey import (
    KEYS,
    format_passkey_table,
    passkey_documents,
    passkey_eval,
    passkey_examples,
    passkey_prompts,
    read_answer,
)

from .conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def model_with_context(n: int):
    """Enough of a model for evaluations whose generator is rigged: only its context length is read."""
    return SimpleNamespace(config=SimpleNamespace(max_seq_len=n))


def rig(monkeypatch, tok, answer):
    """Replace decoding: each prompt is answered with ``answer(prompt text)``."""
    def fake(model, prompts, stop_ids, max_new_tokens, batch_size=16):
        return [(tok.encode(answer(tok.decode(p))), True) for p in prompts]

    monkeypatch.setattr(passkey, "greedy_complete", fake)


@pytest.mark.parametrize("length", [128, 300, 1024])
def test_prompts_are_at_most_the_length_and_within_a_filler_line_of_it(llama_tokenizer, length):
    for p in passkey_prompts(llama_tokenizer, length, DEPTHS, n=2, seed=0):
        assert length - 16 < len(p.ids) <= length
        assert p.ids == llama_tokenizer.encode(p.text, bos=True)


def test_the_key_sits_at_the_requested_depth(llama_tokenizer):
    for p in passkey_prompts(llama_tokenizer, 1024, DEPTHS, n=2, seed=1):
        # the first prefix of the prompt whose text holds the whole key
        end = next(i for i in range(1, len(p.ids) + 1) if p.key in llama_tokenizer.decode(p.ids[:i]))
        assert abs(end / len(p.ids) - p.depth) <= 0.05, (p.depth, end, len(p.ids))
        assert p.key_position <= end <= p.key_position + 12


def keys_in(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", text) if w in KEYS]


def test_keys_are_64_words_the_fixed_lines_never_use():
    fixed = set(re.findall(r"[a-z]+", "\n".join([passkey.HEADER, passkey.KEY_LINE, passkey.QUESTION,
                                                   *passkey.FILLER]).lower()))
    assert len(set(KEYS)) == len(KEYS) == 64 and all(k.isalpha() and k.islower() for k in KEYS)
    assert not fixed & set(KEYS)


def test_the_key_is_the_only_key_word_and_the_prompt_ends_with_the_question(llama_tokenizer):
    for p in passkey_prompts(llama_tokenizer, 256, DEPTHS, n=3, seed=2):
        assert keys_in(p.text) == [p.key]
        assert p.text.endswith("# What is the passkey?\npasskey =")


def test_prompts_are_deterministic_per_seed(llama_tokenizer):
    a = passkey_prompts(llama_tokenizer, 200, DEPTHS, n=3, seed=7)
    b = passkey_prompts(llama_tokenizer, 200, DEPTHS, n=3, seed=7)
    c = passkey_prompts(llama_tokenizer, 200, DEPTHS, n=3, seed=8)
    assert [p.ids for p in a] == [p.ids for p in b]
    assert [p.key for p in a] != [p.key for p in c]


def test_a_cell_does_not_change_when_another_depth_is_added(llama_tokenizer):
    alone = passkey_prompts(llama_tokenizer, 200, [0.5], n=2, seed=0)
    among = passkey_prompts(llama_tokenizer, 200, [0.0, 0.5], n=2, seed=0)
    assert [p.ids for p in alone] == [p.ids for p in among if p.depth == 0.5]


def test_training_documents_have_the_probe_shape_with_the_answer(llama_tokenizer):
    docs = passkey_documents(512, 4, seed=0, tok=llama_tokenizer)
    assert len(docs) == 4
    for d in docs:
        key = keys_in(d)
        assert len(key) == 2 and key[0] == key[1]  # set once, answered once
        assert d.endswith(f"# What is the passkey?\npasskey = {key[0]}\n")
        assert 480 <= len(llama_tokenizer.encode(d, bos=True, eos=True)) <= 512


def test_training_documents_come_from_another_seed_space_than_the_probe(llama_tokenizer):
    probe = [p.key for p in passkey_prompts(llama_tokenizer, 256, [0.5], n=20, seed=0)]
    train = [keys_in(d)[0] for d in passkey_documents(256, 20, seed=0, tok=llama_tokenizer)]
    assert probe != train  # 64 keys: the same words recur, drawn by other streams
    assert passkey_documents(256, 3, 5, llama_tokenizer) == passkey_documents(256, 3, 5, llama_tokenizer)


def test_a_model_that_reads_the_key_scores_one_everywhere(llama_tokenizer, monkeypatch):
    rig(monkeypatch, llama_tokenizer, lambda text: " " + re.search(r"passkey = ([a-z]+)", text).group(1) + "\n")
    r = passkey_eval(model_with_context(1024), llama_tokenizer, [128, 512], DEPTHS, n_per_cell=2)
    assert [(c["length"], c["depth"]) for c in r["cells"]] == [(n, d) for n in (128, 512) for d in DEPTHS]
    assert all(c["accuracy"] == 1.0 and c["n"] == 2 for c in r["cells"])
    assert r["accuracy"] == 1.0


def test_a_model_that_answers_a_constant_scores_zero(llama_tokenizer, monkeypatch):
    rig(monkeypatch, llama_tokenizer, lambda text: " quokka")
    r = passkey_eval(model_with_context(1024), llama_tokenizer, [128], DEPTHS, n_per_cell=2)
    assert all(c["accuracy"] == 0.0 for c in r["cells"]) and r["accuracy"] == 0.0


def test_an_answer_counts_by_its_first_word():
    assert read_answer(" falcon\nassert x") == "falcon"
    assert read_answer(" falcons") == "falcons"  # a longer word is not the key
    assert read_answer(" 48213") is None


def test_a_length_past_the_models_context_is_refused(llama_tokenizer):
    with pytest.raises(ValueError, match="passkey length 1024"):
        passkey_eval(model_with_context(1024), llama_tokenizer, [1024], DEPTHS)


def test_bad_lengths_and_depths_are_refused(llama_tokenizer):
    with pytest.raises(ValueError, match="too short"):
        passkey_prompts(llama_tokenizer, 20, [0.5], n=1)
    with pytest.raises(ValueError, match="depth 1.5"):
        passkey_prompts(llama_tokenizer, 256, [1.5], n=1)


def test_the_table_is_a_depth_by_length_grid():
    result = {"cells": [{"length": n, "depth": d, "accuracy": a, "n": 2}
                        for n, a in ((256, 1.0), (1024, 0.5)) for d in (0.0, 1.0)]}
    lines = format_passkey_table(result).splitlines()
    assert lines[0] == "| depth \\ length | 256 | 1024 |"
    assert lines[2:] == ["| 0.00 | 100% | 50% |", "| 1.00 | 100% | 50% |"]


def test_a_tiny_random_model_runs_the_probe_end_to_end(llama_tokenizer):
    from llama2 import Transformer

    model = Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=256), seed=0).eval()
    r = passkey_eval(model, llama_tokenizer, [64, 128], [0.0, 1.0], n_per_cell=2, max_new_tokens=6)
    assert len(r["cells"]) == 4 and r["n"] == 8
    assert all(0.0 <= c["accuracy"] <= 1.0 for c in r["cells"])
    assert r["samples"] and all(s["key"] in KEYS for s in r["samples"])


def test_training_texts_too_short_for_the_tokenizer_say_their_length(llama_tokenizer):
    with pytest.raises(ValueError, match="passkey training texts of 40 tokens are too short for this tokenizer"):
        passkey_examples(40, 1, 0, llama_tokenizer)


def test_training_texts_are_exactly_their_length(llama_tokenizer):
    for length in (64, 100, 256):
        for prompt, answer in passkey_examples(length, 5, 0, llama_tokenizer):
            assert len(llama_tokenizer.encode(prompt + answer, bos=True, eos=True)) == length
