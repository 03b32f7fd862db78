"""Does a huge request body stall the server? /health latency idle vs while one arrives.

Starts ``llama2 serve`` as a subprocess (a random preset saved to a temporary directory, or
``--model DIR``) with its default ``--max-body-bytes`` unless told otherwise, then probes
``GET /health`` back to back on one keep-alive connection:

  * idle;
  * while a 20 MB prompt is sent with a Content-Length (refused with 413 before it is read);
  * while a 20 MB prompt is sent chunked (refused with 413 once the chunks pass the limit);
  * while a prompt just under the limit is sent, parsed and tokenized (off the event loop),
    then refused for exceeding the model's context (400).

For each it prints the big request's status and duration and the /health p50 / max latency
as a ratio to the idle p50. Timings only; nothing here asserts a speed.

    python benchmarks/serve_health.py
    python benchmarks/serve_health.py --huge-mb 50 --json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FIXTURE_TOKENIZER = Path(__file__).resolve().parents[2] / "shared/fixtures/llama2-tokenizer/tokenizer.model"
DEFAULT_LIMIT = 4 * 1024 * 1024  # llama2.serve.app.DEFAULT_MAX_BODY_BYTES (not imported: keeps this a client)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_random_model(preset: str, tokenizer: Path, out: Path, seed: int) -> None:
    from llama2 import ModelConfig, Tokenizer, Transformer, save_model

    tok = Tokenizer(tokenizer)
    cfg = ModelConfig.from_preset(preset, vocab_size=tok.vocab_size)
    save_model(Transformer.from_config(cfg, seed=seed), out, tokenizer=tok)


def connect(port: int) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def health_once(conn: http.client.HTTPConnection) -> float:
    t0 = time.perf_counter()
    conn.request("GET", "/health")
    r = conn.getresponse()
    r.read()
    if r.status != 200:
        raise RuntimeError(f"/health answered {r.status}")
    return time.perf_counter() - t0


def probe_while(port: int, busy: threading.Event, done: threading.Event) -> list[float]:
    """/health latencies from when ``busy`` is set until ``done`` is."""
    conn = connect(port)
    health_once(conn)
    busy.wait()
    out = []
    while not done.is_set():
        out.append(health_once(conn))
    conn.close()
    return out


def big_request(port: int, body, chunked: bool) -> tuple[int, float, str]:
    conn = connect(port)
    t0 = time.perf_counter()
    if chunked:
        conn.request("POST", "/v1/completions", body=iter(body), encode_chunked=True,
                     headers={"Content-Type": "application/json"})
    else:
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    elapsed = time.perf_counter() - t0
    conn.close()
    try:
        message = json.loads(data)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = data[:80].decode(errors="replace")
    return r.status, elapsed, message


def during(port: int, body, chunked: bool = False) -> dict:
    busy, done = threading.Event(), threading.Event()
    latencies: list[float] = []
    prober = threading.Thread(target=lambda: latencies.extend(probe_while(port, busy, done)))
    prober.start()
    busy.set()
    try:
        status, elapsed, message = big_request(port, body, chunked)
    finally:
        done.set()
        prober.join()
    return {"status": status, "request_s": elapsed, "message": message, "probes": len(latencies),
            "health_p50_ms": statistics.median(latencies) * 1000 if latencies else None,
            "health_max_ms": max(latencies) * 1000 if latencies else None}


def prompt_body(n_bytes: int) -> bytes:
    """A completions body of about ``n_bytes`` whose prompt is ordinary text (so tokenizing it is real work)."""
    head, tail = b'{"prompt": "', b'", "max_tokens": 1, "temperature": 0}'
    sentence = b"The quick brown fox jumps over the lazy dog. "
    fill = n_bytes - len(head) - len(tail)
    return head + (sentence * (fill // len(sentence) + 1))[:fill] + tail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="a saved model directory (default: a random --preset)")
    ap.add_argument("--preset", default="tiny", help="random model shape when no --model")
    ap.add_argument("--tokenizer", type=Path, default=FIXTURE_TOKENIZER, help="tokenizer.model for a random preset")
    ap.add_argument("--max-body-bytes", type=int, default=DEFAULT_LIMIT, help="the server's limit (default: 4 MiB)")
    ap.add_argument("--huge-mb", type=float, default=20, help="size of the oversized bodies in MB (default: 20)")
    ap.add_argument("--idle-probes", type=int, default=200)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args(argv)

    huge = prompt_body(int(args.huge_mb * 1e6))
    under = prompt_body(args.max_body_bytes - 1024)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            if not args.tokenizer.is_file():
                raise SystemExit(f"no tokenizer at {args.tokenizer}; pass --tokenizer or --model")
            model_dir = Path(tmp) / f"random-{args.preset}"
            save_random_model(args.preset, args.tokenizer, model_dir, 0)
        else:
            model_dir = args.model
        port = free_port()
        cmd = [sys.executable, "-m", "llama2", "serve", "--model", str(model_dir), "--port", str(port),
               "--device", "cpu", "--max-body-bytes", str(args.max_body_bytes), "--log-level", "warning"]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 300
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited with status {server.returncode}")
                try:
                    health_once(connect(port))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("the server did not come up") from None
                    time.sleep(0.2)
            conn = connect(port)
            for _ in range(20):  # warm-up
                health_once(conn)
            idle = [health_once(conn) for _ in range(args.idle_probes)]
            conn.close()
            idle_p50 = statistics.median(idle) * 1000
            step = 1 << 16
            scenarios = {
                f"{args.huge_mb:g} MB body, Content-Length": during(port, huge),
                f"{args.huge_mb:g} MB body, chunked": during(port, [huge[i:i + step] for i in range(0, len(huge), step)],
                                                           chunked=True),
                f"{len(under) / 2**20:.2f} MiB prompt, tokenized": during(port, under),
            }
        finally:
            server.terminate()
            server.wait(timeout=30)

    for s in scenarios.values():
        s["p50_ratio"] = s["health_p50_ms"] / idle_p50 if s["health_p50_ms"] else None
        s["max_ratio"] = s["health_max_ms"] / idle_p50 if s["health_max_ms"] else None
    result = {"max_body_bytes": args.max_body_bytes, "idle_health_p50_ms": idle_p50,
              "idle_health_max_ms": max(idle) * 1000, "scenarios": scenarios}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"/health idle: p50 {idle_p50:.2f} ms, max {max(idle) * 1000:.2f} ms ({len(idle)} probes); "
          f"--max-body-bytes {args.max_body_bytes}")
    for name, s in scenarios.items():
        if s["probes"]:
            probes = (f"/health p50 {s['health_p50_ms']:.2f} ms ({s['p50_ratio']:.1f}x idle), "
                      f"max {s['health_max_ms']:.2f} ms ({s['max_ratio']:.1f}x), {s['probes']} probes")
        else:
            probes = "no /health probe completed meanwhile"
        print(f"  {name}: {s['status']} in {s['request_s'] * 1000:.0f} ms; {probes}")
        print(f"      ({s['message'][:100]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
