"""Decoding with the KV cache: agreement with transformers and with full recomputation, batching,
sampling (temperature / top-k / top-p), seeds, stopping, logprobs and streaming.

Tiny random float32 models; the real Llama 2 tokenizer only where text matters.
"""

from __future__ import annotations

import pytest
import torch

from llama2 import Generator, ModelConfig, SamplingParams, Transformer, save_model
from llama2.generate import ContextOverflow, prompt_logprobs, sample

from .conftest import FIXTURE_TOKENIZER as FIXTURE
from .conftest import tiny_config

# Tiny models gain nothing from threads, and a busy machine makes them much slower.
pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 2
PROMPTS = [[1, 5, 77, 300, 12], [1, 400], [1, 9, 8, 7, 6, 5, 4, 3, 200, 100, 50]]


def make_model(vocab_size: int = 512, seed: int = 0, **overrides) -> Transformer:
    cfg = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=16, max_seq_len=64)
    return Transformer.from_config(ModelConfig(**{**cfg, **overrides}), seed=seed).eval()


class IdTokenizer:
    """Decodes each id as "<id>": stop strings and streaming without SentencePiece's subtleties."""

    def __init__(self, eos_id: int = EOS):
        self.eos_id = eos_id

    def decode(self, ids) -> str:
        return "".join(f"<{int(i)}>" for i in ids)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return make_model()


@pytest.fixture(scope="module")
def gen(model) -> Generator:
    return Generator(model, IdTokenizer())


@pytest.fixture(scope="module")
def real_tokenizer():
    from llama2 import Tokenizer

    return Tokenizer(FIXTURE)


@pytest.fixture(scope="module")
def text_gen(real_tokenizer) -> Generator:
    """A tiny random model over the real 32,000-piece vocabulary."""
    return Generator(make_model(vocab_size=32000, dim=32, n_heads=4, n_kv_heads=2, max_seq_len=96), real_tokenizer)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, **kw)


def full_logprobs(model: Transformer, ids: list[int]) -> torch.Tensor:
    """log_softmax of the next-token logits after ``ids``, by a plain forward pass (no cache)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0, -1], dim=-1)


# -- agreement with transformers and with recomputation ------------------------------------
def test_greedy_matches_transformers_generate(model, gen, tmp_path):
    from transformers import GenerationConfig, LlamaForCausalLM

    save_model(model, tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    n = 24
    config = GenerationConfig(do_sample=False, max_new_tokens=n, bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    for prompt, ours in zip(PROMPTS, gen.generate(PROMPTS, greedy(n))):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, len(prompt):]
        theirs = out.tolist()
        if EOS in theirs:
            theirs = theirs[: theirs.index(EOS)]
        assert ours.tokens == theirs
        assert len(theirs) >= 10  # the comparison covered real decoding steps


def test_cached_decoding_matches_full_recomputation(model, gen):
    """Every step's distribution (left-padded batch, KV cache) equals a fresh forward of the row."""
    params = greedy(12, top_logprobs=1, stop_at_eos=False)
    tokens = [list(p) for p in PROMPTS]
    for nxt, lp, full in gen.steps(PROMPTS, params):
        for i, row in enumerate(tokens):
            expected = full_logprobs(model, row)
            assert torch.allclose(full[i], expected, atol=1e-4)
            assert lp[i].item() == pytest.approx(expected[nxt[i]].item(), abs=1e-4)
            row.append(int(nxt[i]))


def test_cache_logits_match_model_forward(model):
    """The model's cache interface on its own: prefill + one-token steps == one full forward."""
    ids = torch.tensor([[1, 17, 230, 45, 99, 3, 500, 8, 64]])
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(1, 16)
        try:
            pieces = [model(ids[:, :4], slots=torch.arange(4))]
            for t in range(4, ids.shape[1]):
                pieces.append(model(ids[:, t: t + 1], slots=torch.tensor([t])))
        finally:
            model.clear_cache()
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-4)


def test_batched_prompts_each_equal_generating_alone_greedy(gen):
    batch = gen.generate(PROMPTS, greedy(16))
    for prompt, together in zip(PROMPTS, batch):
        alone = gen.generate([prompt], greedy(16))[0]
        assert together.tokens == alone.tokens
        assert together.finish_reason == alone.finish_reason


