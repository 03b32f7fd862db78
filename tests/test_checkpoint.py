"""Checkpoints: our/Hugging Face directories, Meta's release format, conversion, bad input.

Meta-format checkpoints are written here from scratch (params.json + consolidated.NN.pth,
split across model-parallel ranks by the rules of fairscale's parallel layers) and checked against an
independent forward pass written in Meta's convention (adjacent-pair complex RoPE,
repeat_kv), not against our own model code.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama2 import ModelConfig, Transformer
from llama2.checkpoint import CheckpointError, convert, load_model, load_tokenizer, save_model
from llama2.cli import main as cli

from .conftest import FIXTURE_TOKENIZER as FIXTURE

ATOL = 1e-4


def tiny(**kw) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Weights with unit-scale activations, so that logits are O(1) and comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    model = Transformer.from_config(cfg, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (1 if "tok_embeddings" in name else math.sqrt(p.shape[1])))
    return model.eval()


def logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


# -- Meta's format, written independently -------------------------------------------------
META_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4, "multiple_of": 32,
               "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 1000000.0, "vocab_size": -1}
META_VOCAB = 96


def ffn_width(p: dict) -> int:
    hidden = int(2 * 4 * p["dim"] / 3)
    if p.get("ffn_dim_multiplier") is not None:
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    return p["multiple_of"] * ((hidden + p["multiple_of"] - 1) // p["multiple_of"])


def meta_weights(p: dict, vocab: int, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Full (unsharded) Meta-layout weights under Meta's names."""
    g = torch.Generator().manual_seed(seed)
    d, hd = p["dim"], p["dim"] // p["n_heads"]
    kv = p.get("n_kv_heads", p["n_heads"]) * hd
    h = ffn_width(p)

    def mat(out, inp):
        return (torch.randn(out, inp, generator=g) / math.sqrt(inp)).to(dtype)

    def norm():
        return (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)

    w = {"tok_embeddings.weight": torch.randn(vocab, d, generator=g).to(dtype)}
    for i in range(p["n_layers"]):
        pre = f"layers.{i}."
        w[pre + "attention.wq.weight"] = mat(p["n_heads"] * hd, d)
        w[pre + "attention.wk.weight"] = mat(kv, d)
        w[pre + "attention.wv.weight"] = mat(kv, d)
        w[pre + "attention.wo.weight"] = mat(d, p["n_heads"] * hd)
        w[pre + "feed_forward.w1.weight"] = mat(h, d)
        w[pre + "feed_forward.w2.weight"] = mat(d, h)
        w[pre + "feed_forward.w3.weight"] = mat(h, d)
        w[pre + "attention_norm.weight"] = norm()
        w[pre + "ffn_norm.weight"] = norm()
    w["norm.weight"] = norm()
    w["output.weight"] = mat(vocab, d)
    return w


def split_dim(name: str) -> int | None:
    """Column-parallel weights split on dim 0, row-parallel and the embedding on dim 1."""
    if name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")) or name == "output.weight":
        return 0
    if name.endswith(("wo.weight", "w2.weight")) or name == "tok_embeddings.weight":
        return 1
    return None


