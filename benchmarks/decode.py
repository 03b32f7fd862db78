"""Greedy decoding speed: our Generator vs transformers (and llama.cpp) on the same random model.

Every side loads the SAME weights from one saved model directory, runs on the same device with
the same thread count, decodes the same prompt token ids greedily with its KV cache, and emits
exactly ``--new-tokens`` tokens (EOS ignored everywhere: ``stop_at_eos=False`` on ours,
``min_new_tokens`` on transformers', an argmax loop on llama.cpp's). Each side is warmed up
first; the timed runs alternate between all the sides, and the best of ``--repeats`` is
reported (prefill included, so tokens/s = new tokens / wall time).

The sides:

* ours and transformers in ``--dtype`` (float32 on CPU, bfloat16 on CUDA by default);
* ``--bf16``: ours again with bfloat16 weights, the peer of llama.cpp's f16;
* ``--quantize int8,w8a8,int4:64``: ours again, loaded with ``load_model(path, quantize=SPEC)`` per
  SPEC (int8 | w8a8 | int4 | int4:32|64|128): weight-only int8/int4 on PyTorch's packed kernels with
  bfloat16 activations; w8a8 (CPU) = int8 weights and activations on fbgemm's kernels, the rest of
  the model in float32 (with ``--compile``, fbgemm's product is one opaque op inside the compiled
  step). Quantized greedy tokens legitimately drift from the float run after a
  while; the table says how many of the n agree;
* llama.cpp, through llama-cpp-python when it is installed (``--llama-cpp``; on by default when
  ``import llama_cpp`` works, ``--no-llama-cpp`` turns it off; skipped with a note otherwise):
  the same directory exported to GGUF as f32 and f16 (``llama2.checkpoint.convert``) and as
  q8_0 and q4_0 (``export_gguf(quant=...)``, llama-quantize ``--pure``), run with the same
  threads. Compared at the same precision: ours float32 / llama.cpp f32 (F32 KV cache, as ours;
  its greedy tokens should equal ours), ours bfloat16 (``--bf16``; else ours in ``--dtype`` float16 or bfloat16) / llama.cpp f16 (llama.cpp's
  default F16 KV cache), the faster of ours w8a8 and int8 / q8_0, ours int4 / q4_0 (blocks of 32: the int4 run with
  the smallest group is its peer). GGUF needs a ``tokenizer.model`` with the model's
  vocabulary: ``--model DIR``'s own, or ``--tokenizer``; a random preset with the Llama 2
  vocabulary (110m, 7b, ...) uses the repository's test copy (tests/fixtures/llama2-tokenizer).
  Each GGUF type is first run for two tokens in a child process: one that crashes this llama.cpp
  build (a CPU feature it assumes but cannot use) is left out with a note, not the whole run.

The roofline: the device's copy bandwidth is measured in the same run (a buffer copied, bytes
read + written per second), and each of our sides reports its weight bytes x decode steps per
second as a fraction of it (a step reads every weight once, whatever ``--batch``).

Ratios are ours' tokens/s over the other side's (> 1: ours is faster); "greedy tokens" counts the
positions where a side's tokens equal ours in ``--dtype``. ``--json`` prints one object: the
headline keys (``ours_tok_s``, ``transformers_tok_s``, ``ratio``, ``same_tokens``, ...) plus
``sides`` (every row), ``quantized``, ``llama_cpp`` (null when skipped, ``llama_cpp_note`` says
why), ``ratios`` and each side's ``tokens``.

    python benchmarks/decode.py                                   # 110m preset, CPU, float32
    python benchmarks/decode.py --threads 2 --quantize int8,int4:64   # + quantized ours, + llama.cpp
    python benchmarks/decode.py --threads 2 --quantize int8 --no-llama-cpp --json
    python benchmarks/decode.py --threads 2 --compile --bf16 --quantize w8a8   # every CPU precision
    python benchmarks/decode.py --device cuda --dtype bfloat16 --preset 7b --compile --batch 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llama2 import Generator, ModelConfig, SamplingParams, Transformer, load_model, save_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the Llama 2 vocabulary, kept in the repository as test data: a random preset's GGUF tokenizer
FIXTURE_TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "llama2-tokenizer" / "tokenizer.model"
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")


def build_random_model(preset: str, dtype: torch.dtype, device: str, seed: int) -> Transformer:
    """A randomly initialised preset, created directly in ``dtype`` on ``device``."""
    cfg = ModelConfig.from_preset(preset)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # so a 7B model is never materialised in float32
    try:
        with torch.device(device):
            model = Transformer(cfg)
        model.init_weights()
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ours(gen: Generator, prompts: list[list[int]], n: int, device: str) -> tuple[float, list[int]]:
    """Seconds to decode every prompt (one batch), and the first row's tokens."""
    params = SamplingParams(temperature=0.0, max_new_tokens=n, stop_at_eos=False)
    sync(device)
    t0 = time.perf_counter()
    out = gen.generate(prompts, params)[0]
    sync(device)
    return time.perf_counter() - t0, out.tokens


