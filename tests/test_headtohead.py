"""``llama2 evaluate --model A --against B``: head-to-head win rates (the paper's Figure 1 / 12)
and the reward models' view (Figure 11)."""

import json
import math

import pytest

from llama2.data.world import World, is_refusal
from llama2.data.world.annotator import Judgement
from llama2.eval import headtohead
from llama2.eval.headtohead import (
    SPLITS,
    head_to_head,
    headtohead_prompts,
    outcome,
    wilson_interval,
    win_rates,
)

from .conftest import run_cli, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

Z = 1.959963984540054


# ---- a stand-in for the world's annotator (llama2.data.world.annotator), same API ---------


# The judgements are the annotator's own type (their overall verdict is Judgement.winner).
FakeJudgement = Judgement


class FakeAnnotator:
    """Right beats wrong (the world's checker), safe beats unsafe (an unsafe request refused);
    symmetric in a and b, deterministic."""

    def __init__(self, world):
        self.world = world

    def _item(self, messages):
        return self.world.resolve(messages)[0]

    def compare(self, messages, a, b):
        item = self._item(messages)
        if item is None:
            return None
        ra, rb = self.world.judge(messages, a), self.world.judge(messages, b)
        sa, sb = [not (item.kind == "unsafe" and not is_refusal(x)) for x in (a, b)]

        def verdict(x, y):
            return ("tie", None) if x == y else ("a", "better") if x else ("b", "better")

        h, hl = verdict(ra, rb)
        s, sl = verdict(sa, sb)
        return FakeJudgement(h, hl, s, sl, sa, sb, (f"right {ra}/{rb}", f"safe {sa}/{sb}"))

    def knowledge(self, messages):
        item = self._item(messages)
        if item is None:
            return None
        return "in" if len(item.prompt) % 2 == 0 else "out"

    def is_safety_prompt(self, messages):
        item = self._item(messages)
        return item is not None and item.kind != "task"


def real_annotator(world):
    from llama2.data.world.annotator import Annotator

    return Annotator(world)


ANNOTATORS = pytest.mark.parametrize("annotator", [FakeAnnotator, real_annotator], ids=["fake", "real"])


@pytest.fixture(scope="module")
def world():
    return World(0)


@pytest.fixture(scope="module")
def prompts(world):
    return headtohead_prompts(world, "test", max_items=2)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory, llama_tokenizer):
    """A second tiny random chat model (another seed) with the same vocabulary as chat_dir."""
    from llama2 import Transformer, save_model

    d = tmp_path_factory.mktemp("other")
    return save_model(Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=256), seed=1), d / "model",
                      tokenizer=llama_tokenizer)


@pytest.fixture(scope="module")
def models(chat_dir, other_dir):
    from llama2.checkpoint import load_model, load_tokenizer

    a, b = load_model(chat_dir), load_model(other_dir)
    return a, b, load_tokenizer(chat_dir, a.config.vocab_size)


# ---- statistics ---------------------------------------------------------------------------


def _on_wilson_boundary(p, k, n):
    """The Wilson interval's ends are the rates p where the score test is exactly at z:
    (k/n - p)^2 = z^2 p (1 - p) / n."""
    return (k / n - p) ** 2 == pytest.approx(Z * Z * p * (1 - p) / n, abs=1e-12)


def test_win_rates_count_the_outcomes_and_give_wilson_intervals_and_the_sign_test():
    r = win_rates(["win"] * 6 + ["tie"] * 3 + ["loss"])
    assert r["n"] == 10 and r["counts"] == {"win": 6, "tie": 3, "loss": 1}
    assert r["rates"] == {"win": 0.6, "tie": 0.3, "loss": 0.1}
    # 6 of 10: the textbook Wilson 95% interval is [0.3127, 0.8318]
    assert r["ci"]["win"] == pytest.approx([0.31267, 0.83182], abs=1e-5)
    for o, k in (("win", 6), ("tie", 3), ("loss", 1)):
        lo, hi = r["ci"][o]
        assert lo < k / 10 < hi
        assert _on_wilson_boundary(lo, k, 10) and _on_wilson_boundary(hi, k, 10)
    # sign test on 6 wins and 1 loss, ties dropped: 2 * P(X <= 1), X ~ Bin(7, 1/2) = 2 * 8 / 128
    assert r["sign_test_p"] == pytest.approx(0.125)


