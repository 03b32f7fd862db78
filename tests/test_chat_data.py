"""SFT data: answer-only loss labels, packing that keeps conversations apart, validation errors."""

import json

import pytest
import torch

from llama2.data.chat_data import IGNORE, DataError, collate, load_conversations, pack, tokenize_conversation

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42."},
    {"role": "user", "content": "Reverse the word llama."},
    {"role": "assistant", "content": "amall"},
]


def test_loss_covers_exactly_the_answers_and_their_eos(llama_tokenizer):
    tok = llama_tokenizer
    ex = tokenize_conversation(tok, CONVERSATION)
    learned = [i for i, lab in zip(ex.ids, ex.labels) if lab != IGNORE]
    cut = learned.index(tok.eos_id)
    assert tok.decode(learned[:cut]) == "12 + 30 = 42. " and learned[cut + 1 :][-1] == tok.eos_id
    assert tok.decode(learned[cut + 1 : -1]) == "amall "
    # the learned spans end right where Meta's per-exchange encoding ends each answer
    prompt_only = tok.encode("[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nWhat is 12 + 30? [/INST]", bos=True)
    assert ex.ids[: len(prompt_only)] == prompt_only and ex.labels[: len(prompt_only)] == [IGNORE] * len(prompt_only)
    assert ex.labels[len(prompt_only)] != IGNORE
    assert all(lab == i for i, lab in zip(ex.ids, ex.labels) if lab != IGNORE)
    # nothing of the system prompt or user turns, and no BOS, is learned
    assert ex.labels[0] == IGNORE and learned.count(tok.bos_id) == 0


def test_loss_turns_restrict_the_loss_to_chosen_exchanges(llama_tokenizer):
    ex = tokenize_conversation(llama_tokenizer, CONVERSATION, loss_turns=[1])
    learned = [i for i, lab in zip(ex.ids, ex.labels) if lab != IGNORE]
    assert llama_tokenizer.decode(learned[:-1]) == "amall "


def test_prompt_completion_rows_are_accepted(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "completion": "hello"}) + "\n\n")
    assert load_conversations(f) == [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]


@pytest.mark.parametrize(
    "line,problem",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"text": "x"}', "expected 'messages' or 'prompt' \\+ 'completion'"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "assistant's answer"),
        ('{"messages": [{"role": "bot", "content": "q"}]}', "unknown role"),
        ('{"messages": [{"role": "user", "content": "[INST]"}, {"role": "assistant", "content": "a"}]}', "special tag"),
    ],
)
def test_invalid_rows_name_file_line_and_problem(tmp_path, line, problem):
    f = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    f.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{problem}"):
        load_conversations(f)


def test_packing_fills_sequences_and_truncates_only_overlong_examples():
    from llama2.data.chat_data import Example

    exs = [Example([1] * n, [5] * n) for n in (4, 5, 3, 20)]
    packs, truncated = pack(exs, seq_len=9)
    assert [len(p.ids) for p in packs] == [9, 3, 10]
    assert truncated == 1
    assert all(len(p.ids) <= 10 for p in packs)
    assert packs[0].doc == [0] * 4 + [1] * 5


def _model():
    from llama2 import Transformer

    from .conftest import tiny_config

    return Transformer.from_config(tiny_config(vocab_size=32000), seed=0)


def test_packed_conversations_neither_attend_to_nor_learn_from_each_other(llama_tokenizer):
    a = tokenize_conversation(llama_tokenizer, CONVERSATION)
    b = tokenize_conversation(llama_tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    seq_len = len(a) + len(b) + 5
    packed = collate(pack([a, b], seq_len)[0], seq_len)
    alone = collate(pack([a], seq_len)[0], seq_len)
    model = _model()

    def loss_a(batch):
        logits = model(batch["tokens"], positions=batch["positions"], mask=batch["mask"])
        n = len(a) - 1
        return torch.nn.functional.cross_entropy(logits[0, :n], batch["labels"][0, :n], ignore_index=IGNORE)

    assert packed["tokens"].shape == (1, seq_len)
    with torch.no_grad():
        torch.testing.assert_close(loss_a(packed), loss_a(alone))
    # the boundary target (first token of b, a BOS in a prompt) is never learned
    assert packed["labels"][0, len(a) - 1] == IGNORE
    # gradients of b's loss do not flow through a's tokens' representations: perturbing b leaves a's logits unchanged
    with torch.no_grad():
        before = model(packed["tokens"], positions=packed["positions"], mask=packed["mask"])[0, : len(a)]
        tokens = packed["tokens"].clone()
        tokens[0, len(a):] = 7
        after = model(tokens, positions=packed["positions"], mask=packed["mask"])[0, : len(a)]
    torch.testing.assert_close(before, after)


def test_positions_restart_at_each_conversation():
    from llama2.data.chat_data import Example

    batch = collate(pack([Example([1, 2, 3], [IGNORE] * 3), Example([1, 4], [IGNORE] * 2)], 8)[0], 8)
    assert batch["positions"][0, :5].tolist() == [0, 1, 2, 0, 1]