def copy_bandwidth(device: str, nbytes: int) -> float:
    """The device's memory bandwidth in bytes/s as a copy measures it: ``nbytes`` read and
    ``nbytes`` written, best of 5 (what the roofline of decoding is compared with)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads from memory at least: every tensor of the model but the token
    embeddings (one row of them per token)."""
    embed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in embed]
    return sum(t.numel() * t.element_size() for t in tensors)


def floor_step(model: Transformer, compiled: bool) -> Callable[[], None]:
    """One token's worth of the model's matrix-vector products and nothing else: every weight
    streams through memory once, which bounds batch-1 decoding from below. ``compiled`` (``--compile``
    on a CPU): the products compiled together as our decode step compiles them
    (``generate.compile_decode_step``); otherwise one eager ``F.linear`` call each."""
    import torch.nn.functional as F

    from llama2.generate import compile_decode_step

    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.zeros(1, 1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}

    def products(xs, weights):
        return [F.linear(xs[w.shape[1]], w) for w in weights]

    step = compile_decode_step(products, model) if compiled else products
    return lambda: step(xs, weights)


@torch.inference_mode()
def time_floor(step: Callable[[], None], n: int, device: str) -> float:
    """Seconds for n calls of a :func:`floor_step`."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def time_hf(model, prompts: list[list[int]], n: int, device: str) -> tuple[float, list[int]]:
    from transformers import GenerationConfig

    ids = torch.tensor(prompts, device=device)  # (all of one length: no padding)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    sync(device)
    return time.perf_counter() - t0, out[0, len(prompts[0]):].tolist()


def time_llama_cpp(llm, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """Greedy decoding in llama.cpp, prefill included: evaluate the prompt, then n times take the
    argmax of the last logits (read straight from the context: no sampler, no logits copy into
    Python lists) and evaluate it. EOS is just another token here."""
    import llama_cpp
    import numpy as np

    vocab = llm.n_vocab()
    tokens: list[int] = []
    t0 = time.perf_counter()
    llm.reset()
    llm.eval(prompt)
    for i in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        tokens.append(int(logits.argmax()))
        if i + 1 < n:
            llm.eval(tokens[-1:])
    return time.perf_counter() - t0, tokens


def gguf_tokenizer(args, path: Path, vocab_size: int) -> tuple[Path | None, str | None]:
    """(tokenizer.model for the GGUF export, None) or (None, why llama.cpp is skipped)."""
    from llama2.checkpoint import load_tokenizer
    from llama2.checkpoint.gguf import tokenizer_file

    if args.tokenizer is not None:
        file = args.tokenizer
    elif args.model is not None:
        file = tokenizer_file(args.model)
    else:
        file = FIXTURE_TOKENIZER if FIXTURE_TOKENIZER.is_file() else None
    if file is None:
        return None, (f"{path}: no tokenizer.model (GGUF needs one): pass --tokenizer, or --model with a "
                      f"directory that has one")
    try:
        load_tokenizer(file, vocab_size)
    except Exception as e:  # a vocabulary of another size: the preset's random model cannot take it
        return None, f"{e}: pass --tokenizer, or --model with a directory that has a matching tokenizer.model"
    return Path(file), None


# Loads a GGUF file in llama.cpp and evaluates two tokens: run in a child process first, since a
# llama.cpp build can die on a CPU that advertises instructions it cannot run (seen: AMX tile
# instructions in a VM that does not enable AMX, a general protection fault on q8_0 and q4_0).
PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=16, n_threads=int(sys.argv[2]), n_gpu_layers=int(sys.argv[3]),
                      verbose=False)
llm.eval([1, 2])
"""


