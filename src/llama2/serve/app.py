"""An OpenAI-compatible HTTP server for a Llama 2 model directory (``llama2 serve``).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /health``, ``POST /tokenize``, ``POST /detokenize`` (the last two as in vLLM).
Requests are decoded together by :class:`llama2.serve.engine.Engine` (continuous batching).

Prompts and BOS: a string prompt is encoded with exactly one BOS in front; a prompt given as
token ids is used exactly as given, so it must carry its own BOS (lm-eval does, with
``add_bos_token=True``). Chat requests use Meta's Llama 2 chat format (``encode_chat``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama2.chat import encode_chat
from llama2.generate import SamplingParams

from .engine import (
    TEXT_CONTEXT_TOKENS,
    Engine,
    EngineError,
    IncrementalDetokenizer,
    QueueFull,
    Result,
    TokenLogprob,
)
from .engine import Request as EngineRequest

log = logging.getLogger("llama2.serve")

# Meta's chat defaults (facts §4), used when a request does not say and the model directory
# has no generation_config.json that does.
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 0.6, 0.9
MAX_LOGPROBS = 20


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


# -- request bodies -------------------------------------------------------------------------
class _Common(BaseModel):
    # Unknown fields are ignored: OpenAI clients send some we have no use for (e.g. "user").
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 or 0 = off
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None


class ChatBody(_Common):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


_FIELD_HELP = {
    "prompt": "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "stop must be a string or a list of strings",
    "messages": "messages must be a list of {role, content} objects",
}


def _parse(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        if param in _FIELD_HELP and err["type"] != "missing":
            message = _FIELD_HELP[param]
        else:
            where = ".".join(str(p) for p in err["loc"])
            message = f"{where}: {err['msg']}" if where else err["msg"]
        raise APIError(400, message, param=param) from None


async def _read_json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


# -- the server -----------------------------------------------------------------------------
class OpenAIServer:
    """State and request handling behind the routes (one model, one engine)."""

    def __init__(self, model, tokenizer, *, name: str, aliases: Sequence[str] = (), api_key: str | None = None,
                 max_batch_size: int = 8, max_queue: int = 64, guard=None, defaults: dict | None = None):
        self.tokenizer = tokenizer
        self.name = name
        self.aliases = {name, *aliases}
        self.api_key = api_key
        self.guard = guard
        self._guard_lock = asyncio.Lock()  # a guard model is not assumed to be re-entrant
        self.max_seq_len = model.config.max_seq_len
        self.vocab_size = model.config.vocab_size
        self.defaults = {"temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P, **(defaults or {})}
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue)
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

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.aliases:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.name}'",
                           param="model", code="model_not_found")

    def check_prompt(self, prompt: list[int], max_tokens: int, param: str) -> None:
        if not prompt:
            raise APIError(400, "the prompt is empty", param=param)
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})", param=param)
        if len(prompt) + max_tokens > self.max_seq_len:
            raise APIError(
                400,
                f"this model's maximum context length is {self.max_seq_len} tokens, but {len(prompt) + max_tokens} "
                f"were requested ({len(prompt)} in the prompt + {max_tokens} for the completion); "
                "shorten the prompt or lower max_tokens",
                param="max_tokens", code="context_length_exceeded",
            )

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
            raise APIError(503, str(e), type="server_error") from None

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
            raise APIError(500, str(e)) from None
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
    def completion_prompts(self, prompt) -> list[tuple[list[int], str | None]]:
        """(token ids, the prompt's own text or None) per prompt; strings get exactly one BOS."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is an empty list", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append((self.tokenizer.encode(p, bos=True), p))
            else:
                out.append((list(p), None))
        return out

    async def completions(self, request: Request) -> Response:
        body: CompletionBody = _parse(CompletionBody, await _read_json(request))
        self.check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of is not supported by this server (use n)", param="best_of")
        if body.stream and body.logprobs is not None:
            raise APIError(400, "logprobs are not supported with stream=true", param="logprobs")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default
        prompts = self.completion_prompts(body.prompt)
        for ids, _ in prompts:
            self.check_prompt(ids, max_tokens, "prompt")
        want_logprobs = body.logprobs is not None
        params = self.sampling(body, max_tokens, want_logprobs, body.logprobs or 0)
        echo_logprobs = (body.logprobs or 0) if (body.echo and want_logprobs) else None
        requests = [
            EngineRequest(ids, _choice_params(params, j), prompt_logprobs=echo_logprobs)
            for ids, _ in prompts for j in range(body.n)
        ]
        handles = self.submit(requests)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echoes = [(text if text is not None else self.tokenizer.decode(ids)) if body.echo else ""
                  for ids, text in prompts for _ in range(body.n)]
        if body.stream:
            return _sse(self._stream_completion(rid, created, handles, echoes, prompts, body))

        results = await self.collect(request, handles)
        choices = []
        for i, (res, echo) in enumerate(zip(results, echoes)):
            ids = prompts[i // body.n][0]
            choice = {"index": i, "text": echo + res.text, "logprobs": None, "finish_reason": res.finish_reason}
            if want_logprobs:
                choice["logprobs"] = self.completion_logprobs(ids, res, body.echo, len(echo))
            choices.append(choice)
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": self.name,
            "choices": choices, "usage": _usage(sum(len(ids) for ids, _ in prompts), results),
        })

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

    async def _stream_completion(self, rid, created, handles, echoes, prompts, body) -> AsyncIterator[dict]:
        def chunk(index: int, text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": self.name,
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
        if (body.stream_options or {}).get("include_usage"):
            usage = _usage(sum(len(ids) for ids, _ in prompts), [results[i] for i in sorted(results)])
            yield {"id": rid, "object": "text_completion", "created": created, "model": self.name,
                   "choices": [], "usage": usage}

    # -- /v1/chat/completions ------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        body: ChatBody = _parse(ChatBody, await _read_json(request))
        self.check_model(body.model)
        messages = _chat_messages(body.messages)
        try:
            prompt = encode_chat(self.tokenizer, messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        if self.guard is not None:
            unsafe, categories = await self.check_guard(messages)
            if unsafe:
                raise APIError(400, "the conversation was flagged as unsafe by the safety classifier"
                               + (f" ({', '.join(categories)})" if categories else ""),
                               param="messages", code="content_filter")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:  # as long as the context allows
            if len(prompt) >= self.max_seq_len:
                self.check_prompt(prompt, 1, "messages")
            max_tokens = self.max_seq_len - len(prompt)
        self.check_prompt(prompt, max_tokens, "messages")
        params = self.sampling(body, max_tokens, body.logprobs, (body.top_logprobs or 0) if body.logprobs else 0)
        handles = self.submit([EngineRequest(prompt, _choice_params(params, j), continue_prompt=False)
                               for j in range(body.n)])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        # With a guard the answer is checked before anyone sees it, so a stream is sent at the end.
        if body.stream and self.guard is None:
            return _sse(self._stream_chat(rid, created, handles, len(prompt), body))

        results = await self.collect(request, handles)
        contents, reasons = [r.text for r in results], [r.finish_reason for r in results]
        if self.guard is not None:
            for i, text in enumerate(contents):
                unsafe, _ = await self.check_guard(messages + [{"role": "assistant", "content": text}])
                if unsafe:
                    contents[i], reasons[i] = "", "content_filter"
        if body.stream:
            return _sse(self._replay_chat(rid, created, contents, reasons, len(prompt), results, body))
        choices = []
        for i, (res, text, reason) in enumerate(zip(results, contents, reasons)):
            choices.append({
                "index": i, "message": {"role": "assistant", "content": text},
                "logprobs": self.chat_logprobs(res) if body.logprobs and reason != "content_filter" else None,
                "finish_reason": reason,
            })
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": self.name,
            "choices": choices, "usage": _usage(len(prompt), results),
        })

    def chat_logprobs(self, res: Result) -> dict:
        def entry(token: int, logprob: float) -> dict:
            return {"token": self.token_string(token), "logprob": logprob, "bytes": self.token_bytes(token)}

        return {"content": [
            {**entry(e.token, e.logprob), "top_logprobs": [entry(t, v) for t, v in e.top.items()]}
            for e in res.logprobs
        ]}

    def _chat_chunk(self, rid, created, index, delta: dict, finish: str | None) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def _usage_chunk(self, rid, created, prompt_len: int, results: list[Result]) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name,
                "choices": [], "usage": _usage(prompt_len, results)}

    async def _stream_chat(self, rid, created, handles, prompt_len, body) -> AsyncIterator[dict]:
        for i in range(len(handles)):
            yield self._chat_chunk(rid, created, i, {"role": "assistant", "content": ""}, None)
        results: dict[int, Result] = {}
        async for i, delta, result in _merged(handles):
            if result is None:
                yield self._chat_chunk(rid, created, i, {"content": delta}, None)
            else:
                results[i] = result
                yield self._chat_chunk(rid, created, i, {}, result.finish_reason)
        if (body.stream_options or {}).get("include_usage"):
            yield self._usage_chunk(rid, created, prompt_len, [results[i] for i in sorted(results)])

    async def _replay_chat(self, rid, created, contents, reasons, prompt_len, results, body) -> AsyncIterator[dict]:
        for i, (text, reason) in enumerate(zip(contents, reasons)):
            yield self._chat_chunk(rid, created, i, {"role": "assistant", "content": text}, None)
            yield self._chat_chunk(rid, created, i, {}, reason)
        if (body.stream_options or {}).get("include_usage"):
            yield self._usage_chunk(rid, created, prompt_len, results)

    # -- small endpoints -----------------------------------------------------------------
    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "llama2",
                "max_model_len": self.max_seq_len}

    async def tokenize(self, request: Request) -> Response:
        body = await _read_json(request)
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        self.check_model(body.get("model"))
        if "messages" in body:
            try:
                ids = encode_chat(self.tokenizer, _chat_messages(body["messages"]))
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
        elif isinstance(body.get("prompt"), str):
            add_special = body.get("add_special_tokens", True)
            if not isinstance(add_special, bool):
                raise APIError(400, "add_special_tokens must be true or false", param="add_special_tokens")
            ids = self.tokenizer.encode(body["prompt"], bos=add_special)
        else:
            raise APIError(400, "send a string 'prompt' (or chat 'messages') to tokenize", param="prompt")
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.max_seq_len})

    async def detokenize(self, request: Request) -> Response:
        body = await _read_json(request)
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        self.check_model(body.get("model"))
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise APIError(400, "tokens must be a list of token ids", param="tokens")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})", param="tokens")
        return JSONResponse({"prompt": self.tokenizer.decode(ids)})


