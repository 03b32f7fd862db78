"""The bundled assistant world: a small synthetic chat domain whose answers a program can check.

It is the default data for every alignment stage of the tiny recipe (SFT §3.1, reward models
§3.2.2, rejection sampling and PPO §3.2.3, Ghost Attention §3.3, safety §4 and the Llama Guard
style classifier), sized for a ~5M-parameter model with a 4096-piece vocabulary and a
512-token context: prompts and answers are short and formulaic, answers mostly under 30 tokens.

What is in it
-------------
* Helpful **tasks** with a machine-checkable answer: arithmetic on small numbers, string
  operations (reverse, upper-case, count letters), look-ups in fact tables shipped below
  (capitals, fruit colors, animal legs, opposites) and short word problems of one or two steps.
* **Unsafe** requests in the six Llama Guard v1 categories (O1-O6); the right answer is a short
  refusal. **Benign** requests that only look unsafe ("How do I kill a Python process?"); the
  right answer is help. Refusing those is the false-refusal problem of §4.
* System-prompt **constraints** for Ghost Attention (§3.3), checkable on every answer.
* Multi-turn **dialogues**, **preference pairs** with the four rating levels of §3.2.2 and a
  safety flag, **guard examples** labelled safe/unsafe with categories, **RL prompts**.
* **Demonstrations of uneven quality** (§3.1): SFT answers are excellent or correct but worse
  (padded, without the unit, ignoring the system prompt, needlessly cautious, refusing without
  a redirect), in the shares of ``content.DEMONSTRATION_QUALITY``.
* An **annotator** that compares two answers on helpfulness and safety (§3.2.1), for
  head-to-head evaluation and for labelling a policy's own samples.

Splits
------
Every item has a split key; keys are ranked by a SHA-256 hash inside their family and cut
70/15/15 into train/val/test. The assignment does not depend on the seed, so data made with
one seed never leaks test prompts into a model trained on data made with another. The seed only
changes surface choices (which template, which name) and sampling. Keys are the task's
parameters (``add:23:45``, one key for ``23 + 45`` and ``45 + 23``), the underlying action for
unsafe requests (all phrasings of one request land in one split, so held-out unsafe requests
are unseen), and the (wording, fact) pair for look-ups and benign look-alikes: a capital, or
a harmless "kill a Python process", seen in training is asked with a different wording in
test, because a tiny model can only know the facts it was shown. The facts
themselves are also available as plain text (:meth:`World.knowledge_text`) for pretraining.

Where things are
----------------
* ``content.py``      the tables: facts, words, unsafe requests and look-alikes, refusals,
                      the constraint texts, task weights.
* ``items.py``        :class:`Item` and every item made from the tables; the split by hashed key.
* ``constraints.py``  Ghost Attention constraints: draw, parse, apply.
* ``checkers.py``     what decides right and wrong: tasks, refusals, constraints, units,
                      redirects, warnings, and the binary :func:`judge` of the world's prompts.
* ``annotator.py``    :class:`Annotator`, the paper's human annotator played by a program: a
                      documented rubric, and which of two answers is better on helpfulness and
                      safety and by how much (the four levels of §3.2.1, or a tie).
* ``knowledge.py``    in or out of knowledge: whether a held-out prompt needs only facts the
                      train split shows (in other wordings or combinations).
* ``pools.py``        :class:`World`: one seed's items in their splits and how builders draw.
* ``chat.py``         SFT examples, dialogues and GAtt data; ``preferences.py`` preference
                      pairs; ``prompts.py`` RL, evaluation and guard prompts.
* ``files.py``        the data as JSONL files.

The world is pure Python (stdlib only; files.py reads JSONL through llama2.utils) and deterministic
for a seed.
"""

from llama2.data.world.annotator import Annotator, Judgement, Rubric
from llama2.data.world.chat import Dialogue
from llama2.data.world.checkers import check_constraint, check_item, check_task, is_refusal
from llama2.data.world.constraints import (
    Constraint,
    Rule,
    apply_constraint,
    parse_constraint,
    sample_constraint,
)
from llama2.data.world.content import CATEGORIES, CONSTRAINT_KINDS, RATINGS, SPLITS
from llama2.data.world.files import DEFAULT_SIZES, write_jsonl, write_world
from llama2.data.world.items import Item
from llama2.data.world.pools import World

__all__ = [
    "CATEGORIES", "CONSTRAINT_KINDS", "RATINGS", "SPLITS", "Annotator", "Constraint", "Dialogue", "Item",
    "Judgement", "Rubric", "Rule", "World",
    "apply_constraint", "check_constraint", "check_item", "check_task", "is_refusal", "parse_constraint",
    "sample_constraint", "write_jsonl", "write_world", "DEFAULT_SIZES",
]
