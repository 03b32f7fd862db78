"""``llama2 info``: exact parameter counts, weight and KV-cache memory."""

from __future__ import annotations

import json

import pytest
import torch

from llama2 import ModelConfig, Transformer
from llama2.checkpoint import save_model
from llama2.cli import main as cli
from llama2.commands.info import gather, kv_cache_bytes, param_breakdown

from .test_checkpoint import META_PARAMS, meta_weights, random_model, tiny, write_meta

GiB = 1024**3


def run_json(capsys, *argv) -> dict:
    assert cli(["info", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_7b_preset(capsys):
    info = run_json(capsys, "7b", "--context", "4096", "--dtype", "bf16", "--batch", "1")
    assert info["params"] == 6_738_415_616
    assert info["weight_bytes"] == 6_738_415_616 * 2
    assert info["kv_cache"]["bytes"] == 2 * 32 * 4096 * 4096 * 2 == 2 * GiB
    assert info["kv_cache"]["bytes_per_token"] == 512 * 1024
    assert info["config"]["hidden_dim"] == 11008 and info["config"]["head_dim"] == 128
    assert sum(info["params_breakdown"].values()) == info["params"]


def test_70b_gqa_kv_cache(capsys):
    info = run_json(capsys, "70b", "--context", "4096", "--dtype", "bf16")
    assert info["params"] == 68_976_648_192
    assert info["kv_cache"]["bytes"] == 2 * 80 * 4096 * 1024 * 2 == int(1.25 * GiB)
    info = run_json(capsys, "70B", "--context", "4096", "--batch", "8", "--dtype", "f16", "--kv-dtype", "fp8")
    assert info["kv_cache"]["bytes"] == 5 * GiB  # 1.25 GiB * 8 sequences / 2 bytes per element
    assert info["weight_bytes"] == 68_976_648_192 * 2 and info["total_bytes"] == info["weight_bytes"] + 5 * GiB


@pytest.mark.parametrize("preset,count", [("13b", 13_015_864_320), ("codellama-7b", 6_738_546_688),
                                          ("codellama-13b", 13_016_028_160), ("codellama-34b", 33_743_970_304)])
def test_other_presets(preset, count):
    info = gather(preset)
    assert info["params"] == count and sum(info["params_breakdown"].values()) == count
    assert info["dtype"] == "bf16" and info["kv_cache"]["context"] == ModelConfig.from_preset(preset).max_seq_len


def test_breakdown_and_kv_formula_match_a_built_model():
    cfg = tiny()
    model = Transformer(cfg)
    parts = param_breakdown(cfg)
    assert parts["embeddings"] == model.tok_embeddings.weight.numel()
    assert parts["output"] == model.output.weight.numel()
    assert parts["norms"] == sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1)
    model.setup_cache(batch_size=3, max_len=50, dtype=torch.float16)
    cache = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith((".k", ".v")))
    assert cache == kv_cache_bytes(cfg, 50, 3, 2)


def test_table_output(capsys):
    assert cli(["info", "70b"]) == 0
    out = capsys.readouterr().out
    assert "68,976,648,192" in out and "GQA" in out and "1.25 GiB" in out and "28672" in out


def test_model_directories(tmp_path, capsys):
    model = random_model(tiny(ffn_dim_multiplier=1.3))
    save_model(model, tmp_path / "hf", dtype=torch.float16)
    info = run_json(capsys, str(tmp_path / "hf"))
    assert info["params"] == model.num_params() and info["dtype"] == "f16"
    assert info["weight_bytes"] == 2 * model.num_params()
    assert info["kv_cache"]["context"] == 64
    write_meta(tmp_path / "meta", META_PARAMS, meta_weights(META_PARAMS, 96, dtype=torch.bfloat16), 2)
    info = run_json(capsys, str(tmp_path / "meta"), "--context", "100")
    assert info["config"]["vocab_size"] == 96 and info["dtype"] == "bf16"
    assert info["params"] == ModelConfig(**{**META_PARAMS, "vocab_size": 96}).num_params()
    assert info["kv_cache"]["bytes"] == 2 * 2 * 100 * 4 * 8 * 2
    assert "Meta" in info["source"]


@pytest.mark.parametrize("argv,message", [(["nosuch"], "neither a preset"), (["7b", "--context", "0"], "--context"),
                                          (["7b", "--batch", "-1"], "--batch")])
def test_bad_input(capsys, argv, message):
    assert cli(["info", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_lora_adapter_directory_is_described_as_its_base(tmp_path):
    from llama2.model.lora import adapter_state_dict, apply_lora
    from llama2.train.lora import LoraConfig, export_adapter

    model = Transformer.from_config(tiny(), seed=0)
    base = save_model(model, tmp_path / "base")
    apply_lora(model, "q,v", rank=2, alpha=4)
    adapter = export_adapter(adapter_state_dict(model), LoraConfig(method="lora", rank=2, alpha=4), base,
                             tmp_path / "run")
    info, plain = gather(str(adapter)), gather(str(base))
    assert "LoRA adapter" in info["source"]
    assert info["params"] == plain["params"]


@pytest.mark.parametrize("spec", ["int8", "int4:32", "int4:64"])
def test_quantized_weight_memory_is_what_the_quantized_model_holds(spec):
    from llama2.commands.info import quantized_weight_bytes
    from llama2.model.quant import quantize_model

    cfg = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=64, max_seq_len=64)
    model = quantize_model(Transformer.from_config(cfg, seed=0), spec)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert quantized_weight_bytes(cfg, spec, "f32") == held


def test_70b_in_int4_fits_one_80gb_gpu_and_in_bf16_does_not(capsys):
    assert cli(["info", "70b", "--quantize", "int4", "--gpu-memory", "80GB", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["gpu"]["fits"] and 34 * 1024**3 < info["weight_bytes"] < 35 * 1024**3
    assert cli(["info", "70b", "--gpu-memory", "80GB", "--json"]) == 0
    assert not json.loads(capsys.readouterr().out)["gpu"]["fits"]
