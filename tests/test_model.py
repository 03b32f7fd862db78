"""The model family: shapes, parameter counts, and exact agreement with transformers' Llama."""

import pytest
import torch

from llama2 import ModelConfig, Transformer
from llama2.model import PRESETS

from .conftest import tiny_config

RELEASED = {
    "7B": 6_738_415_616,
    "13B": 13_015_864_320,
    "70B": 68_976_648_192,
    "codellama-34B": 33_743_970_304,
    "codellama-7B": 6_738_546_688,
    "codellama-13B": 13_016_028_160,
}


@pytest.mark.parametrize("preset,count", RELEASED.items())
def test_released_presets_have_the_released_parameter_counts(preset, count):
    cfg = ModelConfig.from_preset(preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == count
    assert cfg.num_params() == count


def test_ffn_width_follows_metas_rule():
    assert ModelConfig.from_preset("7B").hidden_dim == 11008
    assert ModelConfig.from_preset("13B").hidden_dim == 13824
    assert ModelConfig.from_preset("70B").hidden_dim == 28672
    assert ModelConfig.from_preset("codellama-34B").hidden_dim == 22016


def test_every_preset_builds_on_meta_device():
    for name in PRESETS:
        with torch.device("meta"):
            Transformer(ModelConfig.from_preset(name))


def test_bad_config_is_one_clear_error():
    with pytest.raises(ValueError, match="not divisible by n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_preset("8B")
    with pytest.raises(ValueError, match="unknown model config field"):
        ModelConfig.from_dict({"dim": 64, "n_head": 4})


def test_logits_are_float32_batch_seq_vocab(tiny_model):
    logits = tiny_model(torch.randint(0, 512, (3, 7)))
    assert logits.shape == (3, 7, 512) and logits.dtype == torch.float32


def _hf_twin(model: Transformer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama2.checkpoint.hf import hf_config, to_hf_name

    cfg = model.config
    fields = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "llama2", "torch_dtype")}
    hf = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    hf.load_state_dict({to_hf_name(k): v for k, v in model.state_dict().items()}, strict=True)
    return hf


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 4}, {"n_kv_heads": 1, "rope_theta": 1e6}])
def test_same_logits_as_transformers(overrides):
    model = Transformer.from_config(tiny_config(**overrides), seed=1).eval()
    hf = _hf_twin(model)
    x = torch.randint(0, 512, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_equals_full_recomputation(tiny_model):
    x = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        full = tiny_model(x)
        tiny_model.setup_cache(2, 32)
        steps = [tiny_model(x[:, :12], slots=torch.arange(12))]
        for t in range(12, 20):
            steps.append(tiny_model(x[:, t : t + 1], slots=torch.tensor([t])))
        tiny_model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_block_diagonal_mask_and_reset_positions_isolate_packed_documents(tiny_model):
    a, b = torch.randint(0, 512, (1, 5)), torch.randint(0, 512, (1, 7))
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([0] * 5 + [1] * 7)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        out = tiny_model(packed, positions=positions, mask=mask.view(1, 1, 12, 12))
        torch.testing.assert_close(out[:, :5], tiny_model(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 5:], tiny_model(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_close_to_float32(tiny_model, dtype):
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        ref = tiny_model(x)
        half = Transformer.from_config(tiny_model.config).to(dtype)
        half.load_state_dict(tiny_model.state_dict())
        out = half(x)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1


def test_rmsnorm_matches_formula():
    from llama2.model import RMSNorm

    norm = RMSNorm(8, eps=1e-5)
    norm.weight.data = torch.arange(8.0)
    x = torch.randn(3, 8)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * torch.arange(8.0)
    torch.testing.assert_close(norm(x), expected)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    x = torch.randint(0, 512, (2, 9))
    tiny_model.train()
    tiny_model(x).sum().backward()
    ref = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    tiny_model.gradient_checkpointing = True
    tiny_model(x).sum().backward()
    for r, p in zip(ref, tiny_model.parameters()):
        torch.testing.assert_close(p.grad, r)
