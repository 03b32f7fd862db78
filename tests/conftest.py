import os
from pathlib import Path

import pytest
import torch

from llama2 import ModelConfig, Transformer

# The real Llama 2 vocabulary, kept in the repository so a fresh clone runs every test
# (provenance and licence: fixtures/llama2-tokenizer/README.md).
FIXTURE_TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "llama2-tokenizer" / "tokenizer.model"


@pytest.fixture(scope="session")
def llama_tokenizer():
    """The real Llama 2 vocabulary (test data, not shipped in the package)."""
    from llama2 import Tokenizer

    return Tokenizer(FIXTURE_TOKENIZER)


def run_cli(capsys, *argv, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    """``llama2 ARGV...`` in-process: (exit code, stdout, stderr); ``stdin`` feeds standard input."""
    import io
    import sys

    from llama2.cli import main as cli

    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def tiny_config(**overrides) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=128)
    return ModelConfig(**{**base, **overrides})


@pytest.fixture
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer.from_config(tiny_config(), seed=0).eval()


# Directories of session-scoped fixtures (pretrain_data), which later modules still read.
SESSION_TMP_DIRS = ("pre",)


@pytest.fixture(scope="module", autouse=True)
def _module_tmp_dirs(request, tmp_path_factory):
    """Removes the temporary directories a test module made once its tests have passed: the
    module-scoped model directories (PPO runs with checkpoints among them) would otherwise stay
    until the session ends, gigabytes over the suite. A failing module keeps them to look at."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        import shutil

        for d in set(base.iterdir()) - before:
            if d.is_symlink():  # pytest's "<name>current" link to the newest numbered directory
                d.unlink()
            elif d.name.rstrip("0123456789") not in SESSION_TMP_DIRS:
                shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory):
    """Token shards of 150k characters of the bundled corpus on a 384-piece tokenizer."""
    from llama2.corpus import default_corpus_files, read_text
    from llama2.data.shards import prepare
    from llama2.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("pre")
    text = root / "text.txt"
    text.write_text(read_text(default_corpus_files()[3])[:150_000])
    train_tokenizer([text], root / "tok", vocab_size=384, verbose=False)
    prepare([text], root / "tok" / "tokenizer.model", root / "data", val_fraction=0.1, workers=1, log=lambda m: None)
    return root / "data"


SMALL_VOCAB = 320


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    """A 320-piece tokenizer trained with Llama 2's settings (GGUFReader parses the real 32k-entry
    vocabulary slowly)."""
    import sentencepiece as spm

    from llama2.checkpoint import load_tokenizer
    from llama2.tokenizer import LLAMA2_TRAINER_SETTINGS

    root = tmp_path_factory.mktemp("sp")
    text = "\n".join(f"The quick brown fox {i} jumps over the lazy dog {i * 7}. Hello world!" for i in range(300))
    (root / "text.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(root / "text.txt"), model_prefix=str(root / "tokenizer"),
                                   vocab_size=SMALL_VOCAB, minloglevel=2, **LLAMA2_TRAINER_SETTINGS)
    return load_tokenizer(root / "tokenizer.model", SMALL_VOCAB)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models gain nothing from threads, and a busy machine makes them much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, llama_tokenizer):
    """A tiny random chat model directory with the Llama 2 vocabulary, per test module."""
    from llama2 import save_model

    d = tmp_path_factory.mktemp("chat")
    return save_model(Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=256), seed=0), d / "model",
                      tokenizer=llama_tokenizer)


@pytest.fixture(scope="module")
def rl_dirs(tmp_path_factory, llama_tokenizer):
    """(root, policy, reward model): a tiny random chat model and a reward model from its trunk,
    per test module (the PPO runs under root must not meet another module's)."""
    from llama2 import save_model
    from llama2.checkpoint import save_scalar_model
    from llama2.model.heads import ScalarModel

    root = tmp_path_factory.mktemp("rl")
    lm = Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=1024), seed=0)
    policy = save_model(lm, root / "policy", tokenizer=llama_tokenizer)
    rm = save_scalar_model(ScalarModel.from_language_model(lm), root / "rm", tokenizer=llama_tokenizer)
    return root, policy, rm


def ppo_config(root, policy, rm, out, steps):
    """A PPO run of ``steps`` iterations of 4 prompts under ``root / out``, checkpointing every one."""
    from llama2.train.ppo import PPOConfig

    return PPOConfig(out=str(root / out), model=str(policy), reward_model=str(rm), safety_model=str(rm),
                     max_steps=steps, batch_size=4, minibatch_size=2, lr=1e-3, value_lr=1e-3,
                     max_new_tokens=6, prompts=12, save_every=1, progress=False)


# -- the suite a newcomer runs is the suite CI runs ---------------------------------------
# Only tests that need hardware or an optional package this project cannot install
# everywhere may skip: a CUDA GPU, llama-cpp-python. With LLAMA2_STRICT_SKIPS=1 (set by
# .ci/run) any other skip fails the run, naming the test and its reason.
ALLOWED_SKIPS = ("needs a CUDA GPU", "llama-cpp-python not installed")
_unexpected_skips: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
        if not any(allowed in reason for allowed in ALLOWED_SKIPS):
            _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("LLAMA2_STRICT_SKIPS") == "1" and _unexpected_skips:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("LLAMA2_STRICT_SKIPS") == "1" and _unexpected_skips:
        terminalreporter.write_line(f"{len(_unexpected_skips)} test(s) skipped for a reason CI does not allow:",
                                    red=True)
        for line in _unexpected_skips:
            terminalreporter.write_line(f"  {line}")


def load_benchmark(name: str):
    """benchmarks/NAME.py imported as a module (the benchmarks are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model_dirs(llama_tokenizer, tmp_path_factory):
    """Saved (model, draft) directories for speculative decoding: a tiny model and a smaller one, one tokenizer."""
    from llama2 import save_model

    root = tmp_path_factory.mktemp("spec")
    big = save_model(Transformer.from_config(tiny_config(vocab_size=32000, max_seq_len=96), seed=0), root / "big",
                     tokenizer=llama_tokenizer)
    small = save_model(Transformer.from_config(tiny_config(dim=32, n_layers=1, vocab_size=32000, max_seq_len=96),
                                               seed=1), root / "small", tokenizer=llama_tokenizer)
    return big, small