def test_wilson_intervals_at_the_edges_stay_inside_zero_and_one():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(Z * Z / (10 + Z * Z))  # 0.2775
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + Z * Z))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # the interval narrows about as 1/sqrt(n)
    w100, w400 = (math.fsum(x * s for x, s in zip(wilson_interval(k, n), (-1, 1)))
                  for k, n in ((50, 100), (200, 400)))
    assert w100 / w400 == pytest.approx(2, rel=0.02)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(11, 10)


def test_win_rates_of_no_outcomes_and_bad_outcomes():
    r = win_rates([])
    assert r["n"] == 0 and r["rates"]["win"] is None and r["ci"]["tie"] is None and r["sign_test_p"] == 1.0
    assert win_rates(["tie"] * 5)["sign_test_p"] == 1.0
    with pytest.raises(ValueError, match="draw"):
        win_rates(["win", "draw"])


def test_safety_prompts_are_decided_by_safety_then_helpfulness():
    j = FakeJudgement("b", "better", "a", "better", True, False, ())
    assert outcome(j, safety_prompt=True) == "win"  # safer wins though less helpful
    assert outcome(j, safety_prompt=False) == "loss"  # on a task only helpfulness counts
    tie = FakeJudgement("b", "slightly_better", "tie", None, True, True, ())
    assert outcome(tie, safety_prompt=True) == "loss"  # equally safe: the more helpful wins
    assert outcome(FakeJudgement("tie", None, "tie", None, True, True, ()), True) == "tie"


# ---- the comparison -----------------------------------------------------------------------


def test_the_prompts_are_held_out_and_cover_tasks_unsafe_look_alikes_and_system_prompts(world, prompts):
    ann = FakeAnnotator(world)
    kinds = {world.resolve(p)[0].kind for p in prompts}
    assert kinds == {"task", "unsafe", "benign"}
    assert any(p[0]["role"] == "system" for p in prompts)
    assert all(world.split_of(world.resolve(p)[0].prompt) == "test" for p in prompts)
    assert any(ann.is_safety_prompt(p) for p in prompts) and not all(ann.is_safety_prompt(p) for p in prompts)


@ANNOTATORS
def test_a_model_against_itself_ties_on_every_prompt_greedy_and_sampled(world, prompts, models, annotator):
    a, _, tok = models
    r = head_to_head(a, a, tok, world, annotator(world), prompts, sampled_answers=2, max_new_tokens=6)
    assert set(r["results"]) == {"greedy", "sampled"}
    g, s = r["results"]["greedy"]["all"], r["results"]["sampled"]["all"]
    assert g["n"] == len(prompts) and g["counts"] == {"win": 0, "tie": len(prompts), "loss": 0}
    # the sampled answers are seeded alike for A and B: the same model draws the same answers
    assert s["n"] == 2 * len(prompts) and s["counts"]["tie"] == s["n"]
    assert g["sign_test_p"] == 1.0
    assert r["annotator"]["greedy"]["a"] == r["annotator"]["greedy"]["b"]
    # two samples of one prompt differ from each other (they are samples, not the greedy answer twice)
    sampled = [p["a"] for p in r["pairs"] if p["mode"] == "sampled"]
    assert len(set(sampled)) > len(prompts)


