"""Long context (Code Llama §2.4; Llama 2 Long, Xiong et al. 2023): a raised RoPE base, linear
position interpolation (Chen et al. 2023), their agreement with transformers and the checkpoint
formats, continued pretraining at a longer length from a model directory (`llama2 pretrain
--init`), and `llama2 info`'s memory prediction for a context length."""

import json

import pytest
import torch

from llama2 import ModelConfig, Transformer
from llama2.checkpoint import CheckpointError, convert, load_model, save_model
from llama2.model.transformer import rope_cos_sin

from .conftest import run_cli
from .test_checkpoint import random_model  # unit-scale activations: logits depend visibly on positions
from .test_pretrain import NANO

LONG = 4200  # past Llama 2's 4096-token training context


def long_config(**overrides) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16,
                rope_theta=1e6, max_seq_len=4608)
    return ModelConfig(**{**base, **overrides})


def hf_twin(model: Transformer):
    """transformers' LlamaForCausalLM built from our config.json fields, holding our weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama2.checkpoint.hf import hf_config, to_hf_name

    fields = {k: v for k, v in hf_config(model.config).items() if k not in ("architectures", "llama2", "torch_dtype")}
    theirs = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    theirs.load_state_dict({to_hf_name(k): v for k, v in model.state_dict().items()}, strict=True)
    return theirs


def rope_params(hf_model) -> dict:
    """transformers v5 keeps the RoPE settings in ``rope_parameters``, v4 in ``rope_scaling``."""
    return getattr(hf_model.config, "rope_parameters", None) or hf_model.config.rope_scaling


def logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


# -- RoPE ----------------------------------------------------------------------------------------

def test_position_interpolation_rotates_position_p_as_p_over_the_factor():
    p = torch.arange(0, 1024)
    torch.testing.assert_close(rope_cos_sin(4 * p, 16, 1e4, scaling=4.0), rope_cos_sin(p, 16, 1e4), atol=0, rtol=0)


def test_rope_scaling_below_one_is_one_line_error():
    with pytest.raises(ValueError, match="rope_scaling=0.5 must be >= 1"):
        long_config(rope_scaling=0.5)


def test_theta_1e6_logits_equal_transformers_past_4096_tokens():
    model = random_model(long_config())
    tokens = torch.randint(0, 256, (1, LONG), generator=torch.Generator().manual_seed(1))
    ours = logits(model, tokens)
    torch.testing.assert_close(logits(hf_twin(model), tokens), ours, atol=1e-4, rtol=0)
    # theta matters at these positions: the same weights with Llama 2's base give other logits
    model.config.rope_theta = 1e4
    assert (logits(model, tokens)[0, -1] - ours[0, -1]).abs().max() > 1e-2


def test_linear_position_interpolation_logits_equal_transformers():
    model = random_model(long_config(rope_theta=1e4, rope_scaling=4.0))
    tokens = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(2))
    theirs = hf_twin(model)
    assert rope_params(theirs)["rope_type"] == "linear"
    ours = logits(model, tokens)
    torch.testing.assert_close(logits(theirs, tokens), ours, atol=1e-4, rtol=0)
    model.config.rope_scaling = None
    assert (logits(model, tokens) - ours).abs().max() > 1e-2


def test_kv_cache_decoding_past_4096_equals_the_full_forward():
    model = random_model(long_config())
    tokens = torch.randint(0, 256, (1, 4108), generator=torch.Generator().manual_seed(3))
    full = logits(model, tokens)
    with torch.no_grad():
        model.setup_cache(1, 4608)
        steps = [model(tokens[:, :4100], slots=torch.arange(4100))[:, -1:]]
        for t in range(4100, 4108):
            steps.append(model(tokens[:, t:t + 1], slots=torch.tensor([t])))
        model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 4099:], atol=1e-4, rtol=0)


# -- checkpoint formats --------------------------------------------------------------------------

def test_hf_directory_carries_linear_rope_scaling_to_transformers_and_back(tmp_path):
    from transformers import LlamaForCausalLM

    model = random_model(long_config(rope_scaling=4.0, max_seq_len=512))
    save_model(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_scaling"] == {"rope_type": "linear", "factor": 4.0} and written["rope_theta"] == 1e6
    theirs = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert rope_params(theirs)["factor"] == 4.0
    tokens = torch.randint(0, 256, (1, 200))
    torch.testing.assert_close(logits(theirs, tokens), logits(model, tokens), atol=1e-4, rtol=0)
    back = load_model(tmp_path)
    assert (back.config.rope_scaling, back.config.rope_theta) == (4.0, 1e6)


def test_transformers_v5_rope_parameters_load_as_linear_scaling(tmp_path):
    theirs = hf_twin(random_model(long_config(rope_scaling=2.0, max_seq_len=256)))
    theirs.save_pretrained(tmp_path)  # transformers writes its own layout of the field
    cfg = load_model(tmp_path).config
    assert (cfg.rope_scaling, cfg.rope_theta) == (2.0, 1e6)


@pytest.mark.parametrize("rope_type", ["llama3", "dynamic", "yarn"])
def test_other_rope_scaling_types_are_refused_on_load(tmp_path, rope_type):
    save_model(random_model(long_config(max_seq_len=256)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": rope_type, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"RoPE scaling type '{rope_type}' is not supported"):
        load_model(tmp_path)


def test_meta_export_refuses_rope_scaling_before_writing(tmp_path):
    save_model(random_model(long_config(rope_scaling=4.0, max_seq_len=256)), tmp_path / "hf")
    with pytest.raises(CheckpointError, match="cannot be written to Meta's params.json"):
        convert(tmp_path / "hf", tmp_path / "meta", "meta")
    assert not (tmp_path / "meta" / "consolidated.00.pth").exists()


def test_meta_params_carry_theta(tmp_path):
    save_model(random_model(long_config(max_seq_len=256)), tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "meta", "meta")
    assert json.loads((tmp_path / "meta" / "params.json").read_text())["rope_theta"] == 1e6


def test_gguf_carries_llama_cpp_rope_scaling_metadata(tmp_path, llama_tokenizer):
    gguf = pytest.importorskip("gguf")
    cfg = long_config(vocab_size=32000, rope_scaling=4.0, max_seq_len=256)
    save_model(random_model(cfg), tmp_path / "hf", tokenizer=llama_tokenizer)
    reader = gguf.GGUFReader(convert(tmp_path / "hf", tmp_path / "m.gguf", "gguf"))
    assert reader.get_field("llama.rope.scaling.type").contents() == "linear"
    assert reader.get_field("llama.rope.scaling.factor").contents() == 4.0
    assert reader.get_field("llama.rope.freq_base").contents() == 1e6


# -- continued pretraining at a longer context (`llama2 pretrain --init`) -----------------------

def pretrain_args(data, out, *extra):
    return ["pretrain", "--data", data, "--out", out, "--batch-size", "4", "--micro-batch-size", "4",
            "--warmup-steps", "1", "--lr", "3e-3", "--eval-every", "2", "--eval-batches", "2", "--no-progress", *extra]


@pytest.fixture(scope="module")
def short_model(tmp_path_factory, pretrain_data):
    """A nano model pretrained 4 steps on 32-token sequences (Llama 2's 4096, scaled down)."""
    out = tmp_path_factory.mktemp("short") / "run"
    code = run_cli_plain(*pretrain_args(pretrain_data, out, *NANO, "--max-steps", "4"))
    assert code == 0
    return out / "model"


def run_cli_plain(*argv) -> int:
    from llama2.cli import main as cli

    return cli([str(a) for a in argv])


def test_init_continues_at_a_longer_context_with_a_raised_theta(tmp_path, capsys, pretrain_data, short_model):
    from llama2.data.shards import EvalBatches, PackedSequences, TokenStream
    from llama2.train.core import lm_loss

    out = tmp_path / "long"
    code, _, err = run_cli(capsys, *pretrain_args(pretrain_data, out, "--init", short_model, "--seq-len", "128",
                                                  "--model.max-seq-len", "128", "--model.rope-theta", "1e6",
                                                  "--max-steps", "2"))
    assert code == 0, err
    assert "rope_theta 10000 -> 1e+06" in err and "max_seq_len 32 -> 128" in err
    config = json.loads((out / "model" / "config.json").read_text())
    assert (config["rope_theta"], config["max_position_embeddings"], config["hidden_size"]) == (1e6, 128, 32)
    # Step 0's validation loss is the old weights' loss under the new RoPE base at 128 tokens.
    old = load_model(short_model, dtype=torch.float32)
    old.config.rope_theta, old.config.max_seq_len = 1e6, 128
    batches = EvalBatches(PackedSequences(TokenStream(pretrain_data, "val"), 128), 4, max_batches=2)
    with torch.no_grad():
        expected = sum(lm_loss(old, b)[0].item() for b in batches) / len(batches)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_init_starts_from_the_directorys_weights(short_model):
    from llama2.train.pretrain import PretrainConfig, init_model, init_model_config

    model_cfg = init_model_config(str(short_model), {"rope_scaling": 4.0, "max_seq_len": 128})
    assert (model_cfg.rope_scaling, model_cfg.max_seq_len, model_cfg.dim) == (4.0, 128, 32)
    cfg = PretrainConfig(init=str(short_model), model=model_cfg, seq_len=128, batch_size=4, micro_batch_size=4)
    model, old = init_model(cfg), load_model(short_model, dtype=torch.float32)
    assert model.config.rope_scaling == 4.0
    for name, t in old.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name


def test_init_refuses_another_shape_in_one_line(tmp_path, capsys, pretrain_data, short_model):
    code, _, err = run_cli(capsys, *pretrain_args(pretrain_data, tmp_path / "x", "--init", short_model,
                                                  "--model.dim", "64", "--max-steps", "1"))
    assert code != 0
    assert "--model.dim=64 differs from" in err and "keeps the model's shape" in err


def test_init_needs_a_context_that_covers_seq_len(tmp_path, capsys, pretrain_data, short_model):
    code, _, err = run_cli(capsys, *pretrain_args(pretrain_data, tmp_path / "x", "--init", short_model,
                                                  "--seq-len", "128", "--max-steps", "1"))
    assert code != 0 and "seq_len=128 exceeds model.max_seq_len=32" in err


def test_continued_run_resumes_from_its_own_checkpoints(tmp_path, capsys, pretrain_data, short_model):
    args = ("--init", short_model, "--seq-len", "64", "--model.max-seq-len", "64", "--model.rope-theta", "5e5",
            "--save-every", "1")
    assert run_cli(capsys, *pretrain_args(pretrain_data, tmp_path / "r", *args, "--max-steps", "1"))[0] == 0
    code, _, err = run_cli(capsys, *pretrain_args(pretrain_data, tmp_path / "r", *args, "--max-steps", "2"))
    assert code == 0 and "resumed from" in err
    steps = [json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]


# -- llama2 info: memory at a context length ----------------------------------------------------

def test_info_predicts_the_kv_cache_of_code_llama_7b_at_16k(capsys):
    from llama2.commands.info import gather

    info = gather("codellama-7b", context=16384, dtype="bf16")
    cfg = ModelConfig.from_preset("codellama-7b")
    per_sequence = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 16384 * 2
    assert info["kv_cache"]["bytes_per_sequence"] == per_sequence == 8 * 1024**3
    code, out, _ = run_cli(capsys, "info", "codellama-7b", "--context", "16384", "--batch", "2")
    assert code == 0
    assert "KV cache (bf16)     16.00 GiB (17.18 GB) for 16,384 tokens x batch 2 (8.00 GiB" in out


def test_info_prefill_peak_is_weights_cache_and_the_prompts_mask_and_activations(capsys):
    from llama2.commands.info import gather
    from llama2.commands.memory import prefill_bytes

    info = gather("codellama-7b", context=16384, dtype="bf16")
    cfg = ModelConfig.from_preset("codellama-7b")
    # One prompt: one block's activations (SDPA's causal kernels, no mask) ...
    assert prefill_bytes(cfg, 16384, 1, 2) == 16384 * (3 * 2 * cfg.hidden_dim + 2 * 2 * cfg.dim)
    # ... a left-padded batch adds a boolean mask and its bf16 additive copy, quadratic in the context.
    assert prefill_bytes(cfg, 16384, 2, 2) == 2 * prefill_bytes(cfg, 16384, 1, 2) + 2 * 16384**2 * 3
    assert info["prefill"]["peak_bytes"] == info["weight_bytes"] + info["kv_cache"]["bytes"] + prefill_bytes(
        cfg, 16384, 1, 2)
    code, out, _ = run_cli(capsys, "info", "codellama-7b", "--context", "16384")
    assert code == 0 and "prefill peak        21.81 GiB" in out and "16,384-token prompt at once" in out


def test_one_prompts_prefill_builds_no_mask_and_equals_the_masked_one(monkeypatch):
    import torch.nn.functional as F

    from llama2 import Generator, SamplingParams

    model = Transformer.from_config(long_config(max_seq_len=96), seed=0).eval()
    masks = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        masks.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    params = SamplingParams(temperature=0, max_new_tokens=6, stop_at_eos=False, logprobs=True)
    gen = Generator(model)
    alone = gen.generate([[1, 5, 9, 33, 7]], params)[0]
    assert masks[0] is None  # the prefill: SDPA's causal path
    assert all(m is not None for m in masks[model.config.n_layers:])  # decoding: the filled prefix
    padded = gen.generate([[1, 5, 9, 33, 7], [1, 2]], params)[0]  # left padding needs the mask
    assert padded.tokens == alone.tokens
    assert padded.logprobs == pytest.approx(alone.logprobs, abs=1e-5)


def test_info_shows_a_directorys_rope_scaling(tmp_path, capsys):
    save_model(random_model(long_config(rope_scaling=4.0, max_seq_len=256)), tmp_path)
    code, out, _ = run_cli(capsys, "info", tmp_path)
    assert code == 0 and "rope theta          1e+06, linear position interpolation x4" in out
