"""Files a user hands us are data, never code, and a bad one is refused in one line naming it:
checkpoints (no pickled objects), the metrics log, JSONL data, model directories (checksums),
conversions (all or nothing) and devices."""

import builtins
import json
import pickle
import shutil

import pytest
import torch

from llama2.checkpoint import CheckpointError
from llama2.train.state import latest_checkpoint, truncate_metrics

from .conftest import ppo_config
from .test_train_core import make


class Payload:
    """A pickle that creates ``marker`` when unpickled, as a crafted checkpoint would run code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def plant(file, marker):
    torch.save({"state": Payload(marker)}, file)


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 3-step run with one checkpoint, copied by each test that damages it."""
    root = tmp_path_factory.mktemp("safe")
    make(root, max_steps=3, save_every=3, eval_every=0).fit()
    return root / "run"


@pytest.fixture
def run_copy(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path


# ------------------------------------------------------------------------------------------
# (a) checkpoints hold tensors and plain JSON only
# ------------------------------------------------------------------------------------------

def test_the_payload_is_live_when_loaded_unsafely(tmp_path):
    """The control: the planted file does run code under weights_only=False."""
    plant(tmp_path / "evil.pt", tmp_path / "marker")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("name", ["model.pt", "optimizer.pt", "rank-0.pt"])
def test_a_pickled_object_in_a_checkpoint_file_is_refused_and_never_run(run_copy, name):
    ckpt = latest_checkpoint(run_copy / "run")
    plant(ckpt / name, run_copy / "marker")
    with pytest.raises(CheckpointError) as err:
        make(run_copy, max_steps=6)
    assert str(ckpt / name) in one_line(err) and "refused" in str(err.value)
    assert not (run_copy / "marker").exists()


def test_an_old_pickled_trainer_pt_is_refused_as_an_older_unsafe_format(run_copy):
    ckpt = latest_checkpoint(run_copy / "run")
    (ckpt / "trainer.json").unlink()
    plant(ckpt / "trainer.pt", run_copy / "marker")
    with pytest.raises(CheckpointError) as err:
        make(run_copy, max_steps=6)  # resume="auto" finds it: refused, not silently skipped
    assert str(ckpt / "trainer.pt") in one_line(err) and "unsafe format of an older llama2" in str(err.value)
    assert not (run_copy / "marker").exists()


def test_a_trainer_json_of_another_format_version_is_refused(run_copy):
    file = latest_checkpoint(run_copy / "run") / "trainer.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "format": 99}))
    with pytest.raises(CheckpointError, match="trainer.json: checkpoint format 99"):
        make(run_copy, max_steps=6)


def test_a_truncated_tensor_file_is_one_line_naming_it(run_copy):
    file = latest_checkpoint(run_copy / "run") / "optimizer.pt"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(CheckpointError) as err:
        make(run_copy, max_steps=6)
    assert str(file) in one_line(err)


@pytest.fixture(scope="module")
def ppo_run(rl_dirs):
    from llama2.train.ppo import PPOTrainer

    root, policy, rm = rl_dirs
    PPOTrainer(ppo_config(root, policy, rm, "safe-ppo", 1), quiet=True).fit()
    return root / "safe-ppo"


@pytest.mark.parametrize("name", ["model.pt", "rank-0.pt", "trainer.pt"])
def test_a_planted_ppo_checkpoint_file_is_refused_and_never_run(rl_dirs, ppo_run, tmp_path, name):
    from llama2.train.ppo import PPOTrainer

    root, policy, rm = rl_dirs
    run = root / f"ppo-{name}"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(ppo_run, run)
    ckpt = latest_checkpoint(run)
    if name == "trainer.pt":  # a checkpoint of the old format
        (ckpt / "trainer.json").unlink()
    plant(ckpt / name, tmp_path / "marker")
    with pytest.raises(CheckpointError) as err:
        PPOTrainer(ppo_config(root, policy, rm, run.name, 2), quiet=True)
    assert str(ckpt / name) in one_line(err)
    assert not (tmp_path / "marker").exists()


# ------------------------------------------------------------------------------------------
# (b) the metrics log of an interrupted run
# ------------------------------------------------------------------------------------------

def test_a_torn_last_metrics_line_is_dropped_with_a_warning(run_copy):
    metrics = run_copy / "run" / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"step": 4, "loss": 1.2')  # killed mid-write
    warnings = []
    truncate_metrics(metrics, "step", 3, warnings.append)
    assert metrics.read_text() == good
    assert warnings == [f"warning: {metrics}:4: dropped a torn last line (the run was interrupted mid-write)"]


def test_a_torn_last_line_does_not_block_a_resume(run_copy):
    metrics = run_copy / "run" / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"step": 4, "lo\xc3')  # torn inside a UTF-8 character
    t = make(run_copy, max_steps=4)
    t.fit()
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3, 4]