def write_meta(path: Path, params: dict, weights: dict, n_shards: int, rope_freqs: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    for rank in range(n_shards):
        shard = {}
        for name, t in weights.items():
            dim = split_dim(name)
            shard[name] = t.clone() if dim is None else t.chunk(n_shards, dim=dim)[rank].clone()
        if rope_freqs:  # some of Meta's files carry this buffer; loaders must ignore it
            shard["rope.freqs"] = torch.ones(params["dim"] // params["n_heads"] // 2)
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")
    return path


def reference_forward(p: dict, w: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Llama 2 in Meta's own convention (llama/model.py), in float64."""
    w = {k: v.double() for k, v in w.items()}
    B, T = tokens.shape
    n_heads, n_kv = p["n_heads"], p.get("n_kv_heads", p["n_heads"])
    hd, eps, theta = p["dim"] // n_heads, p["norm_eps"], p.get("rope_theta", 10000.0)

    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2)[: hd // 2].double() / hd))
    angles = torch.outer(torch.arange(T).double(), freqs)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)  # [T, hd/2] complex

    def rmsnorm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope(x):  # x [B, T, H, hd]: adjacent pairs (2i, 2i+1) as complex numbers
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(xc * freqs_cis.view(1, T, 1, hd // 2)).flatten(3)

    def repeat_kv(x, n_rep):
        bs, slen, n_kv_heads, head_dim = x.shape
        return x[:, :, :, None, :].expand(bs, slen, n_kv_heads, n_rep, head_dim).reshape(bs, slen, -1, head_dim)

    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    h = w["tok_embeddings.weight"][tokens]
    for i in range(p["n_layers"]):
        def L(n, i=i):
            return w[f"layers.{i}.{n}.weight"]

        x = rmsnorm(h, L("attention_norm"))
        xq = (x @ L("attention.wq").T).view(B, T, n_heads, hd)
        xk = (x @ L("attention.wk").T).view(B, T, n_kv, hd)
        xv = (x @ L("attention.wv").T).view(B, T, n_kv, hd)
        xq, xk = rope(xq), rope(xk)
        keys, values = repeat_kv(xk, n_heads // n_kv), repeat_kv(xv, n_heads // n_kv)
        q, k, v = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(hd) + mask, dim=-1)
        out = (scores @ v).transpose(1, 2).reshape(B, T, -1)
        h = h + out @ L("attention.wo").T
        x = rmsnorm(h, L("ffn_norm"))
        h = h + (torch.nn.functional.silu(x @ L("feed_forward.w1").T) * (x @ L("feed_forward.w3").T)) @ L(
            "feed_forward.w2").T
    return (rmsnorm(h, w["norm.weight"]) @ w["output.weight"].T).float()


@pytest.fixture(scope="module")
def meta_ckpt():
    weights = meta_weights(META_PARAMS, META_VOCAB)
    tokens = torch.randint(0, META_VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    return weights, tokens, reference_forward(META_PARAMS, weights, tokens)


# -- ours <-> transformers --------------------------------------------------------------------
def test_save_model_loads_in_transformers_with_identical_logits(tmp_path):
    from transformers import LlamaForCausalLM

    model = random_model(tiny(rope_theta=1e6, n_kv_heads=2))
    save_model(model, tmp_path)
    theirs = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert theirs.config.num_key_value_heads == 2
    tokens = torch.randint(0, 128, (2, 13))
    ours = logits(model, tokens)
    assert ours.std() > 0.1
    torch.testing.assert_close(logits(theirs, tokens), ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kv_heads,theta", [(4, 10000.0), (2, 1e6), (1, 5e5)])
def test_transformers_model_loads_with_identical_logits(tmp_path, kv_heads, theta):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hc = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=kv_heads, rope_theta=theta,
                     rms_norm_eps=1e-5, max_position_embeddings=64, initializer_range=0.2)
    theirs = LlamaForCausalLM(hc).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert (ours.config.n_kv_heads, ours.config.rope_theta, ours.config.hidden_dim) == (kv_heads, theta, 96)
    tokens = torch.randint(0, 100, (2, 13))
    expected = logits(theirs, tokens)
    assert expected.std() > 0.1
    torch.testing.assert_close(logits(ours, tokens), expected, atol=ATOL, rtol=0)


def test_sharded_save_writes_an_index_and_reloads(tmp_path):
    from transformers import LlamaForCausalLM

    model = random_model(tiny())
    save_model(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
    assert all((tmp_path / f).is_file() for f in files)
    assert len(index["weight_map"]) == len(model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    tokens = torch.randint(0, 128, (1, 9))
    torch.testing.assert_close(logits(load_model(tmp_path), tokens), logits(model, tokens), atol=0, rtol=0)
    theirs = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(theirs, tokens), logits(model, tokens), atol=ATOL, rtol=0)
    # re-saving unsharded removes the stale index and shards' map
    save_model(model, tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "model.safetensors.index.json").exists()


def test_save_model_writes_generation_and_tokenizer_configs(tmp_path):
    save_model(random_model(tiny()), tmp_path, dtype=torch.bfloat16)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["temperature"], gen["top_p"]) == (1, 2, 0.6, 0.9)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["model_type"] == "llama"
    assert load_model(tmp_path).tok_embeddings.weight.dtype == torch.bfloat16
    assert not (tmp_path / "tokenizer_config.json").exists()  # no tokenizer given


def test_transformers_tokenizer_loads_the_saved_directory(tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(FIXTURE, 32000)
    save_model(random_model(tiny(vocab_size=32000)), tmp_path, tokenizer=tok)
    tok_cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "[INST]" in tok_cfg["chat_template"] and tok_cfg["bos_token"] == "<s>"
    assert (tmp_path / "tokenizer.model").read_bytes() == FIXTURE.read_bytes()
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    for text in ("Hello world", "The 2 cats sat.\nOn 12 mats!"):
        assert theirs(text).input_ids == tok.encode(text, bos=True)
    chat = [{"role": "user", "content": "Hi"}]
    assert theirs.apply_chat_template(chat, tokenize=False) == "<s>[INST] Hi [/INST]"


# -- Meta's format ----------------------------------------------------------------------------
@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_meta_checkpoint_matches_an_independent_reference(tmp_path, meta_ckpt, n_shards):
    weights, tokens, expected = meta_ckpt
    write_meta(tmp_path, META_PARAMS, weights, n_shards)
    model = load_model(tmp_path)
    cfg = model.config
    assert (cfg.vocab_size, cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta) == (META_VOCAB, 8, 4, 1e6)
    assert cfg.hidden_dim == ffn_width(META_PARAMS) == 224
    assert expected.std() > 0.1
    torch.testing.assert_close(logits(model, tokens), expected, atol=ATOL, rtol=0)


def test_meta_checkpoint_without_gqa_or_theta(tmp_path):
    params = {"dim": 64, "multiple_of": 16, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-5, "vocab_size": -1}
    weights = meta_weights(params, 64, seed=3)
    write_meta(tmp_path, params, weights, 2, rope_freqs=False)
    tokens = torch.randint(0, 64, (1, 9))
    torch.testing.assert_close(logits(load_model(tmp_path), tokens), reference_forward(params, weights, tokens),
                               atol=ATOL, rtol=0)


def _read_meta(path: Path, n: int) -> list[dict]:
    return [torch.load(path / f"consolidated.{r:02d}.pth", weights_only=True) for r in range(n)]


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_to_hf_to_meta_is_bitwise_identical(tmp_path, n_shards):
    weights = meta_weights(META_PARAMS, META_VOCAB, seed=5, dtype=torch.bfloat16)  # Meta ships bf16
    src = write_meta(tmp_path / "meta", META_PARAMS, weights, n_shards)
    convert(src, tmp_path / "hf", "hf")
    assert json.loads((tmp_path / "hf/config.json").read_text())["torch_dtype"] == "bfloat16"
    convert(tmp_path / "hf", tmp_path / "back", "meta", n_shards=n_shards)
    assert sorted(p.name for p in (tmp_path / "back").glob("consolidated.*.pth")) == [
        f"consolidated.{r:02d}.pth" for r in range(n_shards)]
    for original, back in zip(_read_meta(src, n_shards), _read_meta(tmp_path / "back", n_shards)):
        original.pop("rope.freqs")
        assert list(back) == list(original)
        for name in original:
            assert back[name].dtype == original[name].dtype, name
            assert torch.equal(back[name], original[name]), name
    params = json.loads((tmp_path / "back/params.json").read_text())
    assert params == {**META_PARAMS, "vocab_size": META_VOCAB}


def test_hf_to_meta_to_hf_is_bitwise_identical(tmp_path):
    # max_seq_len 4096: Meta's params.json has no context length (Meta's loader passes
    # max_seq_len itself and would reject a duplicate), so it comes back as Llama 2's 4096.
    model = random_model(tiny(rope_theta=1e6, ffn_dim_multiplier=1.3, max_seq_len=4096))
    save_model(model, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "meta", "meta", n_shards=2)
    convert(tmp_path / "meta", tmp_path / "back", "hf")
    a, b = load_file(tmp_path / "hf/model.safetensors"), load_file(tmp_path / "back/model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert json.loads((tmp_path / "hf/config.json").read_text()) == json.loads(
        (tmp_path / "back/config.json").read_text())


def test_transformers_checkpoint_converts_to_meta(tmp_path):
    """HF configs carry only intermediate_size; Meta's params.json needs multiple_of/multiplier."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama2.checkpoint.hf import config_from_hf
    from llama2.checkpoint.meta import meta_params

    torch.manual_seed(0)
    hc = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.2)
    theirs = LlamaForCausalLM(hc).eval()
    theirs.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "meta", "meta", n_shards=2)
    tokens = torch.randint(0, 100, (1, 9))
    torch.testing.assert_close(logits(load_model(tmp_path / "meta"), tokens), logits(theirs, tokens), atol=ATOL, rtol=0)
    # meta-llama/Llama-2-70b-hf's config.json -> Meta's own 70B params.json
    hf70 = {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_hidden_layers": 80,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "vocab_size": 32000, "model_type": "llama",
            "hidden_act": "silu", "rope_scaling": None, "tie_word_embeddings": False}
    assert meta_params(config_from_hf(hf70)) == {
        "dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
        "n_layers": 80, "norm_eps": 1e-05, "vocab_size": 32000}


def test_convert_cli_both_ways(tmp_path, capsys):
    src = write_meta(tmp_path / "meta", META_PARAMS, meta_weights(META_PARAMS, 32000, seed=2), 2)
    (tmp_path / "tokenizer.model").write_bytes(FIXTURE.read_bytes())  # one folder up, as Meta ships it
    assert cli(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    err = capsys.readouterr().err
    n_params = Transformer(ModelConfig(**{**META_PARAMS, "vocab_size": 32000})).num_params()
    assert f"{n_params:,} parameters" in err and "[21/21]" in err and "done" in err
    assert (tmp_path / "hf/tokenizer.model").is_file() and (tmp_path / "hf/tokenizer_config.json").is_file()
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "meta2"), "--shards", "2", "-q"]) == 0  # --to inferred
    assert capsys.readouterr().err == ""
    assert (tmp_path / "meta2/tokenizer.model").is_file()
    tokens = torch.randint(0, 32000, (1, 7))
    expected = logits(load_model(src), tokens)
    for out in ("hf", "meta2"):
        torch.testing.assert_close(logits(load_model(tmp_path / out), tokens), expected, atol=0, rtol=0)
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "hf16"), "--to", "hf", "--dtype", "f16", "-q"]) == 0
    assert load_model(tmp_path / "hf16").output.weight.dtype == torch.float16


# -- lazy, memory-mapped conversion -----------------------------------------------------------
def test_meta_shards_are_memory_mapped(tmp_path, meta_ckpt, monkeypatch):
    weights, tokens, expected = meta_ckpt
    src = write_meta(tmp_path / "meta", META_PARAMS, weights, 2)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mmap"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    convert(src, tmp_path / "hf", "hf")
    load_model(src)
    assert calls and all(m is True for m in calls), calls


def test_hf_writer_holds_at_most_one_shard(tmp_path, monkeypatch):
    """Conversion consumes the lazy tensor stream shard by shard instead of reading it all first."""
    from llama2.checkpoint import hf

    model = random_model(tiny())
    save_model(model, tmp_path / "src")
    read, saved = [0], []
    real_iter, real_save = hf.iter_hf_tensors, hf._atomic_save

    def counting_iter(path, *args):
        for item in real_iter(path, *args):
            read[0] += 1
            yield item

    def recording_save(tensors, file):
        saved.append((read[0], len(tensors)))
        return real_save(tensors, file)

    monkeypatch.setattr(hf, "iter_hf_tensors", counting_iter)
    monkeypatch.setattr(hf, "_atomic_save", recording_save)
    convert(tmp_path / "src", tmp_path / "out", "hf", max_shard_bytes=60_000)
    total = len(model.state_dict())
    assert len(saved) > 2 and saved[0][0] < total
    written = 0
    for n_read, n_in_shard in saved:
        assert n_read - written <= n_in_shard + 1  # this shard plus the tensor that did not fit
        written += n_in_shard
    assert written == total


_RSS_SCRIPT = textwrap.dedent("""
    import json, re, sys, torch
    from llama2.checkpoint import convert

    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    convert(sys.argv[1], sys.argv[2] + "/out-warm", "hf")  # import and warm up every code path
    with open("/proc/self/clear_refs", "w") as f:          # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = status("VmRSS")
    convert(sys.argv[3], sys.argv[2] + "/out-big", "hf", max_shard_bytes=4_000_000)  # 8 output shards
    print(json.dumps({"delta_bytes": status("VmHWM") - before}))
""")


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_reset_peak_rss(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_conversion_peak_memory_stays_below_two_copies(tmp_path, meta_ckpt):
    weights, _, _ = meta_ckpt
    small = write_meta(tmp_path / "small", META_PARAMS, weights, 1)
    # ~30 MB in 2 model-parallel shards, no tensor above 2.1 MB
    params = {"dim": 256, "n_layers": 8, "n_heads": 8, "multiple_of": 256, "norm_eps": 1e-5, "vocab_size": -1}
    big_weights = meta_weights(params, 2000, seed=4)
    size = sum(t.numel() * 4 for t in big_weights.values())
    big = write_meta(tmp_path / "big", params, big_weights, 2)
    del big_weights
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(small), str(tmp_path), str(big)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    delta = json.loads(out.stdout.strip().splitlines()[-1])["delta_bytes"]
    assert 25e6 < size < 40e6
    print(f"peak RSS grew by {delta / 1e6:.1f} MB converting a {size / 1e6:.1f} MB model")
    # Memory-mapped input (its pages count once they are touched) plus one output shard at a
    # time; reading everything before writing would need two full copies.
    assert delta < 1.5 * size, f"peak RSS grew by {delta / 1e6:.1f} MB converting a {size / 1e6:.1f} MB model"


# -- bad input ---------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = random_model(tiny())
    save_model(model, tmp_path / "m")
    return tmp_path / "m"


def _error(path, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(path, **kw)
    return str(e.value)


def test_missing_directory_and_directory_without_config(tmp_path):
    assert str(tmp_path / "nope") in _error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    msg = _error(tmp_path / "empty")
    assert str(tmp_path / "empty") in msg and "config.json" in msg and "params.json" in msg
    (tmp_path / "file").write_text("x")
    assert str(tmp_path / "file") in _error(tmp_path / "file")


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    for cut in (len(data) // 2, 6):
        f.write_bytes(data[:cut])
        assert str(f) in _error(saved)


def test_truncated_meta_shard(tmp_path, meta_ckpt):
    src = write_meta(tmp_path, META_PARAMS, meta_ckpt[0], 2)
    f = src / "consolidated.01.pth"
    f.write_bytes(f.read_bytes()[:1000])
    assert str(f) in _error(src)


def test_config_weight_shape_mismatch_names_tensor_and_shapes(saved):
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    msg = _error(saved)
    assert str(saved / "model.safetensors") in msg and "config.json" in msg
    assert "model.layers.0.mlp." in msg and "176" in msg and "96" in msg


def test_meta_shape_mismatch(tmp_path, meta_ckpt):
    src = write_meta(tmp_path, {**META_PARAMS, "ffn_dim_multiplier": None}, meta_ckpt[0], 1)
    msg = _error(src)
    assert "consolidated.00.pth" in msg and "params.json" in msg and "feed_forward.w1" in msg
    assert "(224, 64)" in msg and "(192, 64)" in msg


def test_missing_tensor(saved):
    f = saved / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f)
    msg = _error(saved, verify=False)  # past the checksum, which no longer matches
    assert str(f) in msg and "model.layers.1.mlp.up_proj.weight" in msg


def test_missing_tensor_in_meta_shard(tmp_path, meta_ckpt):
    weights = dict(meta_ckpt[0])
    del weights["layers.1.feed_forward.w3.weight"]
    src = write_meta(tmp_path, META_PARAMS, weights, 1)
    msg = _error(src)
    assert "consolidated.00.pth" in msg and "layers.1.feed_forward.w3.weight" in msg


def test_missing_weight_file_and_bad_index(saved, tmp_path):
    model = random_model(tiny())
    save_model(model, tmp_path / "sh", max_shard_bytes=40_000)
    index = tmp_path / "sh/model.safetensors.index.json"
    shard = tmp_path / "sh" / sorted(set(json.loads(index.read_text())["weight_map"].values()))[-1]
    shard.unlink()
    assert str(shard) in _error(tmp_path / "sh")
    index.write_text("{not json")
    assert str(index) in _error(tmp_path / "sh")
    (saved / "model.safetensors").unlink()
    assert str(saved / "model.safetensors") in _error(saved)


@pytest.mark.parametrize("file,text", [("config.json", "{oops"), ("config.json", "[1, 2]"),
                                       ("config.json", '{"model_type": "llama"}'),
                                       ("config.json", '{"model_type": "gpt2", "hidden_size": 64}'),
                                       ("params.json", "{oops"), ("params.json", '{"dim": 64, "colour": 3}')])
def test_invalid_json(tmp_path, file, text):
    (tmp_path / file).write_text(text)
    if file == "params.json":
        torch.save({"tok_embeddings.weight": torch.zeros(4, 4)}, tmp_path / "consolidated.00.pth")
    assert str(tmp_path / file) in _error(tmp_path)


def test_unsupported_hf_features_are_refused(saved):
    cfg = json.loads((saved / "config.json").read_text())
    for extra in ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, {"tie_word_embeddings": True},
                  {"hidden_act": "gelu"}):
        (saved / "config.json").write_text(json.dumps({**cfg, **extra}))
        assert str(saved / "config.json") in _error(saved)


def test_tokenizer_vocab_must_match_the_model(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.model.*32000.*512"):
        load_tokenizer(FIXTURE, 512)
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        save_model(random_model(tiny(vocab_size=512)), tmp_path, tokenizer=load_tokenizer(FIXTURE))
    assert load_tokenizer(FIXTURE, 32000).vocab_size == 32000


def test_convert_refuses_same_directory_and_unknown_target(saved, tmp_path):
    with pytest.raises(CheckpointError, match="differ"):
        convert(saved, saved, "meta")
    with pytest.raises(ValueError, match="unknown target"):
        convert(saved, tmp_path / "x", "onnx")


CLI_BAD = [["info", "{missing}"], ["convert", "{missing}", "{out}"], ["convert", "{bad}", "{out}", "--to", "hf"],
           ["info", "{bad}"], ["convert", "{saved}", "{out}", "--tokenizer", "{missing}"],
           ["convert", "{saved}", "{out}", "--to", "hf", "--max-shard-size", "lots"]]


def _bad_args(tmp_path, argv):
    bad = tmp_path / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "config.json").write_text("{oops")
    if not (tmp_path / "saved").exists():
        save_model(random_model(tiny()), tmp_path / "saved")
    subs = dict(missing=tmp_path / "missing", out=tmp_path / "out", bad=bad, saved=tmp_path / "saved")
    return [a.format(**subs) for a in argv]


@pytest.mark.parametrize("argv", CLI_BAD)
def test_cli_bad_input_is_one_line_exit_1(tmp_path, argv, capsys):
    assert cli(_bad_args(tmp_path, argv)) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llama2 {argv[0]}: error:"), captured.err
    assert str(tmp_path) in lines[0] or "lots" in lines[0]


def test_cli_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    args = _bad_args(tmp_path, ["convert", "{bad}", "{out}", "--to", "meta"])
    out = subprocess.run([sys.executable, "-m", "llama2", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"llama2 convert: error: {tmp_path / 'bad/config.json'}: invalid JSON "
                                               "(Expecting property name enclosed in double quotes: line 1 column 2 "
                                               "(char 1))"]


# -- parameter counts --------------------------------------------------------------------------
RELEASED = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192,
            "codellama-34b": 33_743_970_304, "codellama-7b": 6_738_546_688, "codellama-13b": 13_016_028_160}


@pytest.mark.parametrize("preset,count", RELEASED.items())
def test_released_parameter_counts(preset, count):
    cfg = ModelConfig.from_preset(preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == count
    assert cfg.num_params() == count
