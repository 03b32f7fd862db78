"""The assistant world draws the same data for a seed, release after release: every builder's
output and the checkers' and annotator's verdicts are pinned by a hash (a change of any random
draw shows here)."""

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
        "annotator": [[_judgement(world.annotator.compare(p["messages"], a, b)) for a, b in zip(ANSWERS, ANSWERS[1:])]
                      for p in prompts],
        "knowledge": [world.knowledge(p["messages"]) for p in prompts],
        "annotated": world.annotate_samples([p["messages"] for p in prompts], [list(ANSWERS[:8])] * len(prompts)),
    }


def _judgement(j) -> list:
    return [j.helpfulness, j.helpfulness_level, j.safety, j.safety_level, j.safe_a, j.safe_b, list(j.reasons)]


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
        "items": "39f3fb4cb0318ca9", "knowledge": "d8eecb37ba1e8ea3", "sft": "914984443005223a",
        "sft_val": "3564dabf03d51a20", "sft_mix": "c311dfbcf9e7ceb3", "pref_helpfulness": "d3a54831250fcc5e",
        "pref_safety": "29fd750cc1331df4", "guard": "6a84f3e8d74b5e94", "gatt": "ed5faffdb4bd9f23",
        "gatt_repeat": "239db588cee6d3ae", "dialogues": "b30fa920806f9056", "rl": "7abd2f30fd0ca3e2",
        "rl_kinds": "84f0c9a29f08f559", "eval": "a19e9d5c8e0affa4", "eval_all": "ab64b6b46501bba4",
        "constraints": "054b8a539413e439", "verdicts": "d1fbc0f8ea9ffc99", "files": "62bdb48edd8f1fcb",
    },
    1: {
        "items": "3eed61d4f3dfe12d", "knowledge": "d8eecb37ba1e8ea3", "sft": "839a0ce3e1b61941",
        "sft_val": "94b0cf4b2c1fe2d6", "sft_mix": "a35f09f929e87c57", "pref_helpfulness": "d6a2a57f02bd3686",
        "pref_safety": "be9e3a0f7d016cf0", "guard": "7ea4af323fbd62ba", "gatt": "04e656dce787ae29",
        "gatt_repeat": "173c2cd68ae333a1", "dialogues": "fafa6f097732eeb1", "rl": "87b763e8c3f60efb",
        "rl_kinds": "b785d3e731db8316", "eval": "108f4aeba7609516", "eval_all": "e6b282eeb68f368a",
        "constraints": "2ac331f903fb1bc5", "verdicts": "cef6184f748321d6", "files": "db82faa1f5acf544",
    },
}


@pytest.mark.parametrize("seed", [0, 1])
def test_the_world_draws_the_same_data_for_a_seed(seed, tmp_path):
    assert fingerprint(seed, tmp_path) == EXPECTED[seed]
