"""Rollouts for a sharded trainer: rank 0 generates with a whole-model copy fed from the shards.

Under torchrun the training engine holds only this rank's shard (tp × pp × ep × dp). The built-in
engine needs the whole model on one device, so rank 0 keeps one (as verl's and slime's colocated
setups keep an inference copy) and `update_weights()` refreshes it from the shards one tensor at a
time (`engine.iter_full_state`, a collective: every rank calls it, only rank 0 keeps the result; the
gather never holds more than one whole tensor beside the copy). Other ranks do not generate: the
GRPO trainer broadcasts rank 0's batch to them.
"""

from __future__ import annotations

from typing import Callable

import torch

from r1core.model import ModelArgs, Transformer

from .types import RolloutEngine, Sample, SamplingParams


class GatheredRollout(RolloutEngine):
    def __init__(
        self,
        engine,
        model_args: ModelArgs,
        make: Callable[[Transformer], RolloutEngine],
        *,
        device,
        dtype: torch.dtype,
    ):
        self.engine = engine
        self.generates = engine.rank == 0
        self.inner: RolloutEngine | None = None
        if self.generates:
            with torch.device(device):
                model = Transformer(model_args).to(dtype).eval()
            self.inner = make(model)
        self.update_weights()

    @property
    def model(self):
        return None if self.inner is None else self.inner.model

    def update_weights(self, _model=None) -> None:
        """Collective: copy every whole tensor of the trainer's current weights into rank 0's model."""
        own = self.inner.model.state_dict() if self.inner is not None else None
        seen = set()
        for name, full in self.engine.iter_full_state():
            if own is None:
                continue
            if name not in own:
                raise KeyError(
                    f"GatheredRollout: the trainer's weight {name!r} has no place in the rollout model"
                )
            own[name].copy_(full)
            seen.add(name)
        if own is not None:
            missing = sorted(set(own) - seen)
            if missing:
                raise KeyError(f"GatheredRollout: the trainer sent no value for {missing[:5]}")
            self.inner.weight_version += 1

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Sample]:
        if self.inner is None:
            raise RuntimeError(
                f"rank {self.engine.rank} does not generate: rank 0 does, and broadcasts the batch"
            )
        return self.inner.generate(prompts, n, sampling)

    def sleep(self) -> None:
        if self.inner is not None:
            self.inner.sleep()

    def wake(self) -> None:
        if self.inner is not None:
            self.inner.wake()
