"""The GPU paths: parity with transformers on CUDA (float32 and bfloat16), the KV cache,
torch.compile, batched decoding, `llama2 pretrain` in bf16 single-GPU and under torchrun
with FSDP2 (NCCL, meta-device init, torch.distributed.checkpoint), and the RL stages, the
world evaluation and the guard on the GPU.

Every test is skipped without CUDA. Tiny random models, a few seconds each (the compile test
and the torchrun one take longest: compilation and process start-up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from llama2 import Generator, SamplingParams, Transformer, load_model, save_model

from .conftest import ppo_config, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[1]
CUDA = "cuda"
# A small shape of the pretraining CLI (as tests/test_pretrain.py), on a 384-piece vocabulary.
NANO = ["--model.dim", "64", "--model.n-layers", "2", "--model.n-heads", "4", "--model.n-kv-heads", "2",
        "--model.vocab-size", "384", "--model.multiple-of", "16", "--model.max-seq-len", "64", "--seq-len", "64"]


def cuda_model(seed: int = 1, **overrides) -> Transformer:
    return Transformer.from_config(tiny_config(**overrides), seed=seed).to(CUDA).eval()


def hf_twin(model: Transformer, tmp_path: Path, dtype: torch.dtype):
    """transformers' LlamaForCausalLM reading our saved model directory (the HF-compatible format)."""
    transformers = pytest.importorskip("transformers")
    save_model(model, tmp_path / "hf", dtype=torch.float32)
    return transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=dtype).to(CUDA).eval()


def tokens(batch: int = 2, length: int = 33, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(CUDA)


# -- the model ------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 4}, {"n_kv_heads": 1, "rope_theta": 1e6}])
def test_float32_logits_equal_transformers_on_cuda(tmp_path, overrides):
    model = cuda_model(**overrides)
    hf = hf_twin(model, tmp_path, torch.float32)
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits.float()
    assert ours.device.type == "cuda" and ours.dtype == torch.float32
    # Both sides in float32 (TF32 is off for matmuls by default), but GPU kernels (SDPA backend,
    # GEMM tiling) may sum in another order than on CPU: ~1e-6 on logits of size ~0.2.
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_bfloat16_logits_are_as_close_to_float32_as_transformers_bfloat16(tmp_path):
    model = cuda_model()
    x = tokens()
    with torch.no_grad():
        ref = model(x)  # float32
        hf = hf_twin(model, tmp_path, torch.bfloat16)
        theirs = hf(x).logits.float()
        ours = model.to(torch.bfloat16)(x)
    assert ours.dtype == torch.float32  # logits are returned in float32 whatever the weights
    err_ours, err_hf = (ours - ref).abs().max().item(), (theirs - ref).abs().max().item()
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); through two blocks and the
    # output projection, logits of size ~0.2-0.5 move by ~1e-2 at most. transformers' bf16 model
    # makes the same kind of error (same float32 RMSNorm and RoPE tables, bf16 matmuls), so ours
    # may not be more than 3x further from float32 than theirs (+2e-3 slack for a lucky draw).
    assert err_ours < 5e-2, err_ours
    assert err_ours <= 3 * err_hf + 2e-3, (err_ours, err_hf)


def test_bf16_autocast_forward_is_close_to_float32():
    model = cuda_model()
    x = tokens()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            amp = model(x)
    assert amp.dtype == torch.float32
    # The training path (float32 weights, bf16 matmuls): the same bf16 error budget as above.
    assert (amp - ref).abs().max().item() < 5e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_decoding_equals_full_forward_on_cuda(dtype):
    model = cuda_model().to(dtype)
    x = tokens(length=24)
    with torch.no_grad():
        full = model(x)
        model.setup_cache(2, 32)
        steps = [model(x[:, :12], slots=torch.arange(12, device=CUDA))]
        for t in range(12, 24):
            steps.append(model(x[:, t: t + 1], slots=torch.tensor([t], device=CUDA)))
        model.clear_cache()
        inc = torch.cat(steps, 1)
        if dtype == torch.float32:
            torch.testing.assert_close(inc, full, atol=2e-5, rtol=1e-4)
        else:
            # Prefill and one-token steps take other SDPA kernels (masked vs causal) than the full
            # forward, each rounding to bf16: the two may differ by about as much as bf16 differs
            # from float32 (x2 for the two independent roundings).
            ref = model.float()(x)
            budget = (full - ref).abs().max().item()
            assert (inc - full).abs().max().item() <= 2 * budget + 1e-3
            assert (inc.argmax(-1) == full.argmax(-1)).float().mean() > 0.9


