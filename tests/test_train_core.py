"""The shared trainer: the paper's schedule and AdamW, the loss helper, accumulation, exact
resume, atomic checkpoints and the metrics log. Nano models, a few seconds in all."""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from llama2.model import ModelConfig, Transformer
from llama2.train import core
from llama2.train.core import (
    TrainConfig,
    Trainer,
    build_optimizer,
    cross_entropy,
    grad_accum_steps,
    lm_loss,
    lr_at,
    transformer_flops_per_token,
)
from llama2.train.state import latest_checkpoint, list_checkpoints, rng_state, set_rng_state

NANO = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=32)


class ToyData:
    """Deterministic token batches whose position is the whole state (like PackedLoader)."""

    def __init__(self, batch=4, seq=16, vocab=128, seed=0):
        self.batch, self.seq, self.vocab, self.seed, self.pos = batch, seq, vocab, seed, 0

    def __iter__(self):
        return self

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.pos)
        self.pos += 1
        start = torch.randint(0, self.vocab, (self.batch, 1), generator=g)
        rows = (start + torch.arange(self.seq + 1) * 3) % self.vocab  # learnable: an arithmetic sequence
        return {"tokens": rows[:, :-1], "labels": rows[:, 1:]}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def make(tmp_path, name="run", data=None, **overrides):
    cfg = TrainConfig(**{**dict(out=str(tmp_path / name), max_steps=6, batch_size=4, micro_batch_size=2, lr=1e-2,
                                warmup_steps=2, save_every=3, eval_every=3, eval_batches=2, progress=False),
                         **overrides})
    model = Transformer.from_config(ModelConfig(**NANO), seed=0)
    evals = [next(ToyData(seed=99)) for _ in range(2)]
    return Trainer(cfg, model, lm_loss, data or ToyData(batch=cfg.micro_batch_size), evals, quiet=True)


def test_schedule_matches_the_formula_at_key_steps():
    cfg = TrainConfig(lr=3e-4, warmup_steps=2000, max_steps=500_000)
    peak, floor = 3e-4, 3e-5  # decays to 10% of peak (§2.2)
    assert lr_at(0, cfg) == pytest.approx(peak / 2000)
    assert lr_at(999, cfg) == pytest.approx(peak * 1000 / 2000)
    assert lr_at(1999, cfg) == pytest.approx(peak)  # warmup ends at the peak
    assert lr_at(2000, cfg) == pytest.approx(peak)
    mid = 2000 + (500_000 - 2000) // 2
    assert lr_at(mid, cfg) == pytest.approx(floor + (peak - floor) * 0.5)
    quarter = 2000 + (500_000 - 2000) // 4
    assert lr_at(quarter, cfg) == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(500_000, cfg) == pytest.approx(floor)
    assert lr_at(600_000, cfg) == pytest.approx(floor)  # stays at the floor past the end
    steps = [lr_at(s, cfg) for s in range(2000, 500_000, 997)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))  # monotone decay
    const = TrainConfig(lr=1e-6, warmup_steps=0, schedule="constant", max_steps=10)
    assert [lr_at(s, const) for s in (0, 5, 9)] == [1e-6] * 3


def test_adamw_has_the_papers_settings_and_decays_matrices_only():
    cfg = TrainConfig()
    assert (cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.grad_clip) == (0.9, 0.95, 1e-5, 0.1, 1.0)
    assert (cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio, cfg.batch_size) == (3e-4, 2000, 0.1, 1024)
    model = Transformer.from_config(ModelConfig(**NANO), seed=0)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    decay, no_decay = opt.param_groups
    assert decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-5
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if "norm" in n}
    assert all(p.ndim == 2 for p in decay["params"]) and len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_cross_entropy_ignores_minus_100():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    labels[0, :3] = -100
    keep = labels != -100
    manual = -torch.log_softmax(logits, -1)[keep].gather(-1, labels[keep][:, None]).mean()
    assert torch.allclose(cross_entropy(logits, labels), manual)


def test_cross_entropy_of_a_batch_without_targets_is_zero_not_nan():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    loss = cross_entropy(logits, torch.full((2, 3), -100))
    loss.backward()
    assert loss.item() == 0.0 and not logits.grad.any()


def test_batch_must_divide():
    assert grad_accum_steps(1024, 4, 8) == 32
    with pytest.raises(ValueError, match=r"batch_size=10 is not divisible by micro_batch_size=4 x 1 rank\(s\)"):
        grad_accum_steps(10, 4, 1)


def test_flops_per_token_is_6n_plus_attention():
    cfg = ModelConfig.from_preset("7b")
    n = 6_738_415_616 - 32000 * 4096  # without the embedding lookup
    assert transformer_flops_per_token(cfg, 4096) == 6 * n + 12 * 32 * 4096 * 4096


def test_flops_per_token_with_frozen_weights_has_no_weight_gradients():
    cfg = ModelConfig.from_preset("7b")
    n = 6_738_415_616 - 32000 * 4096
    assert transformer_flops_per_token(cfg, 4096, frozen_weights=True) == 4 * n + 12 * 32 * 4096 * 4096


