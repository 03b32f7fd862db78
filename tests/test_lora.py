"""LoRA and QLoRA: adapters, their PEFT format, training through the trainer core, PPO's reference."""

import json

import pytest
import torch
from torch import nn

from llama2 import Transformer, load_model, save_model
from llama2.checkpoint import CheckpointError, load_scalar_model, peft, save_scalar_model
from llama2.model.heads import ScalarModel
from llama2.model.lora import (
    LoRALinear,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    merge_lora,
    parse_targets,
    quantize_nf4,
    select_adapters,
    stack_adapters,
    to_nf4,
)
from llama2.train.lora import LoraConfig, export_adapter

from .conftest import tiny_config

TOL = dict(atol=1e-5, rtol=1e-5)


def _randomize_adapters(model, seed=0):
    """Trained-looking adapters: B is zero at init, which would make every parity test trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _tokens(vocab=512, seed=0):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


# -- the layer --------------------------------------------------------------------------------

def test_targets_accept_short_hf_and_all_names():
    assert parse_targets("q,v") == ("q", "v")
    assert parse_targets(["v_proj", "q_proj", "down_proj"]) == ("q", "v", "down")
    assert parse_targets("all") == ("q", "k", "v", "o", "gate", "up", "down")
    with pytest.raises(ValueError, match="unknown LoRA target 'x'"):
        parse_targets("q,x")


def test_a_fresh_adapter_leaves_the_model_unchanged(tiny_model):
    x = _tokens()
    ref = tiny_model(x)
    apply_lora(tiny_model, "all", rank=4, alpha=8)
    assert torch.equal(tiny_model(x), ref)


def test_only_adapters_are_trainable_and_only_they_get_gradients(tiny_model):
    names = apply_lora(tiny_model, ("q", "v"), rank=4, alpha=8)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {n.split(".")[3] for n in names} == {"wq", "wv"}
    tiny_model.train()
    tiny_model(_tokens()).sum().backward()
    for n, p in tiny_model.named_parameters():
        assert (p.grad is not None) == (n in names), n


def test_a_reward_models_head_trains_with_its_adapters():
    model = ScalarModel.from_config(tiny_config(), seed=0)
    names = apply_lora(model, ("q", "v"), rank=2, alpha=4)
    assert "score.weight" in names


def test_merged_equals_unmerged_and_disabled_equals_base(tiny_model):
    x = _tokens()
    base = tiny_model(x)
    apply_lora(tiny_model, "all", rank=4, alpha=8)
    _randomize_adapters(tiny_model)
    adapted = tiny_model(x)
    assert (adapted - base).abs().max() > 1e-2
    with adapters_disabled(tiny_model):
        assert torch.equal(tiny_model(x), base)
    merge_lora(tiny_model)
    assert not any(isinstance(m, LoRALinear) for m in tiny_model.modules())
    torch.testing.assert_close(tiny_model(x), adapted, **TOL)


def test_qlora_base_is_torchaos_nf4_round_trip(tiny_model):
    from torchao.quantization import to_nf4 as torchao_to_nf4

    w = tiny_model.layers[0].attention.wq.weight.detach().clone()
    apply_lora(tiny_model, ("q", "v"), rank=4, alpha=8, quantize_base=True)
    layer = tiny_model.layers[0].attention.wq
    assert type(layer.weight).__name__ == "NF4Tensor"
    expected = torchao_to_nf4(w, 64, 64).get_original_weight()  # 4096 weights: 64 scales, one block of 64
    assert torch.equal(layer.weight.get_original_weight(), expected)
    # non-target linear layers are stored in NF4 too (QLoRA quantizes the whole frozen base)
    assert type(tiny_model.layers[0].feed_forward.w1.weight).__name__ == "NF4Tensor"


def test_qlora_forward_is_the_dequantized_base_plus_adapters(tiny_model):
    x = _tokens()
    apply_lora(tiny_model, ("q", "v"), rank=4, alpha=8, quantize_base=True)
    _randomize_adapters(tiny_model)
    out = tiny_model(x)
    merge_lora(tiny_model)  # dequantized weights + folded adapters, plain nn.Linear
    torch.testing.assert_close(tiny_model(x), out, **TOL)


def test_nf4_block_of_scales_shrinks_to_fit_small_weights():
    w = torch.randn(8, 64)  # 512 weights: 8 scales
    assert torch.equal(to_nf4(w).get_original_weight(), to_nf4(w).get_original_weight())
    with pytest.raises(ValueError, match="multiple of 64"):
        to_nf4(torch.randn(3, 7))


def test_frozen_scorer_in_nf4_scores_like_the_dequantized_model():
    model = ScalarModel.from_config(tiny_config(), seed=0).eval()
    x = _tokens()
    quantize_nf4(model)
    assert not any(p.requires_grad for p in model.parameters())
    out = model(x)
    merge_lora(model)  # dequantizes
    torch.testing.assert_close(model(x), out, **TOL)


def test_adapters_are_drawn_from_the_seed_alone(tiny_model):
    other = Transformer.from_config(tiny_config(), seed=0)
    torch.manual_seed(123)  # the global RNG must not matter
    apply_lora(tiny_model, ("q",), rank=4, alpha=8, seed=7)
    apply_lora(other, ("q",), rank=4, alpha=8, seed=7)
    for (n, a), (_, b) in zip(adapter_state_dict(tiny_model).items(), adapter_state_dict(other).items()):
        assert torch.equal(a, b), n


# -- several adapters over one base, per row ---------------------------------------------------

def test_stacked_adapters_give_each_row_its_own_adapters_output(tiny_model):
    x = _tokens()
    models, adapters = [], []
    for seed, (targets, rank) in enumerate((("q,v", 4), ("all", 2))):
        m = Transformer.from_config(tiny_config(), seed=0).eval()
        apply_lora(m, targets, rank=rank, alpha=8)
        _randomize_adapters(m, seed)
        models.append(m)
        adapters.append({n: (layer.lora_A.weight.detach(), layer.lora_B.weight.detach(), layer.scaling)
                         for n, layer in m.named_modules() if isinstance(layer, LoRALinear)})
    base = tiny_model(x)
    stack_adapters(tiny_model, adapters)
    select_adapters(tiny_model, torch.tensor([2, 0]))
    out = tiny_model(x)
    torch.testing.assert_close(out[0], models[1](x)[0], **TOL)
    torch.testing.assert_close(out[1], base[1], **TOL)
    select_adapters(tiny_model, torch.tensor([1, 2]))
    out = tiny_model(x)
    torch.testing.assert_close(out[0], models[0](x)[0], **TOL)
    torch.testing.assert_close(out[1], models[1](x)[1], **TOL)


# -- the PEFT format -------------------------------------------------------------------------

@pytest.fixture
def base_dir(tmp_path, llama_tokenizer):
    return save_model(Transformer.from_config(tiny_config(vocab_size=32000), seed=0), tmp_path / "base",
                      tokenizer=llama_tokenizer)


def _trained_adapter(base_dir, out, targets="q,v", rank=4, seed=0, merge=False, tokenizer=None):
    model = load_model(base_dir)
    apply_lora(model, targets, rank=rank, alpha=8)
    _randomize_adapters(model, seed)
    lora = LoraConfig(method="lora", rank=rank, alpha=8, targets=targets, merge=merge)
    path = export_adapter(adapter_state_dict(model), lora, base_dir, out, tokenizer=tokenizer)
    return model, path


def test_adapter_directory_is_peft_format(tmp_path, base_dir):
    _, path = _trained_adapter(base_dir, tmp_path / "run")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["task_type"] == "CAUSAL_LM"
    from safetensors.torch import load_file

    names = set(load_file(path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_an_adapter_directory_loads_as_its_base_with_the_adapter_merged(tmp_path, base_dir):
    model, path = _trained_adapter(base_dir, tmp_path / "run")
    x = _tokens(32000)
    torch.testing.assert_close(load_model(path)(x), model(x), **TOL)
    torch.testing.assert_close(load_model(base_dir, adapter=path)(x), model(x), **TOL)


def test_merge_writes_a_plain_model_directory_beside_the_adapter(tmp_path, base_dir, llama_tokenizer):
    model, path = _trained_adapter(base_dir, tmp_path / "run", merge=True, tokenizer=llama_tokenizer)
    assert path == tmp_path / "run" / "model" and (path / "config.json").is_file()
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    x = _tokens(32000)
    torch.testing.assert_close(load_model(path)(x), model(x), **TOL)


def test_peft_reads_our_adapter_and_gives_our_logits(tmp_path, base_dir):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model, path = _trained_adapter(base_dir, tmp_path / "run", targets="all")
    hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), path).eval()
    x = _tokens(32000)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model.eval()(x), **TOL)


def test_an_adapter_made_by_peft_loads_into_ours(tmp_path, base_dir):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    hf = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                        PeftLoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"],
                                       lora_dropout=0.0, init_lora_weights=False))  # random A and B
    hf.save_pretrained(tmp_path / "peft")
    x = _tokens(32000)
    with torch.no_grad():
        expected = hf.eval()(x).logits
    torch.testing.assert_close(load_model(base_dir, adapter=tmp_path / "peft")(x), expected, **TOL)


def test_reward_model_adapter_is_peft_seq_cls_with_its_score_head(tmp_path, base_dir, llama_tokenizer):
    from peft import PeftModel
    from transformers import LlamaForSequenceClassification

    rm_dir = save_scalar_model(ScalarModel.from_language_model(load_model(base_dir), seed=0), tmp_path / "rm",
                               tokenizer=llama_tokenizer)
    model = load_scalar_model(rm_dir)
    apply_lora(model, "q,v", rank=4, alpha=8)
    _randomize_adapters(model)
    with torch.no_grad():
        model.score.weight.mul_(3.0)
    path = export_adapter(adapter_state_dict(model), LoraConfig(method="lora", rank=4, alpha=8), rm_dir,
                          tmp_path / "run", scalar=True, reward_kind="safety")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]
    x = _tokens(32000)
    ours = load_scalar_model(path)
    torch.testing.assert_close(ours(x), model(x), **TOL)
    from llama2.checkpoint import model_config

    assert model_config(path)["reward_kind"] == "safety"
    hf = PeftModel.from_pretrained(LlamaForSequenceClassification.from_pretrained(rm_dir, num_labels=1),
                                   path).eval()
    with torch.no_grad():
        logits = hf.base_model.model.model(x).last_hidden_state @ hf.base_model.model.score.modules_to_save[
            "default"].weight.T
    torch.testing.assert_close(logits.squeeze(-1), model(x), **TOL)


def test_missing_base_is_one_line_naming_the_adapter_config(tmp_path, base_dir):
    _, path = _trained_adapter(base_dir, tmp_path / "run")
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"adapter_config.json: base model 'meta-llama/Llama-2-7b-hf' not found"):
        load_model(path)


def test_unsupported_adapter_kinds_are_refused_in_one_line(tmp_path, base_dir):
    _, path = _trained_adapter(base_dir, tmp_path / "run")
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora=True is not supported"):
        peft.read_adapter(path)


def test_adapter_of_the_wrong_shape_is_refused_naming_the_layer(tmp_path, base_dir, llama_tokenizer):
    _, path = _trained_adapter(base_dir, tmp_path / "run")
    other = save_model(Transformer.from_config(tiny_config(vocab_size=32000, dim=128), seed=0), tmp_path / "big",
                       tokenizer=llama_tokenizer)
    with pytest.raises(CheckpointError, match=r"adapter for layers.0.attention.wq is \(64, 64\)"):
        load_model(other, adapter=path)


def test_lora_layer_refuses_a_biased_linear():
    with pytest.raises(ValueError, match="bias-free"):
        LoRALinear(nn.Linear(4, 4), rank=2, alpha=4)