def test_batched_sampling_is_independent_of_the_batch(gen):
    """Row i samples with its own RNG seeded ``seed + i``: the same as that prompt alone."""
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=16, seed=123)
    batch = gen.generate(PROMPTS, params)
    for i, prompt in enumerate(PROMPTS):
        alone = gen.generate([prompt], SamplingParams(**{**vars(params), "seed": 123 + i}))[0]
        assert batch[i].tokens == alone.tokens
    explicit = gen.generate(PROMPTS[::-1], params, seeds=[125, 124, 123])
    assert [c.tokens for c in explicit] == [c.tokens for c in batch[::-1]]


def test_identical_prompts_in_one_batch_get_different_samples(gen):
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=0, stop_at_eos=False)
    a, b = gen.generate([PROMPTS[0], PROMPTS[0]], params)
    assert a.tokens != b.tokens


# -- sampling -------------------------------------------------------------------------------
def draws(logits, n=4000, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    rows = torch.as_tensor(logits, dtype=torch.float32).expand(n, -1)
    return sample(rows, kw.pop("temperature", 1.0), kw.pop("top_p", 1.0), kw.pop("top_k", 0), g)


def test_temperature_zero_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(1))
    best = logits.argmax(-1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, 0.0, 0.9, 0), best)
    assert torch.equal(sample(logits, 1.0, 1.0, 1, g), best)
    assert torch.equal(sample(logits, 1.5, 1e-6, 0, g), best)


def test_nucleus_keeps_the_smallest_prefix_whose_mass_exceeds_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    for p, kept in [(0.49, {0}), (0.51, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2}), (0.96, {0, 1, 2, 3})]:
        assert set(draws(logits, top_p=p).tolist()) == kept, p
    # the kept tokens are renormalised: 0.5 / 0.8 and 0.3 / 0.8
    freq = torch.bincount(draws(logits, top_p=0.79), minlength=4).float() / 4000
    assert freq[0].item() == pytest.approx(0.625, abs=0.04)
    assert freq[1].item() == pytest.approx(0.375, abs=0.04)


def test_top_k_and_temperature():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    assert set(draws(logits, top_k=2).tolist()) == {0, 1}
    assert set(draws(logits).tolist()) == {0, 1, 2, 3, 4}
    for t in (0.5, 2.0):
        freq = torch.bincount(draws(logits, temperature=t), minlength=5).float() / 4000
        assert torch.allclose(freq, torch.softmax(logits / t, -1), atol=0.04)


def test_per_row_generators_make_rows_independent():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    together = sample(logits, 1.0, 0.9, 0, gens(7, 8, 9))
    alone = sample(logits[2:], 1.0, 0.9, 0, gens(9))
    assert together[2] == alone[0]
    with pytest.raises(ValueError, match="generators"):
        sample(logits, 1.0, 0.9, 0, gens(1))


def test_per_row_generators_draw_from_the_same_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).expand(4000, -1)
    gens = [torch.Generator().manual_seed(s) for s in range(4000)]
    freq = torch.bincount(sample(logits, 1.0, 1.0, 0, gens), minlength=5).float() / 4000
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.03)
    assert set(sample(logits, 1.0, 1.0, 2, gens).tolist()) == {0, 1}  # filtered tokens are never drawn


def test_sampling_params_are_validated():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(max_new_tokens=-1),
                dict(seed=-1), dict(seed=2**64), dict(temperature=float("nan"))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_seed_reproducibility(gen):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=5, stop_at_eos=False)
    a, b = gen.generate([PROMPTS[0]], params)[0], gen.generate([PROMPTS[0]], params)[0]
    assert a.tokens == b.tokens
    other = gen.generate([PROMPTS[0]], SamplingParams(**{**vars(params), "seed": 6}))[0]
    assert other.tokens != a.tokens
    # without a seed, torch's global RNG decides (so torch.manual_seed reproduces a run)
    unseeded = SamplingParams(temperature=1.0, max_new_tokens=12, stop_at_eos=False)
    torch.manual_seed(0)
    c = gen.generate([PROMPTS[0]], unseeded)[0]
    torch.manual_seed(0)
    assert gen.generate([PROMPTS[0]], unseeded)[0].tokens == c.tokens


