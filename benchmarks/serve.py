"""Serving throughput and latency: N concurrent streaming clients vs the same requests one at a time.

Starts ``llama2 serve`` as a subprocess on a free loopback port (a random preset saved to a
temporary directory, or ``--model DIR``) and sends greedy completion requests of different
prompts:

  * one at a time, not streamed: the peer (what a server without batching achieves), and
    each request's reference answer;
  * for each N in ``--clients`` (e.g. 1,8,32,64): N requests at once, streamed (server-sent
    events), decoded together by the batching engine.

For each N it prints total generated tokens/s, p50/p99 request latency, time to first token
(first streamed text) and inter-token latency (the gaps between a stream's text chunks), the
speed-up over one at a time as a ratio, and checks that nothing was lost or garbled: every
streamed text must equal the request's non-streamed greedy answer, token counts included.

``--long-prompt L``: a stall test of chunked prefill. ``--stall-streams`` streams decode; once
each has its first text, a prompt of L tokens arrives. Measured on this server (prefill
``--prefill-chunk`` tokens per step) and on a second one with ``--prefill-chunk 0`` (whole
prompts in one forward, the peer): the running streams' longest gap between two texts, their
p99 gap, and the long request's time to first token. The ratio is the peer's longest gap over
ours (> 1: chunking shortened the stall).

    python benchmarks/serve.py                                  # 'tiny' shape, 1/8/32/64 clients, CPU
    python benchmarks/serve.py --preset 110m --clients 1,8 --max-tokens 64
    python benchmarks/serve.py --model path/to/model --device cuda --clients 1,8,32,64
    python benchmarks/serve.py --preset 110m --clients 1 --long-prompt 960 --prefill-chunk 128
    python benchmarks/serve.py --model BIG --draft-model SMALL --clients 1,8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

FIXTURE_TOKENIZER = Path(__file__).resolve().parents[1] / "tests/fixtures/llama2-tokenizer/tokenizer.model"

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "Here is a recipe for pancakes:",
    "The three laws of thermodynamics are",
    "Dear hiring manager, I am writing to apply for",
    "A llama is",
    "def fibonacci(n):",
    "The most important lesson I learned this year was that",
    "Question: What is the boiling point of water?\nAnswer:",
    "In 1969, the first humans",
    "To be or not to be,",
    "The quick brown fox",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def save_random_model(preset: str, tokenizer: Path, out: Path, seed: int) -> None:
    from llama2 import ModelConfig, Tokenizer, Transformer, save_model

    tok = Tokenizer(tokenizer)
    cfg = ModelConfig.from_preset(preset, vocab_size=tok.vocab_size)
    save_model(Transformer.from_config(cfg, seed=seed), out, tokenizer=tok)


async def one_request(client: httpx.AsyncClient, url: str, body: dict, stream: bool, started=None) -> dict:
    """One completion; streamed: its text chunks' times too. ``started`` (a list) gets an entry at
    the stream's first text."""
    t0 = time.perf_counter()
    if not stream:
        r = await client.post(url, json=body)
        r.raise_for_status()
        data = r.json()
        return {"text": data["choices"][0]["text"], "tokens": data["usage"]["completion_tokens"],
                "latency": time.perf_counter() - t0, "ttft": None}
    text, tokens, ttft, stamps = [], None, None, []
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                if choice["text"]:
                    stamps.append(time.perf_counter())
                    if ttft is None:
                        ttft = stamps[-1] - t0
                        if started is not None:
                            started.append(ttft)
                text.append(choice["text"])
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"text": "".join(text), "tokens": tokens, "latency": time.perf_counter() - t0, "ttft": ttft,
            "gaps": gaps}


async def run(base: str, bodies: list[dict], clients: list[int], warm_rounds: bool = False) -> dict:
    """Every body once alone (the reference), then the first N of them at once for each N.
    ``warm_rounds``: each N is run once untimed first (a compiled server builds its graphs then)."""
    url = base + "/v1/completions"
    limits = httpx.Limits(max_connections=len(bodies) + 1)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await one_request(client, url, {**bodies[0], "max_tokens": 4}, stream=False)  # warm-up
        await one_request(client, url, {**bodies[0], "max_tokens": 4}, stream=True)
        for n in clients if warm_rounds else ():
            await asyncio.gather(*(one_request(client, url, b, stream=True) for b in bodies[:n]))

        t0 = time.perf_counter()
        alone = [await one_request(client, url, b, stream=False) for b in bodies]
        alone_wall = time.perf_counter() - t0

        together = {}
        for n in clients:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(one_request(client, url, b, stream=True) for b in bodies[:n]))
            together[n] = (results, time.perf_counter() - t0)
        health = (await client.get(base + "/health")).json()
    return {"alone": alone, "alone_wall": alone_wall, "together": together, "health": health}


