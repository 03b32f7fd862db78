"""Speculative decoding (a draft model proposes, the model verifies): greedy output equal to plain
greedy decoding, sampled output distributed exactly as plain sampling (Leviathan et al. 2023)."""

import pytest
import torch

from llama2 import ModelConfig, Transformer
from llama2.generate import Generator, SamplingParams, sampling_probs

from .conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    return Transformer.from_config(tiny_config(), seed=0).eval()


@pytest.fixture(scope="module")
def draft():
    return Transformer.from_config(tiny_config(dim=32, n_layers=1, n_heads=2, n_kv_heads=1), seed=1).eval()


PROMPTS = ([1, 5, 9], [1, 100, 200, 300, 7], [1] + list(range(20, 60)))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_tokens_equal_plain_greedy_decoding(target, draft, k):
    plain, spec = Generator(target), Generator(target, draft=draft, draft_tokens=k)
    params = SamplingParams(temperature=0, max_new_tokens=30, logprobs=True)
    for prompt in PROMPTS:
        a, b = plain.generate([prompt], params)[0], spec.generate([prompt], params)[0]
        assert b.tokens == a.tokens
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
    assert spec.stats["rounds"] > 0


def test_the_model_as_its_own_draft_has_every_token_accepted(target):
    spec = Generator(target, draft=target, draft_tokens=4)
    out = spec.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=21))[0]
    assert len(out.tokens) == 21
    # 1 token from the prefill, then 4 rounds of 4 accepted drafts + 1 bonus token.
    assert spec.stats == {"drafted": 16, "accepted": 16, "rounds": 4}


def test_stops_at_max_new_tokens_and_at_the_context(target, draft):
    spec = Generator(target, draft=draft, draft_tokens=5)
    for n in (1, 2, 3, 7):
        assert len(spec.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=n))[0].tokens) == n
    long = list(range(1, 120))  # 128-token context: room for 9
    out = spec.generate([long], SamplingParams(temperature=0, max_new_tokens=50))[0]
    assert len(out.tokens) == 9 and out.tokens == Generator(target).generate(
        [long], SamplingParams(temperature=0, max_new_tokens=50))[0].tokens


def test_a_batch_is_decoded_row_by_row_with_each_rows_seed(target, draft):
    spec = Generator(target, draft=draft, draft_tokens=3)
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=12, seed=7)
    both = spec.generate(list(PROMPTS[:2]), params)
    assert both[1].tokens == spec.generate([PROMPTS[1]], SamplingParams(
        temperature=0.8, top_p=0.95, max_new_tokens=12, seed=8))[0].tokens


def test_streaming_with_a_draft_gives_the_generated_text(target, draft):
    class Tok:  # ids as text, enough for stream()'s bookkeeping
        eos_id = 2

        def decode(self, ids):
            return " ".join(map(str, ids))

    spec = Generator(target, Tok(), draft=draft, draft_tokens=3)
    params = SamplingParams(temperature=0, max_new_tokens=15, stop_at_eos=False)
    assert "".join(spec.stream(PROMPTS[0], params)) == Tok().decode(
        Generator(target).generate([PROMPTS[0]], params)[0].tokens)


def test_a_draft_with_another_vocabulary_is_refused(target):
    other = Transformer.from_config(tiny_config(vocab_size=600), seed=2)
    with pytest.raises(ValueError, match="vocabulary has 600 tokens, the model's 512"):
        Generator(target, draft=other)
    with pytest.raises(ValueError, match="draft_tokens must be >= 1"):
        Generator(target, draft=target, draft_tokens=0)
    with pytest.raises(ValueError, match="compile and a draft"):
        Generator(target, draft=target, compile=True)


# ---- sampling: the emitted tokens follow the model's distribution, not the draft's -----------

VOCAB = 12


def peaked(seed: int) -> Transformer:
    """A tiny model whose next-token distributions are far from uniform (random init gives near-
    uniform ones, which any draft would match)."""
    m = Transformer.from_config(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=VOCAB,
                                            multiple_of=16, max_seq_len=32), seed=seed).eval()
    with torch.no_grad():
        m.output.weight.mul_(5)
    return m


