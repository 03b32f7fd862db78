from pathlib import Path

import pytest
import torch

from llama2 import ModelConfig, Transformer

FIXTURE_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "llama2-tokenizer" / "tokenizer.model"


@pytest.fixture(scope="session")
def llama_tokenizer():
    """The real Llama 2 vocabulary (test data kept outside the package)."""
    if not FIXTURE_TOKENIZER.is_file():
        pytest.skip(f"Llama 2 tokenizer fixture not found at {FIXTURE_TOKENIZER}")
    from llama2 import Tokenizer

    return Tokenizer(FIXTURE_TOKENIZER)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=128)
    return ModelConfig(**{**base, **overrides})


@pytest.fixture
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer.from_config(tiny_config(), seed=0).eval()


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory):
    """Token shards of 150k characters of the bundled corpus on a 384-piece tokenizer."""
    from llama2.data.corpus import default_corpus_files, read_text
    from llama2.data.shards import prepare
    from llama2.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("pre")
    text = root / "text.txt"
    text.write_text(read_text(default_corpus_files()[3])[:150_000])
    train_tokenizer([text], root / "tok", vocab_size=384, verbose=False)
    prepare([text], root / "tok" / "tokenizer.model", root / "data", val_fraction=0.1, workers=1, log=lambda m: None)
    return root / "data"