def test_accumulation_matches_one_big_batch(tmp_path):
    class Fixed(ToyData):  # the same 4 sequences, served as 1 x 4 or 2 x 2
        def __next__(self):
            whole = ToyData(batch=4)
            whole.pos = self.pos // (4 // self.batch)
            b = next(whole)
            part = self.pos % (4 // self.batch)
            self.pos += 1
            return {k: v[part * self.batch:(part + 1) * self.batch] for k, v in b.items()}

    a = make(tmp_path, "a", Fixed(batch=4), micro_batch_size=4, eval_every=0, save_every=0)
    b = make(tmp_path, "b", Fixed(batch=2), micro_batch_size=2, eval_every=0, save_every=0)
    assert (a.grad_accum, b.grad_accum) == (1, 2)
    a.fit(), b.fit()
    for (n, p), q in zip(a.module.named_parameters(), b.module.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def test_exact_resume_is_bitwise(tmp_path):
    """N steps + resume + N steps == 2N steps straight, bit for bit (weights and optimizer)."""
    straight = make(tmp_path, "straight", max_steps=6, decay_steps=6)
    straight.fit()
    first = make(tmp_path, "resumed", max_steps=3, decay_steps=6)
    first.fit()
    second = make(tmp_path, "resumed", max_steps=6, decay_steps=6)  # resume="auto" finds step-3
    assert second.step == 3 and second.train_data.pos == 3 * second.grad_accum
    second.fit()
    for (name, p), q in zip(straight.module.state_dict().items(), second.module.state_dict().values()):
        assert torch.equal(p, q), name
    sa, sb = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[k][m], sb[k][m]) for k in sa for m in ("exp_avg", "exp_avg_sq", "step"))
    lines = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [x["step"] for x in ref] == [0, 1, 2, 3, 4, 5, 6]
    assert [x.get("loss") for x in lines] == [x.get("loss") for x in ref]


def test_metrics_and_checkpoint_contents(tmp_path):
    t = make(tmp_path, keep_last=1)
    t.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[1]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"}
    assert "val_loss" in rows[0] and "val_loss" in rows[3] and "val_ppl" in rows[-1]
    assert rows[-1]["loss"] < rows[1]["loss"]  # it learns
    ckpts = list_checkpoints(tmp_path / "run")
    assert [p.name for p in ckpts] == ["step-6"]  # keep_last=1 pruned step-3
    files = {p.name for p in ckpts[0].iterdir()}
    assert files == {"model.pt", "optimizer.pt", "trainer.json", "rank-0.pt", "config.yaml"}
    state = json.loads((ckpts[0] / "trainer.json").read_text())
    assert state["step"] == 6 and state["data"] == {"pos": 12} and state["schedule"]["warmup_steps"] == 2
    assert "rng" in torch.load(ckpts[0] / "rank-0.pt", weights_only=True)


def test_checkpoint_tensor_files_need_nothing_but_the_safe_unpickler(tmp_path):
    t = make(tmp_path, max_steps=3)
    t.fit()
    for name in ("model.pt", "optimizer.pt", "rank-0.pt"):
        torch.load(latest_checkpoint(tmp_path / "run") / name, weights_only=True)  # raises on any Python object


def test_rng_states_round_trip_exactly():
    import random

    import numpy as np

    random.random(), np.random.standard_normal()  # numpy now holds a cached gaussian
    saved = rng_state()
    want = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    set_rng_state(saved)
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(), torch.rand(1))
    assert got == want


def test_a_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    t = make(tmp_path)
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        if "step-6" in str(f) and str(f).endswith("optimizer.pt"):
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(core.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        t.fit()
    monkeypatch.undo()
    assert (tmp_path / "run" / "checkpoints" / ".tmp-step-6" / "model.pt").is_file()
    assert latest_checkpoint(tmp_path / "run").name == "step-3"
    again = make(tmp_path)  # resumes from step 3 and clears the debris
    assert again.step == 3 and not (tmp_path / "run" / "checkpoints" / ".tmp-step-6").exists()
    again.fit()
    assert latest_checkpoint(tmp_path / "run").name == "step-6"


def test_a_killed_process_leaves_the_previous_checkpoint(tmp_path):
    """The process dies (os._exit: no cleanup at all) halfway through writing step 6."""
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(tmp_path.parent)!r})
        from pathlib import Path
        from llama2.train import core
        sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
        from test_train_core import make
        real = torch.save
        def dying(obj, f, *a, **k):
            real(obj, f, *a, **k)
            if "step-6" in str(f) and str(f).endswith("model.pt"):
                os._exit(9)
        core.torch.save = dying
        make(Path({str(tmp_path)!r})).fit()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "run").name == "step-3"
    resumed = make(tmp_path)
    assert resumed.step == 3
    resumed.fit()
    assert resumed.step == 6


def test_resume_modes(tmp_path):
    make(tmp_path, max_steps=3).fit()
    with pytest.raises(ValueError, match="already has checkpoints"):
        make(tmp_path, resume="never")
    assert make(tmp_path, "other", resume="never").step == 0
    assert make(tmp_path, resume=str(tmp_path / "run" / "checkpoints" / "step-3")).step == 3
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        make(tmp_path, "empty", resume="latest")


def test_export_is_a_model_directory(tmp_path):
    from llama2.checkpoint import load_model

    t = make(tmp_path, max_steps=2, eval_every=0)
    t.fit()
    model = load_model(t.export())
    for (n, p), q in zip(t.module.state_dict().items(), model.state_dict().values()):
        assert torch.equal(p, q), n


def test_parallel_mode_wraps_one_rank_only_for_an_explicit_fsdp_in_a_process_group():
    from llama2.train.core import DistInfo, parallel_mode

    def mode(distributed, info):
        return parallel_mode(TrainConfig(distributed=distributed), info)

    two_cpu, two_gpu = DistInfo(world_size=2), DistInfo(world_size=2, device=torch.device("cuda", 0))
    assert [mode(d, two_cpu) for d in ("auto", "ddp", "fsdp")] == ["ddp", "ddp", "fsdp"]
    assert mode("auto", two_gpu) == "fsdp"
    # One rank, no process group (plain `python`): never wrapped, whatever was asked.
    assert [mode(d, DistInfo()) for d in ("auto", "ddp", "fsdp")] == ["single"] * 3