class _ClientGone(Exception):
    pass


def _choice_params(params: SamplingParams, j: int) -> SamplingParams:
    """Choice j of n: a seeded request gives its choices seeds seed, seed+1, ... so they differ."""
    return params if params.seed is None or j == 0 else replace(params, seed=params.seed + j)


def _usage(prompt_tokens: int, results: Sequence[Result]) -> dict:
    completion = sum(len(r.tokens) for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _chat_messages(messages: Any) -> list[dict]:
    """OpenAI messages -> [{role, content}] with string content (text parts are joined)."""
    if not isinstance(messages, list):
        raise APIError(400, _FIELD_HELP["messages"], param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"message {i} must be an object with 'role' and 'content'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"message {i}: only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        out.append({"role": m.get("role"), "content": content} if "role" in m else dict(m))
    return out


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
        except EngineError as e:
            yield f"data: {json.dumps(APIError(500, str(e)).body())}\n\n"
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


# -- the app --------------------------------------------------------------------------------
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
) -> FastAPI:
    """The FastAPI app for a model directory or a ``(Transformer, Tokenizer)`` pair.

    ``guard``: optional object with ``check(messages) -> (unsafe, categories)``; chat requests
    flagged unsafe are refused (400, code ``content_filter``) and flagged answers are withheld
    (``finish_reason: "content_filter"``).
    """
    aliases: list[str] = []
    defaults: dict = {}
    if isinstance(model, tuple):
        model, tokenizer = model
        name = model_name or "llama2"
    else:
        from llama2.checkpoint import load_model, load_tokenizer

        path = Path(model)
        model = load_model(path, dtype=dtype, device=device or "cpu")
        tokenizer = load_tokenizer(path, model.config.vocab_size)
        name = model_name or path.resolve().name
        aliases = [str(model_dir) for model_dir in (path, path.resolve())]
        defaults = _read_generation_defaults(path)

    server = OpenAIServer(model, tokenizer, name=name, aliases=aliases, api_key=api_key,
                          max_batch_size=max_batch_size, max_queue=max_queue, guard=guard, defaults=defaults)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()

    app = FastAPI(title="llama2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, exc: _ClientGone) -> Response:
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return APIError(exc.status_code, str(exc.detail), code=None).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return APIError(500, f"internal server error: {type(exc).__name__}").response()

    def guarded(handler):
        async def endpoint(request: Request) -> Response:
            server.authorize(request)
            return await handler(request)
        return endpoint

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": server.name, "running": server.engine.running,
                "waiting": server.engine.queued}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        server.authorize(request)
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str, request: Request) -> dict:
        server.authorize(request)
        server.check_model(model_id)
        return server.model_card()

    app.add_api_route("/v1/completions", guarded(server.completions), methods=["POST"])
    app.add_api_route("/v1/chat/completions", guarded(server.chat), methods=["POST"])
    app.add_api_route("/tokenize", guarded(server.tokenize), methods=["POST"])
    app.add_api_route("/detokenize", guarded(server.detokenize), methods=["POST"])
    return app


