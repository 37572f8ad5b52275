"""Reward registry and per-reason counters.

A reward is a function `(response, answer, **kwargs) -> (score, reason)`. `register` wraps it so
callers get a plain float in [0, 1] and every call adds one count under `(reward name, reason)` to
`STATS`: the RL trainer logs `STATS.snapshot(reset=True)` each step to see *why* rewards are zero
(no answer, timeouts, fork bombs...) rather than only how often.

Error policy: a reward never raises because of what a model wrote. Anything unexpected inside a
reward becomes score 0 with reason `internal_error` (and a logged traceback), so one odd sample
cannot kill a rollout worker. Mistakes of the caller (unknown kwargs, bad settings, a reward model
that was never set) raise: they are bugs in the job, and hiding them would silently zero a run.
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)


class RewardError(Exception):
    """Raised through the registry wrapper, never turned into a zero reward."""


class RewardConfigError(RewardError, ValueError):
    """A caller mistake (bad kwargs or settings)."""


class RewardStats:
    """Thread-safe counts of reward outcomes: {reward name: {reason: count}}."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def record(self, name: str, reason: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name][reason] += n

    def snapshot(self, reset: bool = False) -> dict[str, dict[str, int]]:
        """A plain-dict copy; `reset=True` clears atomically (no count lost between the two)."""
        with self._lock:
            snap = {name: dict(reasons) for name, reasons in self._counts.items()}
            if reset:
                self._counts.clear()
        return snap

    def flat(self, reset: bool = False) -> dict[str, int]:
        """`{"code/timeout": 3, ...}`: the shape metric loggers want."""
        snap = self.snapshot(reset)
        return {f"{name}/{reason}": n for name, reasons in snap.items() for reason, n in reasons.items()}

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


STATS = RewardStats()

RewardFn = Callable[..., "tuple[float, str]"]
BatchFn = Callable[..., "list[tuple[float, str]]"]


@dataclass
class RewardSpec:
    """How `score_batch` runs a reward: `batch` scores a whole list at once (reward models);
    `parallel` rewards spend their time waiting on subprocesses and run in a thread pool."""

    name: str
    fn: RewardFn
    batch: BatchFn | None = None
    parallel: bool = False


_REGISTRY: dict[str, RewardSpec] = {}


def _clamp(score: float) -> float:
    score = float(score)
    if not math.isfinite(score):
        return 0.0
    return min(1.0, max(0.0, score))


class Reward:
    """The callable `get(name)` returns: `reward(response, answer, **kwargs) -> float`."""

    def __init__(self, spec: RewardSpec, stats: RewardStats) -> None:
        self.spec, self.stats, self.name = spec, stats, spec.name
        self._sig = inspect.signature(spec.fn)

    def check_kwargs(self, kwargs: dict[str, Any]) -> None:
        try:
            self._sig.bind("", None, **kwargs)
        except TypeError as e:
            raise RewardConfigError(f"reward {self.name!r}: {e}") from None

    def scored(self, response: Any, answer: Any, **kwargs: Any) -> tuple[float, str]:
        """(score, reason) without recording it; used by `score_batch` and tests."""
        self.check_kwargs(kwargs)
        try:
            score, reason = self.spec.fn(response, answer, **kwargs)
        except RewardError:
            raise
        except Exception:  # noqa: BLE001 - a reward must not kill a rollout worker; see module doc
            log.exception("reward %s failed", self.name)
            return 0.0, "internal_error"
        return _clamp(score), reason

    def __call__(self, response: Any, answer: Any = None, **kwargs: Any) -> float:
        score, reason = self.scored(response, answer, **kwargs)
        self.stats.record(self.name, reason)
        return score

    def __repr__(self) -> str:
        return f"Reward({self.name!r})"


def register(name: str, *, batch: BatchFn | None = None, parallel: bool = False, replace: bool = False):
    """Decorator: `@register("my_reward")` over `fn(response, answer, **kw) -> (score, reason)`."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and not replace:
            raise RewardConfigError(f"reward {name!r} is already registered (pass replace=True to override)")
        _REGISTRY[name] = RewardSpec(name, fn, batch, parallel)
        return fn

    return deco


def names() -> list[str]:
    return sorted(_REGISTRY)


def spec(name: str) -> RewardSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; registered: {', '.join(names())}")
    return _REGISTRY[name]


def get(name: str, stats: RewardStats | None = None) -> Reward:
    """The reward called `name`; outcomes are counted in `stats` (default: the global `STATS`)."""
    return Reward(spec(name), STATS if stats is None else stats)


def combine(rewards: dict[str, float], weights: dict[str, float]) -> float:
    """Weighted sum, as R1 adds accuracy, format and language rewards (no normalization).

    Rewards without a weight are ignored (computed for logging only); a weight without a reward
    raises, because it is almost always a misspelled name in the config."""
    missing = sorted(set(weights) - set(rewards))
    if missing:
        raise KeyError(f"weights name rewards that were not computed: {missing}; computed: {sorted(rewards)}")
    return float(sum(w * rewards[k] for k, w in weights.items()))