def test_compiled_forward_equals_eager():
    model = cuda_model()
    x = tokens()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, dynamic=False)(x)
    # Inductor fuses RMSNorm/RoPE/SwiGLU and may reorder float32 sums: ~1e-6 differences.
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


def test_compiled_training_step_gradients_equal_eager():
    eager_model, compiled_model = cuda_model().train(), cuda_model().train()
    x = tokens(length=17)
    compiled = torch.compile(compiled_model, dynamic=False)
    eager_model(x).logsumexp(-1).mean().backward()
    compiled(x).logsumexp(-1).mean().backward()
    for (name, p), q in zip(eager_model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-3, msg=name)


# -- decoding -------------------------------------------------------------------------------

PROMPTS = [[1, 5, 77, 300, 12], [1, 400], [1, 9, 8, 7, 6, 5, 4, 3, 200, 100, 50]]


def test_batched_greedy_equals_one_at_a_time_on_cuda():
    gen = Generator(cuda_model(seed=0))
    assert gen.device.type == "cuda"
    params = SamplingParams(temperature=0.0, max_new_tokens=16, stop_at_eos=False)
    batch = gen.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, batch):
        assert out.tokens == gen.generate([prompt], params)[0].tokens


def test_greedy_on_cuda_equals_greedy_on_cpu():
    cpu = Transformer.from_config(tiny_config(), seed=0).eval()
    params = SamplingParams(temperature=0.0, max_new_tokens=16, stop_at_eos=False)
    on_cpu = Generator(cpu).generate(PROMPTS, params)
    on_gpu = Generator(cpu.to(CUDA)).generate(PROMPTS, params)
    assert [o.tokens for o in on_gpu] == [o.tokens for o in on_cpu]


def test_compiled_decode_with_cuda_graphs_gives_the_eager_tokens():
    # Generator(compile=True): the decode step replayed as a CUDA graph over the whole (bucketed)
    # cache. Same greedy tokens as eager decoding, on a second call (graph replay) too.
    model = cuda_model(seed=0)
    eager, compiled = Generator(model), Generator(model, compile=True)
    params = SamplingParams(temperature=0.0, max_new_tokens=16, stop_at_eos=False)
    expected = [o.tokens for o in eager.generate(PROMPTS, params)]
    for _ in range(2):
        assert [o.tokens for o in compiled.generate(PROMPTS, params)] == expected
    model.clear_cache()


def test_seeded_sampling_on_cuda_is_reproducible_and_batch_independent():
    gen = Generator(cuda_model(seed=0))
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, stop_at_eos=False, seed=7)
    a, b = gen.generate(PROMPTS, params), gen.generate(PROMPTS, params)
    assert [o.tokens for o in a] == [o.tokens for o in b]
    alone = gen.generate([PROMPTS[1]], SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12,
                                                      stop_at_eos=False, seed=8))
    assert alone[0].tokens == a[1].tokens


def test_bfloat16_model_round_trips_through_save_and_load_on_cuda(tmp_path):
    model = cuda_model().to(torch.bfloat16)
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m", device=CUDA)
    assert back.tok_embeddings.weight.dtype == torch.bfloat16 and back.tok_embeddings.weight.is_cuda
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    x = tokens()
    with torch.no_grad():  # same weights and kernels: equal up to (unlikely) cuBLAS algorithm changes
        torch.testing.assert_close(back(x), model(x), atol=1e-3, rtol=0)


# -- pretraining ----------------------------------------------------------------------------