def test_a_corrupt_metrics_line_before_the_end_names_file_and_line(run_copy):
    metrics = run_copy / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = "{not json"
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        make(run_copy, max_steps=6)
    assert one_line(err).startswith(f"{metrics}:2: not a JSON record")


def test_a_torn_ppo_metrics_line_is_dropped(rl_dirs, ppo_run):
    from llama2.train.ppo import PPOTrainer

    root, policy, rm = rl_dirs
    run = root / "ppo-torn"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(ppo_run, run)
    metrics = run / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"iteration": 2, "kl"')
    assert PPOTrainer(ppo_config(root, policy, rm, run.name, 2), quiet=True).iteration == 1
    assert metrics.read_text() == good


# ------------------------------------------------------------------------------------------
# (c) every data error names the file and line
# ------------------------------------------------------------------------------------------

CHAT_ROW = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
PAIR_ROW = '{"prompt": "hi", "chosen": "hello", "rejected": "go away", "rating": "better"}\n'


def test_invalid_utf8_in_sft_data_names_file_and_line(tmp_path):
    from llama2.data.chat_data import DataError, load_conversations

    f = tmp_path / "sft.jsonl"
    f.write_bytes(CHAT_ROW.encode() + CHAT_ROW.encode().replace(b"hello", b"hel\xfflo"))
    with pytest.raises(DataError) as err:
        load_conversations(f)
    assert one_line(err).startswith(f"{f}:2: not valid UTF-8 (byte 0xff")


def test_invalid_utf8_in_preference_data_names_file_and_line(tmp_path):
    from llama2.data.chat_data import DataError
    from llama2.data.preference import load_pairs

    f = tmp_path / "pairs.jsonl"
    f.write_bytes(PAIR_ROW.encode() * 2 + b'{"prompt": "\xc3\x28"}\n')
    with pytest.raises(DataError) as err:
        load_pairs(f)
    assert one_line(err).startswith(f"{f}:3: not valid UTF-8")


def test_a_row_of_the_wrong_shape_names_file_and_line(tmp_path):
    from llama2.data.chat_data import DataError, load_conversations
    from llama2.data.preference import load_pairs

    f = tmp_path / "bad.jsonl"
    f.write_text(CHAT_ROW + '{"messages": ["hi", "hello"]}\n')
    with pytest.raises(DataError, match=f"^{f}:2: "):
        load_conversations(f)
    f.write_text(PAIR_ROW + '{"messages": [1], "chosen": "a", "rejected": "b", "rating": "better"}\n')
    with pytest.raises(DataError, match=f"^{f}:2: "):
        load_pairs(f)


def test_a_leading_byte_order_mark_is_not_an_error(tmp_path):
    from llama2.data.chat_data import load_conversations

    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + CHAT_ROW.encode())
    assert len(load_conversations(f)) == 1


def test_the_world_cache_reader_names_file_and_line(tmp_path):
    from llama2.utils import read_jsonl

    f = tmp_path / "cache.jsonl"
    f.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(ValueError, match=f"^{f}:3: invalid JSON"):
        list(read_jsonl(f))


def test_invalid_utf8_in_a_corpus_file_names_file_and_line(tmp_path):
    from llama2.corpus import read_text

    f = tmp_path / "text.txt"
    f.write_bytes(b"one\ntwo\nth\xffree\n")
    with pytest.raises(ValueError) as err:
        read_text(f)
    assert one_line(err) == f"{f}:3: not valid UTF-8 (byte 0xff)"


# ------------------------------------------------------------------------------------------
# (d) devices: one line, exit code 1
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama_tokenizer):
    from llama2 import Transformer, save_model

    from .conftest import tiny_config

    root = tmp_path_factory.mktemp("model")
    return save_model(Transformer.from_config(tiny_config(vocab_size=32000), seed=0), root / "m",
                      tokenizer=llama_tokenizer)


