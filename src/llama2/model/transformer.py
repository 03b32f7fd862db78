"""The Llama 2 transformer: pre-norm RMSNorm, SwiGLU, RoPE, grouped-query attention, KV cache.

Weights are stored in the Hugging Face layout: RoPE rotates the pairs (i, i + head_dim/2)
("rotate half"), so ``model.safetensors`` files load without any permutation. Meta's
checkpoints rotate adjacent pairs; ``llama2.checkpoint.meta`` permutes wq/wk rows on the way
in and out, which makes the two conventions produce identical outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 even under bf16/fp16: the mean of squares overflows otherwise.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float,
                 scaling: float | None = None) -> tuple[Tensor, Tensor]:
    """cos/sin tables for integer ``positions`` (any shape) -> ``positions.shape + (head_dim,)``.

    ``scaling``: linear position interpolation (Chen et al. 2023), position p is rotated as
    p / scaling. Dividing the frequencies instead of the positions is the same product."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    if scaling is not None:
        inv_freq = inv_freq / scaling
    angles = positions.float().unsqueeze(-1) * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rope_tables(cos: Tensor, sin: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [B, T, D] -> ([B, 1, T, D], [B, 1, T, D] with the first half of sin negated), in
    ``dtype``: prepared once per forward instead of once per layer and per q/k (see _rotate)."""
    cos, sin = cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rotate(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """Rotate (i, i + d/2) pairs of ``x`` [B, H, T, D] by the prepared tables: x * cos +
    cat(-x2, x1) * sin, computed as roll(x) * [-s1, s2], which is the same, bit for bit."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class KVCache(nn.Module):
    """Preallocated keys and values for incremental decoding, written at slot indices."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        ck, cv = self.k[: k.shape[0]], self.v[: v.shape[0]]
        ck.index_copy_(2, slots, k)  # one kernel; advanced-index assignment costs several per layer
        cv.index_copy_(2, slots, v)
        return ck, cv


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, slots: Tensor | None, mask: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)  # tables from rope_tables, once per forward
        if self.cache is not None and slots is not None:
            k, v = self.cache.update(slots, k, v)
            # Only the slots the mask covers take part (the filled prefix); without a mask the
            # queries are a prompt at slots 0..T-1 (see Transformer.hidden_states).
            S = T if mask is None else mask.shape[-1]
            k, v = k[:, :, :S], v[:, :, :S]
        # GQA: each K/V head serves n_heads // n_kv_heads adjacent query heads.
        gqa = self.n_kv_heads != self.n_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, slots: Tensor | None, mask: Tensor | None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, slots, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Decoder-only Llama 2. ``model(tokens)`` -> float32 logits [batch, seq, vocab].

    Extra inputs, all optional, for decoding with the cache, batching and packing:
      ``positions`` [B, T] RoPE positions (default 0..T-1, or ``slots`` when decoding);
      ``slots`` [T] cache slots to write K/V to (requires ``setup_cache``);
      ``mask`` [B, 1, T, S] boolean, True = may attend (default causal).

    Blocks receive RoPE tables from :func:`rope_tables` ([B, 1, T, D], sin half-negated); a
    block called directly with [B, T, D] cos/sin from :func:`rope_cos_sin` works as well.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False

    # -- cache -------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int | None = None, dtype=None, device=None) -> None:
        cfg = self.config
        max_len = max_len or cfg.max_seq_len
        ref = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(
                batch_size, max_len, cfg.n_kv_heads, cfg.head_dim, dtype or ref.dtype, device or ref.device
            )

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    @property
    def cache_len(self) -> int:
        cache = self.layers[0].attention.cache
        return 0 if cache is None else cache.k.shape[2]

    # -- forward -----------------------------------------------------------------------
    def hidden_states(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        slots: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Final RMS-normalised hidden states [B, T, dim] (what reward and value heads read)."""
        B, T = tokens.shape
        if positions is None:
            base = slots if slots is not None else torch.arange(T, device=tokens.device)
            positions = base.unsqueeze(0).expand(B, T)
        if slots is not None and self.layers[0].attention.cache is not None and mask is None:
            # Decoding with a cache: attend to every filled slot up to each query's own slot. A
            # prompt written from slot 0 is plainly causal: no mask, so SDPA runs its fused causal
            # (flash) kernels, with no [T, T] mask in memory (Code Llama's 16k prompts).
            S = int(slots[-1]) + 1
            if S != T:
                mask = (torch.arange(S, device=tokens.device) <= slots.unsqueeze(-1)).view(1, 1, T, S)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta,
                                self.config.rope_scaling)
        h = self.tok_embeddings(tokens)
        cos, sin = rope_tables(cos, sin, h.dtype)
        if mask is not None and mask.dtype == torch.bool and not torch.is_grad_enabled():
            # SDPA turns a boolean mask into this additive one in every layer; do it once. (Not
            # while training: the float mask would be kept alive for the backward pass.)
            mask = torch.zeros(mask.shape, dtype=h.dtype, device=mask.device).masked_fill_(
                ~mask, float("-inf"))
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, slots, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, slots, mask)
        return self.norm(h)

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        slots: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        return self.output(self.hidden_states(tokens, positions, slots, mask)).float()

    # -- construction ------------------------------------------------------------------
    def init_weights(self, std: float = 0.02) -> None:
        """GPT-style init for training from scratch; output projections scaled by depth."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=std / (2 * self.config.n_layers) ** 0.5)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    @classmethod
    def from_config(cls, cfg: ModelConfig, device=None, dtype=None, seed: int | None = None) -> Transformer:
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            model = cls(cfg)
        if str(device) != "meta":
            model.init_weights()
        if dtype is not None:
            model.to(dtype)
        return model

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
