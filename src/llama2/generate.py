"""Text generation with the KV cache: batched prompts of any lengths, sampling, stop strings, streaming.

Prompts of different lengths are left-padded into one batch. Each row's RoPE positions start
at 0 at its first real token and a mask hides the padding, so every row decodes exactly as
it would alone (Meta's generation.py instead forces prompt tokens step by step; padding lets
the whole batch prefill in one forward pass).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from llama2.model import Transformer
from llama2.model.matvec import MatVecMode

# Temperatures below this are greedy decoding, as in vLLM: dividing logits by a tiny
# temperature overflows them to inf (NaN probabilities below ~1e-38), and long before that the
# distribution is already one-hot in float32.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """Defaults are Meta's chat defaults (temperature 0.6, top-p 0.9); temperature 0 (or anything
    below ``GREEDY_BELOW``) = greedy."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    stop: Sequence[str] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    stop_at_eos: bool = True
    # Token ids that end a completion like EOS does, and likewise stay out of its text (vLLM's
    # name). Code Llama's infilling ends its middle with <EOT>, not EOS (Code Llama §2.3).
    stop_token_ids: Sequence[int] = ()

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # (NaN too)
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**63:  # what torch.Generator takes
            raise ValueError(f"seed must be in [0, 2^63), got {self.seed}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop_token_ids = tuple(self.stop_token_ids)
        bad = next((t for t in self.stop_token_ids if isinstance(t, bool) or not isinstance(t, int) or t < 0), None)
        if bad is not None:
            raise ValueError(f"stop_token_ids must be token ids (ints >= 0), got {bad!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def ends(self, token: int, eos_id: int) -> bool:
        """Whether sampling ``token`` ends the completion (EOS, unless ``stop_at_eos`` is off, or
        one of ``stop_token_ids``); the token is then not part of the text."""
        return (self.stop_at_eos and token == eos_id) or token in self.stop_token_ids


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (EOS, a stop token or a stop string) or "length"
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_tokens: int = 0


class ContextOverflow(ValueError):
    pass


def sample(logits: Tensor, temperature: float, top_p: float, top_k: int, generator=None) -> Tensor:
    """Pick the next token for each row of ``logits`` [B, V].

    ``generator`` is None (torch's global RNG), one ``torch.Generator`` for the whole batch, or a
    sequence of B generators, one per row: then row i's draw depends only on row i's logits and
    its generator, never on the other rows of the batch. A temperature below ``GREEDY_BELOW``
    is greedy.
    """
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    probs = torch.softmax(_tempered(logits, temperature, top_k), dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = _nucleus(probs, top_p)
    # Inverse-CDF sampling with one uniform per row: the row's own RNG when given one RNG per row,
    # else B draws from the one RNG (the same distribution as multinomial, one batched search).
    if isinstance(generator, (list, tuple)):
        if len(generator) != probs.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {probs.shape[0]} rows")
        u = torch.stack([torch.rand((), generator=g, device=probs.device) for g in generator])
    else:
        u = torch.rand(probs.shape[0], generator=generator, device=probs.device)
    choice = _inverse_cdf(probs, u)
    if order is not None:
        choice = order.gather(-1, choice)
    return choice.squeeze(-1)


def _tempered(logits: Tensor, temperature: float, top_k: int) -> Tensor:
    """Logits divided by the temperature, all but the ``top_k`` largest of each row at -inf (0: all kept)."""
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def _nucleus(probs: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """(probabilities sorted in descending order with everything past the nucleus zeroed, the sort
    order): the smallest prefix of the sorted distribution whose mass exceeds ``top_p`` is kept."""
    probs, order = probs.sort(dim=-1, descending=True)
    before = probs.cumsum(dim=-1) - probs
    return probs.masked_fill(before > top_p, 0.0), order


def _inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """Indices [B, 1]: where each row's uniform ``u`` falls in its (unnormalised) cumulative sum."""
    cdf = probs.double().cumsum(dim=-1)
    choice = torch.searchsorted(cdf, (u.double() * cdf[:, -1]).unsqueeze(-1), right=True)
    return choice.clamp_(max=probs.shape[-1] - 1)


def sampling_probs(logits: Tensor, temperature: float, top_p: float, top_k: int) -> Tensor:
    """The distribution ``sample`` draws from, over the whole vocabulary [B, V] (float32,
    rows summing to 1): temperature, then top-k, then the nucleus, renormalised. Greedy
    (a temperature below ``GREEDY_BELOW``) is the one-hot of the argmax. Speculative decoding
    needs it whole: its acceptance test compares two such distributions token by token."""
    if temperature < GREEDY_BELOW:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    probs = torch.softmax(_tempered(logits.float(), temperature, top_k), dim=-1)
    if top_p < 1.0:
        kept, order = _nucleus(probs, top_p)
        probs = torch.zeros_like(probs).scatter(-1, order, kept)
    return probs / probs.sum(dim=-1, keepdim=True)


def draw(probs: Tensor, generator=None) -> Tensor:
    """One token per row of ``probs`` [B, V] (any non-negative weights), by inverse CDF."""
    u = torch.rand(probs.shape[0], generator=generator, device=probs.device)
    return _inverse_cdf(probs, u).squeeze(-1)


def propose(forward_draft, feed: list[int], fed: int, k: int, greedy: bool, dist, rng=None
            ) -> tuple[list[int], list[Tensor], int]:
    """Speculative decoding's draft: ``k`` tokens proposed one at a time after feeding ``feed``
    at position ``fed`` (``forward_draft(tokens, start)`` -> float logits [T, V], writing the
    draft's cache). Returns the tokens, the distributions q they were drawn from (empty when
    greedy: only argmaxes are compared) and how many tokens the draft's cache now holds."""
    drafts, qs = [], []
    for _ in range(k):
        q_logits = forward_draft(feed, fed)[-1]
        fed += len(feed)
        if greedy:
            t = int(q_logits.argmax())
        else:
            qs.append(dist(q_logits.view(1, -1))[0])
            t = int(draw(qs[-1].view(1, -1), rng)[0])
        drafts.append(t)
        feed = [t]
    return drafts, qs, fed


def verify(rows: Tensor, drafts: list[int], qs: list[Tensor], greedy: bool, dist, rng=None) -> list[tuple[Tensor, int]]:
    """The model's verdict on ``drafts``: ``rows`` [k + 1, V] are its logits at each draft
    position and after the last. Returns (logits, token) for the accepted drafts plus one token
    of the model's own: the correction at the first rejection, or a bonus after all k.

    Draft token x ~ q is kept with probability min(1, p(x)/q(x)); at a rejection the token is
    drawn from max(0, p - q) renormalised, which makes every token distributed exactly as p
    (Leviathan et al. 2023, Theorem 1). Greedy: kept while it is p's argmax."""
    out: list[tuple[Tensor, int]] = []
    for j, t in enumerate(drafts):
        if greedy:
            ok = int(rows[j].argmax()) == t
        else:
            p = dist(rows[j].view(1, -1))[0]
            u = torch.rand((), generator=rng, device=rows.device)
            ok = bool(u * qs[j][t] <= p[t]) and bool(p[t] > 0)
        if ok:
            out.append((rows[j], t))
            continue
        if greedy:
            fix = int(rows[j].argmax())
        else:
            residual = (p - qs[j]).clamp(min=0)
            fix = int(draw((residual if residual.sum() > 0 else p).view(1, -1), rng)[0])
        out.append((rows[j], fix))
        return out
    last = rows[len(drafts)]
    out.append((last, int(last.argmax()) if greedy else int(draw(dist(last.view(1, -1)), rng)[0])))
    return out


# On a CPU, inductor inlines a pointwise expression into the loops that read it unless its body
# has more than this many ops (its CPU default: 50). The rotated query (RoPE, its cos/sin computed
# from the positions inside the step) has ~30, and attention written as loops
# (``model.matvec.attend``) reads it once per key slot: inlined, it was recomputed for every slot
# of the cache. At 8 it is computed once. Measured on the 110m, 2 threads (AMD EPYC), compiled
# decoding with the attention as loops: bf16 66.5 tokens/s at the default, 103-115 at 8 (SDPA
# instead: 76-88); int8 120-121 at 8 (SDPA: 76-97).
CPU_REALIZE_OPCOUNT = 8


def compile_options(device: torch.device) -> dict:
    """``torch.compile`` arguments for a decode step: CUDA graphs on a GPU (gpt-fast's recipe:
    batch-1 decoding there waits on kernel launches); on a CPU, inductor's threshold for computing
    an expression once instead of inlining it (:data:`CPU_REALIZE_OPCOUNT`)."""
    if device.type == "cuda":
        return {"mode": "reduce-overhead"}
    return {"options": {"realize_opcount_threshold": CPU_REALIZE_OPCOUNT}}


def last_logits(model: Transformer, tokens: Tensor, **kw) -> Tensor:
    """Float32 logits of the last position only (a prompt's other positions are never sampled,
    and projecting them to the vocabulary is the costliest part of a long prefill)."""
    if type(model).forward is Transformer.forward:
        return model.output(model.hidden_states(tokens, **kw)[:, -1]).float()
    return model(tokens, **kw)[:, -1].float()


def check_draft(model: Transformer, draft: Transformer, draft_tokens: int) -> None:
    """Refuse, in one line, a draft that cannot draft for ``model`` (speculative decoding)."""
    if draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary has {draft.config.vocab_size} tokens, the model's "
                         f"{model.config.vocab_size}: a draft must share the model's tokenizer")
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")


# A compiled decode step attends over the cache's first 128, 256, 512, ... slots (up to its
# capacity), the fewest that hold the newest token, under a mask: static shapes, one graph per
# bucket, and a short sequence does not read a whole cache of keys and values every step.
TIMELINE_BUCKET = 128


def timeline_buckets(capacity: int) -> list[int]:
    """The slot counts a compiled step over a cache of ``capacity`` slots attends over."""
    return sorted({min(TIMELINE_BUCKET << i, capacity) for i in range(max(1, capacity // TIMELINE_BUCKET).bit_length() + 1)})


def timeline_bucket(slot: int, capacity: int) -> int:
    """The fewest slots of :func:`timeline_buckets` that hold ``slot``."""
    return next(size for size in timeline_buckets(capacity) if size > slot)


_graphs = 0  # decode-step graphs announced in this process (allow_graphs)


def allow_graphs(n: int) -> None:
    """Make room in dynamo for ``n`` more graphs of compiled decode steps (one per shape bucket).
    Every compiled step of the process runs the same code (``compile_decode_step``'s wrapper, or
    one method of a class), and dynamo keeps at most ``recompile_limit`` graphs (8 by default) per
    code object; past it, with ``fullgraph``, the step fails."""
    global _graphs
    _graphs += n
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _graphs)


def compile_decode_step(fn, model: Transformer):
    """``torch.compile`` of a decode step ``fn`` that runs ``model``: static shapes, CUDA graphs on
    a GPU; on a CPU every product of a few rows traced as products and sums (``model.matvec``),
    which inductor compiles into loops that stream the weights at the memory's bandwidth."""
    device = model.tok_embeddings.weight.device
    traced = fn
    if device.type == "cpu":
        def traced(*args, **kwargs):
            with MatVecMode():
                return fn(*args, **kwargs)
    return torch.compile(traced, fullgraph=True, dynamic=False, **compile_options(device))


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    pads = torch.tensor([width - len(p) for p in prompts], device=device)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
    return tokens, pads


class Generator:
    """Decodes with a model and its tokenizer; ``generate`` for batches, ``stream`` for text deltas."""

    def __init__(self, model: Transformer, tokenizer=None, compile: bool = False, draft: Transformer | None = None,
                 draft_tokens: int = 4):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        # draft: a smaller model of the same vocabulary that proposes ``draft_tokens`` tokens at a
        # time for this one to check in one forward pass (speculative decoding: Leviathan et al.
        # 2023, Chen et al. 2023). Greedy output is the plain greedy output; sampled output has
        # exactly the plain distribution. One sequence at a time: batches decode row by row.
        if draft is not None:
            check_draft(model, draft, draft_tokens)
            if compile:
                raise ValueError("compile and a draft model cannot be combined yet (the verification step's "
                                 "shapes vary); drop one")
            draft.eval()
        self.draft, self.draft_tokens = draft, draft_tokens
        self.stats = {"drafted": 0, "accepted": 0, "rounds": 0}  # speculative decoding, over this object's life
        # compile=True: the one-token decode step is torch.compile'd with CUDA graphs (gpt-fast's
        # recipe). On a GPU, batch-1 decoding in eager mode waits on kernel launches, not memory;
        # a graph replays the whole step as one launch. The step then has static shapes: it
        # attends over a timeline bucket of the cache (its first 128, 256, ... slots) under a
        # mask instead of the filled prefix, one graph per bucket, and the cache
        # is kept between calls of the same (batch, length) so the graph is reused. Worth it on
        # a GPU for long answers; the first call of each shape pays for compilation.
        self.compile = compile
        self._step = None

    @property
    def max_seq_len(self) -> int:
        return self.model.config.max_seq_len

    def check_prompt(self, prompt: Sequence[int], max_new_tokens: int = 0) -> None:
        if not prompt:
            raise ValueError("prompt is empty: it needs at least one token (e.g. BOS)")
        if len(prompt) >= self.max_seq_len:
            raise ContextOverflow(
                f"prompt has {len(prompt)} tokens; the model's context is {self.max_seq_len} tokens"
            )
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {vocab})")

    def _row_generators(self, n: int, params: SamplingParams, seeds: Sequence[int] | None):
        """One RNG per row so a row's samples never depend on the rest of the batch: row i uses
        ``seeds[i]``, else ``params.seed + i``, else a seed drawn from torch's global RNG."""
        if params.temperature == 0:
            return None
        if seeds is None:
            if params.seed is not None:
                seeds = [params.seed + i for i in range(n)]
            else:
                seeds = torch.randint(0, 2**62, (n,)).tolist()
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} prompts")
        return [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def _last_logits(self, tokens: Tensor, **kw) -> Tensor:
        return last_logits(self.model, tokens, **kw)

    def _compiled_step(self):
        if self._step is None:
            self._step = compile_decode_step(self._last_logits, self.model)
        return self._step

    def _setup_cache(self, B: int, total: int) -> None:
        cache = self.model.layers[0].attention.cache
        if self.compile and cache is not None and (cache.k.shape[0], cache.k.shape[2]) == (B, total):
            return  # the compiled step's graph reads these very buffers: keep them
        self.model.setup_cache(B, total)
        if self.compile:  # new buffers: a graph per timeline bucket
            allow_graphs(len(timeline_buckets(total)))

    def steps(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """Yield (next tokens [B], their log-probs [B], full log-softmax [B, V] or None) per step.

        The full log-softmax is yielded only when ``params.top_logprobs`` asks for it.
        """
        # no_grad rather than inference_mode when compiled: CUDA graphs keep the cache buffers
        # across calls, and inference tensors may not be updated in place outside inference mode.
        with (torch.no_grad() if self.compile else torch.inference_mode()):
            if self.draft is None:
                yield from self._steps(prompts, params, seeds)
            elif len(prompts) != 1:
                raise ValueError(f"speculative decoding steps one prompt at a time, got {len(prompts)}")
            else:
                yield from self._speculative_steps(prompts[0], params, seeds)

    def _speculative_steps(self, prompt, params, seeds):
        """Speculative decoding of one prompt: per round the draft proposes up to K tokens
        (``propose``), the model scores all of them in one forward pass, and the longest prefix
        that passes the acceptance test is kept, plus one token from the model itself (``verify``).

        Both caches keep their slots past the accepted prefix: those hold rejected tokens, but
        the causal mask never reaches them before they are written again."""
        self.check_prompt(prompt)
        target, draft, K = self.model, self.draft, self.draft_tokens
        n_new = min(params.max_new_tokens, self.max_seq_len - len(prompt))
        if n_new <= 0:
            return
        if len(prompt) + n_new > draft.config.max_seq_len:
            raise ContextOverflow(f"prompt + new tokens = {len(prompt) + n_new} exceed the draft model's context "
                                  f"({draft.config.max_seq_len} tokens)")
        gens = self._row_generators(1, params, seeds)
        rng = gens[0] if gens else None
        greedy = params.greedy
        dev = self.device
        dist = functools.partial(sampling_probs, temperature=params.temperature, top_p=params.top_p,
                                 top_k=params.top_k)

        def forward(model, tokens: list[int], start: int) -> Tensor:  # float32 logits [T, V]
            x = torch.tensor([tokens], device=dev)
            return model(x, slots=torch.arange(start, start + len(tokens), device=dev))[0].float()

        def emit(logits_row: Tensor, token: int):
            logprobs = torch.log_softmax(logits_row, dim=-1)
            nxt = torch.tensor([token], device=dev)
            return nxt, logprobs[token].view(1), logprobs.view(1, -1) if params.top_logprobs else None

        def pick(logits_row: Tensor) -> int:
            if greedy:
                return int(logits_row.argmax())
            return int(draw(dist(logits_row.view(1, -1)), rng)[0])

        seq = list(prompt)
        total = len(prompt) + n_new
        target.setup_cache(1, total)
        draft.setup_cache(1, total)
        try:
            last = forward(target, seq, 0)[-1]
            t_fed, d_fed = len(seq), 0  # tokens of seq each cache holds
            token = pick(last)
            seq.append(token)
            yield emit(last, token)
            while len(seq) - len(prompt) < n_new:
                k = min(K, n_new - (len(seq) - len(prompt)) - 1)  # never draft past the last token asked for
                drafts, qs, d_fed = propose(functools.partial(forward, draft), seq[d_fed:], d_fed, k, greedy, dist, rng)
                rows = forward(target, seq[t_fed:] + drafts, t_fed)[-(k + 1):]
                self.stats["rounds"] += 1
                self.stats["drafted"] += k
                out = verify(rows, drafts, qs, greedy, dist, rng)
                self.stats["accepted"] += len(out) - 1  # the last is the model's own token
                for row, t in out:
                    seq.append(t)
                    yield emit(row, t)
                # The caches are right up to the last accepted draft; the newest token is unseen.
                t_fed = len(seq) - 1
                d_fed = min(d_fed, len(seq) - 1)
        finally:
            target.clear_cache()
            draft.clear_cache()

    def _steps(self, prompts, params, seeds):
        for p in prompts:
            self.check_prompt(p)
        B = len(prompts)
        tokens, pads = _left_pad(prompts, 0, self.device)
        width = tokens.shape[1]
        n_new = min(params.max_new_tokens, self.max_seq_len - width)
        if n_new <= 0:
            return
        gens = self._row_generators(B, params, seeds)
        total = width + n_new
        if self.compile:  # cache lengths in steps of 256, so a few graphs serve all lengths
            total = min(self.max_seq_len, -(-total // 256) * 256)
        self._setup_cache(B, total)
        # Everything the steps need is built once; each step slices views out of it.
        all_slots = torch.arange(total, device=self.device)
        keys = all_slots.view(1, 1, 1, -1)
        real = keys >= pads.view(B, 1, 1, 1)  # [B, 1, 1, total]: a row's padding is never attended to
        all_positions = (all_slots.unsqueeze(0) - pads.unsqueeze(1)).clamp(min=0)  # [B, total]
        # Prefill: real keys only, causally; a padding query may see itself so no softmax row is empty.
        # Without padding (one prompt, or prompts of one length) no mask: SDPA's fused causal kernels.
        slots = all_slots[:width]
        mask = None
        if any(len(p) != width for p in prompts):
            causal = keys[..., :width] <= slots.view(1, 1, -1, 1)
            mask = (real[..., :width] & causal) | torch.eye(width, dtype=torch.bool, device=self.device)
        try:
            logits = self._last_logits(tokens, positions=all_positions[:, :width], slots=slots, mask=mask)
            for step in range(n_new):
                logprobs = torch.log_softmax(logits, dim=-1)
                nxt = sample(logits, params.temperature, params.top_p, params.top_k, gens)
                full = logprobs if params.top_logprobs else None
                yield nxt, logprobs.gather(-1, nxt[:, None]).squeeze(-1), full
                if step == n_new - 1:
                    break
                slot = width + step
                if self.compile:  # static shapes: a timeline bucket of the cache, slots past this one masked
                    S = timeline_bucket(slot, total)
                    decode, mask = self._compiled_step(), real[..., :S] & (keys[..., :S] <= slot)
                else:
                    decode, mask = self._last_logits, real[..., : slot + 1]
                logits = decode(nxt.view(B, 1), positions=all_positions[:, slot: slot + 1],
                                slots=all_slots[slot: slot + 1], mask=mask)
        finally:
            if not self.compile:
                self.model.clear_cache()

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        """Complete each prompt (token ids). Rows stop independently at EOS / a stop token / a stop string.

        Sampling uses one RNG per row (``seeds[i]``, else ``params.seed + i``), so a row's
        completion is the same whatever else is in the batch: ``generate([a, b], seed=s)[1]``
        equals ``generate([b], seed=s + 1)[0]`` (up to float rounding of batched matmuls).
        ``tokens`` keep the token that completed a stop string; ``text`` is cut before it.
        """
        params = params or SamplingParams()
        if not prompts:
            return []
        if self.draft is not None and len(prompts) > 1:  # speculative decoding goes one prompt at a time
            if seeds is None and params.seed is not None:
                seeds = [params.seed + i for i in range(len(prompts))]
            return [self.generate([p], params, None if seeds is None else [seeds[i]])[0]
                    for i, p in enumerate(prompts)]
        outs = [Completion([], "", "length", prompt_tokens=len(p)) for p in prompts]
        done = [False] * len(prompts)
        eos = self.tokenizer.eos_id if self.tokenizer is not None else 2
        for nxt, lp, full in self.steps(prompts, params, seeds):
            for i, (t, logp) in enumerate(zip(nxt.tolist(), lp.tolist())):
                if done[i]:
                    continue
                out = outs[i]
                if params.ends(t, eos):
                    out.finish_reason, done[i] = "stop", True
                    continue
                out.tokens.append(t)
                if params.logprobs:
                    out.logprobs.append(logp)
                    if params.top_logprobs:
                        top = full[i].topk(params.top_logprobs)
                        out.top_logprobs.append(dict(zip(top.indices.tolist(), top.values.tolist())))
                if params.stop and self.tokenizer is not None:
                    text = self.tokenizer.decode(out.tokens)
                    if any(s in text for s in params.stop):
                        out.finish_reason, done[i] = "stop", True
            if all(done):
                break
        for out in outs:
            if self.tokenizer is not None:
                out.text = self.tokenizer.decode(out.tokens)
                if params.stop:
                    out.text = truncate_at_stop(out.text, params.stop)
        return outs

    def stream(self, prompt: Sequence[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion of one prompt as text deltas while it is decoded."""
        params = params or SamplingParams()
        tokens: list[int] = []
        sent = ""
        hold = max((len(s) for s in params.stop), default=1) - 1  # may be the start of a stop string
        for nxt, _, _ in self.steps([prompt], params):
            t = int(nxt[0])
            if params.ends(t, self.tokenizer.eos_id):
                break
            tokens.append(t)
            text = self.tokenizer.decode(tokens)
            if params.stop and any(s in text for s in params.stop):
                text = truncate_at_stop(text, params.stop)
                if len(text) > len(sent):
                    yield text[len(sent):]
                return
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence of byte pieces: wait for the rest
                continue
            ready = text[: len(text) - hold] if hold else text
            if len(ready) > len(sent) and ready.startswith(sent):
                yield ready[len(sent):]
                sent = ready
        text = self.tokenizer.decode(tokens)
        if len(text) > len(sent):
            yield text[len(sent):]


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text if cut < 0 else text[:cut]


@torch.inference_mode()
def prompt_logprobs(model: Transformer, ids: Sequence[int], top: int = 0) -> tuple[list[float], list[dict[int, float]]]:
    """Log-probability of each token given the ones before it (None-equivalent 0.0 for the first)."""
    x = torch.tensor([list(ids)], device=next(model.parameters()).device)
    logp = torch.log_softmax(model(x)[0].float(), dim=-1)
    chosen = logp[:-1].gather(-1, x[0, 1:, None]).squeeze(-1).tolist()
    tops: list[dict[int, float]] = []
    if top:
        values, indices = logp[:-1].topk(top, dim=-1)
        tops = [dict(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]
    return chosen, tops
