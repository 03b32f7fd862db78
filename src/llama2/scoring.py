"""Sampling answers from a policy and scoring them with the reward models, shared by the
reward, rejection sampling, PPO and safety distillation stages and by ``llama2 evaluate``
(not a stage). Scores are probabilities, sigmoid of the reward model's output, which is what
the paper's 0.15 safety threshold and logit(Rc) (§3.2.3) refer to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from llama2.chat import encode_chat, validate_dialogue
from llama2.checkpoint import load_scalar_model, load_tokenizer
from llama2.data.preference import encode_answer, pad_rows
from llama2.data.world import World
from llama2.generate import Generator, SamplingParams
from llama2.model.lora import quantize_nf4
from llama2.utils import DataError, read_jsonl


def combine_rewards(r_helpful: Tensor, r_safety: Tensor, is_safety: Tensor, threshold: float = 0.15) -> Tensor:
    """§3.2.3: Rc = Rs if is_safety(prompt) or Rs < threshold else Rh.

    Scores are probabilities (sigmoid of the reward models' outputs); the 0.15 threshold had
    precision 0.89 / recall 0.55 on Meta Safety.
    """
    use_safety = is_safety.bool() | (r_safety < threshold)
    return torch.where(use_safety, r_safety, r_helpful)


@torch.no_grad()
def score_answers(model, tokenizer, prompts: Sequence[Sequence[dict]], answers: Sequence[str],
                  batch_size: int = 32, max_len: int | None = None) -> torch.Tensor:
    """Raw reward of each (dialogue, answer), read at the answer's EOS; float32 [N] on CPU."""
    device = next(model.parameters()).device
    max_len = max_len or model.config.max_seq_len
    rows = [encode_answer(tokenizer, p, a) for p, a in zip(prompts, answers)]
    out = []
    for start in range(0, len(rows), batch_size):
        tokens, lengths = pad_rows(rows[start:start + batch_size], max_len)
        out.append(model.score_last(tokens.to(device), lengths.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


class RewardScorer:
    """The helpfulness and (optional) safety reward models, and the paper's gated combination."""

    def __init__(self, helpful_dir: str, safety_dir: str | None = None, device="cpu", quantize: bool = False):
        """``quantize``: the models' linear weights stored in 4-bit NF4 (QLoRA's format), as PPO
        with ``--quantize-rewards`` holds them beside the policy."""
        def load(path):
            model = load_scalar_model(path, device=device)
            return quantize_nf4(model) if quantize else model

        self.helpful = load(helpful_dir)
        self.tokenizer = load_tokenizer(helpful_dir, self.helpful.config.vocab_size)
        self.safety = load(safety_dir) if safety_dir else None

    def scores(self, prompts, answers) -> dict[str, torch.Tensor]:
        """{"helpful": Rh, "safety": Rs} as probabilities in (0, 1); Rs = Rh without a safety model."""
        rh = torch.sigmoid(score_answers(self.helpful, self.tokenizer, prompts, answers))
        rs = torch.sigmoid(score_answers(self.safety, self.tokenizer, prompts, answers)) if self.safety else rh
        return {"helpful": rh, "safety": rs}

    def combined(self, prompts, answers, is_safety: Sequence[bool], threshold: float = 0.15) -> dict[str, torch.Tensor]:
        s = self.scores(prompts, answers)
        s["combined"] = combine_rewards(s["helpful"], s["safety"], torch.tensor(list(is_safety)), threshold)
        return s


def sample_answers(model, tokenizer, prompts: Sequence[Sequence[dict]], k: int, temperature: float, top_p: float = 1.0,
                   max_new_tokens: int = 64, seed: int = 0, batch_size: int = 64, progress=None) -> list[list[str]]:
    """``k`` sampled answers for each dialogue (batched, KV cache); prompts too long for the
    context get no answers (an empty list)."""
    gen = Generator(model, tokenizer)
    limit = model.config.max_seq_len - max_new_tokens
    encoded = [encode_chat(tokenizer, p) for p in prompts]
    jobs = [(i, ids) for i, ids in enumerate(encoded) if len(ids) <= limit for _ in range(k)]
    answers: list[list[str]] = [[] for _ in prompts]
    for n, start in enumerate(range(0, len(jobs), batch_size)):
        chunk = jobs[start:start + batch_size]
        params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                seed=seed * 100_003 + n)
        for (i, _), out in zip(chunk, gen.generate([ids for _, ids in chunk], params)):
            answers[i].append(out.text.strip())
        if progress is not None:
            progress(len(chunk))
    return answers


def load_rl_prompts(path: str, n: int, world_seed: int = 0) -> list[dict]:
    """Prompts for sampling: rows ``{"messages", "safety"}`` (the dialogue to answer and
    is_safety(prompt)) from a JSONL file ``{"messages"|"prompt", "safety": bool}``, or ``n``
    from the bundled world when ``path`` is empty."""
    if not path:
        return [{"messages": r["messages"], "safety": bool(r["safety"])} for r in World(world_seed).rl_prompts("train", n)]
    rows = []
    for line, obj in read_jsonl(path):
        msgs = obj.get("messages") or ([{"role": "user", "content": obj["prompt"]}] if "prompt" in obj else None)
        try:
            if msgs is None:
                raise ValueError("expected 'messages' or 'prompt'")
            validate_dialogue(msgs)
        except ValueError as e:
            raise DataError(f"{path}:{line}: {e}") from None
        rows.append({"messages": msgs, "safety": bool(obj.get("safety", False))})
    return rows
