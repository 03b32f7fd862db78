from .config import PRESETS, ModelConfig
from .transformer import Attention, Block, FeedForward, KVCache, RMSNorm, Transformer

__all__ = ["PRESETS", "ModelConfig", "Transformer", "RMSNorm", "Attention", "FeedForward", "Block", "KVCache"]