# -- the command ----------------------------------------------------------------------------
def configure(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory (ours, Hugging Face or Meta)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("LLAMA2_API_KEY"), metavar="KEY",
                        help="require 'Authorization: Bearer KEY' (default: $LLAMA2_API_KEY; none = open)")
    parser.add_argument("--model-name", metavar="NAME", help="the model id clients use (default: the directory name)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together (default: 8)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="sequences allowed to wait for a free slot before answering 503 (default: 64)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="f32, f16, bf16 or auto (the checkpoint's)")
    parser.add_argument("--guard", metavar="DIR", help="a Llama Guard-style classifier directory (llama2 guard)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def main(args) -> int:
    import uvicorn

    from llama2.checkpoint import parse_dtype
    from llama2.generate import default_device

    device = args.device or default_device()
    guard = None
    if args.guard:
        from llama2.serve.guard import load_guard  # only when asked: it loads a second model

        guard = load_guard(args.guard, device=device)
    app = create_app(args.model, api_key=args.api_key, max_batch_size=args.max_batch_size,
                     max_queue=args.max_queue, guard=guard, model_name=args.model_name,
                     device=device, dtype=parse_dtype(args.dtype))
    name = app.state.server.name
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 ({device})", flush=True)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: listening beyond this machine without --api-key", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
