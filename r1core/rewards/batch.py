"""`score_batch`: one reward over a batch of responses, without letting any sample hang it."""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import os
from typing import Any, Sequence

from r1core.rewards.registry import RewardConfigError, RewardStats, get


def score_batch(
    name: str,
    responses: Sequence,
    answers: Sequence,
    *,
    max_workers: int | None = None,
    deadline_s: float | None = None,
    stats: RewardStats | None = None,
    **kwargs: Any,
) -> list[float]:
    """Scores in input order; every outcome is counted in `stats` (default: the global STATS).

    Rewards with a batch form (the reward model) get one call. Rewards that wait on subprocesses
    (code) run in a pool of `max_workers` threads (default: the CPU count), each sandboxed run
    bounded by its own limits; `deadline_s` bounds the whole batch on top: samples not finished
    by then score 0 with reason `timeout` (their sandboxes still end at their own deadlines).
    Everything else runs in the calling thread, so math-verify's signal timeouts stay available."""
    reward = get(name, stats)
    if len(responses) != len(answers):
        raise RewardConfigError(f"{len(responses)} responses but {len(answers)} answers")
    if reward.spec.batch is not None:
        try:
            inspect.signature(reward.spec.batch).bind(responses, answers, **kwargs)
        except TypeError as e:
            raise RewardConfigError(f"reward {name!r}: {e}") from None
        results = reward.spec.batch(responses, answers, **kwargs)
    elif reward.spec.parallel and len(responses) > 1:
        reward.check_kwargs(kwargs)
        results = _pooled(reward, responses, answers, kwargs, max_workers, deadline_s)
    else:
        results = [reward.scored(r, a, **kwargs) for r, a in zip(responses, answers)]
    for _, reason in results:
        reward.stats.record(name, reason)
    return [score for score, _ in results]


def _pooled(reward, responses, answers, kwargs, max_workers, deadline_s) -> list[tuple[float, str]]:
    workers = max(1, min(len(responses), max_workers or os.cpu_count() or 1))
    pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"reward-{reward.name}")
    try:
        futures = [pool.submit(reward.scored, r, a, **kwargs) for r, a in zip(responses, answers)]
        cf.wait(futures, timeout=deadline_s)
        return [f.result() if f.done() else (0.0, "timeout") for f in futures]
    finally:
        # Do not wait for stragglers: their sandboxes are killed at their own deadlines.
        pool.shutdown(wait=False, cancel_futures=True)