def probe_llama_cpp(file: Path, threads: int, gpu_layers: int) -> str | None:
    """None if llama.cpp evaluates ``file`` in a child process, else why not (one line)."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", PROBE, str(file), str(threads), str(gpu_layers)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return None
    why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    last = (proc.stderr.strip().splitlines() or [""])[-1][:120]
    return f"{why}{': ' + last if last else ''}"


def load_llama_cpp(args, path: Path, vocab_size: int, n_ctx: int, threads: int, out: Path,
                   say: Callable[[str], None]) -> tuple[dict, str | None]:
    """({gguf type: llama_cpp.Llama}, None) for the model at ``path``, or ({}, why not)."""
    try:
        import llama_cpp
    except ImportError as e:
        return {}, f"llama.cpp side skipped: llama-cpp-python not installed ({e})"
    try:
        import gguf  # noqa: F401  (the export's writer)
    except ImportError:
        return {}, "llama.cpp side skipped: the gguf package (pip install 'llama2[gguf]') is not installed"
    gpu_layers = 0
    if args.device != "cpu":
        if not llama_cpp.llama_supports_gpu_offload():
            return {}, (f"llama.cpp side skipped: this llama-cpp-python build cannot offload to {args.device} "
                            f"(a CPU llama.cpp against a GPU run compares nothing)")
        gpu_layers = -1
    tok_file, why = gguf_tokenizer(args, path, vocab_size)
    if tok_file is None:
        return {}, f"llama.cpp side skipped: {why}"
    from llama2.checkpoint import convert
    from llama2.checkpoint.gguf import export_gguf

    llms, failed = {}, []
    for kind in GGUF_TYPES:
        file = out / f"model.{kind}.gguf"
        say(f"exporting GGUF {kind} -> {file.name}")
        if kind in ("f32", "f16"):
            convert(path, file, "gguf", dtype=torch.float32 if kind == "f32" else torch.float16, tokenizer=tok_file)
        else:
            export_gguf(path, file, tokenizer_path=tok_file, quant=kind, log=say)
        why = probe_llama_cpp(file, threads, gpu_layers)
        if why is not None:
            failed.append(f"{kind} ({why})")
            continue
        # f32: an F32 KV cache too (type 0), as ours in float32; the rest keep llama.cpp's default F16 cache
        cache = dict(type_k=0, type_v=0) if kind == "f32" else {}
        llms[kind] = llama_cpp.Llama(model_path=str(file), n_ctx=n_ctx, n_threads=threads,
                                     n_threads_batch=threads, n_batch=512, n_gpu_layers=gpu_layers,
                                     verbose=False, seed=0, **cache)
    if failed:
        return llms, (f"llama.cpp {', '.join(failed)} left out: this llama.cpp build failed to run it (a CPU "
                      f"feature it assumes? rebuild llama-cpp-python for this CPU, see the README)")
    return llms, None


def quant_name(spec: str) -> str:
    from llama2.model.quant import parse_quantize

    kind, group = parse_quantize(spec)
    return kind if group is None else f"{kind}:{group}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="110m", help="model shape (llama2.model.PRESETS); random weights")
    ap.add_argument("--model", type=Path, help="use this saved model directory instead of a random preset")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                    help="float32 on CPU, bfloat16 on CUDA by default")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt length in tokens (BOS + random ids)")
    ap.add_argument("--batch", type=int, default=1,
                    help="prompts decoded together by ours and transformers (llama.cpp: batch 1 only); tokens/s "
                         "counts every row, the greedy-token columns the first")
    ap.add_argument("--copy-bytes", type=int, default=None, metavar="N",
                    help="buffer size of the copy-bandwidth measurement (default 1 GiB on a GPU, 256 MiB on a CPU)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for EVERY side: torch's, and llama.cpp's n_threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pause", type=float, default=0.5, metavar="S",
                    help="seconds of idle before each timed run, so no side's spinning threads slow the next "
                         "(default: 0.5)")
    ap.add_argument("--compile", action="store_true",
                    help="our Generator with its compiled decode step (CUDA graphs on a GPU); transformers "
                         "stays eager")
    ap.add_argument("--bf16", action="store_true",
                    help="also time ours with bfloat16 weights, llama.cpp f16's peer")
    ap.add_argument("--quantize", default=None, metavar="SPEC[,SPEC...]",
                    help="also time ours loaded with load_model(quantize=SPEC) for each SPEC: int8, int4, "
                         "int4:32|64|128 (weight-only, bfloat16 activations)")
    ap.add_argument("--llama-cpp", dest="llama_cpp", action="store_true", default=None,
                    help="also time llama.cpp (llama-cpp-python) on GGUF exports f32/f16/q8_0/q4_0 of the same "
                         "model (default: on when llama_cpp imports)")
    ap.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false", help="leave llama.cpp out")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="tokenizer.model for the GGUF export (default: the --model directory's; for a random "
                         "preset with the Llama 2 vocabulary, tests/fixtures/llama2-tokenizer)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args(argv)

    dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    dname = str(dtype).removeprefix("torch.")
    cpu_compiled = args.compile and args.device == "cpu"  # the products become reductions (llama2.model.matvec)
    # quantized layers take bfloat16 activations (their kernels' dtype): the rest of the model too
    qdtype = dtype if args.device != "cpu" and dtype != torch.float32 else torch.bfloat16
    specs = [quant_name(s) for s in args.quantize.split(",") if s.strip()] if args.quantize else []
    specs = list(dict.fromkeys(specs))  # a spec twice is timed once
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        # Every compiled side compiles the same function (Generator._last_logits) for its own model:
        # past dynamo's default of 8 graphs per function the later sides would silently run eager.
        torch._dynamo.config.recompile_limit = 64
    threads = torch.get_num_threads()
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    def say(line: str) -> None:  # progress and notes: stderr under --json, so stdout stays one object
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    n = args.new_tokens
    llms: dict = {}
    note = None
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))  # the GGUF files live until the end
        if args.model is None:
            model = build_random_model(args.preset, dtype, args.device, args.seed)
            name = f"random {args.preset}"
            path = save_model(model, tmp / "model", dtype=dtype)
            del model
        else:
            path, name = args.model, str(args.model)
        ours = load_model(path, dtype=dtype, device=args.device)
        theirs = LlamaForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
        def act_dtype(spec: str) -> torch.dtype:
            # w8a8 takes float32 in; so does int8 compiled on a CPU, whose products become float32
            # sums (llama2.model.matvec) and where bf16 norms and attention only cost time; the
            # weight-only kernels otherwise take bf16
            if spec == "w8a8" or (spec == "int8" and cpu_compiled):
                return torch.float32
            return qdtype

        quantized = {s: load_model(path, dtype=act_dtype(s), device=args.device, quantize=s) for s in specs}
        half = load_model(path, dtype=torch.bfloat16, device=args.device) if args.bf16 else None
        cfg = ours.config
        if args.prompt_len + n > cfg.max_seq_len:
            raise SystemExit(f"prompt-len + new-tokens exceeds the context ({cfg.max_seq_len})")
        if args.batch < 1:
            raise SystemExit(f"--batch must be at least 1, got {args.batch}")
        if args.batch > 1 and args.llama_cpp is not False:
            note = "llama.cpp side skipped: it is timed at batch 1 only"
        elif args.llama_cpp is not False:
            llms, note = load_llama_cpp(args, path, cfg.vocab_size, args.prompt_len + n + 8, threads, tmp, say)
            for llm in llms.values():
                stack.callback(llm.close)
        if note is not None and args.json:  # the table ends with it otherwise
            say(note)
        g = torch.Generator().manual_seed(args.seed)
        prompts = [[1] + torch.randint(3, cfg.vocab_size, (args.prompt_len - 1,), generator=g).tolist()
                   for _ in range(args.batch)]
        prompt = prompts[0]

        # (side, precision, timed run): run(k) decodes k new tokens -> (seconds, tokens)
        sides: list[tuple[str, str, Callable[[int], tuple[float, list[int]]]]] = []
        gen = Generator(ours, compile=args.compile)
        sides.append(("ours", dname, lambda k: time_ours(gen, prompts, k, args.device)))
        sides.append(("transformers", dname, lambda k: time_hf(theirs, prompts, k, args.device)))
        if half is not None:
            hgen = Generator(half, compile=args.compile)
            sides.append(("ours bfloat16", "bfloat16", lambda k: time_ours(hgen, prompts, k, args.device)))
        for s, qmodel in quantized.items():
            qgen = Generator(qmodel, compile=args.compile)
            sides.append((f"ours {s}", f"{s}, {str(act_dtype(s)).removeprefix('torch.')} activations",
                          lambda k, qgen=qgen: time_ours(qgen, prompts, k, args.device)))
        for kind, llm in llms.items():
            sides.append((f"llama.cpp {kind}", kind, lambda k, llm=llm: time_llama_cpp(llm, prompt, k)))

        # Warm-up (allocator, oneDNN/cuBLAS kernel selection, lazy imports, page-ins of the GGUF
        # mmaps) for every side; the compiled step is warmed up at the timed length, so its
        # compilation is never timed.
        for _ in range(2):
            for side, _, run in sides:
                run(n if args.compile and side.startswith("ours") else min(n, 16))
        best = {side: float("inf") for side, _, _ in sides}
        tokens: dict[str, list[int]] = {}
        best_floor = float("inf")
        floor = floor_step(ours, cpu_compiled)
        time_floor(floor, 2, args.device)  # warm-up (and, compiled, its compilation)
        for _ in range(args.repeats):  # alternate, so a busy spell on the machine hits every side
            for side, _, run in sides:
                # A pause first: OpenMP threads (torch's, and llama.cpp's own runtime) spin a while
                # after their last parallel region, and would compete with the next side's.
                time.sleep(args.pause)
                t, tokens[side] = run(n)
                best[side] = min(best[side], t)
            best_floor = min(best_floor, time_floor(floor, n, args.device))
        copy_bytes = args.copy_bytes or (2**30 if args.device.startswith("cuda") else 2**28)
        bandwidth = copy_bandwidth(args.device, copy_bytes)
        models = {"ours": ours, "ours bfloat16": half, **{f"ours {s}": m for s, m in quantized.items()}}
        read = {side: weight_bytes(m) for side, m in models.items() if m is not None}

    def same(side: str) -> str:
        return f"{sum(a == b for a, b in zip(tokens[side], tokens['ours']))}/{n}"

    # each side's same-precision peer among ours, for the ratio ours / peer (> 1: ours is faster)
    int4 = sorted((s for s in specs if s.startswith("int4")), key=lambda s: int(s.split(":")[1]))
    peers = {"transformers": "ours", "llama.cpp f32": "ours" if dtype == torch.float32 else None,
             "llama.cpp f16": "ours bfloat16" if half is not None else
                              "ours" if dtype in (torch.float16, torch.bfloat16) else None,
             # 8-bit weights: the faster of ours w8a8 (8-bit activations too, as q8_0) and int8
             "llama.cpp q8_0": min((f"ours {s}" for s in ("w8a8", "int8") if s in specs), key=best.get, default=None),
             "llama.cpp q4_0": f"ours {int4[0]}" if int4 else None}
    B = args.batch
    rows = []
    for side, precision, _ in sides:
        peer = peers.get(side)
        # The roofline: each step reads the weights once (whatever the batch), so weight bytes x
        # steps/s over the measured copy bandwidth is the fraction of the memory's speed reached.
        frac = read[side] * (n / best[side]) / bandwidth if side in read else None
        rows.append({"side": side, "precision": precision, "tok_s": B * n / best[side],
                     "peer": peer, "ratio": best[side] / best[peer] if peer else None,
                     "same_tokens": None if side == "ours" else same(side),
                     "weight_bytes": read.get(side), "bandwidth_fraction": frac})
    match = sum(a == b for a, b in zip(tokens["ours"], tokens["transformers"]))
    result = {
        "model": name, "params": cfg.num_params(), "device": args.device, "dtype": dname,
        "threads": threads, "batch": B, "prompt_tokens": len(prompt), "new_tokens": n,
        "ours_tok_s": B * n / best["ours"], "transformers_tok_s": B * n / best["transformers"],
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "ours_bandwidth_fraction": read["ours"] * (n / best["ours"]) / bandwidth,
        "ratio": best["transformers"] / best["ours"],
        "matmul_floor_tok_s": n / best_floor,
        "same_tokens": f"{match}/{n}", "compiled": args.compile,
        "sides": rows,
        "quantized": {s: {"tok_s": B * n / best[f"ours {s}"], "same_tokens": same(f"ours {s}"),
                          "activations": str(act_dtype(s)).removeprefix("torch.")} for s in specs},
        "llama_cpp": {kind: {"tok_s": n / best[f"llama.cpp {kind}"], "same_tokens": same(f"llama.cpp {kind}")}
                      for kind in llms} or None,
        "llama_cpp_note": note,
        "ratios": {f"{r['peer']} / {r['side']}": r["ratio"] for r in rows if r["ratio"] is not None},
        "tokens": tokens,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{name} ({cfg.num_params() / 1e6:.0f}M params), {args.device}, {dname}, {threads} threads, batch {B}, "
              f"prompt {len(prompt)} tokens, {n} new tokens, best of {args.repeats}")
        w = max(len(r["side"]) for r in rows)
        pw = max(len(r["precision"]) for r in rows)
        label = {"ours": f"ours {dname}"}
        print(f"  {'side':<{w}}  {'precision':<{pw}}  {'tokens/s':>9}  {'of bandwidth':>12}  "
              f"{'ours / this side (which ours)':<30}  greedy tokens = ours {dname}")
        for r in rows:
            peer = label.get(r["peer"], r["peer"])
            ratio = f"{r['ratio']:.2f}x  ({peer})" if r["ratio"] is not None else "-"
            frac = f"{r['bandwidth_fraction']:.0%}" if r["bandwidth_fraction"] is not None else "-"
            print(f"  {r['side']:<{w}}  {r['precision']:<{pw}}  {r['tok_s']:9.1f}  {frac:>12}  {ratio:<30}  "
                  f"{r['same_tokens'] or '(reference)'}")
        if note is not None:
            print(f"  {note}")
        print(f"  copy bandwidth {result['copy_bandwidth_gb_s']:8.1f} GB/s (a {copy_bytes >> 20} MiB buffer copied: "
              f"bytes read + written per second); 'of bandwidth' = the side's weight bytes x decode steps/s over it")
        how = "compiled as our decode step compiles them (llama2.model.matvec)" if cpu_compiled else "one eager call each"
        print(f"  matmul-only floor {result['matmul_floor_tok_s']:8.1f} tokens/s (the weights' matrix-vector "
              f"products alone, {how}: on a CPU the bound of batch-1 decoding in this dtype; on a GPU eager "
              f"calls are launch-bound, so a compiled decoder can beat them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
