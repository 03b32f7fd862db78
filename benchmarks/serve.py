"""Serving throughput: N concurrent streaming clients vs the same requests one at a time.

Starts ``llama2 serve`` as a subprocess on a free loopback port (a random preset saved to a
temporary directory, or ``--model DIR``) and sends ``--clients`` greedy completion requests
of different prompts twice:

  * one at a time, not streamed: the peer (what a server without batching achieves), and
    each request's reference answer;
  * all at once, streamed (server-sent events), decoded together by the batching engine.

It prints total generated tokens/s and p50/p99 request latency for both, the speed-up as a
ratio, and checks that nothing was lost or garbled: every streamed text must equal the
request's non-streamed greedy answer, token counts included.

    python benchmarks/serve.py                                  # 'tiny' shape, 8 clients, CPU
    python benchmarks/serve.py --preset 110m --clients 16 --max-tokens 64
    python benchmarks/serve.py --model path/to/model --device cuda --clients 32
"""

from __future__ import annotations

import argparse
import asyncio
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

FIXTURE_TOKENIZER = Path(__file__).resolve().parents[2] / "shared/fixtures/llama2-tokenizer/tokenizer.model"

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


async def one_request(client: httpx.AsyncClient, url: str, body: dict, stream: bool) -> dict:
    t0 = time.perf_counter()
    if not stream:
        r = await client.post(url, json=body)
        r.raise_for_status()
        data = r.json()
        return {"text": data["choices"][0]["text"], "tokens": data["usage"]["completion_tokens"],
                "latency": time.perf_counter() - t0, "ttft": None}
    text, tokens, ttft = [], None, None
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
                if choice["text"] and ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(choice["text"])
    return {"text": "".join(text), "tokens": tokens, "latency": time.perf_counter() - t0, "ttft": ttft}


async def run(base: str, bodies: list[dict]) -> dict:
    url = base + "/v1/completions"
    limits = httpx.Limits(max_connections=len(bodies) + 1)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await one_request(client, url, {**bodies[0], "max_tokens": 4}, stream=False)  # warm-up
        await one_request(client, url, {**bodies[0], "max_tokens": 4}, stream=True)

        t0 = time.perf_counter()
        alone = [await one_request(client, url, b, stream=False) for b in bodies]
        alone_wall = time.perf_counter() - t0

        t0 = time.perf_counter()
        together = await asyncio.gather(*(one_request(client, url, b, stream=True) for b in bodies))
        together_wall = time.perf_counter() - t0
        health = (await client.get(base + "/health")).json()
    return {"alone": alone, "alone_wall": alone_wall, "together": together, "together_wall": together_wall,
            "health": health}


def summarize(results: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    lat = [r["latency"] for r in results]
    out = {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
           "p50_s": statistics.median(lat), "p99_s": percentile(lat, 99)}
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    if ttft:
        out["ttft_p50_s"] = statistics.median(ttft)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="a saved model directory (default: a random --preset)")
    ap.add_argument("--preset", default="tiny", help="random model shape when no --model (vocabulary: the tokenizer's)")
    ap.add_argument("--tokenizer", type=Path, default=FIXTURE_TOKENIZER, help="tokenizer.model for a random preset")
    ap.add_argument("--clients", type=int, default=8, help="concurrent requests (default: 8)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default: 64)")
    ap.add_argument("--max-batch-size", type=int, default=None, help="server batch size (default: --clients)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            if not args.tokenizer.is_file():
                raise SystemExit(f"no tokenizer at {args.tokenizer}; pass --tokenizer or --model")
            model_dir, name = Path(tmp) / f"random-{args.preset}", f"random {args.preset}"
            save_random_model(args.preset, args.tokenizer, model_dir, args.seed)
        else:
            model_dir, name = args.model, str(args.model)
        port = free_port()
        cmd = [sys.executable, "-m", "llama2", "serve", "--model", str(model_dir), "--port", str(port),
               "--max-batch-size", str(args.max_batch_size or args.clients), "--max-queue", str(4 * args.clients),
               "--device", args.device, "--log-level", "warning"]
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
            bodies = [{"prompt": PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i})"),
                       "max_tokens": args.max_tokens, "temperature": 0} for i in range(args.clients)]
            res = asyncio.run(run(base, bodies))
        finally:
            server.terminate()
            server.wait(timeout=30)

    alone, together = summarize(res["alone"], res["alone_wall"]), summarize(res["together"], res["together_wall"])
    garbled = [i for i, (a, b) in enumerate(zip(res["alone"], res["together"]))
               if a["text"] != b["text"] or a["tokens"] != b["tokens"]]
    result = {
        "model": name, "device": args.device, "clients": args.clients, "max_tokens": args.max_tokens,
        "one_at_a_time": alone, "concurrent_streaming": together,
        "throughput_ratio": together["tok_s"] / alone["tok_s"],
        "streamed_equals_alone": f"{args.clients - len(garbled)}/{args.clients}",
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{name}, {args.device}, {args.clients} clients x {args.max_tokens} tokens (greedy)")
        for label, s in (("one at a time      ", alone), ("concurrent, stream ", together)):
            ttft = f", first token p50 {s['ttft_p50_s'] * 1000:.0f} ms" if "ttft_p50_s" in s else ""
            print(f"  {label} {s['tok_s']:8.1f} tokens/s  latency p50 {s['p50_s']:.2f} s  "
                  f"p99 {s['p99_s']:.2f} s  ({s['tokens']} tokens in {s['wall_s']:.2f} s{ttft})")
        print(f"  batching speed-up (tokens/s, concurrent / one at a time): {result['throughput_ratio']:.2f}x")
        print(f"  streamed text identical to the non-streamed greedy answer: {result['streamed_equals_alone']}")
    return 0 if not garbled else 1


if __name__ == "__main__":
    sys.exit(main())
