"""Llama 2-Chat's dialogue format (Meta's generation.py): ``[INST]``/``<<SYS>>`` tags, one BOS/EOS per exchange.

Every completed (user, assistant) exchange is tokenized on its own and wrapped in BOS ... EOS;
the last user turn gets a BOS and no EOS. Tokenizing the joined string once gives different
ids, so training data, generation and the server all go through :func:`chat_segments`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")

Message = Mapping[str, str]


@dataclass(frozen=True)
class Segment:
    """A run of token ids and whether they are the assistant's answer (what SFT learns)."""

    ids: list[int]
    is_answer: bool
    turn: int  # index of the exchange this segment belongs to


def validate_dialogue(messages: Sequence[Message], *, allow_final_assistant: bool = False) -> None:
    """Raise ValueError with a clear message unless ``messages`` is a valid Llama 2 dialogue."""
    if not messages:
        raise ValueError("dialogue is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has unknown role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a string")
        for tag in SPECIAL_TAGS:
            if tag in m["content"]:
                raise ValueError(f"message {i}: special tag {tag!r} is not allowed inside a message")
    turns = list(messages[1:] if messages[0]["role"] == "system" else messages)
    if not turns:
        raise ValueError("dialogue has a system message but no user message")
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(
                f"turn {i} has role {m['role']!r}, expected {expected!r}: after an optional system "
                "message, roles must alternate user/assistant"
            )
    last = turns[-1]["role"]
    if last != "user" and not (allow_final_assistant and last == "assistant"):
        raise ValueError("the last message must be from the user")


def _merge_system(messages: Sequence[Message]) -> list[dict]:
    msgs = [dict(m) for m in messages]
    if msgs[0]["role"] == "system":
        system, msgs = msgs[0], msgs[1:]
        msgs[0]["content"] = B_SYS + system["content"] + E_SYS + msgs[0]["content"]
    return msgs


def chat_segments(tokenizer, messages: Sequence[Message], *, allow_final_assistant: bool = False) -> list[Segment]:
    """Token segments of a dialogue in Meta's format, tagging which ids are answers.

    With ``allow_final_assistant`` the dialogue may end with an assistant answer (training
    data); its exchange is then closed with EOS like every other completed one.
    """
    validate_dialogue(messages, allow_final_assistant=allow_final_assistant)
    msgs = _merge_system(messages)
    segments: list[Segment] = []
    for turn, start in enumerate(range(0, len(msgs), 2)):
        user = msgs[start]["content"].strip()
        prompt = f"{B_INST} {user} {E_INST}"
        if start + 1 < len(msgs):
            answer = msgs[start + 1]["content"].strip()
            # Meta encodes f"{prompt} {answer} " in one call; SentencePiece's dummy-prefix and
            # merges make that differ from encoding the two halves, so split after the fact.
            full = tokenizer.encode(f"{prompt} {answer} ", bos=True, eos=True)
            n_prompt = _common_prefix(full, tokenizer.encode(prompt, bos=True))
            segments.append(Segment(full[:n_prompt], False, turn))
            segments.append(Segment(full[n_prompt:], True, turn))
        else:
            segments.append(Segment(tokenizer.encode(prompt, bos=True), False, turn))
    return segments


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_chat(tokenizer, messages: Sequence[Message]) -> list[int]:
    """Token ids identical to Meta's ``chat_completion`` for a dialogue ending with a user turn."""
    return [i for seg in chat_segments(tokenizer, messages) for i in seg.ids]


# transformers' apply_chat_template with this template gives the ids of encode_chat
# (tested against the real Llama 2 tokenizer).
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% set system_message = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = '' %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 %}{% set content = system_message + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
