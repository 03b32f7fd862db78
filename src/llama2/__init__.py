"""llama2: the Llama 2 recipe in PyTorch — model, tokenizer, checkpoints, training stages, serving."""

from llama2.chat import encode_chat
from llama2.checkpoint import load_model, save_model
from llama2.generate import Completion, Generator, SamplingParams
from llama2.model import ModelConfig, Transformer
from llama2.tokenizer import Tokenizer, train_tokenizer

__version__ = "0.1.0"
__all__ = [
    "ModelConfig", "Transformer", "Tokenizer", "train_tokenizer", "encode_chat",
    "load_model", "save_model", "Generator", "SamplingParams", "Completion",
]
