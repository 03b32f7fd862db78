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
