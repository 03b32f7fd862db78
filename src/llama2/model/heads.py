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

    def reset_score(self) -> None:
        # A fresh head starts near zero so initial rewards (and PPO values) are unbiased.
        nn.init.normal_(self.score.weight, std=1.0 / (self.config.dim + 1) ** 0.5)

    @classmethod
    def from_language_model(cls, lm: Transformer) -> ScalarModel:
        """Take a chat model's trunk, drop its next-token head, add a new scalar head."""
        model = cls(lm.config).to(lm.tok_embeddings.weight.dtype)
        state = {k: v for k, v in lm.state_dict().items() if not k.startswith("output.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert missing == ["score.weight"] and not unexpected, (missing, unexpected)
        with torch.no_grad():
            model.reset_score()
        return model