# -- stopping ---------------------------------------------------------------------------------
def test_stops_at_eos_without_emitting_it(model):
    reference = Generator(model, IdTokenizer(eos_id=-1)).generate([PROMPTS[0]], greedy(20))[0].tokens
    k = next(i for i in range(3, 20) if reference[i] not in reference[:i])
    out = Generator(model, IdTokenizer(eos_id=reference[k])).generate([PROMPTS[0]], greedy(20))[0]
    assert out.tokens == reference[:k] and out.finish_reason == "stop"
    ignored = Generator(model, IdTokenizer(eos_id=reference[k])).generate(
        [PROMPTS[0]], greedy(20, stop_at_eos=False))[0]
    assert ignored.tokens == reference and ignored.finish_reason == "length"


def test_stop_strings_cut_the_text_before_the_stop(gen):
    reference = gen.generate([PROMPTS[2]], greedy(20, stop_at_eos=False))[0]
    k = next(i for i in range(3, 20) if reference.tokens[i] not in reference.tokens[:i])
    stop = f"<{reference.tokens[k]}>"
    out = gen.generate([PROMPTS[2]], greedy(20, stop=[stop, "never"], stop_at_eos=False))[0]
    assert out.finish_reason == "stop"
    assert out.text == reference.text[: reference.text.index(stop)]
    assert out.tokens == reference.tokens[: k + 1]  # the token that completed the stop string is kept
    # a stop string spanning two tokens, starting in the middle of one
    two = f"{reference.tokens[k]}><{reference.tokens[k + 1]}"
    assert gen.generate([PROMPTS[2]], greedy(20, stop=two, stop_at_eos=False))[0].text == \
        reference.text[: reference.text.index(two)]


def test_stop_string_in_real_text(text_gen, real_tokenizer):
    prompt = real_tokenizer.encode("Once upon a time", bos=True)
    full = text_gen.generate([prompt], greedy(30, stop_at_eos=False))[0]
    assert len(full.text) > 10
    stop = full.text[6:9]
    out = text_gen.generate([prompt], greedy(30, stop=[stop], stop_at_eos=False))[0]
    assert out.text == full.text[: full.text.index(stop)] and out.finish_reason == "stop"


def test_max_new_tokens_and_the_context_limit(gen, model):
    out = gen.generate([PROMPTS[0]], greedy(7, stop_at_eos=False))[0]
    assert len(out.tokens) == 7 and out.finish_reason == "length" and out.prompt_tokens == len(PROMPTS[0])
    assert gen.generate([PROMPTS[0]], greedy(0))[0].tokens == []
    ctx = model.config.max_seq_len
    near_full = [1] + [7] * (ctx - 4)  # room for exactly 3 more tokens
    assert len(gen.generate([near_full], greedy(50, stop_at_eos=False))[0].tokens) == 3


def test_context_overflow_and_bad_prompts_are_clear_errors(gen, model):
    ctx = model.config.max_seq_len
    with pytest.raises(ContextOverflow, match=f"{ctx} tokens"):
        gen.generate([[1] * ctx], greedy(5))
    with pytest.raises(ValueError, match="empty"):
        gen.generate([[]], greedy(5))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.generate([[1, model.config.vocab_size]], greedy(5))
    assert model.cache_len == 0  # nothing left allocated after an error


# -- logprobs -----------------------------------------------------------------------------------
def test_logprobs_equal_log_softmax_of_the_full_forward(model, gen):
    for params in (greedy(10, logprobs=True, top_logprobs=3, stop_at_eos=False),
                   SamplingParams(temperature=0.8, max_new_tokens=10, seed=1, logprobs=True, stop_at_eos=False)):
        out = gen.generate([PROMPTS[1]], params)[0]
        with torch.no_grad():
            logits = model(torch.tensor([PROMPTS[1] + out.tokens]))[0]
        expected = torch.log_softmax(logits, -1)[len(PROMPTS[1]) - 1: -1]
        chosen = expected.gather(-1, torch.tensor(out.tokens)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(out.logprobs), chosen, atol=1e-4)
        for step, top in enumerate(out.top_logprobs):
            values, ids = expected[step].topk(3)
            assert list(top) == ids.tolist()
            assert torch.allclose(torch.tensor(list(top.values())), values, atol=1e-4)


def test_prompt_logprobs_equal_a_direct_computation(model):
    ids = [1, 44, 300, 7, 7, 120, 5]
    chosen, tops = prompt_logprobs(model, ids, top=2)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
    assert len(chosen) == len(ids) - 1 and len(tops) == len(ids) - 1
    for t in range(1, len(ids)):
        assert chosen[t - 1] == pytest.approx(logp[t - 1, ids[t]].item(), abs=1e-5)
        values, best = logp[t - 1].topk(2)
        assert list(tops[t - 1]) == best.tolist()