@pytest.mark.parametrize("device,message", [
    ("cuda", "--device cuda: CUDA is not available on this machine"),
    ("cuda:1", "--device cuda:1: CUDA is not available on this machine"),
    ("gpu0", "--device 'gpu0': not a device; use cpu, cuda, cuda:N or mps"),
    ("meta", "--device meta: unsupported device type 'meta'"),
])
@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["chat"]])
def test_an_unusable_device_is_one_line_and_exit_1(model_dir, capsys, monkeypatch, command, device, message):
    from llama2.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*command, "--model", str(model_dir), "--device", device]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"llama2 {command[0]}: error: {message}") and err.count("\n") == 1


def test_a_cuda_index_past_the_last_gpu_is_named(monkeypatch):
    from llama2.utils import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="--device cuda:2: this machine has 2 CUDA device"):
        check_device("cuda:2")
    assert check_device("cuda:1") == "cuda:1" and check_device("cpu") == "cpu"


def test_a_prompt_file_that_is_not_utf8_is_one_line(model_dir, tmp_path, capsys):
    from llama2.cli import main

    (tmp_path / "p.txt").write_bytes(b"caf\xe9")
    assert main(["generate", "--model", str(model_dir), "--prompt-file", str(tmp_path / "p.txt")]) == 1
    assert capsys.readouterr().err == f"llama2 generate: error: {tmp_path / 'p.txt'}: not UTF-8 text (byte 3)\n"


# ------------------------------------------------------------------------------------------
# (e) a conversion is all or nothing
# ------------------------------------------------------------------------------------------

def interrupt_after(n):
    seen = []

    def progress(name):
        seen.append(name)
        if len(seen) == n:
            raise KeyboardInterrupt  # Ctrl-C (or any failure) halfway through the weights
    return progress


@pytest.mark.parametrize("to,name", [("hf", "out"), ("meta", "out"), ("gguf", "out.gguf")])
def test_an_interrupted_conversion_leaves_nothing_behind(model_dir, tmp_path, to, name):
    from llama2.checkpoint import convert

    dst = tmp_path / "new" / "deeper" / name
    with pytest.raises(KeyboardInterrupt):
        convert(model_dir, dst, to, progress=interrupt_after(5), max_shard_bytes=100_000)
    assert list(tmp_path.iterdir()) == []  # not the output, its temporary, nor the folders made for it


def test_a_failed_conversion_into_an_existing_folder_leaves_only_that_folder(model_dir, tmp_path):
    from llama2.checkpoint import convert

    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="does not split into 3 shards"):
        convert(model_dir, tmp_path / "out", "meta", n_shards=3)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not any((tmp_path / "out").iterdir())


def test_conversion_fills_an_empty_folder_and_refuses_a_full_one(model_dir, tmp_path):
    from llama2.checkpoint import convert, load_model

    (tmp_path / "empty").mkdir()
    convert(model_dir, tmp_path / "empty", "meta")
    load_model(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        convert(model_dir, tmp_path / "empty", "meta")


def test_an_unwritable_destination_is_one_line(model_dir, tmp_path):
    from llama2.checkpoint import convert

    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError) as err:
        convert(model_dir, tmp_path / "afile" / "out", "hf")
    assert one_line(err).startswith(f"{tmp_path / 'afile' / 'out'}: cannot be written")


# ------------------------------------------------------------------------------------------
# (f) model directories carry checksums
# ------------------------------------------------------------------------------------------

def flip_last_byte(file):
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x40  # inside the last tensor's data: the file still parses
    file.write_bytes(bytes(data))


@pytest.fixture
def model_copy(model_dir, tmp_path):
    return shutil.copytree(model_dir, tmp_path / "m")


def test_save_writes_the_sha256_of_every_weight_file(tmp_path):
    import hashlib

    from llama2 import Transformer, save_model

    from .conftest import tiny_config

    for name, shard in (("one", 10**9), ("sharded", 60_000)):
        path = save_model(Transformer.from_config(tiny_config(), seed=0), tmp_path / name, max_shard_bytes=shard)
        manifest = json.loads((path / "checksums.json").read_text())
        weights = sorted(p.name for p in path.glob("*.safetensors"))
        assert manifest["algorithm"] == "sha256" and sorted(manifest["files"]) == weights
        for file, digest in manifest["files"].items():
            assert hashlib.sha256((path / file).read_bytes()).hexdigest() == digest
    assert len(weights) > 1