async def stall(base: str, bodies: list[dict], long_prompt: list[int]) -> dict:
    """The streams of ``bodies`` decode; once all have their first text, ``long_prompt`` arrives."""
    url = base + "/v1/completions"
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=len(bodies) + 2)) as client:
        await one_request(client, url, {"prompt": long_prompt, "max_tokens": 1, "temperature": 0}, stream=False)
        started: list[float] = []
        streams = [asyncio.create_task(one_request(client, url, b, stream=True, started=started)) for b in bodies]
        while len(started) < len(bodies):
            await asyncio.sleep(0.002)
        long = await one_request(client, url, {"prompt": long_prompt, "max_tokens": 4, "temperature": 0},
                                 stream=True)
        results = await asyncio.gather(*streams)
    gaps = [g for r in results for g in r["gaps"]]
    return {"streams": len(bodies), "long_prompt_tokens": len(long_prompt), "max_gap_s": max(gaps),
            "itl_p99_s": percentile(gaps, 99), "itl_p50_s": statistics.median(gaps), "long_ttft_s": long["ttft"],
            "stream_texts": [r["text"] for r in results]}


@contextlib.contextmanager
def serving(model_dir: Path, args, batch: int, queue: int, prefill_chunk: int | None):
    """``llama2 serve`` in a subprocess on a free port; yields its base URL once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "llama2", "serve", "--model", str(model_dir), "--port", str(port),
           "--max-batch-size", str(batch), "--max-queue", str(queue),
           "--device", args.device, "--log-level", "warning"]
    if prefill_chunk is not None:
        cmd += ["--prefill-chunk", str(prefill_chunk)]
    if args.compile:
        cmd += ["--compile"]
    if args.draft_model is not None:
        cmd += ["--draft-model", str(args.draft_model), "--draft-tokens", str(args.draft_tokens)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with status {server.returncode}")
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not come up")
            time.sleep(0.2)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def summarize(results: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    lat = [r["latency"] for r in results]
    out = {"requests": len(results), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
           "p50_s": statistics.median(lat), "p99_s": percentile(lat, 99)}
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    if ttft:
        out["ttft_p50_s"], out["ttft_p99_s"] = statistics.median(ttft), percentile(ttft, 99)
    gaps = [g for r in results for g in r.get("gaps", [])]
    if gaps:
        out["itl_p50_s"], out["itl_p99_s"] = statistics.median(gaps), percentile(gaps, 99)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="a saved model directory (default: a random --preset)")
    ap.add_argument("--preset", default="tiny", help="random model shape when no --model (vocabulary: the tokenizer's)")
    ap.add_argument("--tokenizer", type=Path, default=FIXTURE_TOKENIZER, help="tokenizer.model for a random preset")
    ap.add_argument("--clients", default="1,8,32,64",
                    help="concurrent requests, one run per comma-separated count (default: 1,8,32,64)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default: 64)")
    ap.add_argument("--max-batch-size", type=int, default=None,
                    help="server batch size (default: the largest --clients)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                    help="the server's --prefill-chunk (default: the server's default)")
    ap.add_argument("--compile", action="store_true",
                    help="serve with --compile; each stream count then runs once untimed first, so the "
                         "graphs of its batch buckets are compiled before the timed run")
    ap.add_argument("--draft-model", type=Path, default=None, metavar="DIR",
                    help="serve with this draft model (speculative decoding for a stream decoding alone: the "
                         "one-at-a-time requests and the 1-stream run); /health's acceptance is reported")
    ap.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="with --draft-model (default: 4)")
    ap.add_argument("--long-prompt", type=int, default=0, metavar="L",
                    help="also run the stall test with an L-token prompt, against a whole-prompt server (0: off)")
    ap.add_argument("--stall-streams", type=int, default=4, help="streams decoding in the stall test (default: 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args(argv)
    try:
        clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        raise SystemExit(f"--clients {args.clients!r}: expected counts like 1,8,32,64") from None
    if not clients or min(clients) < 1:
        raise SystemExit(f"--clients {args.clients!r}: expected counts >= 1")
    most = max(clients)
    if args.long_prompt < 0 or args.stall_streams < 1:
        raise SystemExit("--long-prompt must be >= 0 and --stall-streams >= 1")
    if args.long_prompt:  # the stall test's streams need their one-at-a-time answers too
        most = max(most, args.stall_streams)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            if not args.tokenizer.is_file():
                raise SystemExit(f"no tokenizer at {args.tokenizer}; pass --tokenizer or --model")
            model_dir, name = Path(tmp) / f"random-{args.preset}", f"random {args.preset}"
            save_random_model(args.preset, args.tokenizer, model_dir, args.seed)
        else:
            model_dir, name = args.model, str(args.model)
        bodies = [{"prompt": PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i})"),
                   "max_tokens": args.max_tokens, "temperature": 0} for i in range(most)]
        batch = args.max_batch_size or (max(most, args.stall_streams + 1) if args.long_prompt else most)
        with serving(model_dir, args, batch, 4 * most, args.prefill_chunk) as base:
            res = asyncio.run(run(base, bodies, clients, warm_rounds=args.compile))
            if args.long_prompt:
                long_prompt = [1] + [(7 * i) % 1000 + 100 for i in range(args.long_prompt - 1)]
                stall_bodies = bodies[: args.stall_streams]
                ours = asyncio.run(stall(base, stall_bodies, long_prompt))
        if args.long_prompt:
            with serving(model_dir, args, batch, 4 * most, 0) as base:
                whole = asyncio.run(stall(base, stall_bodies, long_prompt))

    runs, garbled_any = [], False
    for n in clients:
        results, wall = res["together"][n]
        alone = summarize(res["alone"][:n], sum(r["latency"] for r in res["alone"][:n]))
        together = summarize(results, wall)
        garbled = [i for i, (a, b) in enumerate(zip(res["alone"], results))
                   if a["text"] != b["text"] or a["tokens"] != b["tokens"]]
        garbled_any |= bool(garbled)
        runs.append({"clients": n, "one_at_a_time": alone, "concurrent_streaming": together,
                     "throughput_ratio": together["tok_s"] / alone["tok_s"],
                     "streamed_equals_alone": f"{n - len(garbled)}/{n}"})
    result = {"model": name, "device": args.device, "max_tokens": args.max_tokens, "compiled": args.compile,
              "max_batch_size": batch, "runs": runs}
    if "speculative" in res["health"]:
        result["speculative"] = {**res["health"]["speculative"], "draft_tokens": args.draft_tokens}
    if args.long_prompt:
        alone_texts = [a["text"] for a in res["alone"][: args.stall_streams]]
        same = sum(a == b == c for a, b, c in zip(alone_texts, ours.pop("stream_texts"), whole.pop("stream_texts")))
        garbled_any |= same != args.stall_streams
        result["stall"] = {"prefill_chunk": args.prefill_chunk, "chunked": ours, "whole_prompt": whole,
                           "max_gap_ratio": whole["max_gap_s"] / ours["max_gap_s"],
                           "streamed_equals_alone": f"{same}/{args.stall_streams}"}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{name}, {args.device}, {args.max_tokens} tokens per request (greedy), server batch "
              f"{result['max_batch_size']}{', compiled' if args.compile else ''}; times in ms")
        print(f"{'streams':>7} {'tok/s':>8} {'alone':>8} {'ratio':>6} {'lat p50':>8} {'lat p99':>8} "
              f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}  same text")
        for r in runs:
            s_, a = r["concurrent_streaming"], r["one_at_a_time"]
            print(f"{r['clients']:>7} {s_['tok_s']:8.1f} {a['tok_s']:8.1f} {r['throughput_ratio']:5.2f}x "
                  f"{s_['p50_s'] * 1000:8.0f} {s_['p99_s'] * 1000:8.0f} {s_['ttft_p50_s'] * 1000:9.0f} "
                  f"{s_['ttft_p99_s'] * 1000:9.0f} {s_.get('itl_p50_s', 0) * 1000:8.1f} "
                  f"{s_.get('itl_p99_s', 0) * 1000:8.1f}  {r['streamed_equals_alone']}")
        print("tok/s: all streams together; alone: the same requests one at a time, not streamed; TTFT: time to "
              "the first streamed text; ITL: gaps between a stream's text chunks")
        if "speculative" in result:
            sp = result["speculative"]
            print(f"speculative decoding (K = {sp['draft_tokens']}): {sp['accepted']} of {sp['drafted']} drafted "
                  f"tokens accepted")
        if args.long_prompt:
            st = result["stall"]
            chunk = "the server's default" if args.prefill_chunk is None else args.prefill_chunk
            print(f"\nstall: {args.stall_streams} streams decoding when a {args.long_prompt}-token prompt arrives "
                  f"(ms)")
            print(f"{'prefill':>22} {'longest gap':>12} {'ITL p99':>8} {'ITL p50':>8} {'long TTFT':>10}")
            for label, r in ((f"chunks ({chunk})", st["chunked"]), ("whole (peer)", st["whole_prompt"])):
                print(f"{label:>22} {r['max_gap_s'] * 1000:12.0f} {r['itl_p99_s'] * 1000:8.1f} "
                      f"{r['itl_p50_s'] * 1000:8.1f} {r['long_ttft_s'] * 1000:10.0f}")
            print(f"longest gap, whole / chunked: {st['max_gap_ratio']:.2f}x; streamed text equal to alone: "
                  f"{st['streamed_equals_alone']}")
    return 0 if not garbled_any else 1


if __name__ == "__main__":
    sys.exit(main())
