"""Built-in pretraining / demo corpus: worked task solutions mixed with a little plain text.

The mix gives a BPE tokenizer trained on it the digits, the operators and the <think>/\\boxed{}
markup, and gives a tiny model enough worked examples to learn the built-in tasks. Problems come
from the *train* split only, so held-out evaluation problems never leak into pretraining.
"""

from __future__ import annotations

import random
from functools import lru_cache
from importlib import resources
from typing import Iterator

from r1core.data.solutions import pretrain_text
from r1core.data.tasks import draw_problem

# (kind, weight, difficulty choices): difficulty is drawn uniformly from the list per document.
DEFAULT_MIX: tuple[tuple[str, float, tuple[dict, ...]], ...] = (
    (
        "arithmetic",
        0.45,
        (
            {"digits": 1},
            {"digits": 2},
            {"digits": 2, "ops": "+-"},
            {"digits": 1, "n_operands": 3},
            {"digits": 3, "ops": "+-"},
        ),
    ),
    ("equations", 0.2, ({"digits": 1}, {"digits": 2})),
    ("countdown", 0.15, ({"n_numbers": 3}, {"n_numbers": 4})),
    ("text", 0.2, ({},)),
)


@lru_cache(maxsize=1)
def builtin_paragraphs() -> tuple[str, ...]:
    """The paragraphs of the shipped plain-text file (r1core/data/builtin/text.txt)."""
    text = resources.files("r1core.data").joinpath("builtin/text.txt").read_text(encoding="utf-8")
    return tuple(p.strip() for p in text.split("\n\n") if p.strip())


def builtin_corpus(
    n_docs: int, seed: int = 0, mix=DEFAULT_MIX, test_fraction: float = 0.1, split: str = "train"
) -> Iterator[str]:
    """Yield `n_docs` documents, a pure function of the arguments. Problems come from `split`: "test" gives
    held-out documents (a validation set) whose problems never occur in the "train" corpus."""
    if n_docs < 0:
        raise ValueError(f"n_docs must be >= 0, got {n_docs}")
    rng = random.Random(f"corpus/{seed}")
    kinds = [k for k, _, _ in mix]
    weights = [w for _, w, _ in mix]
    choices = {k: d for k, _, d in mix}
    paragraphs = builtin_paragraphs()
    for _ in range(n_docs):
        kind = rng.choices(kinds, weights)[0]
        if kind == "text":
            yield rng.choice(paragraphs)
            continue
        difficulty = rng.choice(choices[kind])
        yield pretrain_text(draw_problem(kind, rng, split, test_fraction, **difficulty))
