"""An OpenAI-compatible HTTP server for a Llama 2 model directory (``llama2 serve``).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /health``, ``POST /tokenize``, ``POST /detokenize`` (the last two as in vLLM), and
``GET /``: a chat page (``static/chat.html``) that streams from ``/v1/chat/completions``.
Requests are decoded together by :class:`llama2.serve.engine.Engine` (continuous batching).

LoRA adapters: ``--adapter NAME=DIR`` (repeatable) serves PEFT-format adapters over the one
base model, unmerged: a request's ``model`` field picks one by NAME (the base model's own name
picks the base), ``/v1/models`` lists them all, and requests for different adapters share a
batch — each row of every forward pass gets its own adapter (``model.lora.stack_adapters``).

Prompts and BOS: a string prompt is encoded with exactly one BOS in front; a prompt given as
token ids is used exactly as given, so it must carry its own BOS (lm-eval does, with
``add_bos_token=True``). Chat requests use Meta's Llama 2 chat format (``encode_chat``).

Infilling (Code Llama §2.3): a completion request with a non-empty ``suffix`` asks for the text
between its (string) ``prompt`` and the suffix. The prompt sent to the model is Code Llama's
infilling prompt — prefix-suffix-middle, or suffix-prefix-middle when the body's extension field
``infill_format`` is ``"spm"`` — and the completion ends at the model's ``<EOT>`` token (or EOS),
with ``finish_reason: "stop"``; its text is the middle alone. A model whose tokenizer has no
infilling pieces answers 400. (An empty ``suffix`` is an ordinary completion, as some clients
send one by default.)

Hardening: a request can only fail itself. Bodies are limited in size (``--max-body-bytes``,
413) before they are read, then parsed off the event loop into strict pydantic models with
bounds (see "limits" below), so wrong types, out-of-range numbers, invalid Unicode, deep
nesting and huge integers are 400s naming the field. Tokenization runs in a worker thread.
Every error is OpenAI's ``{"error": {message, type, param, code}}`` JSON *response* — never an
exception escaping to uvicorn, which would close the keep-alive connection — with a 4xx, 503
when busy or stopping, and 500 only for the server's own failures. In the engine, a failure
of one request's row fails that request alone (see :mod:`llama2.serve.engine`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llama2.chat import encode_chat
from llama2.checkpoint import CheckpointError, load_model, load_tokenizer, parse_dtype, peft
from llama2.generate import SamplingParams
from llama2.guard import load_guard
from llama2.model.lora import stack_adapters
from llama2.model.quant import parse_quantize, quantize_model
from llama2.tokenizer import infill_tokens
from llama2.utils import check_device

from .engine import (
    DEFAULT_PREFILL_CHUNK,
    TEXT_CONTEXT_TOKENS,
    Engine,
    EngineError,
    IncrementalDetokenizer,
    QueueFull,
    Result,
    ShuttingDown,
    TokenLogprob,
)
from .engine import Request as EngineRequest

log = logging.getLogger("llama2.serve")

# Meta's chat defaults (their generation.py), used when a request does not say and the model directory
# has no generation_config.json that does.
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 0.6, 0.9

# -- limits ---------------------------------------------------------------------------------
# Everything a request can make the server hold or loop over is bounded here, at the edge.
#
# Bodies: a full batch of full-context prompts sent as token ids (64 x 4096 ids at ~6.5 bytes
# each, ~1.7 MB) fits twice over in 4 MiB; a 4 MiB string prompt takes ~2 s to tokenize on
# one CPU core, off the event loop. Anything larger is refused (413) before it is parsed.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_PROMPTS = 256  # prompts in one /v1/completions request (each x n is still bounded by --max-queue)
MAX_N = 64  # choices per prompt
MAX_STOPS = 16  # stop strings per request ...
MAX_STOP_CHARS = 256  # ... and their length (a stream holds back that many characters)
MAX_MESSAGES = 1024  # chat messages per request (the context fills long before)
MAX_ROLE_CHARS = 32
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI
SEED_LIMIT = 2**63  # torch seeds are 64-bit; choice j of n uses (seed + j) mod SEED_LIMIT
# Ids and counts past these are refused by the schema; the model's own vocabulary size and
# context length are checked after parsing, with errors that name the numbers.
TOKEN_ID_LIMIT = 2**31
COUNT_LIMIT = 2**31


# -- errors ---------------------------------------------------------------------------------
class APIError(Exception):
    """Becomes ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class BodyTooLarge(APIError):
    def __init__(self, limit: int, size: int | None = None):
        got = f"is {size} bytes" if size is not None else "is larger than that"
        super().__init__(413, f"the request body {got}; this server accepts at most {limit} bytes "
                              "(llama2 serve --max-body-bytes)", code="request_too_large")


def _internal_error(exc: BaseException) -> APIError:
    """What a client sees of a failure that is the server's fault, not its request's."""
    if isinstance(exc, ShuttingDown):
        return APIError(503, str(exc), code="server_shutting_down")
    if isinstance(exc, EngineError):
        return APIError(500, str(exc), code="generation_failed")
    return APIError(500, f"internal server error: {type(exc).__name__}", code="internal_error")


# -- request bodies -------------------------------------------------------------------------
# Typed and strict: "5" is not a number, true is not a token id, NaN is not a temperature.
# Unknown fields are ignored: OpenAI clients send some we have no use for (e.g. "user").
_STRICT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

