"""What quantization costs a trained model: perplexity at every precision, ours beside llama.cpp's,
and the chat model's assistant-world suite and multiple-choice task quantized beside unquantized.

    python benchmarks/quant_accuracy.py --model runs/tiny/pretrain/model --chat runs/tiny/chat \\
        [--text held_out.txt] [--llama-perplexity PATH] [--out benchmarks/results/quant_accuracy.json]

Perplexity is computed as llama.cpp's ``llama-perplexity -c CTX`` does (llama2.eval.perplexity),
on ``--text`` (default: the bundled corpus documents the tiny recipe's data stage holds out
for validation, val_fraction 0.02, which pretraining never saw). Rows: our model in float32 and
bfloat16, int8 and int4 at each group size (``--quantize``); then the same weights exported to
GGUF (``llama2 convert --dtype f32|f16|q8_0|q4_0|...``) and scored by llama.cpp's own
``llama-perplexity`` when the binary is given or on PATH. ``--chat``: the assistant-world suite
(task accuracy, safe and false refusal) and the bundled multiple-choice task on the chat model
unquantized, int8 and int4.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llama2.checkpoint import convert, load_model, load_tokenizer
from llama2.checkpoint.gguf import GGUF_QUANTS, export_gguf
from llama2.eval.perplexity import perplexity, read_text
from llama2.eval.stats import sign_test

SPECS = ("int8", "int4:32", "int4:64", "int4:128")
GGUF_FLOATS = {"f32": torch.float32, "f16": torch.float16}
_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def held_out_text(val_fraction: float = 0.02) -> str:
    """The bundled corpus documents a data stage with ``val_fraction`` holds out (the tiny
    recipe's 0.02), joined by blank lines."""
    from llama2.corpus import default_corpus_files
    from llama2.data.shards import in_validation, read_documents

    docs = [d for f in default_corpus_files() for d in read_documents(f) if in_validation(d, val_fraction)]
    return "\n\n".join(docs)


def ours(model_dir: Path, text: str, ctx: int, dtype=None, quantize: str | None = None) -> dict:
    try:
        model = load_model(model_dir, dtype=dtype, quantize=quantize)
    except ValueError as e:  # e.g. an int4 group that does not divide a layer's width
        return {"error": str(e)}
    tok = load_tokenizer(model_dir, model.config.vocab_size)
    t0 = time.perf_counter()
    r = perplexity(model, tok, text, ctx=ctx)
    return {"perplexity": r["perplexity"], "stderr": r["stderr"], "chunks": r["chunks"],
            "seconds": time.perf_counter() - t0}


def llama_cpp(binary: str, gguf: Path, text_file: Path, ctx: int, threads: int) -> dict:
    run = subprocess.run([binary, "-m", str(gguf), "-f", str(text_file), "-c", str(ctx), "-t", str(threads),
                          "-b", str(ctx)], capture_output=True, text=True)
    m = _FINAL.search(run.stdout + run.stderr)
    if run.returncode != 0 or not m:
        tail = (run.stderr or run.stdout).strip().splitlines()[-1:]
        return {"error": f"llama-perplexity exited with {run.returncode}: {tail[0] if tail else ''}"}
    return {"perplexity": float(m.group(1)), "stderr": float(m.group(2))}


def chat_rows(chat_dir: Path, max_items: int, group: int) -> list[dict]:
    from llama2.eval.cli import evaluate_model
    from llama2.eval.multiple_choice import evaluate

    rows = []
    for spec in (None, "int8", f"int4:{group}"):
        t0 = time.perf_counter()
        suite = evaluate_model(str(chat_dir), max_items=max_items, quantize=spec, gatt_dialogues=10)
        model = load_model(chat_dir, quantize=spec)
        mc = evaluate(model, load_tokenizer(chat_dir, model.config.vocab_size))
        rows.append({"quantize": spec or "float32", "task_accuracy": suite["task_accuracy"],
                     "safe_refusal_rate": suite["safe_refusal_rate"],
                     "false_refusal_rate": suite["false_refusal_rate"],
                     "right": [a["right"] for a in suite["answers"]],  # prompt by prompt, for sign tests
                     "mc_acc": mc.acc, "mc_acc_norm": mc.acc_norm, "mc_n": mc.n,
                     "seconds": time.perf_counter() - t0})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a trained model directory (e.g. the tiny "
                                                              "recipe's pretrain/model)")
    ap.add_argument("--text", type=Path, default=None, help="held-out text file (default: the corpus documents "
                                                            "the tiny recipe's data stage holds out)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chat", type=Path, default=None, help="a chat model directory for the suite and the "
                                                            "multiple-choice task")
    ap.add_argument("--max-items", type=int, default=100, help="suite prompts per kind")
    ap.add_argument("--llama-perplexity", default=shutil.which("llama-perplexity"),
                    help="llama.cpp's llama-perplexity binary (default: from PATH; none: no GGUF rows)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        text_file = args.text or Path(tmp) / "held_out.txt"
        if args.text is None:
            text_file.write_text(held_out_text())
        text = read_text(text_file)
        rows = [{"side": "ours", "precision": "float32", **ours(args.model, text, args.ctx)},
                {"side": "ours", "precision": "bfloat16", **ours(args.model, text, args.ctx, dtype=torch.bfloat16)}]
        rows += [{"side": "ours", "precision": spec, **ours(args.model, text, args.ctx, quantize=spec)}
                 for spec in SPECS]
        if args.llama_perplexity:
            for name in (*GGUF_FLOATS, *GGUF_QUANTS):
                gguf = Path(tmp) / f"m.{name}.gguf"
                if name in GGUF_FLOATS:
                    convert(args.model, gguf, "gguf", dtype=GGUF_FLOATS[name])
                else:
                    export_gguf(args.model, gguf, quant=name, log=lambda line: None)
                rows.append({"side": "llama.cpp", "precision": name,
                             **llama_cpp(args.llama_perplexity, gguf, text_file, args.ctx, args.threads)})
                gguf.unlink()
    group = next((int(r["precision"][5:]) for r in rows if r["precision"].startswith("int4") and "error" not in r), 32)
    result = {"model": str(args.model), "text_chars": len(text), "ctx": args.ctx, "threads": args.threads,
              "perplexity": rows, "chat": chat_rows(args.chat, args.max_items, group) if args.chat else None}
    base = rows[0]["perplexity"]
    print(f"perplexity of {args.model} on {len(text):,} characters of held-out text, ctx {args.ctx}")
    print(f"{'side':<10} {'precision':<10} {'PPL':>10} {'+/-':>7} {'vs float32':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['side']:<10} {r['precision']:<10} n/a: {r['error']}")
        else:
            print(f"{r['side']:<10} {r['precision']:<10} {r['perplexity']:>10.3f} {r['stderr']:>7.3f} "
                  f"{r['perplexity'] / base - 1:>+10.2%}")
    if result["chat"]:
        print(f"\nchat model {args.chat}: assistant-world suite ({args.max_items} prompts per kind) and the "
              f"multiple-choice task")
        print(f"{'weights':<10} {'task acc':>9} {'safe refusal':>13} {'false refusal':>14} {'MC acc':>13}  "
              f"suite answers vs float32")
        ref = result["chat"][0]["right"]
        for r in result["chat"]:
            gained = sum(b and not a for a, b in zip(ref, r["right"]))
            lost = sum(a and not b for a, b in zip(ref, r["right"]))
            r["vs_float32"] = {"gained": gained, "lost": lost, "sign_test_p": sign_test(gained, lost)}
            print(f"{r['quantize']:<10} {r['task_accuracy']:>9.1%} {r['safe_refusal_rate']:>13.1%} "
                  f"{r['false_refusal_rate']:>14.1%} {r['mc_acc']:>6.1%} of {r['mc_n']:<3}  "
                  f"gained {gained}, lost {lost} of {len(ref)} (sign test p = {r['vs_float32']['sign_test_p']:.2f})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