def args_for(data, out, *extra):
    return ["pretrain", "--data", str(data), "--out", str(out), *NANO, "--batch-size", "8",
            "--micro-batch-size", "4", "--warmup-steps", "2", "--lr", "3e-3", "--eval-every", "2",
            "--eval-batches", "2", "--no-progress", "--precision", "bf16", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_cli_on_cuda_bf16_learns_and_resumes(tmp_path, pretrain_data, capsys):
    from llama2.cli import main as cli

    out = tmp_path / "run"
    assert cli(args_for(pretrain_data, out, "--max-steps", "4", "--save-every", "2")) == 0
    err = capsys.readouterr().err
    assert "single, bf16 on cuda" in err, err[-2000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert all(r["mfu"] is None or 0 < r["mfu"] < 1 for r in rows[1:])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]

    # Resuming continues from step-4 (weights, optimizer, data position, CUDA RNG).
    assert cli(args_for(pretrain_data, out, "--max-steps", "6", "--save-every", "2")) == 0
    assert "resumed from" in capsys.readouterr().err
    assert [r["step"] for r in metrics(out)] == list(range(7))

    # Exactness: 6 steps straight vs the same run (same schedule) resumed from its step-4
    # checkpoint. Bit for bit on CPU; on CUDA the attention backward may accumulate with
    # atomics, so allow bf16-sized noise and report whether it was exact.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli(args_for(pretrain_data, straight, "--max-steps", "6", "--save-every", "2", "--keep-last", "0")) == 0
    assert cli(args_for(pretrain_data, resumed, "--max-steps", "6", "--save-every", "2",
                        "--resume", str(straight / "checkpoints" / "step-4"))) == 0
    a, b = {r["step"]: r for r in metrics(straight)}, {r["step"]: r for r in metrics(resumed)}
    assert sorted(b) == [5, 6]
    diffs = [abs(a[s]["loss"] - b[s]["loss"]) for s in (5, 6)] + [abs(a[6]["val_loss"] - b[6]["val_loss"])]
    assert max(diffs) < 1e-2, diffs
    wa = torch.load(straight / "checkpoints" / "step-6" / "model.pt")
    wb = torch.load(resumed / "checkpoints" / "step-6" / "model.pt")
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst < 1e-2, worst
    if max(diffs) or worst:
        warnings.warn(f"CUDA resume not bit-exact: max loss diff {max(diffs):.2e}, max weight diff {worst:.2e}",
                      stacklevel=1)

    # The exported model runs on CUDA and transformers reads it.
    model = load_model(out / "model", device=CUDA)
    x = torch.randint(0, 384, (1, 16), device=CUDA)
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(out / "model", dtype=torch.float32).to(CUDA).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits.float(), model(x), atol=1e-4, rtol=1e-4)


def torchrun(data, out, *extra, steps: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"),
           "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "llama2", *args_for(data, out, "--max-steps", str(steps), "--save-every", "2", *extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def test_torchrun_fsdp_on_one_gpu_checkpoints_through_dcp_and_resumes(tmp_path, pretrain_data):
    out = tmp_path / "fsdp"
    err = torchrun(pretrain_data, out, "--distributed", "fsdp", steps=4)
    assert "fsdp, bf16 on cuda" in err, err[-2000:]  # FSDP2 on one rank: meta init, NCCL group
    ck = out / "checkpoints" / "step-4"
    assert (ck / "dcp").is_dir() and any((ck / "dcp").iterdir())  # torch.distributed.checkpoint
    assert not (ck / "model.pt").exists()
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]

    err = torchrun(pretrain_data, out, "--distributed", "fsdp", steps=6)
    assert "resumed from" in err and "step 4" in err, err[-2000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(7))
    assert rows[-1]["val_loss"] < rows[4]["val_loss"] + 0.05  # resumed training did not blow up

    # The exported (gathered) model loads and runs on its own.
    model = load_model(out / "model", device=CUDA)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 384, (1, 16), device=CUDA))).all()


# -- the RL stages: sampling, scoring and updates on the GPU --------------------------------

def test_ppo_rolls_out_scores_and_updates_on_cuda_and_resumes(rl_dirs):
    from llama2.train.ppo import PPOTrainer

    root, policy, rm = rl_dirs
    trainer = PPOTrainer(ppo_config(root, policy, rm, "straight", 2), quiet=True)
    models = (trainer.policy, trainer.reference, trainer.value, trainer.scorer.helpful, trainer.scorer.safety)
    assert trainer.device.type == "cuda" and all(next(m.parameters()).is_cuda for m in models)
    trainer.fit()
    rows = metrics(root / "straight")
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy still equals the reference
    assert all(torch.isfinite(torch.tensor([r["policy_loss"], r["value_loss"], r["kl"]])).all() for r in rows)

    PPOTrainer(ppo_config(root, policy, rm, "resumed", 1), quiet=True).fit()
    PPOTrainer(ppo_config(root, policy, rm, "resumed", 2), quiet=True).fit()  # from the CUDA checkpoint
    a, b = load_model(root / "straight" / "model"), load_model(root / "resumed" / "model")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=name)


def test_rejection_sampling_samples_and_scores_on_cuda(rl_dirs, monkeypatch):
    import llama2.train.rejection as rejection
    from llama2.cli import main as cli

    root, policy, rm = rl_dirs
    seen = []
    real = rejection.sample_answers

    def spy(model, *args, **kwargs):
        seen.append(next(model.parameters()).device.type)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(rejection, "sample_answers", spy)
    out = root / "rs"
    assert cli(["rejection-sample", "--model", str(policy), "--reward-model", str(rm), "--safety-model", str(rm),
                "--out", str(out), "--prompts", "6", "--k", "3", "--max-new-tokens", "6", "--batch-size", "2",
                "--micro-batch-size", "2", "--seq-len", "96", "--max-steps", "1", "--no-progress"]) == 0
    assert seen == ["cuda"]
    assert len((out / "pool.jsonl").read_text().splitlines()) == 6


