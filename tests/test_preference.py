"""Preference data and the scalar reward head (§3.2.2)."""

import json

import pytest
import torch

from llama2.data.chat_data import DataError
from llama2.data.preference import collate_pairs, load_pairs, mix, parse_pair
from llama2.model.heads import ScalarModel

from .conftest import tiny_config


def _write(tmp_path, rows):
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_rows_with_prompt_or_messages_and_ratings_load(tmp_path):
    f = _write(tmp_path, [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "rating": "significantly_better"},
        {"messages": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "go away",
         "rating": "unsure", "safety": True, "margin": 0.5},
    ])
    a, b = load_pairs(f)
    assert a.messages == [{"role": "user", "content": "2+2?"}] and a.rating == "significantly_better"
    assert b.rating == "negligibly_better" and b.safety and b.margin == 0.5


@pytest.mark.parametrize("row,problem", [
    ({"chosen": "a", "rejected": "b", "rating": "better"}, "expected 'prompt' or 'messages'"),
    ({"prompt": "q", "chosen": "a", "rating": "better"}, "'rejected' must be a string"),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, "missing 'rating'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "rating": "way_better"}, "unknown rating"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "rating": "better", "margin": "big"}, "'margin' must be a number"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, problem):
    f = _write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b", "rating": "better"}, row])
    with pytest.raises(DataError, match=rf"pairs.jsonl:2: {problem}"):
        load_pairs(f)


def test_mixing_follows_the_paper():
    helpful = [parse_pair({"prompt": f"h{i}", "chosen": "a", "rejected": "b", "rating": "better"}) for i in range(50)]
    safety = [parse_pair({"prompt": f"s{i}", "chosen": "a", "rejected": "b", "rating": "better", "safety": True})
              for i in range(30)]
    h = mix(helpful, safety, "helpfulness")
    s = mix(helpful, safety, "safety")
    assert len(h) == 50 + 30 and sum(p.safety for p in h) == 30  # all helpful + an equal amount (capped) of safety
    assert len(s) == 30 + 3 and sum(p.safety for p in s) == 30   # all safety + 10% helpfulness


def test_chosen_and_rejected_share_one_batch_with_margins(llama_tokenizer):
    pairs = [parse_pair({"prompt": "2+2?", "chosen": "4", "rejected": "It is five.", "rating": "better"})]
    batch = collate_pairs(llama_tokenizer, pairs, "large", max_len=64)
    assert batch["tokens"].shape[0] == 2 and batch["margin"].tolist() == [2.0]
    chosen_len, rejected_len = batch["lengths"].tolist()
    assert batch["tokens"][0, chosen_len - 1] == llama_tokenizer.eos_id == batch["tokens"][1, rejected_len - 1]


def test_scalar_head_replaces_the_lm_head_and_keeps_the_trunk():
    from llama2 import Transformer

    lm = Transformer.from_config(tiny_config(), seed=0)
    rm = ScalarModel.from_language_model(lm)
    assert not hasattr(rm, "output") and rm.score.weight.shape == (1, 64)
    torch.testing.assert_close(rm.layers[0].attention.wq.weight, lm.layers[0].attention.wq.weight)
    x = torch.randint(0, 512, (2, 5))
    lengths = torch.tensor([5, 3])
    scores = rm.score_last(x, lengths)
    assert scores.shape == (2,)
    torch.testing.assert_close(scores[1], rm(x[1:, :3])[0, -1])


def test_transformers_sequence_classifier_gives_the_same_scores(tmp_path):
    from transformers import LlamaForSequenceClassification

    from llama2 import Transformer
    from llama2.checkpoint import save_model

    rm = ScalarModel.from_language_model(Transformer.from_config(tiny_config(), seed=0)).eval()
    save_model(rm, tmp_path, architecture="LlamaForSequenceClassification",
               extra_config={"num_labels": 1, "pad_token_id": 0})
    hf = LlamaForSequenceClassification.from_pretrained(tmp_path).eval()
    x = torch.randint(3, 512, (2, 7))
    x[1, 5:] = 0  # right padding with the pad id: transformers scores the last non-pad token
    with torch.no_grad():
        ours = rm.score_last(x, torch.tensor([7, 5]))
        theirs = hf(x).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
