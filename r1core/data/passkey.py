"""Passkey retrieval documents (Mohtashami & Jaggi 2023, "Landmark Attention"): a random number hidden
at a chosen depth of irrelevant text, asked for at the end.

    <filler ...> The pass key is 40721. <filler ...> What is the pass key? The pass key is 40721.<|eos|>

The filler is sentences of the built-in prose (the pretraining corpus's own text), so only the
key is new to the model. A document is built in tokens, exactly `length` of them, which is what
lets one generator serve pretraining (documents that fit a training window), long-context training
and the evaluation grid (a document of each length with the needle at each depth).

The answer is the key's digits after the question's "The pass key is", the needle's own words, so
that a model answers by finding them and copying what followed (an induction head; every digit is its own
token in r1core's tokenizer). A model retrieves the key when it predicts each of those tokens greedily,
which, teacher-forced, is one forward pass per document.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch

from r1core.data.corpus import builtin_paragraphs
from r1core.data.shards import IGNORE_INDEX
from r1core.data.tokenizer import Tokenizer

NEEDLE = " The pass key is {key}."
QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyDoc:
    tokens: list[int]  # the whole document, EOS last
    answer_start: int  # index of the key's first token in the final answer
    answer_len: int  # the key's token count
    depth: float  # the depth asked for, in [0, 1] (0: the needle first, 1: right before the question)
    needle_at: float  # the depth it got: the nearest sentence boundary, as a share of the filler
    key: str


@lru_cache(maxsize=4)
def _sentences(tok_hash: str, tok: Tokenizer) -> tuple[tuple[int, ...], ...]:
    """The built-in prose split into sentences, each tokenized with its leading space."""
    out = []
    for para in builtin_paragraphs():
        for s in para.replace("\n", " ").split(". "):
            s = s.strip().rstrip(".")
            if s:
                out.append(tuple(tok.encode(" " + s + ".")))
    return tuple(out)


def min_length(tok: Tokenizer, digits: int = 5) -> int:
    """The shortest document: needle, question and answer with no filler."""
    key = "0" * digits
    fixed = NEEDLE.format(key=key) + QUESTION + " " + key + "."
    return len(tok.encode(fixed)) + 4  # + EOS, and slack for how pieces tokenize apart


def passkey_document(
    tok: Tokenizer, length: int, depth: float, rng: random.Random, digits: int = 5
) -> PasskeyDoc:
    """A document of exactly `length` tokens with a random `digits`-digit key at `depth` in [0, 1]."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must be in [0, 1], got {depth}")
    key = "".join(str(rng.randrange(10)) for _ in range(digits))
    needle = tok.encode(NEEDLE.format(key=key))
    question = tok.encode(QUESTION)
    answer = tok.encode(" " + key)
    tail = tok.encode(".") + [tok.eos_id]
    budget = length - len(needle) - len(question) - len(answer) - len(tail)
    if budget < 0:
        raise ValueError(f"passkey documents need at least {length - budget} tokens, got length={length}")
    filler: list[int] = []
    bounds = [0]  # sentence starts: the needle goes in at one of them
    sentences = _sentences(tok.hash, tok)
    while len(filler) < budget:
        filler.extend(rng.choice(sentences))
        bounds.append(min(len(filler), budget))
    filler = filler[:budget]
    cut = min(bounds, key=lambda b: abs(b - depth * budget))
    doc = filler[:cut] + needle + filler[cut:] + question + answer + tail
    start = len(doc) - len(tail) - len(answer)
    # the key's digits: " 40721" may tokenize as a space token then digits, or a spaced first digit
    n_space = len(answer) - digits if len(answer) > digits else 0
    return PasskeyDoc(
        tokens=doc,
        answer_start=start + n_space,
        answer_len=len(answer) - n_space,
        depth=depth,
        needle_at=cut / budget if budget else 0.0,
        key=key,
    )


def passkey_grid(
    tok: Tokenizer, lengths: list[int], depths: list[float], per_cell: int, seed: int, digits: int = 5
) -> list[PasskeyDoc]:
    """`per_cell` documents for every (length, depth), a pure function of the arguments.

    Each cell's keys and filler come from its own stream, so the same cell holds the same problems
    whatever other lengths and depths are asked for (a paired comparison across models and runs)."""
    docs = []
    for length in lengths:
        for depth in depths:
            rng = random.Random(f"passkey/{seed}/{length}/{depth}")
            docs.extend(passkey_document(tok, length, depth, rng, digits) for _ in range(per_cell))
    return docs


class PasskeyMix:
    """Micro-batches of another source with a share of their rows replaced by passkey documents.

    Each replaced row holds one document of a length drawn from [shortest, row length], the needle at a
    uniform depth, then padding that no label reads. Lengths spread over the whole range also when a
    long_context stage trains at a longer row: documents that fill every row (each at the longest distance
    the model has not yet learned) erased a tiny base's retrieval at every length within 50 steps, while
    the spread lets it relearn retrieval at short distances under the new rotary code and carry it out. Which
    rows, and what they hold, is a function of (seed, micro-batch index, row), so the position is
    the wrapped source's state plus a counter and resumes exactly.
    """

    def __init__(self, source, tok: Tokenizer, fraction: float, seed: int, digits: int = 5):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"passkey fraction must be in [0, 1], got {fraction}")
        self.source, self.tok, self.fraction, self.seed = source, tok, fraction, seed
        self.digits = digits
        self.index = 0

    def __iter__(self):
        shortest = min_length(self.tok, self.digits)
        for mb in self.source:
            rng = random.Random(f"passkey-mix/{self.seed}/{self.index}")
            self.index += 1
            mb = {k: v.clone() for k, v in mb.items()}
            T = mb["tokens"].shape[1]
            for row in range(mb["tokens"].shape[0]):
                if rng.random() < self.fraction:
                    n = rng.randint(min(shortest, T + 1), T + 1)
                    self._fill(mb, row, passkey_document(self.tok, n, rng.random(), rng, self.digits))
            yield mb

    def _fill(self, mb: dict, row: int, doc: PasskeyDoc) -> None:
        ids = torch.tensor(doc.tokens)
        n = len(ids) - 1  # tokens [0, n) predict tokens [1, n]
        mb["tokens"][row] = self.tok.pad_id
        mb["tokens"][row, :n] = ids[:-1]
        mb["labels"][row] = IGNORE_INDEX
        mb["labels"][row, :n] = ids[1:]
        if "doc_ids" in mb:
            mb["doc_ids"][row] = 1
            mb["doc_ids"][row, :n] = 0
        if "positions" in mb:
            T = mb["positions"].shape[1]
            mb["positions"][row, :n] = torch.arange(n)
            mb["positions"][row, n:] = torch.arange(T - n)

    def state_dict(self) -> dict:
        return {"source": self.source.state_dict(), "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.index = state["index"]
