"""Resumable epoch-ordered reading: the one position type behind the data iterators a training stage
checkpoints (token-shard windows, packed SFT rows, RL prompts).

An iterator visits its items epoch after epoch, each epoch in an order fixed by (seed, epoch). Its
whole state is the position (epoch, pos): pos indexes that epoch's order and names the next item to
read, because it advances before an item is handed out. The saved state also records the settings
the order depends on (`identity()`: seed, sizes, data-parallel rank), and a state saved under other
settings fails to load, naming the setting that differs, instead of resuming somewhere else.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence


class EpochCursor:
    """Base of a resumable iterator: subclasses give `order(epoch)` and `identity()`."""

    epoch: int = 0
    pos: int = 0
    loop: bool = True  # False: stop after the current epoch
    what: str = ""  # named in the resume error (" the prompt order")

    def order(self, epoch: int) -> Sequence[int]:
        """Item indices in the order `epoch` reads them."""
        raise NotImplementedError

    def identity(self) -> dict:
        """The settings `order` depends on; a saved state must match them to load."""
        raise NotImplementedError

    def walk(self) -> Iterator[int]:
        """Item indices from the current position on, epoch after epoch."""
        while True:
            order = self.order(self.epoch)
            while self.pos < len(order):
                self.pos += 1  # advance before yielding: state_dict() then names the next item
                yield int(order[self.pos - 1])
            self.epoch, self.pos = self.epoch + 1, 0
            if not self.loop:
                return

    def batches(self, batch_size: int) -> Iterator:
        """The iterator's rows (NamedTuples of tensors) stacked in batches [B, ...]; with loop=False
        the last partial batch is dropped."""
        import torch

        it = iter(self)
        while True:
            rows = list(itertools.islice(it, batch_size))
            if len(rows) < batch_size:
                return
            yield type(rows[0])(*(torch.stack(col) for col in zip(*rows)))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, **self.identity()}

    def load_state_dict(self, state: dict) -> None:
        for key, value in self.identity().items():
            saved = state.get(key)
            if saved != value:
                raise ValueError(f"cannot resume{self.what}: {key} is {value} here, {saved} in the state")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
