"""Scalar heads: reward models (§3.2.2) and PPO value models share one shape.

The chat model's next-token head is replaced by a regression head that reads the final
hidden state, so parameter names stay those of :class:`Transformer` plus ``score.weight``
(transformers' ``LlamaForSequenceClassification`` names it the same).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .transformer import Transformer


class ScalarModel(Transformer):
    """Llama trunk + ``score``: one scalar per position; ``score_last`` reads the answer's last token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        del self.output
        self.score = nn.Linear(cfg.dim, 1, bias=False)

    def forward(self, tokens: Tensor, positions=None, slots=None, mask=None) -> Tensor:
        """Scalar per position, float32 [B, T]."""
        return self.score(self.hidden_states(tokens, positions, slots, mask)).squeeze(-1).float()

    def score_last(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Score of each right-padded row at its last real token, [B]."""
        values = self(tokens)
        return values.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)

    def init_weights(self, std: float = 0.02) -> None:
        super().init_weights(std)
        self.reset_score()

    def reset_score(self, generator: torch.Generator | None = None) -> None:
        # A fresh head starts near zero so initial rewards (and PPO values) are unbiased. Drawn on
        # the CPU in float32 from ``generator`` (torch's global RNG without one), so one seed gives
        # one head on any device and in any dtype.
        w = self.score.weight
        std = 1.0 / (self.config.dim + 1) ** 0.5
        fresh = torch.randn(w.shape, generator=generator, dtype=torch.float32) * std
        with torch.no_grad():
            w.copy_(fresh.to(w.dtype))

    @classmethod
    def from_language_model(cls, lm: Transformer, seed: int = 0) -> ScalarModel:
        """Take a chat model's trunk (copied), drop its next-token head, add a new scalar head
        drawn from ``seed`` alone: a reward model trained with one seed starts from the same
        weights whatever drew from torch's global RNG before (an earlier stage, a cached step
        skipped on resume)."""
        with torch.device("meta"):  # no default init: the trunk is copied, the head drawn below
            model = cls(lm.config)
        w = lm.tok_embeddings.weight
        state = {k: v.detach().clone() for k, v in lm.state_dict().items() if not k.startswith("output.")}
        state["score.weight"] = torch.empty(1, lm.config.dim, dtype=w.dtype, device=w.device)
        model.load_state_dict(state, strict=True, assign=True)
        model.reset_score(torch.Generator().manual_seed(seed))
        return model
