"""Chat format: the ids of Meta's chat_completion, validation, and the transformers chat template."""

import pytest

from llama2 import encode_chat
from llama2.chat import chat_segments

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def meta_reference(tok, dialog):
    """Meta's chat_completion prompt encoding, written out from the facts (§4)."""
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
    ids = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        ids += tok.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ", bos=True, eos=True)
    ids += tok.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True)
    return ids


DIALOGUES = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "  Hi there  "}],
    [
        {"role": "system", "content": "Be brief.\nVery brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": " It is 4. "},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
        {"role": "user", "content": "Thanks 🦙\n"},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b  "}, {"role": "user", "content": "日本語"}],
]


@pytest.mark.parametrize("dialog", DIALOGUES)
def test_ids_equal_metas_chat_completion(llama_tokenizer, dialog):
    assert encode_chat(llama_tokenizer, dialog) == meta_reference(llama_tokenizer, dialog)


def test_completed_exchanges_are_each_wrapped_in_bos_and_eos(llama_tokenizer):
    ids = encode_chat(llama_tokenizer, DIALOGUES[2])
    assert ids.count(1) == 3 and ids.count(2) == 2 and ids[0] == 1 and ids[-1] != 2


def test_segments_mark_exactly_the_answers(llama_tokenizer):
    segs = chat_segments(llama_tokenizer, DIALOGUES[2][:5], allow_final_assistant=True)
    answers = [llama_tokenizer.decode(s.ids) for s in segs if s.is_answer]
    assert answers == ["It is 4. ", "6 "]  # Meta keeps a space before EOS
    assert all(s.ids[-1] == 2 for s in segs if s.is_answer)  # the EOS belongs to the answer
    assert [i for s in segs for i in s.ids] == meta_reference(llama_tokenizer, DIALOGUES[2][:5] + [{"role": "user", "content": "x"}])[: sum(len(s.ids) for s in segs)]


@pytest.mark.parametrize(
    "dialog,message",
    [
        ([], "empty"),
        ([{"role": "assistant", "content": "hi"}], "expected 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must be from the user"),
        ([{"role": "robot", "content": "a"}], "unknown role"),
        ([{"role": "user", "content": "ignore [INST] this"}], "special tag"),
        ([{"role": "system", "content": "<<SYS>>"}, {"role": "user", "content": "x"}], "special tag"),
        ([{"role": "system", "content": "only a system prompt"}], "no user message"),
        ([{"role": "user"}], "'role' and 'content'"),
    ],
)
def test_invalid_dialogues_raise_a_clear_value_error(llama_tokenizer, dialog, message):
    with pytest.raises(ValueError, match=message):
        encode_chat(llama_tokenizer, dialog)


def test_saved_chat_template_gives_the_same_ids_in_transformers(llama_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from llama2 import Transformer, save_model

    from .conftest import tiny_config

    save_model(Transformer.from_config(tiny_config(vocab_size=32000), seed=0), tmp_path, tokenizer=llama_tokenizer)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    # transformers' tokenizers-based Llama tokenizer splits runs of spaces differently from
    # SentencePiece ("a  b"), so dialogues with inner double spaces are left out here.
    for dialog in [d for d in DIALOGUES if "  " not in "".join(m["content"] for m in d).strip()]:
        ids = hf.apply_chat_template(dialog, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        assert ids == encode_chat(llama_tokenizer, dialog)
