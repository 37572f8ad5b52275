"""Reward-model hook for R1's all-scenario RL stage.

DeepSeek-R1's last RL stage mixes reasoning prompts (rule rewards) with general prompts, where a
learned reward model judges helpfulness and harmlessness. This module is the seam: rewards never
import the model code, so the job builds a model that satisfies `RewardModel` and installs it with
`set_reward_model(model)` before RL starts. Until then the `reward_model` reward raises
`RewardModelError` (a silent zero would train the policy on noise).

`RewardModel.score(prompts, responses)` returns raw scalars (any real numbers). The registry entry
maps them into [0, 1] like every other reward: `transform="sigmoid"` (default; a Bradley-Terry
reward model's logit becomes the probability that the response is preferred) or "clip".
`score_batch("reward_model", responses, answers, prompts=[...])` makes one `score` call for the
whole batch; the single-sample reward takes `prompt=`.

`ScalarHeadRewardModel` adapts anything that maps token ids to a scalar, such as a transformer
with a scalar head; the job supplies the tokenizer and that callable.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Protocol, Sequence, runtime_checkable

from r1core.rewards.registry import RewardConfigError, RewardError, register
from r1core.rewards.text import as_text


class RewardModelError(RewardError, RuntimeError):
    """The reward model is missing or returned something unusable."""


@runtime_checkable
class RewardModel(Protocol):
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One raw scalar per (prompt, response) pair, higher is better."""
        ...


class ScalarHeadRewardModel:
    """Score `join(prompt, response)` by `scalar_fn(token_ids)`.

    tokenize: str -> list[int].
    scalar_fn: list[int] -> float, or with `batched=True` list[list[int]] -> sequence of floats
        (anything `float()` accepts, e.g. 0-d tensors; batching is the caller's job then: pad,
        run the model, read the scalar at each sequence's last token).
    max_tokens: keep only the last `max_tokens` ids, so the response (at the end) is never cut.
    """

    def __init__(
        self,
        tokenize: Callable[[str], list[int]],
        scalar_fn: Callable,
        *,
        join: Callable[[str, str], str] = lambda prompt, response: prompt + response,
        max_tokens: int | None = None,
        batched: bool = False,
    ) -> None:
        self.tokenize, self.scalar_fn, self.join = tokenize, scalar_fn, join
        self.max_tokens, self.batched = max_tokens, batched

    def token_ids(self, prompt: str, response: str) -> list[int]:
        ids = list(self.tokenize(self.join(prompt, response)))
        return ids[-self.max_tokens :] if self.max_tokens else ids

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        batch = [self.token_ids(p, r) for p, r in zip(prompts, responses, strict=True)]
        raw = self.scalar_fn(batch) if self.batched else [self.scalar_fn(ids) for ids in batch]
        return [float(x) for x in raw]


_lock = threading.Lock()
_installed: dict = {"model": None, "transform": "sigmoid"}
_TRANSFORMS = ("sigmoid", "clip")


def set_reward_model(model: RewardModel | None, *, transform: str = "sigmoid") -> None:
    """Install (or with None, remove) the model behind the `reward_model` reward."""
    if model is not None and not isinstance(model, RewardModel):
        raise RewardConfigError(f"{type(model).__name__} has no score(prompts, responses) method")
    if transform not in _TRANSFORMS:
        raise RewardConfigError(f"transform must be one of {_TRANSFORMS}, got {transform!r}")
    with _lock:
        _installed.update(model=model, transform=transform)


def get_reward_model() -> RewardModel:
    with _lock:
        model = _installed["model"]
    if model is None:
        raise RewardModelError("the 'reward_model' reward needs set_reward_model(model) first")
    return model


def _to_unit(raw: float, transform: str) -> tuple[float, str]:
    if not math.isfinite(raw):
        return 0.0, "non_finite"
    if transform == "clip":
        return min(1.0, max(0.0, raw)), "scored"
    # Written so that exp never overflows for large |raw|.
    z = math.exp(-abs(raw))
    return (1.0 / (1.0 + z) if raw >= 0 else z / (1.0 + z)), "scored"


def _score_pairs(prompts: Sequence[str], responses: Sequence) -> list[tuple[float, str]]:
    model, transform = get_reward_model(), _installed["transform"]
    texts = [as_text(r) for r in responses]
    keep = [i for i, t in enumerate(texts) if t is not None]
    try:
        raw = model.score([prompts[i] for i in keep], [texts[i] for i in keep]) if keep else []
    except Exception as e:  # a broken reward model must stop the job, not zero its rewards
        raise RewardModelError(f"reward model failed: {e!r}") from e
    if len(raw) != len(keep):
        raise RewardModelError(f"reward model returned {len(raw)} scores for {len(keep)} responses")
    out: list[tuple[float, str]] = [(0.0, "non_utf8")] * len(texts)
    for i, value in zip(keep, raw):
        out[i] = _to_unit(float(value), transform)
    return out


def _batch(
    responses: Sequence, answers: Sequence, *, prompts: Sequence[str] | None = None
) -> list[tuple[float, str]]:
    prompts = [""] * len(responses) if prompts is None else list(prompts)
    if len(prompts) != len(responses):
        raise RewardConfigError(f"{len(prompts)} prompts for {len(responses)} responses")
    return _score_pairs(prompts, responses)


@register("reward_model", batch=_batch)
def reward_model(response, answer=None, *, prompt: str = "") -> tuple[float, str]:
    """Reasons: scored, non_finite, non_utf8. `answer` is ignored (there is no gold)."""
    return _score_pairs([prompt], [response])[0]