def marginals(model: Transformer, prompt: list[int], params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact distributions of the 2nd and 3rd sampled tokens (summing over the tokens before)."""
    def probs(seqs):
        with torch.no_grad():
            return sampling_probs(model(torch.tensor(seqs))[:, -1], params.temperature, params.top_p, params.top_k)

    p1 = probs([prompt])[0]                                                       # [V]
    p2 = probs([prompt + [a] for a in range(VOCAB)])                              # [V(t1), V]
    p3 = probs([prompt + [a, b] for a in range(VOCAB) for b in range(VOCAB)]).view(VOCAB, VOCAB, VOCAB)
    second = p1 @ p2
    third = torch.einsum("a,ab,abc->c", p1, p2, p3)
    return second, third


def chi2_pvalue(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    from scipy.stats import chi2
    n = counts.sum()
    expected = expected_probs.double() * n
    big = expected >= 5  # cells expected fewer than 5 times are pooled into one
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] < 1e-9:
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    return float(chi2.sf(stat, len(obs) - 1))


def test_sampled_tokens_follow_the_models_distribution_not_the_drafts():
    target, draft = peaked(10), peaked(11)
    prompt = [1, 4]
    params = SamplingParams(temperature=0.9, top_p=0.95)
    spec = Generator(target, draft=draft, draft_tokens=2)  # tokens 2 and 3: the first round's drafts
    n = 2500
    seconds, thirds = torch.zeros(VOCAB), torch.zeros(VOCAB)
    for seed in range(n):
        toks = spec.generate([prompt], SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=4,
                                                      stop_at_eos=False, seed=seed))[0].tokens
        seconds[toks[1]] += 1
        thirds[toks[2]] += 1
    want2, want3 = marginals(target, prompt, params)
    draft2, draft3 = marginals(draft, prompt, params)
    # The draft is a different model (far apart: the test can tell them), it was often wrong and
    # often right, and the tokens that came out are the model's.
    assert 0.1 < spec.stats["accepted"] / spec.stats["drafted"] < 0.9
    assert (want2 - draft2).abs().sum() > 0.2
    assert chi2_pvalue(seconds, want2) > 1e-3 and chi2_pvalue(thirds, want3) > 1e-3
    assert chi2_pvalue(seconds, draft2) < 1e-6


# ---- the command line: --draft-model / --draft-tokens ----------------------------------------

def test_generate_with_a_draft_model_prints_the_same_greedy_text(capsys, model_dirs):
    import json

    from .conftest import run_cli

    big, small = model_dirs
    args = ("generate", "--model", big, "--prompt", "Hello there", "--max-new-tokens", "20", "--temperature", "0",
            "--json")
    rc, plain, _ = run_cli(capsys, *args)
    rc2, spec, err = run_cli(capsys, *args, "--draft-model", small, "--draft-tokens", "3")
    assert rc == rc2 == 0
    assert json.loads(spec)["tokens"] == json.loads(plain)["tokens"]
    assert "drafted tokens accepted" in err


def test_draft_flags_are_refused_in_one_line(capsys, model_dirs, tmp_path):
    from llama2 import Tokenizer, save_model
    from llama2.tokenizer import train_tokenizer

    from .conftest import run_cli

    big, small = model_dirs
    rc, _, err = run_cli(capsys, "generate", "--model", big, "--prompt", "Hi", "--draft-tokens", "2")
    assert rc != 0 and "--draft-tokens needs --draft-model" in err and "Traceback" not in err
    text = tmp_path / "t.txt"
    text.write_text("a small corpus of words for a tokenizer with another vocabulary " * 50)
    train_tokenizer([text], tmp_path / "tok", vocab_size=300, verbose=False)
    other = save_model(Transformer.from_config(tiny_config(vocab_size=300), seed=3), tmp_path / "other",
                       tokenizer=Tokenizer(tmp_path / "tok" / "tokenizer.model"))
    rc, _, err = run_cli(capsys, "generate", "--model", big, "--prompt", "Hi", "--draft-model", other)
    assert rc != 0 and "a draft must share the model's tokenizer" in err and len(err.strip().splitlines()) == 1


def test_chat_with_a_draft_model_answers(capsys, model_dirs, monkeypatch):
    from .conftest import run_cli

    big, small = model_dirs
    base = ("chat", "--model", big, "--temperature", "0", "--max-new-tokens", "12")
    rc, plain, _ = run_cli(capsys, *base, stdin="Hello\n", monkeypatch=monkeypatch)
    rc2, spec, _ = run_cli(capsys, *base, "--draft-model", small, stdin="Hello\n", monkeypatch=monkeypatch)
    assert rc == rc2 == 0 and spec == plain and plain.strip()