@ANNOTATORS
def test_a_against_b_mirrors_b_against_a_and_has_every_split(world, prompts, models, annotator):
    a, b, tok = models
    ab = head_to_head(a, b, tok, world, annotator(world), prompts, sampled_answers=1, max_new_tokens=6)
    ba = head_to_head(b, a, tok, world, annotator(world), prompts, sampled_answers=1, max_new_tokens=6)
    for mode in ("greedy", "sampled"):
        assert set(ab["results"][mode]) == set(SPLITS)
        for split in SPLITS:
            x, y = ab["results"][mode][split], ba["results"][mode][split]
            assert (x["counts"]["win"], x["counts"]["tie"], x["counts"]["loss"]) == \
                (y["counts"]["loss"], y["counts"]["tie"], y["counts"]["win"])
            assert x["sign_test_p"] == y["sign_test_p"]
        assert ab["annotator"][mode]["a"] == ba["annotator"][mode]["b"]
        r = ab["results"][mode]
        assert r["helpfulness"]["n"] + r["safety"]["n"] == r["all"]["n"]
        assert r["in_knowledge"]["n"] + r["out_of_knowledge"]["n"] == r["all"]["n"]
    assert ab["unjudged"] == {"greedy": 0, "sampled": 0}
    text = headtohead.format_headtohead(ab)
    assert "out-of-knowledge" in text and "greedy" in text and "sampled x1" in text


def _scripted(world):
    """A stand-in for chat_generate_fn whose "models" are names: "oracle" gives the world's gold
    answer, "refuser" always refuses."""
    def make(model, tokenizer, max_new_tokens=64, batch_size=32, temperature=0.0, top_p=1.0):
        def generate(dialogues, seeds=None):
            if model == "oracle":
                return [world.reference_answer(d) for d in dialogues]
            return ["I can't help with that."] * len(dialogues)
        return generate
    return make


def test_an_oracle_beats_a_refuser_on_tasks_and_look_alikes_and_ties_on_unsafe_requests(world, prompts,
                                                                                      monkeypatch):
    monkeypatch.setattr(headtohead, "chat_generate_fn", _scripted(world))
    kinds = [world.resolve(p)[0].kind for p in prompts]
    ab = head_to_head("oracle", "refuser", None, world, FakeAnnotator(world), prompts, sampled_answers=2)
    ba = head_to_head("refuser", "oracle", None, world, FakeAnnotator(world), prompts, sampled_answers=2)
    real = head_to_head("oracle", "refuser", None, world, real_annotator(world), prompts, modes=("greedy",))
    # the world's annotator also prefers a refusal that points to help over a bare one (§4.2):
    # the oracle wins or ties every prompt, and wins every task and look-alike
    r = real["results"]["greedy"]
    assert r["all"]["counts"]["loss"] == 0 and r["helpfulness"]["counts"]["win"] == kinds.count("task")
    assert r["safety"]["counts"]["win"] >= kinds.count("benign")
    g = ab["results"]["greedy"]
    assert g["helpfulness"]["counts"] == {"win": kinds.count("task"), "tie": 0, "loss": 0}
    # both refuse an unsafe request (equally safe, equally right): a tie; refusing a look-alike loses
    assert g["safety"]["counts"] == {"win": kinds.count("benign"), "tie": kinds.count("unsafe"), "loss": 0}
    assert g["all"]["sign_test_p"] == pytest.approx(2 / 2 ** (len(prompts) - kinds.count("unsafe")))
    assert ab["results"]["sampled"]["all"]["n"] == 2 * len(prompts)
    assert ab["annotator"]["greedy"]["a"]["right"] == 1.0 and ab["annotator"]["greedy"]["b"]["safe"] == 1.0
    for mode in ("greedy", "sampled"):
        for split in SPLITS:
            x, y = ab["results"][mode][split]["counts"], ba["results"][mode][split]["counts"]
            assert (x["win"], x["tie"], x["loss"]) == (y["loss"], y["tie"], y["win"])


def test_prompts_the_annotator_does_not_know_are_left_out(world, models):
    a, _, tok = models
    r = head_to_head(a, a, tok, world, FakeAnnotator(world), [[{"role": "user", "content": "Not one of ours."}]],
                     modes=("greedy",), max_new_tokens=4)
    assert r["unjudged"] == {"greedy": 1} and r["results"]["greedy"]["all"]["n"] == 0
    with pytest.raises(ValueError, match="unknown modes"):
        head_to_head(a, a, tok, world, FakeAnnotator(world), [], modes=("beam",))


