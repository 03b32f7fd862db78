"""A multi-turn conversation that always fits the model's context (used by ``llama2 chat``).

Each new user turn is encoded with Meta's chat format (:func:`llama2.chat.encode_chat`); when
the prompt plus the room reserved for the answer would exceed the context, the OLDEST
completed exchanges are dropped, one at a time, until it fits. The system prompt is never
dropped (it is re-merged into whichever user message comes first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llama2.chat import SPECIAL_TAGS, encode_chat, validate_dialogue
from llama2.generate import ContextOverflow

SPECIAL_TAGS_ERROR = "Error: special tags are not allowed as part of the prompt."  # Meta's wording


def build_messages(system: str | None, exchanges: list[tuple[str, str]], user: str) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    for question, answer in exchanges:
        msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return msgs + [{"role": "user", "content": user}]


def fit_dialogue(tokenizer, system: str | None, exchanges: list[tuple[str, str]], user: str,
                 max_prompt_tokens: int) -> tuple[list[int], int]:
    """(prompt ids, number of oldest exchanges dropped) for the next turn.

    Drops the oldest exchanges until the prompt has at most ``max_prompt_tokens`` tokens; if
    even the system prompt and ``user`` alone are longer, returns them with every exchange
    dropped (the caller decides whether that still fits the context).
    """
    for dropped in range(len(exchanges) + 1):
        ids = encode_chat(tokenizer, build_messages(system, exchanges[dropped:], user))
        if len(ids) <= max_prompt_tokens:
            return ids, dropped
    return ids, len(exchanges)


def has_special_tags(text: str) -> bool:
    return any(tag in text for tag in SPECIAL_TAGS)


@dataclass
class ChatSession:
    """History of (user, assistant) exchanges under a fixed system prompt and token budget.

    ``context`` is the model's window; ``max_new_tokens`` is reserved for each answer, so a
    prompt may use ``context - max_new_tokens`` tokens before old exchanges are dropped.
    """

    tokenizer: object
    context: int
    max_new_tokens: int
    system: str | None = None
    exchanges: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.system:
            validate_dialogue(build_messages(self.system, [], "x"))  # special tags in the system prompt

    @property
    def max_prompt_tokens(self) -> int:
        return max(1, self.context - self.max_new_tokens)

    def prompt(self, user: str) -> tuple[list[int], int]:
        """Ids to generate the answer to ``user`` from, and how many old exchanges were dropped
        (they are forgotten for good). Raises ValueError for special tags and ContextOverflow
        when the system prompt and the message alone do not fit the context."""
        if has_special_tags(user):
            raise ValueError(SPECIAL_TAGS_ERROR)
        ids, dropped = fit_dialogue(self.tokenizer, self.system, self.exchanges, user, self.max_prompt_tokens)
        if len(ids) >= self.context:
            raise ContextOverflow(
                f"the message is too long: {len(ids)} tokens with the system prompt; the context is "
                f"{self.context} tokens"
            )
        del self.exchanges[:dropped]
        return ids, dropped

    def add(self, user: str, answer: str) -> None:
        """Remember a completed exchange. Special tags a model wrote into its answer are removed:
        the chat format refuses them inside messages, and they would break every later turn."""
        for tag in SPECIAL_TAGS:
            answer = answer.replace(tag, "")
        self.exchanges.append((user, answer))

    def reset(self) -> None:
        self.exchanges.clear()