def test_a_flipped_byte_is_refused_in_one_line_naming_the_file(model_copy):
    from llama2.checkpoint import load_model

    flip_last_byte(model_copy / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(model_copy)
    assert one_line(err).startswith(f"{model_copy / 'model.safetensors'}: does not match its sha256 in "
                                    f"{model_copy / 'checksums.json'}: the file is corrupt")


def test_verify_false_loads_a_flipped_byte_anyway(model_copy):
    from llama2.checkpoint import load_model

    flip_last_byte(model_copy / "model.safetensors")
    load_model(model_copy, verify=False)


def test_a_directory_without_a_manifest_loads_as_before(model_copy):
    from llama2.checkpoint import load_model

    (model_copy / "checksums.json").unlink()  # as transformers or another tool writes it
    flip_last_byte(model_copy / "model.safetensors")
    load_model(model_copy)


def test_generate_refuses_a_corrupt_model_unless_no_verify(model_copy, capsys):
    from llama2.cli import main

    flip_last_byte(model_copy / "model.safetensors")
    argv = ["generate", "--model", str(model_copy), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "model.safetensors: does not match its sha256" in err and err.count("\n") == 1
    assert main([*argv, "--no-verify"]) == 0


def test_the_server_refuses_a_corrupt_model_unless_verify_is_off(model_copy):
    from llama2.serve.app import create_app

    flip_last_byte(model_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: does not match its sha256"):
        create_app(model_copy)
    assert create_app(model_copy, verify=False).state.server.name == model_copy.name


def test_convert_refuses_a_corrupt_source_and_writes_nothing(model_copy, tmp_path):
    from llama2.checkpoint import convert

    flip_last_byte(model_copy / "model.safetensors")
    for to, name in (("meta", "meta"), ("hf", "hf"), ("gguf", "x.gguf")):
        with pytest.raises(CheckpointError, match="does not match its sha256"):
            convert(model_copy, tmp_path / name, to)
        assert not (tmp_path / name).exists()


def test_converted_and_resaved_directories_carry_a_fresh_manifest(model_dir, tmp_path):
    from llama2 import Transformer, save_model
    from llama2.checkpoint import convert, load_model

    from .conftest import tiny_config

    convert(model_dir, tmp_path / "meta", "meta")
    convert(tmp_path / "meta", tmp_path / "hf", "hf")
    assert (tmp_path / "hf" / "checksums.json").is_file()
    load_model(tmp_path / "hf")
    save_model(Transformer.from_config(tiny_config(vocab_size=32000), seed=1), tmp_path / "hf")  # new weights
    load_model(tmp_path / "hf")


# ------------------------------------------------------------------------------------------
# (a) FSDP checkpoints (torch.distributed.checkpoint): DCP itself would unpickle anything
# ------------------------------------------------------------------------------------------

def dcp_save(state, path):
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP warns and saves as one rank
        dcp.save(state, checkpoint_id=str(path))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_dcp_checkpoint_loads_through_the_safe_reader(tmp_path):
    from llama2.checkpoint.safe import load_dcp

    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters(), lr=0.5)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    dcp_save({"model": m.state_dict(), "optim": opt.state_dict()}, tmp_path / "dcp")
    m2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=0.1)
    m2(torch.randn(2, 4)).sum().backward()
    opt2.step()  # creates the state that the load fills in place
    state = {"model": m2.state_dict(), "optim": opt2.state_dict()}
    load_dcp(state, tmp_path / "dcp")
    assert all(torch.equal(a, b) for a, b in zip(state["model"].values(), m.state_dict().values()))
    assert state["optim"]["param_groups"][0]["lr"] == 0.5  # a non-tensor item, read with weights_only=True


def test_a_planted_dcp_metadata_file_is_refused_and_never_run(tmp_path):
    from llama2.checkpoint.safe import load_dcp

    dcp_save({"model": torch.nn.Linear(4, 3).state_dict()}, tmp_path / "dcp")
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(tmp_path / "marker")))
    with pytest.raises(CheckpointError) as err:
        load_dcp({"model": torch.nn.Linear(4, 3).state_dict()}, tmp_path / "dcp")
    assert one_line(err).startswith(f"{tmp_path / 'dcp' / '.metadata'}: refused")
    assert not (tmp_path / "marker").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_planted_dcp_item_is_refused_and_never_run(tmp_path):
    from llama2.checkpoint.safe import load_dcp

    dcp_save({"extra": Payload(tmp_path / "marker")}, tmp_path / "dcp")  # pickled as an opaque item
    with pytest.raises(CheckpointError, match="refused: item .extra. holds Python objects"):
        load_dcp({"extra": None}, tmp_path / "dcp")
    assert not (tmp_path / "marker").exists()
