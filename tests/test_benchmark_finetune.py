"""benchmarks/finetune.py on a tiny shape: one step of every configuration, in-process (seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from .conftest import load_benchmark

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("torchao")



@pytest.fixture(scope="module")
def bench():
    return load_benchmark("finetune")


@pytest.fixture(autouse=True)
def keep_threads():
    """The benchmark sets torch's thread count (1 on CPU by default): give the others theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


TINY = ["--preset", "tiny", "--dim", "64", "--layers", "2", "--heads", "4", "--vocab", "256", "--seq-len", "16",
        "--micro-batch-size", "2", "--steps", "1", "--warmup", "0", "--device", "cpu", "--in-process"]


def test_every_config_one_step(bench, tmp_path):
    args = bench.parse_args(TINY)
    res = bench.run_benchmark(args)
    rows = res["configs"]
    assert set(rows) == set(bench.CONFIGS)
    measured = {k: r for k, r in rows.items() if r["status"] == "ok"}
    assert {"full", "lora", "qlora", "peft-lora", "peft-qlora-torchao"} <= set(measured)
    # PEFT's bitsandbytes QLoRA: n/a on a CPU, with the reason
    assert rows["peft-qlora"]["status"] == "n/a" and "CPU" in rows["peft-qlora"]["reason"]
    for name, r in measured.items():
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"]), name
        assert r["trainable_params"] > 0 and r["total_params"] >= r["trainable_params"], name
        assert all(math.isfinite(x) and x > 0 for x in r["losses"]), name
        mem = r["memory"]
        assert mem["rss_loaded_mib"] > 0 and mem["total_peak_mib"] >= mem["peak_mib"] > 0, name
        assert math.isfinite(mem["delta_mib"]), name
    full = measured["full"]["trainable_params"]
    for name in ("lora", "qlora", "peft-lora", "peft-qlora-torchao"):
        assert measured[name]["trainable_params"] < full
    # same LoRA settings on both sides: the same number of adapter weights
    assert measured["lora"]["trainable_params"] == measured["peft-lora"]["trainable_params"]
    # same weights and batch: the first loss agrees (B starts at zero), NF4 bases agree with each other
    assert measured["lora"]["first_loss"] == pytest.approx(measured["full"]["first_loss"], rel=1e-5)
    assert measured["peft-lora"]["first_loss"] == pytest.approx(measured["full"]["first_loss"], rel=1e-4)
    assert measured["qlora"]["first_loss"] == pytest.approx(measured["peft-qlora-torchao"]["first_loss"], rel=1e-4)
    for key in ("lora/peft-lora", "qlora/peft-qlora-torchao", "lora/full", "qlora/full"):
        assert res["ratios"][key]["tokens_per_s"] > 0
    base = bench.write_results(res, str(tmp_path / "finetune-cpu"))
    assert base.with_suffix(".json").is_file()
    assert "| lora |" in base.with_suffix(".md").read_text()


def test_ppo_lora_tiny(bench):
    args = bench.parse_args(["--ppo", "--preset", "tiny", "--dim", "64", "--layers", "2", "--heads", "4",
                             "--ppo-iterations", "1", "--ppo-batch", "2", "--ppo-minibatch", "1",
                             "--ppo-new-tokens", "4", "--no-write"])
    res = bench.run_ppo(args)
    s = res["steady_mean"]
    for key in ("iteration_s", "generation_s", "scoring_s", "train_s"):
        assert s[key] > 0 and math.isfinite(s[key])
    assert s["iteration_s"] >= s["generation_s"] + s["train_s"]
    assert "generation" in bench.format_ppo(res)
