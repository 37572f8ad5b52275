"""Scoring rollouts: which reward functions apply to a problem, with which arguments.

`rl.rewards` maps reward names to weights; the name "accuracy" stands for the task's own checker
(math-verify for arithmetic and equations, the countdown checker, sandboxed tests for code), so one
config serves mixed task sets. `require_boxed` applies R1's rule to math answers (a `\\boxed{}`
after `</think>`, nothing else). Problem meta fields a reward accepts (e.g. countdown's `numbers`) are
passed to it; `rl.reward_kwargs[name]` adds fixed settings (e.g. `format: {think_in_prompt: true}`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Sequence

from r1core import rewards
from r1core.data.tasks import Problem

ACCURACY_BY_TASK = {"countdown": "countdown", "code": "code"}  # everything else: math_accuracy


def accuracy_reward_name(task: str) -> str:
    return ACCURACY_BY_TASK.get(task, "math_accuracy")


def _accepted(name: str) -> frozenset[str]:
    return _keyword_params(rewards.registry.spec(name).fn)


@functools.lru_cache(maxsize=None)
def _keyword_params(fn) -> frozenset[str]:
    # keyed by the function (a name may be registered again): inspect.signature costs ~30 us a call
    return frozenset(list(inspect.signature(fn).parameters)[2:])


class Scorer:
    def __init__(
        self,
        weights: dict[str, float],
        reward_kwargs: dict[str, dict] | None = None,
        think_in_prompt: bool = True,
        require_boxed: bool = False,
    ):
        self.weights = dict(weights)
        self.reward_kwargs = {k: dict(v) for k, v in (reward_kwargs or {}).items()}
        fmt = self.reward_kwargs.setdefault("format", {})
        fmt.setdefault("think_in_prompt", think_in_prompt)
        # R1's accuracy rule: only a boxed answer after </think> counts (see math_accuracy)
        self.reward_kwargs.setdefault("math_accuracy", {}).setdefault("require_boxed", require_boxed)
        for name in self.weights:
            if name != "accuracy":
                rewards.registry.spec(name)  # unknown names fail here, before any rollout

    def _call(self, name: str, response: str, problem: Problem) -> float:
        kw = dict(self.reward_kwargs.get(name, {}))
        accepted = _accepted(name)
        kw.update({k: v for k, v in problem.meta.items() if k in accepted and k not in kw})
        return rewards.get(name)(response, problem.answer, **kw)

    def score(self, response: str, problem: Problem) -> tuple[float, dict[str, float]]:
        """(weighted total, {name: value}); "accuracy" is always computed and reported."""
        values = {}
        for name in set(self.weights) | {"accuracy"}:
            real = accuracy_reward_name(problem.task) if name == "accuracy" else name
            values[name] = self._call(real, response, problem)
        total = sum(w * values[k] for k, w in self.weights.items())
        return total, values

    def score_samples(self, samples: Sequence, problems: Sequence[Problem]) -> None:
        """Fill each rollout Sample's `reward` (weighted total) and `rewards` ({name: value})."""
        for sample, problem in zip(samples, problems, strict=True):
            sample.reward, sample.rewards = self.score(sample.response_text, problem)