def test_world_evaluation_on_cuda_equals_the_cpu_one(rl_dirs, monkeypatch):
    import llama2.eval.cli
    from llama2.eval.cli import evaluate_model

    root, policy, rm = rl_dirs
    kw = dict(max_items=12, gatt_dialogues=2, gatt_turns=(1, 2), max_new_tokens=8, reward_model=str(rm),
              safety_model=str(rm), reward_prompts=6)
    on_gpu = evaluate_model(str(policy), **kw)
    monkeypatch.setattr(llama2.eval.cli, "default_device", lambda: torch.device("cpu"))
    on_cpu = evaluate_model(str(policy), **kw)
    assert [a["answer"] for a in on_gpu["answers"]] == [a["answer"] for a in on_cpu["answers"]]
    assert on_gpu["combined_reward"] == pytest.approx(on_cpu["combined_reward"], abs=1e-4)


def test_guard_scores_on_cuda_equal_the_cpu_ones(rl_dirs):
    from llama2.guard import Guard

    root, policy, _ = rl_dirs
    conversations = [[{"role": "user", "content": "How do I bake bread?"}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]]
    on_gpu, on_cpu = Guard.load(policy), Guard.load(policy, device="cpu")
    assert next(on_gpu.model.parameters()).is_cuda
    assert on_gpu.scores(conversations) == pytest.approx(on_cpu.scores(conversations), abs=1e-4)


# -- LoRA / QLoRA on the GPU --------------------------------------------------------------------

def test_qlora_moves_blocks_to_the_gpu_one_at_a_time_and_matches_the_cpu_adapter():
    from llama2.model.lora import apply_lora, merge_lora

    cpu = Transformer.from_config(tiny_config(), seed=0).eval()
    gpu = Transformer.from_config(tiny_config(), seed=0).eval()
    apply_lora(cpu, "all", rank=4, alpha=8, quantize_base=True, seed=3)
    apply_lora(gpu, "all", rank=4, alpha=8, quantize_base=True, seed=3, device=CUDA)  # CPU -> GPU block by block
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    assert type(gpu.layers[0].attention.wq.weight).__name__ == "NF4Tensor"
    x = torch.randint(0, 512, (2, 16))
    torch.testing.assert_close(gpu(x.to(CUDA)).cpu(), cpu(x), atol=1e-4, rtol=1e-4)
    merge_lora(gpu)
    torch.testing.assert_close(gpu(x.to(CUDA)).cpu(), cpu(x), atol=1e-4, rtol=1e-4)


def test_lora_and_qlora_sft_on_cuda_bf16_learn_and_resume(tmp_path, llama_tokenizer):
    from llama2.cli import main as cli

    base = save_model(Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=256), seed=0),
                      tmp_path / "base", tokenizer=llama_tokenizer)
    data = tmp_path / "chat.jsonl"
    turn = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 is 5."}]
    data.write_text("".join(json.dumps({"messages": turn}) + "\n" for _ in range(40)))
    for method in ("lora", "qlora"):
        out = tmp_path / method
        args = ["sft", "--model", str(base), "--data", str(data), "--out", str(out), "--seq-len", "64",
                "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-2", "--warmup-steps", "0",
                "--decay-steps", "4", "--eval-every", "0", "--save-every", "2", "--no-progress",
                "--lora.method", method, "--lora.targets", "all"]
        assert cli([*args, "--max-steps", "2"]) == 0
        assert cli([*args, "--max-steps", "4"]) == 0  # resumes from step 2
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] < rows[0]["loss"], method
        assert (out / "model" / "adapter_config.json").is_file()


def test_lora_ppo_on_cuda_uses_the_policy_with_adapters_off_as_reference(rl_dirs):
    from llama2.train.lora import LoraConfig
    from llama2.train.ppo import PPOTrainer

    root, policy, rm = rl_dirs
    cfg = ppo_config(root, policy, rm, "cuda-lora-ppo", 2)
    cfg.lora, cfg.quantize_rewards = LoraConfig(method="qlora", dropout=0.0), True
    trainer = PPOTrainer(cfg, quiet=True)
    assert trainer.reference is None and trainer.policy.layers[0].attention.wq.weight.device.type == "cuda"
    trainer.fit()
    rows = [json.loads(x) for x in (root / "cuda-lora-ppo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)
