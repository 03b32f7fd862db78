"""``llama2 info --train``: the training-memory plan (commands/memory.py).

Three kinds of checks:
* the formulas against known numbers (7B/70B parameter counts, LoRA and NF4 sizes) and against
  real modules (adapters counted by apply_lora, NF4 bytes by torchao's tensors);
* the activation count against what autograd really saves (``saved_tensors_hooks``), exactly;
* the whole estimate against the MEASURED peak memory of our Trainer training a small model on
  the CPU (full, LoRA, QLoRA; with and without activation checkpointing), in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llama2.cli import main as cli
from llama2.commands import memory
from llama2.model import ModelConfig, Transformer
from llama2.model.heads import ScalarModel
from llama2.model.lora import apply_lora, is_nf4

# Tiny models gain nothing from threads, and a busy machine makes them much slower.
pytestmark = pytest.mark.usefixtures("one_thread")

GiB = 1024**3
N7B, N70B = 6_738_415_616, 68_976_648_192


def run_json(capsys, *argv) -> dict:
    assert cli(["info", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# -- formulas -------------------------------------------------------------------------------------

def test_7b_full_static_memory():
    cfg = ModelConfig.from_preset("7b")
    p = memory.plan(cfg, "full", "sft", dtype="bf16")
    # Our trainer: bf16 weights, bf16 gradients, AdamW's two moments in bf16: 8 bytes per parameter.
    assert p["weights"] == 2 * N7B and p["gradients"] == 2 * N7B and p["optimizer"] == 4 * N7B
    assert p["trainable_params"] == N7B
    # A float32 checkpoint: 4 + 4 + 8 = 16 bytes per parameter, the paper-era "~108 GB for 7B".
    p32 = memory.plan(cfg, "full", "sft", dtype="f32")
    assert p32["weights"] + p32["gradients"] + p32["optimizer"] == 16 * N7B
    assert 107e9 < 16 * N7B < 108e9


def test_lora_trainable_params_and_optimizer():
    cfg = ModelConfig.from_preset("7b")
    # rank x (in + out) per target per layer: q and v are 4096 -> 4096 in 7B.
    assert memory.lora_params(cfg, "q,v", 8) == 32 * 2 * 8 * (4096 + 4096) == 4_194_304
    p = memory.plan(cfg, "lora", "sft", rank=8, targets="q,v")
    assert p["trainable_params"] == 4_194_304
    assert p["gradients"] == 4 * 4_194_304 and p["optimizer"] == 8 * 4_194_304  # float32 adapters
    assert p["weights"] == 2 * N7B + 4 * 4_194_304
    cfg70 = ModelConfig.from_preset("70b")  # GQA: v is 8192 -> 1024
    assert memory.lora_params(cfg70, "q,v", 8) == 80 * 8 * ((8192 + 8192) + (8192 + 1024))
    allp = 80 * 16 * (2 * (8192 + 8192) + 2 * (8192 + 1024) + 3 * (8192 + 28672))
    assert memory.lora_params(cfg70, "all", 16) == allp


@pytest.mark.parametrize("targets", ["q,v", "all", "k,o,down"])
def test_lora_params_match_apply_lora(targets):
    cfg = ModelConfig.from_preset("nano")
    model = ScalarModel.from_config(cfg)
    names = apply_lora(model, targets.split(","), rank=4)
    n = sum(p.numel() for name, p in model.named_parameters() if name in names)
    assert memory.role(cfg, "lora", 4, "scalar", targets, 4)["trainable_params"] == n  # adapters + score head
    assert n == memory.lora_params(cfg, targets, 4) + cfg.dim


def _stored_bytes(model) -> int:
    total = 0
    for p in model.parameters():
        if is_nf4(p):
            names, _ = p.__tensor_flatten__()
            total += sum(getattr(p, k).numel() * getattr(p, k).element_size() for k in names)
        else:
            total += p.numel() * p.element_size()
    return total


@pytest.mark.parametrize("shape", [(256, 512), (704, 256), (64, 128)])  # 2048, 2816, 128 scales
def test_nf4_bytes_are_torchaos(shape):
    from llama2.model.lora import to_nf4

    t = to_nf4(torch.randn(*shape, dtype=torch.bfloat16))
    names, _ = t.__tensor_flatten__()
    assert memory.nf4_bytes(t.numel(), 2) == sum(getattr(t, k).numel() * getattr(t, k).element_size() for k in names)


def test_qlora_weights_match_a_quantized_model():
    cfg = ModelConfig.from_preset("tiny")
    model = Transformer.from_config(cfg, dtype=torch.bfloat16)
    apply_lora(model, ("q", "v"), rank=8, quantize_base=True)
    assert memory.role(cfg, "qlora", 2, "lm", "q,v", 8)["weights"] == _stored_bytes(model)


def test_70b_qlora_weights():
    cfg = ModelConfig.from_preset("70b")
    w = memory.base_weight_bytes(cfg, 2, "lm", nf4=True)
    blocks = memory.block_linear_params(cfg)
    rest = N70B - blocks  # embeddings, output, norms stay bf16
    # 4 bits + an int8 scale per 64 + a bf16 scale-of-scales per 64 x 256 weights (+ 34 bytes a tensor)
    per_weight = 0.5 + 1 / 64 + 2 / (64 * 256)
    assert w == pytest.approx(blocks * per_weight + 2 * rest, abs=80 * 7 * 34 + 1)
    assert 0.515 < (w - 2 * rest) / blocks < 0.516
    assert 36e9 < w < 37e9  # ~36 GB: fits one 80 GB GPU with room for activations


def test_reward_pairs_double_the_batch():
    cfg = ModelConfig.from_preset("7b")
    reward = memory.plan(cfg, "lora", "reward", micro_batch=2, seq_len=1024)
    acts = memory.activation_bytes(cfg, "lora", 2 * 2 * 1024, 2, 2, False, head="scalar",
                                   dropout=memory.LORA_DROPOUT)["peak"]
    assert reward["activations"]["no_checkpointing"] == acts
    assert reward["trainable_params"] == memory.lora_params(cfg) + cfg.dim  # adapters + score head


def test_ppo_roles():
    cfg = ModelConfig.from_preset("7b")
    full = memory.plan(cfg, "full", "ppo", micro_batch=8, seq_len=512, ppo_batch=64, max_new_tokens=128)
    lora = memory.plan(cfg, "lora", "ppo", micro_batch=8, seq_len=512, ppo_batch=64, max_new_tokens=128)
    assert full["roles"]["reference"]["weights"] == 2 * N7B and lora["roles"]["reference"]["weights"] == 0
    scalar = N7B - 32000 * 4096 + 4096
    assert full["roles"]["helpfulness RM"]["weights"] == 2 * scalar and full["roles"]["value model"]["optimizer"] == 4 * scalar
    assert full["phases"]["rollout KV cache"] == memory.kv_cache_bytes(cfg, 512 + 128, 64, 2) == 64 * 640 * 512 * 1024
    q = memory.plan(cfg, "qlora", "ppo", micro_batch=8, seq_len=512, ppo_batch=64, quantize_rewards=True)
    assert q["roles"]["safety RM"]["weights"] < 0.3 * full["roles"]["safety RM"]["weights"]
    # llama2 ppo --activation-checkpointing shrinks the update phase; --rollout-batch-size the KV cache
    assert full["total"]["checkpointing"] <= full["total"]["no_checkpointing"]
    assert full["phases"]["update (checkpointing)"] < full["phases"]["update"]
    chunked = memory.plan(cfg, "full", "ppo", micro_batch=8, seq_len=512, ppo_batch=64, rollout_batch=16)
    assert chunked["phases"]["rollout KV cache"] == full["phases"]["rollout KV cache"] // 4


@pytest.mark.parametrize("text,value", [("80GB", 80 * GiB), ("141 GiB", 141 * GiB), ("24g", 24 * GiB),
                                        ("512MB", 512 * 2**20), ("1.5TB", int(1.5 * 2**40))])
def test_parse_size(text, value):
    assert memory.parse_size(text) == value


def test_parse_size_rejects_nonsense():
    with pytest.raises(ValueError, match="memory size"):
        memory.parse_size("eighty")


# -- the command ----------------------------------------------------------------------------------

def test_7b_qlora_fits_24gb_and_full_does_not(capsys):
    q = run_json(capsys, "7b", "--train", "qlora", "--stage", "sft", "--gpu-memory", "24GB")["training"]
    assert q["gpu"]["fits"] and q["total"]["checkpointing"] < 8 * GiB
    f = run_json(capsys, "7b", "--train", "full", "--stage", "sft", "--gpu-memory", "24GB")["training"]
    assert not f["gpu"]["fits"] and f["gpu"]["needs"] > 50 * GiB
    assert cli(["info", "7b", "--train", "qlora", "--gpu-memory", "24GB"]) == 0
    assert "GPU 24GB" in capsys.readouterr().out
    assert cli(["info", "7b", "--train", "full", "--gpu-memory", "24GB"]) == 0
    assert "does not fit: needs 52.80 GiB" in capsys.readouterr().out


def test_70b_qlora_fits_80gb_at_short_sequences(capsys):
    q = run_json(capsys, "70b", "--train", "qlora", "--seq-len", "2048", "--gpu-memory", "80GB")["training"]
    assert q["gpu"]["fits"] and q["gpu"]["needs_checkpointing"]
    assert not run_json(capsys, "70b", "--train", "full", "--gpu-memory", "80GB")["training"]["gpu"]["fits"]
    long = run_json(capsys, "70b", "--train", "qlora", "--seq-len", "4096", "--micro-batch-size", "8",
                    "--gpu-memory", "80GB")["training"]
    assert not long["gpu"]["fits"]


def test_table_and_ppo_output(capsys):
    assert cli(["info", "7b", "--train", "lora", "--stage", "ppo", "--seq-len", "1024", "--ppo-batch", "64",
                "--micro-batch-size", "8", "--gpu-memory", "141GB"]) == 0
    out = capsys.readouterr().out
    for row in ("reference", "shares the policy's weights", "value model", "helpfulness RM", "safety RM",
                "rollout KV cache", "rollout log-probs", "total", "GPU 141GB"):
        assert row in out
    assert "weights + KV cache" in out  # the plain info table is still there


def test_without_train_nothing_changes(capsys):
    info = run_json(capsys, "7b")
    assert "training" not in info
    # without --train, --gpu-memory asks whether inference fits: weights + KV cache
    info = run_json(capsys, "7b", "--gpu-memory", "80GB")
    assert "training" not in info and info["gpu"]["fits"]
    assert cli(["info", "7b", "--train", "lora", "--quantize", "int8"]) == 1
    assert "--quantize is for inference" in capsys.readouterr().err


# -- activations: what autograd saves ----------------------------------------------------------------

def saved_bytes(model, tokens: torch.Tensor, head: str) -> int:
    """Bytes of the distinct tensors autograd saves in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters() if not is_nf4(p)}
    seen: dict[int, int] = {}

    def pack(t):
        if not is_nf4(t) and t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens)
        if head == "lm":
            F.cross_entropy(out.flatten(0, -2), tokens.flatten())
    return sum(seen.values())