TokenId = Annotated[int, Field(ge=0, lt=TOKEN_ID_LIMIT)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class _Body(BaseModel):
    model_config = _STRICT


class StreamOptions(_Body):
    include_usage: bool = False


class _Common(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0, lt=COUNT_LIMIT)
    temperature: float | None = Field(None, ge=0, le=2)  # below GREEDY_BELOW = greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, lt=COUNT_LIMIT)  # vLLM's extension; -1 or 0 = off
    n: int = Field(1, ge=1, le=MAX_N)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None


class CompletionBody(_Common):
    prompt: (str | Annotated[list[str], Field(max_length=MAX_PROMPTS)] | list[TokenId]
             | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)])
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None
    infill_format: Literal["psm", "spm"] | None = None  # this server's extension: the infilling prompt's order


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str = Field(max_length=MAX_ROLE_CHARS)
    content: str | list[TextPart]
    name: str | None = None


Messages = Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES)]


class ChatBody(_Common):
    messages: Messages
    max_completion_tokens: int | None = Field(None, ge=0, lt=COUNT_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeBody(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: Messages | None = None
    add_special_tokens: bool = True


class DetokenizeBody(_Body):
    model: str | None = None
    tokens: list[TokenId]


# Fields whose type is a union: pydantic reports one error per alternative, so say what is allowed.
_FIELD_HELP = {
    "prompt": "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": f"stop must be a string or a list of at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters",
    "messages": "messages must be a list of {role, content} objects whose content is a string or a list of "
                "{type: text, text} parts",
}
_TYPE_LABEL = re.compile(r"^(str|int|float|bool|list|dict)\b|[\[\-]")  # pydantic's names for union branches


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    loc = [p for p in err["loc"] if isinstance(p, int) or not _TYPE_LABEL.search(p)]
    param = str(loc[0]) if loc else None
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if err["type"] == "missing":
        return APIError(400, f"{where} is required", param=param)
    if param in _FIELD_HELP:
        at = f" (at {where})" if where != param else ""
        return APIError(400, _FIELD_HELP[param] + at, param=param)
    return APIError(400, f"{where}: {err['msg']} (got {_short(err['input'])})" if where else err["msg"],
                    param=param)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """The request body as ``model``, or a 400 naming what is wrong. CPU-bound: run it in a thread."""
    try:
        text = raw.decode("utf-8-sig")  # (a byte-order mark is tolerated, as RFC 8259 allows)
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (at byte {e.start})") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: it is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except ValueError as e:  # Python's limit on integer digits, NaN / Infinity
        detail = "a number has too many digits" if "digits" in str(e) else str(e)
        raise APIError(400, f"the request body is not valid JSON: {detail}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        # JSON may spell a lone surrogate ("\ud800"); no tokenizer can encode that text, and
        # the cheapest complete check is to try encoding everything once.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the request body contains invalid Unicode (a lone surrogate such as \\ud800)") from None
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None


async def _read_body(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()  # at most --max-body-bytes: _Edge counts it as it arrives
    return await run_in_threadpool(_parse_body, raw, model)


# -- the server -----------------------------------------------------------------------------
class OpenAIServer:
    """State and request handling behind the routes (one model, one engine). ``adapters``: the
    names of the LoRA adapters stacked over ``model`` (``stack_adapters``), in their order."""

    def __init__(self, model, tokenizer, *, name: str, aliases: Sequence[str] = (), api_key: str | None = None,
                 max_batch_size: int = 8, max_queue: int = 64, guard=None, defaults: dict | None = None,
                 adapters: Sequence[str] = (), prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
                 draft=None, draft_tokens: int = 4, compile: bool = False):
        self.tokenizer = tokenizer
        self.name = name
        self.aliases = {name, *aliases}
        self.adapters = {a: i for i, a in enumerate(adapters, start=1)}  # name -> the engine's adapter index
        self.api_key = api_key
        self.guard = guard
        self._guard_lock = asyncio.Lock()  # a guard model is not assumed to be re-entrant
        self.max_seq_len = model.config.max_seq_len
        self.vocab_size = model.config.vocab_size
        self.defaults = {"temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P, **(defaults or {})}
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
                             prefill_chunk=prefill_chunk, draft=draft, draft_tokens=draft_tokens, compile=compile)
        self.created = int(time.time())
        self._token_strings: dict[int, str] = {}

    # -- checks --------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    def resolve_model(self, model: str | None) -> tuple[str, int]:
        """(the name responses carry, the engine's adapter index: 0 = the base) of a request's
        ``model`` field; no field means the base."""
        if model is None or model in self.aliases:
            return self.name, 0
        if model in self.adapters:
            return model, self.adapters[model]
        served = ", ".join(f"'{m}'" for m in (self.name, *self.adapters))
        raise APIError(404, f"the model '{model}' does not exist; this server serves {served}",
                       param="model", code="model_not_found")

    def check_model(self, model: str | None) -> None:
        self.resolve_model(model)

    def check_prompt(self, prompt: list[int], max_tokens: int, param: str) -> None:
        if not prompt:
            raise APIError(400, "the prompt is empty", param=param)
        if len(prompt) + max_tokens > self.max_seq_len:
            raise APIError(
                400,
                f"this model's maximum context length is {self.max_seq_len} tokens, but {len(prompt) + max_tokens} "
                f"were requested ({len(prompt)} in the prompt + {max_tokens} for the completion); "
                "shorten the prompt or lower max_tokens",
                param="max_tokens", code="context_length_exceeded",
            )
        self.check_ids(prompt, param)

    def check_ids(self, ids: Sequence[int], param: str) -> None:
        bad = next((t for t in ids if t >= self.vocab_size), None)  # (the schema refused negative ids)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})", param=param)

    def sampling(self, body: _Common, max_tokens: int, logprobs: bool, top_logprobs: int) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported by this server", param=name)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingParams(
            temperature=self.defaults["temperature"] if body.temperature is None else body.temperature,
            top_p=self.defaults["top_p"] if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0),
            max_new_tokens=max_tokens,
            stop=tuple(s for s in stop if s),
            seed=body.seed,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )

    def submit(self, requests: list[EngineRequest]):
        if len(requests) > self.engine.max_queue:
            raise APIError(400, f"this request needs {len(requests)} sequences (prompts x n); the server queues "
                                f"at most {self.engine.max_queue}", param="n")
        try:
            return self.engine.submit(requests)
        except QueueFull as e:
            raise APIError(503, str(e), code="server_busy", type="server_error") from None
        except EngineError as e:
            raise _internal_error(e) from None

    async def collect(self, request: Request, handles) -> list[Result]:
        """Wait for every handle; if the client hangs up meanwhile, cancel them (frees the rows)."""
        gathered = asyncio.ensure_future(asyncio.gather(*(h.result() for h in handles)))
        try:
            while True:
                done, _ = await asyncio.wait({gathered}, timeout=0.2)
                if done:
                    return gathered.result()
                if await request.is_disconnected():
                    raise _ClientGone
        except EngineError as e:
            raise _internal_error(e) from None
        finally:
            if not gathered.done():
                gathered.cancel()
                for h in handles:
                    h.cancel()

    async def check_guard(self, messages: list[dict]) -> tuple[bool, list[str]]:
        async with self._guard_lock:
            try:
                unsafe, categories = await run_in_threadpool(self.guard.check, messages)
            except ValueError as e:  # too long for the classifier: refuse rather than pass it unread
                raise APIError(400, str(e), param="messages") from None
        return bool(unsafe), list(categories)

    # -- token strings for logprobs ------------------------------------------------------
    def token_string(self, token: int) -> str:
        """OpenAI's spelling of one token: its text, or ``bytes:\\xNN`` for part of a character."""
        s = self._token_strings.get(token)
        if s is None:
            piece = self.tokenizer.id_to_piece(token)
            byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            if byte:
                value = int(byte.group(1), 16)
                s = chr(value) if value < 0x80 else f"bytes:\\x{value:02x}"
            else:
                s = piece.replace("\u2581", " ")
            self._token_strings[token] = s
        return s

    def token_bytes(self, token: int) -> list[int]:
        s = self.token_string(token)
        if s.startswith("bytes:\\x"):
            return [int(s[len("bytes:\\x"):], 16)]
        return list(s.encode("utf-8"))

    def text_offsets(self, ids: Sequence[int], context: Sequence[int] = ()) -> list[int]:
        """Character offset of each token in the text the ids decode to (after ``context``)."""
        detok = IncrementalDetokenizer(self.tokenizer, context)
        offsets, length = [], 0
        for t in ids:
            offsets.append(length)
            length += len(detok.push(t))
        return offsets

    def top_dict(self, top: dict[int, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for t, v in top.items():  # most likely first; two ids with one spelling keep the larger
            out.setdefault(self.token_string(t), v)
        return out

    # -- /v1/completions -----------------------------------------------------------------
    def completion_prompts(self, prompt, max_tokens: int, suffix: str | None = None,
                           suffix_first: bool = False) -> list[tuple[list[int], str | None]]:
        """(token ids, the prompt's own text or None) per prompt, checked against the context;
        strings get exactly one BOS. With a ``suffix``, each string is the prefix of Code Llama's
        infilling prompt (Code Llama §2.3). Tokenizes: run it in a thread."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is an empty list", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        if suffix is not None and not all(isinstance(p, str) for p in prompt):
            raise APIError(400, "suffix needs the prompt as text (a string or a list of strings), not token ids",
                           param="prompt")
        out = []
        for p in prompt:
            if suffix is not None:
                ids = infill_tokens(self.tokenizer, p, suffix, suffix_first=suffix_first)
            elif isinstance(p, str):
                ids = self.tokenizer.encode(p, bos=True)
            else:
                ids = list(p)
            self.check_prompt(ids, max_tokens, "prompt")
            out.append((ids, p if isinstance(p, str) else None))
        return out

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Meta's chat format; a dialogue it refuses (roles out of order, tags inside a message)
        is a 400. Tokenizes: run it in a thread."""
        try:
            return encode_chat(self.tokenizer, messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    def encode_messages(self, messages: list[dict], max_tokens: int | None) -> tuple[list[int], int]:
        """A chat's prompt ids and max_tokens (default: the rest of the context), checked.
        Tokenizes: run it in a thread."""
        prompt = self.encode_chat(messages)
        if max_tokens is None:  # as long as the context allows
            if len(prompt) >= self.max_seq_len:
                self.check_prompt(prompt, 1, "messages")
            max_tokens = self.max_seq_len - len(prompt)
        self.check_prompt(prompt, max_tokens, "messages")
        return prompt, max_tokens

    async def completions(self, request: Request) -> Response:
        body: CompletionBody = await _read_body(request, CompletionBody)
        name, adapter = self.resolve_model(body.model)
        suffix = body.suffix or None  # "" is an ordinary completion
        if suffix is not None:
            self.check_infilling(body)
        elif body.infill_format is not None:
            raise APIError(400, "infill_format needs a non-empty suffix (it orders the infilling prompt)",
                           param="infill_format")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of is not supported by this server (use n)", param="best_of")
        if body.stream and body.logprobs is not None:
            raise APIError(400, "logprobs are not supported with stream=true", param="logprobs")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default
        prompts = await run_in_threadpool(self.completion_prompts, body.prompt, max_tokens, suffix,
                                          body.infill_format == "spm")
        want_logprobs = body.logprobs is not None
        params = self.sampling(body, max_tokens, want_logprobs, body.logprobs or 0)
        if suffix is not None:  # the middle ends with <EOT> (Code Llama §2.3); EOS still ends it too
            params = replace(params, stop_token_ids=(self.tokenizer.eot_id,))
        echo_logprobs = (body.logprobs or 0) if (body.echo and want_logprobs) else None
        requests = [
            EngineRequest(ids, _choice_params(params, j), prompt_logprobs=echo_logprobs, adapter=adapter)
            for ids, _ in prompts for j in range(body.n)
        ]
        handles = self.submit(requests)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echoes = [(text if text is not None else self.tokenizer.decode(ids)) if body.echo else ""
                  for ids, text in prompts for _ in range(body.n)]
        if body.stream:
            return _sse(self._stream_completion(rid, created, handles, echoes, prompts, body, name))

        results = await self.collect(request, handles)
        choices = []
        for i, (res, echo) in enumerate(zip(results, echoes)):
            ids = prompts[i // body.n][0]
            choice = {"index": i, "text": echo + res.text, "logprobs": None, "finish_reason": res.finish_reason}
            if want_logprobs:
                choice["logprobs"] = self.completion_logprobs(ids, res, body.echo, len(echo))
            choices.append(choice)
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": name,
            "choices": choices, "usage": _usage(sum(len(ids) for ids, _ in prompts), results),
        })

    def check_infilling(self, body: CompletionBody) -> None:
        """A suffix needs a tokenizer with Code Llama's infilling pieces; echo would repeat the
        infilling prompt's control pieces, not the text, so it is refused with a suffix."""
        if not getattr(self.tokenizer, "has_infilling", False):
            raise APIError(400, f"suffix (infilling) needs a model whose tokenizer has Code Llama's infilling "
                                f"pieces (<PRE> <SUF> <MID> <EOT>); '{self.name}' has none", param="suffix")
        if body.echo:
            raise APIError(400, "echo cannot be combined with suffix", param="echo")

    def completion_logprobs(self, prompt: list[int], res: Result, echo: bool, echo_len: int) -> dict:
        """The legacy completions schema lm-eval reads: tokens, token_logprobs, top_logprobs, text_offset."""
        entries: list[TokenLogprob | None] = (res.prompt_logprobs if echo else []) + res.logprobs
        ids = (prompt if echo else []) + [e.token for e in res.logprobs]
        # Offsets into the returned text: the echoed prompt (if any), then the completion,
        # decoded after the prompt's last tokens exactly as the engine decoded it.
        offsets = [echo_len + o for o in self.text_offsets([e.token for e in res.logprobs],
                                                           prompt[-TEXT_CONTEXT_TOKENS:])]
        if echo:
            offsets = self.text_offsets(prompt) + offsets
        return {
            "tokens": [self.token_string(t) for t in ids],
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [None if e is None else self.top_dict(e.top) for e in entries],
            "text_offset": offsets,
        }

    async def _stream_completion(self, rid, created, handles, echoes, prompts, body, name) -> AsyncIterator[dict]:
        def chunk(index: int, text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

        for i, echo in enumerate(echoes):
            if echo:
                yield chunk(i, echo, None)
        results: dict[int, Result] = {}
        async for i, delta, result in _merged(handles):
            if result is None:
                yield chunk(i, delta, None)
            else:
                results[i] = result
                yield chunk(i, "", result.finish_reason)
        if body.stream_options is not None and body.stream_options.include_usage:
            usage = _usage(sum(len(ids) for ids, _ in prompts), [results[i] for i in sorted(results)])
            yield {"id": rid, "object": "text_completion", "created": created, "model": name,
                   "choices": [], "usage": usage}

    # -- /v1/chat/completions ------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        body: ChatBody = await _read_body(request, ChatBody)
        name, adapter = self.resolve_model(body.model)
        messages = _chat_messages(body.messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        prompt, max_tokens = await run_in_threadpool(self.encode_messages, messages, max_tokens)
        if self.guard is not None:
            unsafe, categories = await self.check_guard(messages)
            if unsafe:
                refusal = APIError(400, "the conversation was flagged as unsafe by the safety classifier"
                                   + (f" ({', '.join(categories)})" if categories else ""),
                                   param="messages", code="content_filter").body()
                refusal["error"]["guard"] = _verdict(unsafe, categories)  # this server's extension
                return JSONResponse(refusal, status_code=400)
        params = self.sampling(body, max_tokens, body.logprobs, (body.top_logprobs or 0) if body.logprobs else 0)
        handles = self.submit([EngineRequest(prompt, _choice_params(params, j), continue_prompt=False,
                                             adapter=adapter)
                               for j in range(body.n)])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        # With a guard the answer is checked before anyone sees it, so a stream is sent at the end.
        if body.stream and self.guard is None:
            return _sse(self._stream_chat(rid, created, handles, len(prompt), body, name))

        results = await self.collect(request, handles)
        contents, reasons = [r.text for r in results], [r.finish_reason for r in results]
        verdicts: list[dict | None] = [None] * len(results)  # the guard's, per choice (extension field "guard")
        if self.guard is not None:
            for i, text in enumerate(contents):
                unsafe, categories = await self.check_guard(messages + [{"role": "assistant", "content": text}])
                verdicts[i] = _verdict(unsafe, categories)
                if unsafe:
                    contents[i], reasons[i] = "", "content_filter"
        if body.stream:
            return _sse(self._replay_chat(rid, created, contents, reasons, verdicts, len(prompt), results, body,
                                          name))
        choices = []
        for i, (res, text, reason) in enumerate(zip(results, contents, reasons)):
            choices.append({
                "index": i, "message": {"role": "assistant", "content": text},
                "logprobs": self.chat_logprobs(res) if body.logprobs and reason != "content_filter" else None,
                "finish_reason": reason,
                **({"guard": verdicts[i]} if verdicts[i] is not None else {}),
            })
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": name,
            "choices": choices, "usage": _usage(len(prompt), results),
        })

    def chat_logprobs(self, res: Result) -> dict:
        def entry(token: int, logprob: float) -> dict:
            return {"token": self.token_string(token), "logprob": logprob, "bytes": self.token_bytes(token)}

        return {"content": [
            {**entry(e.token, e.logprob), "top_logprobs": [entry(t, v) for t, v in e.top.items()]}
            for e in res.logprobs
        ]}

    def _chat_chunk(self, rid, created, name, index, delta: dict, finish: str | None) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def _usage_chunk(self, rid, created, name, prompt_len: int, results: list[Result]) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [], "usage": _usage(prompt_len, results)}

    async def _stream_chat(self, rid, created, handles, prompt_len, body, name) -> AsyncIterator[dict]:
        for i in range(len(handles)):
            yield self._chat_chunk(rid, created, name, i, {"role": "assistant", "content": ""}, None)
        results: dict[int, Result] = {}
        async for i, delta, result in _merged(handles):
            if result is None:
                yield self._chat_chunk(rid, created, name, i, {"content": delta}, None)
            else:
                results[i] = result
                yield self._chat_chunk(rid, created, name, i, {}, result.finish_reason)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield self._usage_chunk(rid, created, name, prompt_len, [results[i] for i in sorted(results)])

    async def _replay_chat(self, rid, created, contents, reasons, verdicts, prompt_len, results, body,
                           name) -> AsyncIterator[dict]:
        for i, (text, reason, verdict) in enumerate(zip(contents, reasons, verdicts)):
            yield self._chat_chunk(rid, created, name, i, {"role": "assistant", "content": text}, None)
            last = self._chat_chunk(rid, created, name, i, {}, reason)
            if verdict is not None:  # the verdict rides on the choice's last chunk
                last["choices"][0]["guard"] = verdict
            yield last
        if body.stream_options is not None and body.stream_options.include_usage:
            yield self._usage_chunk(rid, created, name, prompt_len, results)

    # -- small endpoints -----------------------------------------------------------------
    def model_card(self, name: str | None = None) -> dict:
        """The base model's card, or an adapter's (which names the base as its ``parent``, as vLLM does)."""
        card = {"id": name or self.name, "object": "model", "created": self.created, "owned_by": "llama2",
                "max_model_len": self.max_seq_len}
        if name is not None and name in self.adapters:
            card["parent"] = self.name
        return card

    def model_cards(self) -> list[dict]:
        return [self.model_card()] + [self.model_card(a) for a in self.adapters]

    async def tokenize(self, request: Request) -> Response:
        body: TokenizeBody = await _read_body(request, TokenizeBody)
        self.check_model(body.model)
        if body.messages is not None:
            ids = await run_in_threadpool(self.encode_chat, _chat_messages(body.messages))
        elif body.prompt is not None:
            ids = await run_in_threadpool(self.tokenizer.encode, body.prompt, body.add_special_tokens)
        else:
            raise APIError(400, "send a string 'prompt' (or chat 'messages') to tokenize", param="prompt")
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.max_seq_len})

    async def detokenize(self, request: Request) -> Response:
        body: DetokenizeBody = await _read_body(request, DetokenizeBody)
        self.check_model(body.model)
        self.check_ids(body.tokens, "tokens")
        return JSONResponse({"prompt": await run_in_threadpool(self.tokenizer.decode, body.tokens)})


class _ClientGone(Exception):
    pass


def _choice_params(params: SamplingParams, j: int) -> SamplingParams:
    """Choice j of n: a seeded request gives its choices seeds seed, seed+1, ... so they differ
    (wrapping below SEED_LIMIT, so every one is a seed torch accepts)."""
    return params if params.seed is None or j == 0 else replace(params, seed=(params.seed + j) % SEED_LIMIT)


def _usage(prompt_tokens: int, results: Sequence[Result]) -> dict:
    completion = sum(len(r.tokens) for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _verdict(unsafe: bool, categories: Sequence[str]) -> dict:
    """The guard's verdict as chat responses carry it (this server's extension, for clients such
    as the chat page): on each choice, and on a refused prompt's error object."""
    return {"unsafe": bool(unsafe), "categories": list(categories)}


def _chat_messages(messages: Sequence[ChatMessage]) -> list[dict]:
    """OpenAI messages -> [{role, content}] with string content (text parts are joined)."""
    return [{"role": m.role, "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
            for m in messages]


async def _merged(handles) -> AsyncIterator[tuple[int, str | None, Result | None]]:
    """(index, delta, None) while the handles decode, then (index, None, result) for each."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle) -> None:
        try:
            async for delta in handle.deltas():
                queue.put_nowait((i, delta, None))
            queue.put_nowait((i, None, await handle.result()))
        except Exception as e:  # handed to the consumer, which raises it
            queue.put_nowait((i, None, e))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            i, delta, result = await queue.get()
            if isinstance(result, Exception):
                raise result
            if result is not None:
                remaining -= 1
            yield i, delta, result
    finally:  # also when the client disconnected and the response was cancelled
        for t in tasks:
            t.cancel()
        for h in handles:
            h.cancel()


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events in OpenAI's format, ending with ``data: [DONE]``."""

    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except Exception as e:  # the status line is sent: the error becomes the stream's last event
            if not isinstance(e, EngineError):
                log.exception("streaming a response failed")
            yield f"data: {json.dumps(_internal_error(e).body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _read_generation_defaults(path: Path) -> dict:
    """temperature / top_p from the model directory's generation_config.json, if it has them."""
    try:
        cfg = json.loads((path / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(cfg[k]) for k in ("temperature", "top_p") if isinstance(cfg.get(k), int | float)}


# -- LoRA adapters ----------------------------------------------------------------------------
QUANTIZE_WITH_ADAPTERS = ("--quantize cannot be combined with --adapter (stacked LoRA adapters need float linear "
                          "layers); merge the adapter first (llama2 convert BASE OUT --merge-adapter DIR)")


def adapter_name(path: str | os.PathLike) -> str:
    """The name ``--adapter DIR`` serves an adapter under: its directory's name, or for the
    folder a LoRA run writes (``RUN/model``, or ``RUN/adapter`` beside a merged model) the run's."""
    path = Path(path).resolve()
    return path.parent.name if path.name in ("model", "adapter") and path.parent.name else path.name


def parse_adapters(specs: Sequence[str]) -> dict[str, Path]:
    """``--adapter NAME=DIR`` / ``--adapter DIR`` values -> {name: directory}, in order. A value
    that is an existing path is a DIR even if it contains '=' (a folder may be named so)."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or Path(spec).exists() or "/" in name or os.sep in name:
            name, directory = adapter_name(spec), spec
        if not name or not directory:
            raise ValueError(f"--adapter {spec!r}: expected NAME=DIR or DIR")
        if name in out:
            raise ValueError(f"--adapter: two adapters are named {name!r} ({out[name]} and {directory}); "
                             "name them: --adapter NAME=DIR")
        out[name] = Path(directory)
    return out


def read_adapters(adapters: dict[str, Path]) -> list[dict]:
    """Each adapter's {linear name: (A, B, scaling)}, read (small files) and checked before the
    base model loads, so a wrong directory costs no model load."""
    out = []
    for name, path in adapters.items():
        acfg, layers, others = peft.read_adapter(path)
        if acfg.get("task_type") == "SEQ_CLS" or others:
            what = "a reward model's score head" if acfg.get("task_type") == "SEQ_CLS" else sorted(others)[0]
            raise CheckpointError(f"{path / peft.ADAPTER_WEIGHTS}: adapter {name!r} replaces {what} as well, which "
                                  "cannot be switched per request; serve it alone (--model DIR) or merged "
                                  "(llama2 convert BASE OUT --merge-adapter DIR)")
        out.append(layers)
    return out


def stack_onto(model, adapters: dict[str, Path], layers: list[dict]) -> None:
    """Stack the adapters over ``model``'s weights, after checking that each fits the base (with
    the message ``load_model(base, adapter=DIR)`` gives)."""
    for path, adapter in zip(adapters.values(), layers):
        for linear, (A, B, _) in adapter.items():
            try:
                base = model.get_submodule(linear)
            except AttributeError:
                base = None
            if base is None or not hasattr(base, "weight"):
                raise CheckpointError(f"{path / peft.ADAPTER_WEIGHTS}: adapter targets {linear}, which the base "
                                      "model has not")
            if (B.shape[0], A.shape[1]) != tuple(base.weight.shape):
                raise CheckpointError(f"{path / peft.ADAPTER_WEIGHTS}: adapter for {linear} is "
                                      f"{(B.shape[0], A.shape[1])} but the base weight is {tuple(base.weight.shape)}")
    try:
        stack_adapters(model, layers)
    except ValueError as e:  # e.g. a base whose layers are not plain nn.Linear
        raise CheckpointError(f"cannot stack the adapters over the base model: {e}") from None


# -- the app ----------------------------------------------------------------------------------
class _Edge:
    """The ASGI layer around everything the app does (inside Starlette's ServerErrorMiddleware).

    * Bodies over ``max_body_bytes`` are refused with 413 before the app reads a byte when
      Content-Length says so, else as soon as the chunks received pass the limit.
    * No exception gets past it. Starlette's own catch-all answers 500 but then re-raises,
      and uvicorn closes the connection — dropping the next request on a keep-alive
      connection too. Routes already turn their errors into responses (``_endpoint``); this
      is the backstop for anything outside them.
    """

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await BodyTooLarge(self.limit, int(declared)).response()(scope, receive, send)

        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # a chunked body (or one longer than it said)
                    raise BodyTooLarge(self.limit)
            return message

        state = {"started": False, "complete": False}

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["complete"] = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception as e:
            error = e if isinstance(e, APIError) else _internal_error(e)
            if error.status >= 500:
                log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            try:
                if not state["started"]:
                    await error.response()(scope, receive, send)
                elif not state["complete"]:  # end the body cleanly so the connection stays usable
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            except Exception:  # the client is gone: nothing left to tell it
                pass


def _endpoint(server: OpenAIServer, handler, *, authorize: bool = True):
    """A route: every failure of this request becomes this request's JSON error response
    (never an exception for the layers above, which would close the connection)."""

    async def endpoint(request: Request) -> Response:
        try:
            if authorize:
                server.authorize(request)
            response = await handler(request)
            return response if isinstance(response, Response) else JSONResponse(response)
        except APIError as e:
            return e.response()
        except (_ClientGone, ClientDisconnect):
            return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
        except Exception as e:
            log.exception("internal error in %s %s", request.method, request.url.path)
            return _internal_error(e).response()

    return endpoint


def create_app(
    model,
    api_key: str | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    guard=None,
    model_name: str | None = None,
    *,
    device: str | None = None,
    dtype=None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    verify: bool = True,
    adapters: dict[str, str | os.PathLike] | None = None,
    quantize: str | None = None,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    draft=None,
    draft_tokens: int = 4,
    compile: bool = False,
) -> FastAPI:
    """The FastAPI app for a model directory or a ``(Transformer, Tokenizer)`` pair.

    ``guard``: optional object with ``check(messages) -> (unsafe, categories)``; chat requests
    flagged unsafe are refused (400, code ``content_filter``) and flagged answers are withheld
    (``finish_reason: "content_filter"``); the verdict, ``{"unsafe", "categories"}``, rides as the
    extension field ``guard`` on each choice (a stream's last chunk of it) and on the refusal's error. ``max_body_bytes``: larger request bodies get 413.
    ``adapters``: {name: LoRA adapter directory} served over the model, unmerged; a request's
    ``model`` field picks one by name (the model is modified in place). ``quantize``: "int8" /
    "int4" / "int4:GROUP", every linear layer quantized after loading (``model.quant``; in place).
    ``prefill_chunk``: prompt tokens prefilled per engine step while other streams decode (None:
    whole prompts at once; see ``llama2.serve.engine``). ``draft``: a model directory or a
    ``(Transformer, Tokenizer)`` pair with the model's tokenizer, drafting ``draft_tokens`` tokens
    per round for a stream that decodes alone (speculative decoding). ``compile``: the engine's
    decode step is torch.compile'd (see ``llama2.serve.engine``).
    """
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be at least 1, got {max_body_bytes}")
    adapters = {name: Path(d) for name, d in (adapters or {}).items()}
    if quantize is not None:
        parse_quantize(quantize)
        if adapters:
            raise ValueError(QUANTIZE_WITH_ADAPTERS)
    layers = read_adapters(adapters)
    aliases: list[str] = []
    defaults: dict = {}
    if isinstance(model, tuple):
        model, tokenizer = model
        if quantize is not None:  # a model handed in already loaded
            quantize_model(model, quantize)
        name = model_name or "llama2"
    else:
        path = Path(model)
        # Quantized as it is read: the float model is never held whole (70B in int4 on one GPU).
        model = load_model(path, dtype=dtype, device=device or "cpu", verify=verify, quantize=quantize)
        tokenizer = load_tokenizer(path, model.config.vocab_size)
        name = model_name or path.resolve().name
        aliases = [str(model_dir) for model_dir in (path, path.resolve())]
        defaults = _read_generation_defaults(path)
    taken = sorted({name, *aliases} & set(adapters))
    if taken:
        raise ValueError(f"--adapter {taken[0]}={adapters[taken[0]]}: the base model is served under that name; "
                         "give the adapter another (--adapter NAME=DIR)")
    if adapters:
        stack_onto(model, adapters, layers)
    if draft is not None:
        draft = _load_draft(draft, tokenizer, device=device, dtype=dtype, verify=verify)

    server = OpenAIServer(model, tokenizer, name=name, aliases=aliases, api_key=api_key,
                          max_batch_size=max_batch_size, max_queue=max_queue, guard=guard, defaults=defaults,
                          adapters=list(adapters), prefill_chunk=prefill_chunk, draft=draft,
                          draft_tokens=draft_tokens, compile=compile)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()

    app = FastAPI(title="llama2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(_Edge, max_body_bytes=max_body_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:  # unknown path, method
        return APIError(exc.status_code, str(exc.detail)).response()

    # The chat page (static/chat.html), with this model's sampling defaults written in.
    page = files("llama2.serve").joinpath("static/chat.html").read_text(encoding="utf-8").replace(
        '<script type="application/json" id="defaults">{}</script>',
        f'<script type="application/json" id="defaults">{json.dumps(server.defaults)}</script>', 1)

    async def chat_page(request: Request) -> Response:
        return HTMLResponse(page)

    async def health(request: Request) -> dict:
        out = {"status": "ok", "model": server.name, "running": server.engine.running,
               "waiting": server.engine.queued}
        if server.engine.draft is not None:
            out["speculative"] = {k: server.engine.stats[k] for k in ("drafted", "accepted")}
        return out

    async def models(request: Request) -> dict:
        return {"object": "list", "data": server.model_cards()}

    async def model_info(request: Request) -> dict:
        return server.model_card(server.resolve_model(request.path_params["model_id"])[0])

    # The page is public (it holds no data); its requests carry the key typed into it.
    app.add_api_route("/", _endpoint(server, chat_page, authorize=False), methods=["GET"])
    app.add_api_route("/health", _endpoint(server, health, authorize=False), methods=["GET", "HEAD"])
    app.add_api_route("/v1/models", _endpoint(server, models), methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", _endpoint(server, model_info), methods=["GET"])
    app.add_api_route("/v1/completions", _endpoint(server, server.completions), methods=["POST"])
    app.add_api_route("/v1/chat/completions", _endpoint(server, server.chat), methods=["POST"])
    app.add_api_route("/tokenize", _endpoint(server, server.tokenize), methods=["POST"])
    app.add_api_route("/detokenize", _endpoint(server, server.detokenize), methods=["POST"])
    return app


def _load_draft(draft, tokenizer, *, device, dtype, verify: bool):
    """The draft model of ``--draft-model``: loaded like the model, refused in one line unless its
    tokenizer is the model's (its token ids must mean the same)."""
    if isinstance(draft, tuple):
        draft, draft_tok = draft
        where = "the draft model"
    else:
        where = f"--draft-model {draft}"
        draft_tok = load_tokenizer(Path(draft))
        draft = load_model(Path(draft), dtype=dtype, device=device or "cpu", verify=verify)
    if not draft_tok.same_pieces(tokenizer):
        raise ValueError(f"{where}: its tokenizer is not the model's ({draft_tok.vocab_size} vs "
                         f"{tokenizer.vocab_size} pieces); a draft must share the model's tokenizer")
    return draft


# -- the command ----------------------------------------------------------------------------
def configure(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="model directory (ours, Hugging Face or Meta; a LoRA adapter directory serves its base "
                             "with that adapter merged)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("LLAMA2_API_KEY"), metavar="KEY",
                        help="require 'Authorization: Bearer KEY' (default: $LLAMA2_API_KEY; none = open)")
    parser.add_argument("--model-name", metavar="NAME", help="the model id clients use (default: the directory name)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="serve a LoRA adapter directory (PEFT's format) over --model, under the model id NAME "
                             "(repeat for several; requests for different adapters share a batch). A bare DIR is "
                             "named after its directory, or after the run for a LoRA run's RUN/model or "
                             "RUN/adapter folder. Requests naming --model's own id get the base model")
    parser.add_argument("--quantize", default=None, metavar="int8|w8a8|int4[:GROUP]",
                        help="quantize every linear layer after loading (weight-only): int8 per output channel, or "
                             "int4 with a scale and zero per GROUP inputs (32, 64 or 128; default 128). "
                             "Not with --adapter")
    parser.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together (default: 8)")
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                        help="prefill a long prompt N tokens per step while other streams decode, so it does not "
                             f"stall them (default: {DEFAULT_PREFILL_CHUNK}; 0 = whole prompts in one forward)")
    parser.add_argument("--draft-model", default=None, metavar="DIR",
                        help="speculative decoding: a smaller model with the same tokenizer drafts --draft-tokens "
                             "tokens per round for a stream that decodes alone, which --model checks in one pass "
                             "(greedy text unchanged, sampled text keeps its distribution). Batched streams decode "
                             "as usual")
    parser.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                        help="tokens the draft proposes per round (default 4, with --draft-model)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the batched decode step (CUDA graphs on a GPU), one graph per batch "
                             "size bucket (1, 2, 4, ... --max-batch-size) and timeline bucket (attention over the "
                             "cache's first 128, 256, ... slots), each compiled when first needed. Not with "
                             "--adapter")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="sequences allowed to wait for a free slot before answering 503 (default: 64)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                        help="refuse larger request bodies with 413 before reading them "
                             f"(default: {DEFAULT_MAX_BODY_BYTES}, 4 MiB)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="f32, f16, bf16 or auto (the checkpoint's)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking the weight files against the directory's checksums.json")
    parser.add_argument("--guard", metavar="DIR", help="a Llama Guard-style classifier directory (llama2 guard)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _listen(host: str, port: int) -> socket.socket:
    """Bind the server's socket first, so a taken or invalid address costs no model load."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        # (proto is IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets, else each
        # response's body waits ~40 ms behind its headers)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ValueError(f"--host {host!r}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def main(args) -> int:
    import uvicorn

    # Every argument is checked before the model loads; a bad one is one line (the CLI prints
    # ValueErrors without a traceback) and exit status 1.
    for flag, value, least in (("--max-batch-size", args.max_batch_size, 1), ("--max-queue", args.max_queue, 0),
                               ("--max-body-bytes", args.max_body_bytes, 1), ("--prefill-chunk", args.prefill_chunk, 0)):
        if value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    if args.draft_tokens is not None and args.draft_model is None:
        raise ValueError("--draft-tokens needs --draft-model")
    draft_tokens = 4 if args.draft_tokens is None else args.draft_tokens
    if draft_tokens < 1:
        raise ValueError(f"--draft-tokens must be >= 1, got {draft_tokens}")
    device = check_device(args.device)
    dtype = parse_dtype(args.dtype)
    adapters = parse_adapters(args.adapter)
    if args.quantize is not None:
        parse_quantize(args.quantize)
        if adapters:
            raise ValueError(QUANTIZE_WITH_ADAPTERS)
    sock = _listen(args.host, args.port)
    try:
        guard = None
        if args.guard:
            guard = load_guard(args.guard, device=device)
        app = create_app(args.model, api_key=args.api_key, max_batch_size=args.max_batch_size,
                         max_queue=args.max_queue, guard=guard, model_name=args.model_name,
                         device=device, dtype=dtype, max_body_bytes=args.max_body_bytes,
                         verify=args.verify, adapters=adapters, quantize=args.quantize,
                         prefill_chunk=args.prefill_chunk or None, draft=args.draft_model,
                         draft_tokens=draft_tokens, compile=args.compile)
        name = app.state.server.name
        port = sock.getsockname()[1]
        with_adapters = f" with adapter(s) {', '.join(map(repr, adapters))}" if adapters else ""
        print(f"serving {name!r}{with_adapters} on http://{args.host}:{port}/v1 ({device}); "
              f"chat page: http://{args.host}:{port}/", flush=True)
        if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            print("warning: listening beyond this machine without --api-key", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level=args.log_level)).run(sockets=[sock])
    finally:
        sock.close()
    return 0
