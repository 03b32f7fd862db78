"""Continuous batching: concurrent requests decoded together, one forward pass per step.

Picture the KV cache as a table with one row per running sequence (``max_batch_size`` rows)
and one column per *slot* of a timeline shared by all rows. Each decode step writes one
new column, at the ``cursor``, for every row at once — so the model's cache interface
(``slots`` shared across the batch) is used as it is. A row's tokens sit in the slots
``[start, cursor)``; its RoPE positions count from its own ``start`` and its mask hides
everything left of it, so each row decodes as if it were alone.

* **Join.** Between two steps, waiting requests take the free rows: their prompts are
  prefilled together into the slots just left of the cursor, ``[cursor - len, cursor)``,
  and from then on they decode in lock-step with the others. (When the cursor is closer
  to the left edge than a prompt is long, the whole table first shifts right.)
* **Chunked prefill.** A prompt longer than ``prefill_chunk`` tokens that arrives while
  others decode is prefilled ``prefill_chunk`` tokens per step, with a decode step of the
  running rows after each chunk, so a long prompt does not freeze the running streams
  (vLLM's and Sarathi's chunked prefill). Until its last chunk it is staged in the free rows
  just past the running ones, at slots ``[0, len)``; then it is moved to its place left of
  the cursor and joins. With nothing running the whole prompt goes in one forward.
* **Leave.** A sequence that finishes or whose client went away is dropped at the next
  step boundary: the last row moves into its place, so the running rows are always
  ``0 .. n-1`` and every forward pass covers exactly them.
* **Compact.** Once the oldest running row starts past the middle of the used part of
  the timeline, everything shifts left, so attention never spans much dead space. No
  sequence needs more than ``max_seq_len`` slots, so a full timeline can always be
  compacted (see ``_make_room``).

**Speculative decoding.** With a ``draft`` model, a stream that decodes alone (nothing else
running or waiting) is decoded in rounds: the draft proposes ``draft_tokens`` tokens, the model
checks them in one forward at the cursor and keeps the accepted ones plus one of its own
(``llama2.generate.propose`` / ``verify``, as ``Generator`` does). The draft keeps its own cache
of that one stream and catches up on whatever was decoded while it was batched.

The engine runs in one background thread (``start``); requests are submitted from the
asyncio event loop (``submit``) and their text comes back through a ``Handle``. A bounded
waiting queue turns overload into ``QueueFull`` (the server answers 503).

**Failures stay with the request that caused them.** Whatever goes wrong while setting up
one row (its prompt, its RNG seed), computing its prompt log-probs or sampling its next token
fails that row alone: its handle gets an ``EngineError`` and every other row keeps decoding.
A failed prefill forward fails only the requests joining in it (their rows were never added).
Only a failure of what the rows share — the batched decode forward or moving the cache
around — fails every row in the batch, since their cache can no longer be trusted.

**Adapters.** A model with several LoRA adapters stacked over its weights
(``model.lora.stack_adapters``) serves them all from one batch: each request names its adapter
(``Request.adapter``, 0 = the base alone) and right before every forward pass, prefill and
decode, ``select_adapters`` gives each row of that pass its own.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from llama2.generate import (
    SamplingParams,
    allow_graphs,
    check_draft,
    compile_decode_step,
    last_logits,
    propose,
    sample,
    sampling_probs,
    timeline_bucket,
    timeline_buckets,
    truncate_at_stop,
    verify,
)
from llama2.model import Transformer
from llama2.model.lora import MultiLoRALinear, select_adapters

log = logging.getLogger("llama2.serve")

# How many prompt tokens a completion's text is decoded after: SentencePiece drops the space
# of a sequence's first piece, so "Paris" after "capital is" must be decoded in context to
# come out as " Paris". A few tokens also cover a UTF-8 character split over byte pieces.
TEXT_CONTEXT_TOKENS = 5

# Prompt tokens prefilled per step while other streams decode (vLLM's chunked-prefill budget is
# of this order): a step then costs at most about one chunk's forward, however long the prompt.
DEFAULT_PREFILL_CHUNK = 512


class QueueFull(RuntimeError):
    """Too many requests are waiting; try again later (HTTP 503)."""


class EngineError(RuntimeError):
    """The engine failed while decoding this request (HTTP 500); the server carries on."""


class ShuttingDown(EngineError):
    """The server is stopping; nothing more is decoded (HTTP 503)."""


def _failure(exc: BaseException) -> EngineError:
    return EngineError(f"generation failed: {type(exc).__name__}: {exc}")


@dataclass
class Request:
    """One sequence to decode. ``prompt`` ids are used exactly as given (BOS included)."""

    prompt: list[int]
    params: SamplingParams
    prompt_logprobs: int | None = None  # echo: log-prob of every prompt token (+ this many alternatives)
    continue_prompt: bool = True  # text continues the prompt (completions) or stands alone (chat)
    adapter: int = 0  # which stacked LoRA adapter decodes it: i + 1 for adapter i, 0 = the base alone


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # the k most likely ids, k = top_logprobs


@dataclass
class Result:
    tokens: list[int]  # every sampled id, a final EOS / stop token included (it was sampled; its text is "")
    text: str  # decoded, cut before the first stop string
    finish_reason: str  # "stop" (EOS, a stop token or a stop string) or "length"
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per token, when params.logprobs
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # first is None


class Handle:
    """The caller's end of one request: text deltas while it is decoded, then its Result.

    Created on the event loop; the engine thread hands events over with
    ``call_soon_threadsafe``, so consumers simply await an asyncio.Queue.
    """

    def __init__(self, engine: Engine, request: Request, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.cancelled = False
        self.finished = False  # (engine thread) its Result or error was emitted; nothing follows
        self._engine = engine
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._result: Result | None = None

    # -- engine thread -----------------------------------------------------------------
    def _emit(self, event) -> None:
        if self.finished:
            return
        if isinstance(event, (Result, Exception)):
            self.finished = True
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shut down): nobody is listening
            pass

    # -- event loop --------------------------------------------------------------------
    async def deltas(self) -> AsyncIterator[str]:
        """Text as it is decoded (stop strings already cut); afterwards ``result()`` is ready."""
        while self._result is None:
            event = await self._events.get()
            if isinstance(event, Exception):
                raise event
            if isinstance(event, Result):
                self._result = event
            elif event:
                yield event

    async def result(self) -> Result:
        async for _ in self.deltas():
            pass
        return self._result

    def cancel(self) -> None:
        """Stop decoding this request (client gone); its row is freed at the next step."""
        self.cancelled = True
        self._engine._forget(self)


class IncrementalDetokenizer:
    """Text of a growing token list, one delta per token, decoding only a short window.

    Text Generation Inference's scheme: decode the tokens since ``prefix`` with and without
    the newest ones and emit the difference, once it no longer ends in an incomplete UTF-8
    character. Decoding a window instead of everything keeps each step O(1).
    """

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context)
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished UTF-8 character at the very end)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""


class _Row:
    """A running sequence: where it lives in the cache, what it has produced, how to sample it.

    Built before its prefill, so that a request the engine cannot decode (a prompt outside the
    vocabulary, a seed torch refuses) fails here, alone, instead of inside a shared forward.
    """

    def __init__(self, handle: Handle, tokenizer, vocab_size: int, max_seq_len: int, device, adapters: int = 0):
        req = handle.request
        _check_prompt(req.prompt, vocab_size, max_seq_len)
        if not (isinstance(req.adapter, int) and 0 <= req.adapter <= adapters):
            raise ValueError(f"adapter {req.adapter!r} does not exist (this model has {adapters})")
        self.handle, self.params = handle, req.params
        self.start = 0  # set when it joins the batch
        self.max_new = min(req.params.max_new_tokens, max_seq_len - len(req.prompt))
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] = []
        self.generator = None
        if req.params.seed is not None and not req.params.greedy:
            # One generator per row, seeded like Generator.generate seeds its single one, so a
            # seeded request draws the same tokens whether it runs alone or in a batch.
            self.generator = torch.Generator(device=device).manual_seed(req.params.seed)
        context = req.prompt[-TEXT_CONTEXT_TOKENS:] if req.continue_prompt else ()
        self.detok = IncrementalDetokenizer(tokenizer, context)
        self.stops = [s for s in req.params.stop if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # could be a stop string's start
        self.text = ""
        self.sent = 0  # characters of text already handed to the client
        self.cut = False  # a stop string ended the text
        self.finish_reason: str | None = None
        self.failed = False

    @property
    def last(self) -> int:
        return self.tokens[-1]

    def accept(self, token: int, eos_id: int, logprob: TokenLogprob | None) -> None:
        """Record a sampled token, decide whether the sequence is done, emit the new text."""
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.params.ends(token, eos_id):  # EOS, or a stop token such as Code Llama's <EOT>
            self.finish_reason = "stop"
        else:
            self._add_text(self.detok.push(token))
        if self.finish_reason is None and len(self.tokens) >= self.max_new:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self._add_text(self.detok.flush())  # an unfinished character at the very end
        self._emit_ready()

    def _add_text(self, delta: str) -> None:
        if not delta or self.cut:
            return
        begin = max(0, len(self.text) - self.hold)  # a stop string may straddle two deltas
        self.text += delta
        if self.stops and any(s in self.text[begin:] for s in self.stops):
            self.text = self.text[:begin] + truncate_at_stop(self.text[begin:], self.stops)
            self.cut, self.finish_reason = True, "stop"

    def _emit_ready(self) -> None:
        ready = len(self.text) if self.finish_reason else len(self.text) - self.hold
        if ready > self.sent:
            self.handle._emit(self.text[self.sent : ready])
            self.sent = ready
        if self.finish_reason:
            self.handle._emit(Result(self.tokens, self.text, self.finish_reason, self.logprobs,
                                     self.prompt_logprobs))

    def fail(self, exc: BaseException) -> None:
        """This row alone cannot go on: its client gets the error, the row leaves at the next step."""
        self.failed = True
        self.handle._emit(_failure(exc))

    def done(self) -> bool:
        return self.finish_reason is not None or self.failed or self.handle.cancelled


class _CacheView(nn.Module):
    """What ``Attention`` expects of a cache, over rows ``lo:hi`` of the engine's tensors.

    The engine owns the K/V storage; before each forward it points every layer at the rows
    that take part, and writes land in place. (A Module, because once ``setup_cache`` has
    run on a model, ``attention.cache`` only accepts Modules.)
    """

    def __init__(self, k: Tensor, v: Tensor):
        super().__init__()
        self.k, self.v = k, v  # plain attributes, not buffers: views of the engine's storage

    def update(self, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


@dataclass
class _Prefill:
    """Joiners being prefilled: their left-padded prompts, where they are staged (cache rows
    ``base..``, slots ``offset + [0, width)``) and how many columns are done."""

    rows: list[_Row]
    tokens: Tensor  # [k, width], left-padded
    lens: list[int]
    base: int
    offset: int
    done: int = 0
    echo: dict[int, list[Tensor]] = field(default_factory=dict)  # row j -> its prompt logits, chunk by chunk


class Engine:
    """Decodes many requests at once with one model; see the module docstring for the layout."""

    def __init__(self, model: Transformer, tokenizer, max_batch_size: int = 8, max_queue: int = 64,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, draft: Transformer | None = None,
                 draft_tokens: int = 4, compile: bool = False):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1 (or None: whole prompts), got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        if draft is not None:
            check_draft(model, draft, draft_tokens)
            if draft is model:  # it keeps a cache of its own, which the engine's would replace
                raise ValueError("the draft must be a model object of its own (load it separately)")
            draft.eval().setup_cache(1)  # one sequence: its own slots, slot = position
        self.draft, self.draft_tokens = draft, draft_tokens
        self._drafted_for: _Row | None = None  # the row whose tokens the draft's cache holds ...
        self._draft_fed = 0  # ... this many of them
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_id
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        cfg = model.config
        self.max_seq_len = cfg.max_seq_len
        self.capacity = cfg.max_seq_len  # slots per row; enough, see _make_room
        ref = model.tok_embeddings.weight
        self.device = ref.device
        shape = (max_batch_size, cfg.n_kv_heads, self.capacity, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=ref.dtype, device=ref.device) for _ in model.layers]
        self.values = [torch.zeros(shape, dtype=ref.dtype, device=ref.device) for _ in model.layers]
        # How many LoRA adapters are stacked over the weights (0: a plain model, nothing to select).
        self.adapters = max((m.A.shape[0] - 1 for m in model.modules() if isinstance(m, MultiLoRALinear)), default=0)

        self.rows: list[_Row] = []  # engine thread only; rows[i] lives in cache row i
        self.pending: _Prefill | None = None  # joiners whose prompts are being prefilled chunk by chunk
        self.cursor = 0  # the slot the next decode step writes
        self.waiting: collections.deque[Handle] = collections.deque()  # guarded by _cv
        self.vocab_size = cfg.vocab_size
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = collections.Counter()  # steps, prefills, shifts, cancelled, max_rows, ...
        # compile: the decode step is torch.compile'd (CUDA graphs on a GPU) with static shapes: the
        # running rows padded to a bucket (1, 2, 4, ... max_batch_size) and attention over the
        # timeline's first 128, 256, ... capacity slots under a mask (the shortest that holds the
        # cursor), so one graph per (rows, slots) bucket serves every step, and a few short streams
        # do not read a whole max_seq_len of keys and values per row.
        self.compile = compile
        if compile:
            if self.adapters:
                raise ValueError("compile cannot be combined with stacked LoRA adapters (each row selects its "
                                 "own); merge them or drop one")
            self.buckets = sorted({min(1 << i, max_batch_size) for i in range(max_batch_size.bit_length() + 1)})
            self.timeline_buckets = timeline_buckets(self.capacity)
            # One set of cache views per bucket, made on first use and kept: the compiled graph of a
            # bucket reads the very same view objects every step (dynamo guards on them).
            self._bucket_views: dict[tuple[int, int], list[_CacheView]] = {}
            self._compiled_decode = compile_decode_step(self._decode_logits, model)
            allow_graphs(len(self.buckets) * len(self.timeline_buckets))

    # -- the event-loop side ---------------------------------------------------------------
    def submit(self, requests: Sequence[Request]) -> list[Handle]:
        """Queue requests (all or none); call from a running event loop. Raises QueueFull."""
        loop = asyncio.get_running_loop()
        handles = [Handle(self, r, loop) for r in requests]
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) + len(handles) > self.max_queue:
                raise QueueFull(
                    f"the server is busy: {len(self.waiting)} requests are waiting "
                    f"(at most {self.max_queue}); try again later"
                )
            self.waiting.extend(handles)
            self._cv.notify()
        return handles

    def _forget(self, handle: Handle) -> None:
        with self._cv:
            try:
                self.waiting.remove(handle)
                self.stats["cancelled"] += 1
            except ValueError:
                pass  # already running: the engine drops the row at the next step

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    # -- the thread ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="llama2-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for handle in self._handles() + list(self.waiting):
            handle._emit(ShuttingDown("the server is shutting down"))
        self.rows.clear()
        self.pending = None
        self.waiting.clear()

    def _handles(self) -> list[Handle]:
        """The handles of every running or prefilling row."""
        return [r.handle for r in self.rows + (self.pending.rows if self.pending else [])]

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.rows and not self.pending and not self.waiting:
                    self._cv.wait()
                if self._stopping:
                    return
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """One step: drop finished rows, let waiting requests join, decode one token for all.

        Per-request failures are handled where they happen (``_prefill``, ``_sample``); what
        reaches this handler broke state the rows share, so every row in the batch fails.
        """
        joiners: list[Handle] = []
        try:
            self._release()
            if self.pending is None:
                joiners = self._take_waiting()
                if joiners:
                    self._begin_prefill(joiners)
            if self.pending is not None:
                self._prefill_chunk()
                self._release()
            if self._alone():
                self._speculate()
            elif self.rows:
                self._decode()
        except Exception as e:  # a failed step must not kill the server
            handles = self._handles() + joiners
            log.exception("engine step failed; failing the %d requests in the batch", len(handles))
            for handle in handles:
                handle._emit(_failure(e))  # (a handle already finished ignores it)
            self.rows.clear()
            self.pending = None

    def _take_waiting(self) -> list[Handle]:
        with self._cv:
            joiners = []
            while self.waiting and len(self.rows) + len(joiners) < self.max_batch_size:
                joiners.append(self.waiting.popleft())
            return joiners

    # -- cache bookkeeping -----------------------------------------------------------------
    def _attach(self, lo: int, hi: int) -> None:
        for layer, k, v in zip(self.model.layers, self.keys, self.values):
            layer.attention.cache = _CacheView(k[lo:hi], v[lo:hi])

    def _detach(self) -> None:
        for layer in self.model.layers:
            layer.attention.cache = None

    def _select(self, rows: Sequence[_Row]) -> None:
        """Give each row of the next forward pass its request's adapter (a no-op for a plain model)."""
        if self.adapters:
            select_adapters(self.model, torch.tensor([r.handle.request.adapter for r in rows], device=self.device))

    def _unselect(self) -> None:
        if self.adapters:  # the model is the base again for anyone else who runs it
            select_adapters(self.model, None)

    def _shift(self, by: int) -> None:
        """Move every running row's slots by ``by`` (right if positive) along the timeline."""
        n = len(self.rows)
        if n:
            lo = min(r.start for r in self.rows)
            for buf in self.keys + self.values:
                buf[:n, :, lo + by : self.cursor + by] = buf[:n, :, lo : self.cursor].clone()
            for r in self.rows:
                r.start += by
        self.cursor += by
        self.stats["shifts"] += 1

    def _make_room(self) -> None:
        """Shift left before a decode step when the cursor hit the end or dead space dominates.

        A running row with p prompt tokens and g sampled ones has g < max_new <= max_seq_len - p
        and writes its newest token at slot start + p + g - 1 = cursor, so
        cursor - start < max_seq_len - 1: at cursor == capacity every row starts at >= 2.
        """
        first = min(r.start for r in self.rows)
        if first > 0 and (self.cursor >= self.capacity or 2 * first >= self.cursor):
            self._shift(-first)

    def _release(self) -> None:
        """Drop finished and cancelled rows, moving the last row into each gap."""
        i = 0
        while i < len(self.rows):
            row = self.rows[i]
            if not row.done():
                i += 1
                continue
            if row.finish_reason is None and not row.failed:  # cancelled while running
                with self._cv:  # (_forget counts from the event loop's thread)
                    self.stats["cancelled"] += 1
            last = len(self.rows) - 1
            if i != last:
                moved = self.rows[last]
                for buf in self.keys + self.values:
                    buf[i, :, moved.start : self.cursor] = buf[last, :, moved.start : self.cursor]
                self.rows[i] = moved
            self.rows.pop()

    # -- the model -------------------------------------------------------------------------
    def _begin_prefill(self, joiners: list[Handle]) -> None:
        """Set up the joiners' rows and decide where their prompts are prefilled.

        A request that cannot be set up fails here, alone. Prompts that fit in one chunk, or
        that arrive while nothing decodes, go straight to their place left of the cursor, in
        rows n..; longer ones are staged in those rows at slots [0, width) and moved at the end.
        """
        rows = []
        for handle in joiners:
            if handle.cancelled:
                continue
            try:
                rows.append(_Row(handle, self.tokenizer, self.vocab_size, self.max_seq_len, self.device,
                                 self.adapters))
            except Exception as e:
                log.warning("request refused by the engine: %s: %s", type(e).__name__, e)
                handle._emit(_failure(e))
        if not rows:
            return
        lens = [len(r.handle.request.prompt) for r in rows]
        width = max(lens)
        if not self.rows or self.prefill_chunk is None or width <= self.prefill_chunk:
            if not self.rows:
                self.cursor = width  # a fresh timeline
            elif self.cursor < width:
                self._shift(width - self.cursor)
            offset = self.cursor - width
        else:
            offset = 0
        tokens = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
        for j, row in enumerate(rows):
            tokens[j, width - lens[j]:] = torch.tensor(row.handle.request.prompt, dtype=torch.long)
        self.pending = _Prefill(rows, tokens, lens, base=len(self.rows), offset=offset)

    def _prefill_chunk(self) -> None:
        """Prefill the next chunk of the pending prompts (all of it when nothing else decodes);
        after the last one, the rows join the batch and sample their first token.

        A failed forward fails only these joiners (the running rows' cache rows are not touched).
        """
        p = self.pending
        if all(r.done() for r in p.rows):  # every joiner was cancelled meanwhile
            self.pending = None
            return
        k, width, dev = len(p.rows), p.tokens.shape[1], self.device
        a = p.done
        b = width if not self.rows or self.prefill_chunk is None else min(width, a + self.prefill_chunk)
        try:
            # Slots offset + [a, b); a row's keys start at its first real token, causally; a
            # padding query may see itself so that no softmax row is empty (its output is unused).
            slots = torch.arange(p.offset + a, p.offset + b, device=dev)
            keys = torch.arange(p.offset + b, device=dev).view(1, 1, 1, -1)
            query = slots.view(1, 1, -1, 1)
            pads = torch.tensor([width - n_ for n_ in p.lens], device=dev)
            starts = (p.offset + pads).view(k, 1, 1, 1)
            mask = ((keys >= starts) & (keys <= query)) | (keys == query)
            positions = (torch.arange(a, b, device=dev).unsqueeze(0) - pads.unsqueeze(1)).clamp(min=0)
            self._attach(p.base, p.base + k)
            self._select(p.rows)
            try:
                h = self.model.hidden_states(p.tokens[:, a:b], positions=positions, slots=slots, mask=mask)
            finally:
                self._detach()
                self._unselect()
            for j, row in enumerate(p.rows):
                # Echo: the prompt's own log-probs need every real position's logits; projecting
                # all positions to the vocabulary is the costliest part of a long prefill, so
                # only these rows do it.
                if row.handle.request.prompt_logprobs is not None:
                    first = max(a, width - p.lens[j])
                    if first < b:
                        p.echo.setdefault(j, []).append(self.model.output(h[j, first - a:]).float())
            p.done = b
            self.stats["prefill_chunks"] += 1
            if b < width:
                return
            logits = self.model.output(h[:, -1]).float()
        except Exception as e:
            log.exception("prefill failed; failing the %d requests joining in it", k)
            for row in p.rows:
                row.fail(e)
            self.pending = None
            return
        self.pending = None
        self._join(p, logits)

    def _join(self, p: _Prefill, logits: Tensor) -> None:
        """The prefilled rows take rows n.. at [cursor - width, cursor) and sample their first token."""
        width, n = p.tokens.shape[1], len(self.rows)
        if not self.rows:
            self.cursor = width  # a fresh timeline
        elif self.cursor < width:
            self._shift(width - self.cursor)
        c = self.cursor
        if (p.base, p.offset) != (n, c - width):
            # Staged elsewhere (or rows left meanwhile): move each joiner's slots into place. Row
            # n + j <= base + j, so in this order no joiner is overwritten before it is moved.
            for j in range(len(p.rows)):
                for buf in self.keys + self.values:
                    buf[n + j, :, c - width: c] = buf[p.base + j, :, p.offset: p.offset + width].clone()
        self.stats["prefills"] += 1
        for j, row in enumerate(p.rows):
            row.start = c - p.lens[j]
            self.rows.append(row)
            try:
                want = row.handle.request.prompt_logprobs
                if want is not None:
                    row.prompt_logprobs = _prompt_logprobs(torch.cat(p.echo[j]), row.handle.request.prompt, want)
                if row.max_new <= 0:
                    row.finish_reason = "length"
                    row._emit_ready()
            except Exception as e:
                log.exception("setting up a request's answer failed; failing that request")
                row.fail(e)
        self._sample(self.rows[n:], logits)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self.rows))

    def _decode_logits(self, tokens: Tensor, positions: Tensor, slots: Tensor, mask: Tensor) -> Tensor:
        """Float32 logits [B, V] of one decode step (what ``compile`` compiles)."""
        return last_logits(self.model, tokens, positions=positions, slots=slots, mask=mask)

    def _decode(self) -> None:
        """Feed every row its newest token at the cursor and sample the next one.

        Compiled (``compile``): the rows padded to the next bucket (a padding row attends to its
        own slot only and writes a cache row no running row uses) and keys over the timeline's
        first 128, 256, ... slots, the fewest that hold the cursor, masked. Not while a prefill is
        staged: padding rows would write into its rows.
        """
        self._make_room()
        c, n, dev = self.cursor, len(self.rows), self.device
        compiled = self.compile and self.pending is None
        b = next(size for size in self.buckets if size >= n) if compiled else n
        slots = timeline_bucket(c, self.capacity) if compiled else c + 1
        tokens = torch.zeros(b, 1, dtype=torch.long, device=dev)
        tokens[:n, 0] = torch.tensor([r.last for r in self.rows], device=dev)
        starts = torch.tensor([r.start for r in self.rows] + [c] * (b - n), device=dev)
        keys = torch.arange(slots, device=dev).view(1, 1, 1, -1)
        mask = (keys >= starts.view(b, 1, 1, 1)) & (keys <= c)
        if compiled:
            for layer, view in zip(self.model.layers, self._views(b, slots)):
                layer.attention.cache = view
            step = self._compiled_decode
        else:
            self._attach(0, n)
            step = self._decode_logits
        self._select(self.rows)
        try:
            logits = step(tokens, (c - starts).view(b, 1), torch.tensor([c], device=dev), mask)
        finally:
            self._detach()
            self._unselect()
        self.cursor += 1
        self.stats["steps"] += 1
        self.stats["compiled_steps"] += compiled
        self.stats["row_steps"] += n
        self._sample(self.rows, logits[:n])

    def _views(self, rows: int, slots: int) -> list[_CacheView]:
        """The compiled step's cache views of a bucket: cache rows [0, rows), slots [0, slots)."""
        views = self._bucket_views.get((rows, slots))
        if views is None:
            views = [_CacheView(k[:rows, :, :slots], v[:rows, :, :slots]) for k, v in zip(self.keys, self.values)]
            self._bucket_views[rows, slots] = views
        return views

    def _draft_count(self, row: _Row) -> int:
        """Tokens to draft for ``row`` this round: never past the last token it may still get."""
        return min(self.draft_tokens, row.max_new - len(row.tokens) - 1)

    def _alone(self) -> bool:
        """Whether this step speculates: a draft model is loaded and one stream decodes alone.
        Batched streams already share each weight read, which is what a draft saves; one stream
        alone is where decoding is slowest per token and the draft pays (vLLM turns speculation
        off at large batches for the same reason)."""
        if self.draft is None or len(self.rows) != 1 or self.pending is not None or self.waiting:
            return False
        row = self.rows[0]
        k = self._draft_count(row)
        length = len(row.handle.request.prompt) + len(row.tokens) + k
        return k >= 1 and not row.done() and length <= self.draft.config.max_seq_len

    def _speculate(self) -> None:
        """One round of speculative decoding for the one running row (``generate.propose`` /
        ``verify``): the draft proposes up to ``draft_tokens`` tokens, the model checks them in
        one forward at the cursor, and the accepted ones plus the model's own token are emitted.
        The greedy text is the plain greedy text; sampled text keeps the model's distribution."""
        row = self.rows[0]
        p = row.params
        k = self._draft_count(row)
        if self.cursor + k + 1 > self.capacity:
            self._shift(-row.start)  # the row then starts at 0: it fits, as it fits the context
        if self._drafted_for is not row:
            self._drafted_for, self._draft_fed = row, 0  # another row's tokens: feed this one's from 0
        seq = row.handle.request.prompt + row.tokens
        dev, rng = self.device, row.generator
        dist = functools.partial(sampling_probs, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k)

        def forward_draft(tokens: list[int], start: int) -> Tensor:
            x = torch.tensor([tokens], device=dev)
            return self.draft(x, slots=torch.arange(start, start + len(tokens), device=dev))[0].float()

        # A failure from here on fails the row (the step's handler): its cache can't be trusted.
        drafts, qs, self._draft_fed = propose(forward_draft, seq[self._draft_fed:], self._draft_fed, k,
                                              p.greedy, dist, rng)
        c = self.cursor
        slots = torch.arange(c, c + k + 1, device=dev)
        keys = torch.arange(c + k + 1, device=dev).view(1, 1, 1, -1)
        mask = (keys >= row.start) & (keys <= slots.view(1, 1, -1, 1))
        self._attach(0, 1)
        self._select(self.rows)
        try:
            logits = self.model(torch.tensor([[row.last] + drafts], device=dev),
                                positions=(slots - row.start).view(1, -1), slots=slots, mask=mask)[0]
        finally:
            self._detach()
            self._unselect()
        out = verify(logits, drafts, qs, p.greedy, dist, rng)
        self.stats["steps"] += 1
        self.stats["row_steps"] += 1
        self.stats["drafted"] += k
        self.stats["accepted"] += len(out) - 1
        # The model's cache is right up to the last accepted draft; the newest token is unseen.
        self.cursor += len(out)
        self._draft_fed = min(self._draft_fed, len(seq) + len(out) - 1)
        for token_logits, token in out:
            if row.done():
                break
            self._take(row, token_logits, token)

    def _sample(self, rows: list[_Row], logits: Tensor) -> None:
        """Pick each row's next token with its own sampling parameters; a row that fails here
        fails alone (the others' tokens do not depend on it)."""
        greedy = logits.argmax(dim=-1).tolist()  # one transfer for every greedy row
        for i, row in enumerate(rows):
            if row.done():
                continue
            try:
                self._sample_row(row, logits[i], greedy[i])
            except Exception as e:
                log.exception("sampling a request failed; failing that request alone")
                row.fail(e)

    def _sample_row(self, row: _Row, logits: Tensor, greedy: int) -> None:
        p = row.params
        if p.greedy:
            token = greedy
        else:
            token = int(sample(logits.unsqueeze(0), p.temperature, p.top_p, p.top_k, row.generator)[0])
        self._take(row, logits, token)

    def _take(self, row: _Row, logits: Tensor, token: int) -> None:
        """Give ``row`` its next token, sampled from ``logits``."""
        p = row.params
        lp = None
        if p.logprobs:
            # Log-probs of the model's own distribution (before temperature / top-p), as
            # OpenAI and vLLM report them.
            full = torch.log_softmax(logits, dim=-1)
            lp = TokenLogprob(token, float(full[token]), _top(full, p.top_logprobs))
        row.accept(token, self.eos_id, lp)


def _check_prompt(prompt: Sequence[int], vocab_size: int, max_seq_len: int) -> None:
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) > max_seq_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {max_seq_len}")
    bad = next((t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab_size)), None)
    if bad is not None:
        raise ValueError(f"token id {bad!r} is outside the vocabulary (0..{vocab_size - 1})")


def _top(logprobs: Tensor, k: int) -> dict[int, float]:
    if k <= 0:
        return {}
    values, ids = logprobs.topk(k)
    return dict(zip(ids.tolist(), values.tolist()))


def _prompt_logprobs(logits: Tensor, prompt: Sequence[int], k: int) -> list[TokenLogprob | None]:
    """Log-prob of each prompt token given the ones before it; None for the first."""
    logp = torch.log_softmax(logits[:-1], dim=-1)
    ids = torch.tensor(prompt[1:], device=logits.device)
    chosen = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1).tolist()
    tops: list[dict[int, float]] = [{}] * len(chosen)
    if k > 0:
        values, indices = logp.topk(k, dim=-1)
        tops = [dict(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    return [None] + [TokenLogprob(t, c, top) for t, c, top in zip(prompt[1:], chosen, tops)]
