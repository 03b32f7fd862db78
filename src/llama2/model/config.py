"""Model hyperparameters and the released Llama 2 / Code Llama shapes (paper §2.2, Table 1)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Shape of a Llama 2 transformer. Field names follow Meta's ``params.json``."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = multi-head attention (n_kv_heads == n_heads)
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    # RoPE base. Longer contexts raise it: Code Llama 1e4 -> 1e6 (Code Llama §2.4), Llama 2 Long
    # 5e5 (Xiong et al. 2023, "adjusted base frequency").
    rope_theta: float = 10000.0
    # Linear position interpolation (Chen et al. 2023): positions are divided by this factor,
    # L_target / L_train, so a longer sequence maps onto the angles seen in training. None = off.
    rope_scaling: float | None = None
    max_seq_len: int = 4096  # Llama 2 context (Llama 1 had 2048)
    ffn_hidden: int | None = None  # explicit SwiGLU width (HF's intermediate_size); None = derived

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        problems = []
        if self.dim <= 0 or self.n_layers <= 0 or self.n_heads <= 0 or self.vocab_size <= 0:
            problems.append("dim, n_layers, n_heads and vocab_size must be positive")
        elif self.dim % self.n_heads:
            problems.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        elif (self.dim // self.n_heads) % 2:
            problems.append(f"head_dim={self.dim // self.n_heads} must be even for RoPE")
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.rope_theta <= 0:
            problems.append(f"rope_theta={self.rope_theta} must be positive")
        if self.rope_scaling is not None and not self.rope_scaling >= 1:
            problems.append(f"rope_scaling={self.rope_scaling} must be >= 1 (L_target / L_train; None = off)")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4*dim (to keep FLOPs of a 4*dim MLP), scaled, rounded up."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_params(self) -> int:
        """Exact parameter count, without building the model."""
        d, h, kv = self.dim, self.hidden_dim, self.n_kv_heads * self.head_dim
        per_layer = d * d * 2 + d * kv * 2 + 3 * d * h + 2 * d
        return self.n_layers * per_layer + 2 * self.vocab_size * d + d

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})


# The released shapes (the paper's Table 1 and Meta's params.json). Code Llama: theta 1e6, 16 extra infilling pieces, 16k context.
PRESETS: dict[str, dict] = {
    "7b": dict(dim=4096, n_layers=32, n_heads=32),
    "13b": dict(dim=5120, n_layers=40, n_heads=40),
    "70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
    "codellama-7b": dict(
        dim=4096, n_layers=32, n_heads=32, vocab_size=32016, ffn_dim_multiplier=1.0,
        rope_theta=1e6, max_seq_len=16384,
    ),
    "codellama-13b": dict(
        dim=5120, n_layers=40, n_heads=40, vocab_size=32016, ffn_dim_multiplier=1.0,
        rope_theta=1e6, max_seq_len=16384,
    ),
    "codellama-34b": dict(
        # 34B was released without infilling, so it keeps the 32,000-piece vocabulary.
        dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, vocab_size=32000, ffn_dim_multiplier=1.0,
        rope_theta=1e6, max_seq_len=16384,
    ),
    # Small shapes for laptops, CI and the tiny end-to-end recipe (same architecture, GQA kept).
    "110m": dict(dim=768, n_layers=12, n_heads=12, max_seq_len=1024),
    "1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, multiple_of=256, max_seq_len=2048),
    "tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=4096, multiple_of=32, max_seq_len=512),
    "nano": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=256),
}
