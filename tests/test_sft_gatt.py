"""SFT and Ghost Attention stages: data construction and short real runs on a tiny model."""

import json

import pytest

from llama2 import Transformer, load_model, save_model
from llama2.data.chat_data import IGNORE, tokenize_conversation
from llama2.train.gatt import gatt_example, with_instruction_everywhere

from .conftest import tiny_config

DIALOGUE = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "ARR! 2 + 3 IS 5."},
    {"role": "user", "content": "Capital of Peru?"},
    {"role": "assistant", "content": "ARR! THE CAPITAL OF PERU IS LIMA."},
    {"role": "user", "content": "Letters in cat?"},
    {"role": "assistant", "content": "ARR! CAT HAS 3 LETTERS."},
]


def test_sampling_view_writes_the_instruction_before_every_user_turn():
    view = with_instruction_everywhere(DIALOGUE, "Act as a pirate.")
    users = [m["content"] for m in view if m["role"] == "user"]
    assert all(u.startswith("Act as a pirate.\n") for u in users) and len(users) == 3
    assert not any(m["role"] == "system" for m in view)


def test_training_view_keeps_the_instruction_in_the_first_turn_only():
    view, loss_turn = gatt_example(DIALOGUE, "Act as a pirate.", upto=2)
    assert view[0] == {"role": "system", "content": "Act as a pirate."}
    assert [m["content"] for m in view[1:]] == [m["content"] for m in DIALOGUE[:4]]
    assert loss_turn == 1


def test_loss_is_zero_on_every_earlier_turn_including_answers(llama_tokenizer):
    view, loss_turn = gatt_example(DIALOGUE, "Act as a pirate.", upto=3)
    ex = tokenize_conversation(llama_tokenizer, view, loss_turns=[loss_turn])
    learned = [i for i, lab in zip(ex.ids, ex.labels) if lab != IGNORE]
    assert llama_tokenizer.decode(learned[:-1]) == "ARR! CAT HAS 3 LETTERS. "
    assert learned[-1] == llama_tokenizer.eos_id


@pytest.fixture
def base_model_dir(tmp_path, llama_tokenizer):
    model = Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=256), seed=0)
    return save_model(model, tmp_path / "base", tokenizer=llama_tokenizer)


def _run(argv):
    from llama2.cli import main

    return main(argv)


def test_sft_trains_on_answer_tokens_and_writes_a_model(tmp_path, base_model_dir):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": DIALOGUE[:2]}) + "\n" for _ in range(40)))
    out = tmp_path / "sft"
    rc = _run(["sft", "--model", str(base_model_dir), "--data", str(data), "--out", str(out), "--seq-len", "64",
               "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "3", "--lr", "1e-3",
               "--eval-every", "0", "--no-progress"])
    assert rc == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    load_model(out / "model")


def test_sft_derives_steps_from_epochs(tmp_path, base_model_dir):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(64)))
    out = tmp_path / "sft"
    _run(["sft", "--model", str(base_model_dir), "--data", str(data), "--out", str(out), "--seq-len", "32",
          "--packing", "--batch-size", "4", "--micro-batch-size", "4", "--epochs", "2", "--eval-every", "0"])
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 64 conversations of ~17 tokens pack two per 33-token row -> 32 rows -> 8 steps per epoch
    assert steps[-1] == 2 * (32 // 4)


def test_bad_sft_data_is_one_line_naming_file_and_line(tmp_path, base_model_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    rc = _run(["sft", "--model", str(base_model_dir), "--data", str(data), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "bad.jsonl:1:" in err and "Traceback" not in err


def test_sft_stops_when_seq_len_cuts_off_every_answer(tmp_path, base_model_dir, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": "word " * 60, "completion": "a"}) + "\n" for _ in range(4)))
    rc = _run(["sft", "--model", str(base_model_dir), "--data", str(data), "--out", str(tmp_path / "o"),
               "--seq-len", "16", "--eval-every", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "no training conversation has an answer token within seq_len=16" in err
    assert "Traceback" not in err


def test_gatt_samples_answers_with_the_model_and_fine_tunes(tmp_path, base_model_dir):
    data = tmp_path / "dialogues.jsonl"
    rows = [{"messages": DIALOGUE, "instruction": "Act as a pirate."}] * 8
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gatt"
    rc = _run(["gatt", "--model", str(base_model_dir), "--data", str(data), "--answers", "model", "--out", str(out),
               "--seq-len", "128", "--batch-size", "2", "--micro-batch-size", "2", "--max-steps", "2",
               "--max-new-tokens", "8", "--eval-every", "0"])
    assert rc == 0 and (out / "model" / "model.safetensors").is_file()