@pytest.mark.parametrize("head", ["lm", "scalar"])
@pytest.mark.parametrize("method,targets,dropout", [("full", "q,v", 0.0), ("lora", "q,v", 0.0), ("lora", "q,v", 0.1),
                                                    ("lora", "all", 0.0), ("lora", "all", 0.1),
                                                    ("qlora", "q,v", 0.05), ("lora", "k", 0.0)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_saved_activations_are_counted_exactly(head, method, targets, dropout, checkpointing):
    cfg = ModelConfig.from_preset("tiny", n_layers=2)
    B, T = 2, 64
    model = (Transformer if head == "lm" else ScalarModel).from_config(cfg, seed=0)
    if method != "full":
        apply_lora(model, targets.split(","), 8, 16, dropout, quantize_base=method == "qlora")
    model.train()
    model.gradient_checkpointing = checkpointing
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    # CPU float32: 4-byte activations, residual stream and dropout masks.
    est = memory.activation_bytes(cfg, method, B * T, 4, 4, checkpointing, head=head, targets=targets, rank=8,
                                  dropout=dropout, mask_bytes=4)["saved"]
    assert abs(est - saved_bytes(model, tokens, head)) <= 16  # to the byte, but for a 0-d scalar or two


# -- the whole estimate against measured peak memory ----------------------------------------------------

CASES = [(m, c) for m in ("full", "lora", "qlora") for c in (False, True)]
SMALL = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=4096, multiple_of=32, max_seq_len=512)
MICRO, SEQ, ACCUM = 2, 256, 2
TOLERANCE = 0.25


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _measure(cases) -> list[dict]:
    """Run in a fresh process with glibc returning every allocation over 64 KiB to the OS, so that
    the resident set follows the live tensors: for each case, one Trainer step to create the
    optimizer state (on a tiny batch: its size does not depend on the batch), then the peak resident set (VmHWM, reset through /proc/self/clear_refs)
    of a second step, minus the resident set before the model was built."""
    import gc
    import tempfile

    from llama2.train.core import TrainConfig, Trainer, lm_loss
    from llama2.train.lora import LoraConfig

    torch.set_num_threads(1)  # a loaded 2-core runner: OpenMP spin-waits cost more than they save

    class Data:
        """Random micro-batches; the first ``ACCUM`` (the step that creates AdamW's state) tiny."""

        def __init__(self, cfg, micro, seq):
            self.g = torch.Generator().manual_seed(0)
            self.cfg, self.micro, self.seq = cfg, micro, seq

        def __iter__(self):
            for i in range(10**9):
                b, s = (1, 8) if i < ACCUM else (self.micro, self.seq)
                t = torch.randint(0, self.cfg.vocab_size, (b, s + 1), generator=self.g)
                yield {"tokens": t[:, :-1], "labels": t[:, 1:]}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    def trainer(cfg, method, ckpt, micro, seq, out):
        tc = TrainConfig(out=out, max_steps=10, batch_size=micro * ACCUM, micro_batch_size=micro, warmup_steps=0,
                         eval_every=0, save_every=0, progress=False, resume="never", activation_checkpointing=ckpt,
                         lora=LoraConfig(method=method))
        return Trainer(tc, Transformer.from_config(cfg, seed=0), lm_loss, Data(cfg, micro, seq), quiet=True)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("full", "lora", "qlora"):  # warm up every code path on a smaller model
            t = trainer(ModelConfig(**{**SMALL, "n_layers": 1}), method, method != "full", 1, 64, tmp)
            batches = iter(t.train_data)
            for _ in range(2):
                t.train_step(batches)
            del t, batches
        for method, ckpt in cases:
            gc.collect()
            before = _rss("VmRSS")
            t = trainer(ModelConfig(**SMALL), method, ckpt, MICRO, SEQ, tmp)
            batches = iter(t.train_data)
            t.train_step(batches)
            gc.collect()
            static = _rss("VmRSS") - before
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            t.train_step(batches)
            results.append({"method": method, "checkpointing": ckpt, "static": static,
                            "peak": _rss("VmHWM") - before})
            del t, batches
    return results


@pytest.fixture(scope="module")
def measured():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {(r["method"], r["checkpointing"]): r for r in json.loads(out.stdout.strip().splitlines()[-1])}


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc peak-RSS reset")
@pytest.mark.parametrize("method,checkpointing", CASES)
def test_estimate_matches_measured_peak(measured, method, checkpointing):
    """The CPU estimate (float32 weights and activations, dropout masks as floats) against the
    measured peak of our Trainer's second optimizer step (two micro-batches of 2 x 256 tokens).
    Tolerance +-25%: the estimate counts gradients and activations as if alive at once (true with
    gradient accumulation, which this step uses) and rounds small things (the rsqrt of a norm,
    RoPE tables, clip_grad_norm_'s and the fused AdamW's temporaries, torchao's dequantized
    weights); the residue is the allocator's pages and the interpreter, a few MiB against a
    peak of 40-150 MiB."""
    p = memory.plan(ModelConfig(**SMALL), method, "sft", MICRO, SEQ, dtype="f32", device="cpu")
    est = p["total"]["checkpointing" if checkpointing else "no_checkpointing"]
    got = measured[(method, checkpointing)]["peak"]
    assert abs(est / got - 1) <= TOLERANCE, f"estimated {est / 2**20:.1f} MiB, measured {got / 2**20:.1f} MiB"


if __name__ == "__main__":
    print(json.dumps(_measure(CASES)))