# -- streaming ------------------------------------------------------------------------------------
def test_stream_deltas_concatenate_to_the_generated_text(gen):
    for params in (greedy(16, stop_at_eos=False), SamplingParams(temperature=1.0, max_new_tokens=16, seed=3)):
        deltas = list(gen.stream(PROMPTS[0], params))
        assert "".join(deltas) == gen.generate([PROMPTS[0]], params)[0].text
        assert len(deltas) > 1


def test_stream_with_stop_strings_never_leaks_the_stop(gen):
    reference = gen.generate([PROMPTS[2]], greedy(20, stop_at_eos=False))[0]
    stop = f"{reference.tokens[6]}><{reference.tokens[7]}"
    params = greedy(20, stop=[stop], stop_at_eos=False)
    deltas = list(gen.stream(PROMPTS[2], params))
    assert "".join(deltas) == gen.generate([PROMPTS[2]], params)[0].text
    assert all(stop not in "".join(deltas[: i + 1]) for i in range(len(deltas)))


def test_stream_real_text_with_byte_pieces(text_gen, real_tokenizer):
    """Random pieces include <0xNN> bytes; deltas still add up to the decoded completion."""
    prompt = real_tokenizer.encode("Héllo wörld, 你好", bos=True)
    for seed in range(3):
        params = SamplingParams(temperature=1.5, top_p=1.0, max_new_tokens=32, seed=seed, stop=["\n\n"])
        streamed = "".join(text_gen.stream(prompt, params))
        assert streamed == text_gen.generate([prompt], params)[0].text


@pytest.mark.slow
def test_compiled_decode_step_gives_the_eager_tokens_and_reuses_its_cache(model):
    # Generator(compile=True) decodes through one torch.compile'd static-shape step (CUDA graphs
    # on a GPU; tests/test_cuda.py checks that). Same greedy and seeded tokens as eager decoding,
    # for a second batch of other prompts too, whose cache length falls in the same bucket.
    eager, compiled = Generator(model), Generator(model, compile=True)
    greedy = SamplingParams(temperature=0, max_new_tokens=10, stop_at_eos=False)
    seeded = SamplingParams(temperature=1.0, max_new_tokens=10, stop_at_eos=False, seed=5)
    for prompts, params in (([[1, 5, 9, 33], [1, 7, 8, 100, 200, 3]], greedy),
                            ([[1, 50, 60], [1, 2, 3, 4, 5, 6, 7]], seeded)):
        expected = [o.tokens for o in eager.generate(prompts, params)]
        assert [o.tokens for o in compiled.generate(prompts, params)] == expected
        cache = model.layers[0].attention.cache  # kept for the next call: its graph reads it
        assert cache is not None and cache.k.shape[2] == min(256, model.config.max_seq_len)
    model.clear_cache()


def test_the_compiled_step_replays_cuda_graphs_on_a_gpu_only():
    from llama2.generate import compile_options

    assert compile_options(torch.device("cuda")) == {"mode": "reduce-overhead"}
    assert compile_options(torch.device("cpu")) == {"options": {"realize_opcount_threshold": 8}}


@pytest.mark.slow
def test_compiled_bfloat16_decoding_on_cpu_gives_the_eager_tokens():
    # The compiled step sums its products in float32 (model/matvec.py): other roundings than
    # eager bf16's, so the log-probs agree to bf16's precision and the greedy tokens exactly
    # (a model with peaked logits, so no near-tie decides a token).
    model = Transformer.from_config(tiny_config(max_seq_len=128), seed=0).eval().bfloat16()
    with torch.no_grad():
        model.output.weight.mul_(8)
    eager, compiled = Generator(model), Generator(model, compile=True)
    params = SamplingParams(temperature=0, max_new_tokens=20, stop_at_eos=False, logprobs=True)
    prompts = [[1, 5, 9, 33], [1, 7, 8, 100, 200, 3]]
    a, b = eager.generate(prompts, params), compiled.generate(prompts, params)
    assert [o.tokens for o in b] == [o.tokens for o in a]
    for x, y in zip(a, b):
        assert y.logprobs == pytest.approx(x.logprobs, abs=0.1)
    model.clear_cache()
