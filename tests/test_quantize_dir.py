"""``llama2 quantize``: a quantized model directory that reloads as it is, and streaming
quantization's peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from llama2 import Transformer, save_model
from llama2.checkpoint import CheckpointError, load_model, quantize_dir
from llama2.model.quant import (
    Int4Linear,
    Int8Linear,
    int4_dequantize,
    int4_from_bytes,
    int4_quantize,
    int4_to_bytes,
)

from .conftest import run_cli, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def float_dir(llama_tokenizer, tmp_path_factory):
    # every out_features % 16 == 0 and in_features % 32 == 0 (hidden 384, vocab 32000)
    cfg = tiny_config(dim=128, n_layers=2, multiple_of=128, vocab_size=32000, max_seq_len=96)
    return save_model(Transformer.from_config(cfg, seed=0), tmp_path_factory.mktemp("float") / "m",
                      tokenizer=llama_tokenizer, max_shard_bytes=4_000_000)


@pytest.fixture(scope="module", params=["int8", "int4:32"])
def quantized(request, float_dir, tmp_path_factory):
    spec = request.param
    return spec, quantize_dir(float_dir, tmp_path_factory.mktemp("q") / spec.replace(":", "-"), spec)


def test_reloaded_directory_gives_the_logits_of_quantizing_on_load(float_dir, quantized):
    spec, qdir = quantized
    x = torch.randint(0, 32000, (2, 11), generator=torch.Generator().manual_seed(0))
    reloaded, on_load = load_model(qdir), load_model(float_dir, quantize=spec)
    with torch.no_grad():
        assert torch.equal(reloaded(x), on_load(x))
    layer = Int8Linear if spec == "int8" else Int4Linear
    assert isinstance(reloaded.output, layer) and isinstance(reloaded.layers[1].attention.wk, layer)


def test_config_says_how_it_was_quantized(quantized):
    spec, qdir = quantized
    cfg = json.loads((qdir / "config.json").read_text())
    q = cfg["quantization_config"]
    assert cfg["model_type"] == "llama2_quantized" and cfg["architectures"] == ["Llama2QuantizedForCausalLM"]
    assert q["quant_method"] == "llama2" and q["weights"] == spec[:4]
    assert q["group_size"] == (None if spec == "int8" else 32) and q["unquantized_dtype"] == "float32"
    with safe_open(str(next(qdir.glob("*.safetensors"))), "pt") as f:
        names = set(f.keys())
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert w.dtype == (torch.int8 if spec == "int8" else torch.uint8)
    assert w.shape == ((128, 128) if spec == "int8" else (128, 64))  # int4: two values per byte
    assert "model.layers.0.self_attn.q_proj.weight_scale" in names
    assert ("model.layers.0.self_attn.q_proj.weight_zero" in names) == (spec != "int8")
    assert (qdir / "tokenizer.model").is_file() and (qdir / "checksums.json").is_file()


def test_int4_file_layout_is_plain_nibbles_low_first():
    w = torch.randn(32, 64)
    q, sz = int4_quantize(w, 32)
    b = int4_to_bytes(q)
    assert b.dtype == torch.uint8 and b.shape == (32, 32)
    assert torch.equal(b[:, 0], (q[:, 0] | (q[:, 1] << 4)).to(torch.uint8))
    assert torch.equal(int4_from_bytes(b), q)
    assert (int4_dequantize(int4_from_bytes(b), sz, 32) - w).abs().max() < 0.5


def test_transformers_refuses_the_directory_by_its_model_type(quantized):
    from transformers import AutoConfig

    with pytest.raises(ValueError, match="llama2_quantized"):
        AutoConfig.from_pretrained(quantized[1])


def test_training_convert_and_requantizing_refuse_it_with_one_line(capsys, quantized, tmp_path):
    spec, qdir = quantized
    with pytest.raises(CheckpointError, match="cannot be trained") as e:
        load_model(qdir, training=True)
    assert "\n" not in str(e.value)
    other = "int4:64" if spec == "int8" else "int8"
    with pytest.raises(CheckpointError, match="already quantized"):
        load_model(qdir, quantize=other)
    assert isinstance(load_model(qdir, quantize=spec).output, Int8Linear if spec == "int8" else Int4Linear)
    rc, out, err = run_cli(capsys, "convert", qdir, tmp_path / "x.gguf")
    assert rc == 1 and err.count("\n") == 1 and "float model" in err, err
    assert not (tmp_path / "x.gguf").exists()


def test_generate_and_info_read_the_directory_as_it_is(capsys, float_dir, quantized):
    spec, qdir = quantized
    args = ("--prompt", "Hello there", "--temperature", "0", "--max-new-tokens", "5", "--json")
    rc, out, err = run_cli(capsys, "generate", "--model", qdir, *args)
    assert rc == 0, err
    rc2, out2, err2 = run_cli(capsys, "generate", "--model", float_dir, "--quantize", spec, *args)
    assert rc2 == 0, err2
    assert json.loads(out)["tokens"] == json.loads(out2)["tokens"]
    rc, out, err = run_cli(capsys, "info", qdir, "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["quantize"] == spec and f"quantized to {spec}" in info["source"]


def test_quantize_cli_writes_the_directory(capsys, float_dir, tmp_path):
    rc, out, err = run_cli(capsys, "quantize", float_dir, tmp_path / "q", "--int4", "--group-size", "64",
                           "--dtype", "bf16")
    assert rc == 0, err
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["group_size"] == 64 and cfg["torch_dtype"] == "bfloat16"
    model = load_model(tmp_path / "q")
    assert model.tok_embeddings.weight.dtype == torch.bfloat16 and model.output.group_size == 64


@pytest.mark.parametrize("argv, message", [
    (("--int8", "--group-size", "64"), "--group-size applies to --int4 only"),
    (("--int4", "--group-size", "128"), "needs in_features divisible by the group size 128"),
])
def test_quantize_cli_bad_combinations_are_one_line(capsys, tmp_path, argv, message):
    cfg = tiny_config(dim=96, multiple_of=32, vocab_size=512)  # in_features 96, not a multiple of 128
    src = save_model(Transformer.from_config(cfg, seed=0), tmp_path / "src")
    rc, out, err = run_cli(capsys, "quantize", src, tmp_path / "q", *argv)
    assert rc == 1 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "q").exists()


def test_quantize_cli_needs_int8_or_int4(capsys, float_dir, tmp_path):
    with pytest.raises(SystemExit):
        run_cli(capsys, "quantize", float_dir, tmp_path / "q")
    assert "one of the arguments --int8 --int4 is required" in capsys.readouterr().err


def test_a_tensor_of_the_wrong_type_is_one_line(tmp_path, float_dir):
    from llama2.checkpoint import hf

    qdir = quantize_dir(float_dir, tmp_path / "q", "int8")
    file = next(qdir.glob("*.safetensors"))
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # not views of the file it overwrites
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].float()
    hf.save_safetensors(tensors, file)
    with pytest.raises(CheckpointError, match=r"up_proj.weight' is float32 \(384, 128\), but a int8 model has "
                                              r"int8 \(384, 128\) there") as e:
        load_model(qdir, verify=False)
    assert str(file) in str(e.value) and "\n" not in str(e.value)


# -- peak memory ---------------------------------------------------------------------------------
# Measured in a child process as the growth of its peak resident set (VmHWM) over a float32 model
# of 110 MB in 8 MB shards. MALLOC_MMAP_THRESHOLD_ makes glibc hand every large freed block back
# to the OS at once (by default it raises the threshold as it goes and keeps freed tensors'
# memory in its heap), so the peak is what was really held. A warm-up load of a tiny model first
# takes the imports and first-call costs out of the measurement.
_CHILD = r"""
import sys, torch
torch.set_num_threads(1)
from llama2.checkpoint import load_model
from llama2.model.quant import quantize_model
def kib(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024
path, small, spec, how = sys.argv[1:]
quantize_model(load_model(small, verify=False), spec)
before = kib("VmRSS")
if how == "stream":
    model = load_model(path, quantize=spec, verify=False)
elif how == "reload":
    model = load_model(path, verify=False)
else:
    model = quantize_model(load_model(path, verify=False), spec)
held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(kib("VmHWM") - before, held)
"""


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory):
    cfg = tiny_config(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, multiple_of=256, vocab_size=4096)
    path = tmp_path_factory.mktemp("big") / "m"
    save_model(Transformer.from_config(cfg, seed=0), path, max_shard_bytes=8_000_000)
    small = save_model(Transformer.from_config(tiny_config(dim=128, multiple_of=128), seed=0), path.parent / "small")
    return path, small, sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _peak(path, small, spec: str, how: str) -> tuple[int, int]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    run = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(small), spec, how],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    peak, held = map(int, run.stdout.split())
    return peak, held


@pytest.mark.parametrize("spec", ["int8", "int4:32"])
def test_quantizing_on_load_peaks_at_the_quantized_model_plus_one_shard(big_dir, tmp_path, spec):
    path, small, float_bytes = big_dir
    shard, largest = 8_000_000, 4096 * 512 * 4  # the output head, in float32
    # one shard being read + the tensor being quantized and its temporaries (one float copy; int4
    # also the int32 values the packing op takes). Measured: int8 +17 MB, int4 +26 MB.
    bound = shard + 3 * largest
    peak, held = _peak(path, small, spec, "stream")
    assert held < float_bytes / 3
    assert peak < held + bound, (peak, held)
    after, _ = _peak(path, small, spec, "after")  # the float model first, then quantized: what streaming avoids
    assert after > float_bytes, (after, float_bytes)
    qdir = quantize_dir(path, tmp_path / "q", spec, max_shard_bytes=shard)
    reload_peak, reload_held = _peak(qdir, small, spec, "reload")
    assert reload_held == held and reload_peak < held + bound, (reload_peak, held)
