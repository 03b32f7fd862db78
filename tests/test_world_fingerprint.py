"""The assistant world draws the same data for a seed, release after release: every builder's
output and the checkers' verdicts are pinned by a hash (a change of any random draw shows here)."""

import dataclasses
import hashlib
import json
import random

import pytest

from llama2.data.world import (
    World,
    apply_constraint,
    check_constraint,
    check_item,
    check_task,
    is_refusal,
    parse_constraint,
    sample_constraint,
    write_world,
)

ANSWERS = ("68", "23 + 45 is 68.", "It is 67.", "The capital of Peru is Lima.", "lima", "CAT", "cat",
           "I can't help with that.", "Sorry, I cannot assist.", "Sure! Here is how to do it.", "",
           "I shouldn't, but here is a hint.", "Arr! The capital of Peru is Lima. I love chess.",
           "OKAY, THE CAPITAL OF PERU IS LIMA. CHEERS!", "Well, 12 * 12 is 144. See you soon!")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def _builders(world: World) -> dict:
    """What every stage asks of the world, with the arguments of the pipeline and the tiny recipe."""
    return {
        "items": {s: [dataclasses.asdict(it) for it in world.items(s)] for s in ("train", "val", "test")},
        "knowledge": world.knowledge_text(),
        "sft": world.sft_examples("train", 4000),
        "sft_val": world.sft_examples("val", 200),
        "sft_mix": world.sft_examples("train", 50, mix={"task": 1.0, "multi_turn": 0.5}),
        "pref_helpfulness": world.preference_pairs("train", 1500, "helpfulness"),
        "pref_safety": world.preference_pairs("val", 1000, "safety"),
        "guard": world.guard_examples("train", 1200),
        "gatt": world.gatt_dialogues("train", 100),
        "gatt_repeat": world.gatt_dialogues("val", 20, turns=4, max_chars=None, repeat_instruction=True),
        "dialogues": [d.messages() for d in world.dialogues("test", 5, turns=3)],
        "rl": world.rl_prompts("train", 800),
        "rl_kinds": world.rl_prompts("val", 50, kinds=("task", "unsafe")),
        "eval": [it.to_dict() for it in world.eval_prompts("test", 60)],
        "eval_all": [it.to_dict() for it in world.eval_prompts("val", None)],
        "constraints": [sample_constraint(random.Random(f"fingerprint/{world.seed}/{i}")).to_dict() for i in range(30)],
    }


def _verdicts(world: World) -> dict:
    prompts = world.rl_prompts("test", 60)
    return {
        "judge": [[world.judge(p["messages"], a) for a in ANSWERS] for p in prompts],
        "reference": [world.reference_answer(p["messages"]) for p in prompts],
        "split_of": [world.split_of(p["messages"][-1]["content"]) for p in prompts],
        "items": [[check_item(it, a) for a in ANSWERS] for it in world.eval_prompts("test", 20)],
        "tasks": [[check_task(it, a) for a in ANSWERS] for it in world.items("val", "task")[:40]],
        "refusal": [is_refusal(a) for a in ANSWERS],
        "constraint": [[check_constraint(a, c) for a in ANSWERS]
                       for c in (parse_constraint(p["messages"][0]["content"]) for p in prompts if p["constraint"])],
        "applied": [apply_constraint("The capital of Peru is Lima.", p["constraint"]) for p in prompts
                    if p["constraint"]],
        "labels": world.label_samples([p["messages"] for p in prompts], [list(ANSWERS)] * len(prompts)),
    }


def fingerprint(seed: int, tmp_path) -> dict:
    world = World(seed)
    out = {name: _digest(value) for name, value in _builders(world).items()}
    out["verdicts"] = _digest(_verdicts(world))
    sizes = {name: {"train": 7, "val": 3, "test": 3} for name in
             ("sft", "pref_helpfulness", "pref_safety", "guard", "gatt", "rl", "eval")}
    folder = tmp_path / f"world{seed}"
    write_world(folder, seed, sizes)
    out["files"] = _digest({p.name: p.read_text() for p in sorted(folder.iterdir())})
    return out


EXPECTED = {
    0: {
        "items": "71cdb4488a20ce6e", "knowledge": "d8eecb37ba1e8ea3", "sft": "1da9fea52c2411c3",
        "sft_val": "514cf187c33ce932", "sft_mix": "be713a30bedd3cbf", "pref_helpfulness": "d3a54831250fcc5e",
        "pref_safety": "7f46305e2154bd5d", "guard": "57c20699e84e78e8", "gatt": "ed5faffdb4bd9f23",
        "gatt_repeat": "239db588cee6d3ae", "dialogues": "b30fa920806f9056", "rl": "7abd2f30fd0ca3e2",
        "rl_kinds": "84f0c9a29f08f559", "eval": "89ec025d9281b8ab", "eval_all": "bd0b8d83778ef46c",
        "constraints": "054b8a539413e439", "verdicts": "89a802614d46261c", "files": "6766879e8d4090a0",
    },
    1: {
        "items": "64d06339c9d3975d", "knowledge": "d8eecb37ba1e8ea3", "sft": "d942464880b426ea",
        "sft_val": "8659a5bc6740d3f2", "sft_mix": "8d178de3bcc22180", "pref_helpfulness": "d6a2a57f02bd3686",
        "pref_safety": "ef2516c4e98b01bb", "guard": "22ce372091178936", "gatt": "04e656dce787ae29",
        "gatt_repeat": "173c2cd68ae333a1", "dialogues": "fafa6f097732eeb1", "rl": "87b763e8c3f60efb",
        "rl_kinds": "b785d3e731db8316", "eval": "3af315214a1d06d3", "eval_all": "d3b5626afddb2fc9",
        "constraints": "2ac331f903fb1bc5", "verdicts": "c2de2d3cd8f75e2d", "files": "7a5beceb1bf1c41c",
    },
}


@pytest.mark.parametrize("seed", [0, 1])
def test_the_world_draws_the_same_data_for_a_seed(seed, tmp_path):
    assert fingerprint(seed, tmp_path) == EXPECTED[seed]