def test_the_reward_models_view_has_both_axes(world, prompts, models, chat_dir, tmp_path):
    from llama2.checkpoint import load_model, save_scalar_model
    from llama2.model.heads import ScalarModel
    from llama2.scoring import RewardScorer

    a, b, tok = models
    rm = save_scalar_model(ScalarModel.from_language_model(load_model(chat_dir)), tmp_path / "rm", tokenizer=tok)
    scorer = RewardScorer(str(rm))
    r = head_to_head(a, b, tok, world, FakeAnnotator(world), prompts, modes=("greedy",), max_new_tokens=6,
                     scorer=scorer)
    v = r["reward"]["greedy"]
    assert 0 < v["a"]["helpful"] < 1 and 0 < v["b"]["safety"] < 1
    ann = FakeAnnotator(world)
    n_safety = sum(ann.is_safety_prompt(p) for p in prompts)
    assert v["helpfulness"]["n"] == len(prompts) - n_safety and v["harmlessness"]["n"] == n_safety
    same = head_to_head(a, a, tok, world, FakeAnnotator(world), prompts, modes=("greedy",), max_new_tokens=6,
                        scorer=scorer)["reward"]["greedy"]
    assert same["helpfulness"]["counts"]["tie"] == same["helpfulness"]["n"]
    assert same["a"]["helpful"] == pytest.approx(same["b"]["helpful"])


# ---- the command line ---------------------------------------------------------------------


def test_evaluate_against_prints_one_json_object(capsys, chat_dir, other_dir):
    # the world's own annotator (llama2.data.world.annotator) judges
    rc, out, err = run_cli(capsys, "evaluate", "--model", chat_dir, "--against", other_dir, "--headtohead-items", 2,
                           "--max-new-tokens", 6, "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert {"prompts", "results", "annotator", "pairs", "unjudged", "model", "against"} <= set(r)
    assert set(r["results"]) == {"greedy", "sampled"} and r["sampled_answers"] == 1
    assert set(r["results"]["greedy"]) == set(SPLITS)
    assert set(r["results"]["greedy"]["all"]) == {"n", "counts", "rates", "ci", "sign_test_p"}
    assert r["results"]["greedy"]["all"]["n"] == r["prompts"] == len(headtohead_prompts(World(0), "test", 2))
    rc, out, err = run_cli(capsys, "evaluate", "--model", chat_dir, "--against", chat_dir, "--headtohead-items", 1,
                           "--max-new-tokens", 4, "--sampled-answers", 0)
    assert rc == 0, err
    assert "win / tie / loss" in out and "sampled" not in out
    assert "  all" in out and "100.0%" in out  # against itself: all ties


@pytest.mark.parametrize("extra, message", [
    (("--task", "t.yaml"), "cannot be combined with --task"),
    (("--perplexity", "t.txt"), "cannot be combined with --perplexity"),
    (("--sampled-answers", "-1"), "sampled_answers must be >= 0"),
])
def test_evaluate_against_errors_are_one_line(capsys, chat_dir, extra, message):
    rc, out, err = run_cli(capsys, "evaluate", "--model", chat_dir, "--against", chat_dir, *extra)
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1


def test_evaluate_against_needs_the_same_vocabulary(capsys, tmp_path, chat_dir, small_tokenizer):
    from llama2 import Transformer, save_model

    from .conftest import SMALL_VOCAB

    other = save_model(Transformer.from_config(tiny_config(vocab_size=SMALL_VOCAB), seed=0), tmp_path / "m",
                       tokenizer=small_tokenizer)
    rc, out, err = run_cli(capsys, "evaluate", "--model", chat_dir, "--against", other)
    assert rc == 1 and "do not share a tokenizer vocabulary" in err and len(err.strip().splitlines()) == 1
