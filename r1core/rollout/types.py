"""The contract between rollout engines and the trainer (slime-style `Sample`).

An engine turns prompts (token ids) into `Sample`s; the trainer scores them with rewards and
trains on them. `Sample.logprobs[i]` is the log-probability the *sampler* gave
`response_ids[i]` under the temperature-scaled full distribution,
    log softmax(logits / temperature)[token],
taken before top-k / top-p truncation (SGLang's default, i.e. without
SGLANG_RETURN_ORIGINAL_LOGPROB). The trainer recomputes the same quantity with its own
weights and forms the per-token importance ratio from the two, so both sides must agree on this
definition. With temperature 0 (greedy) the distribution is the unscaled one (temperature 1).
"""

from __future__ import annotations

import abc
import hashlib
import secrets
from dataclasses import dataclass, field, fields

from torch import nn

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(kw_only=True)
class SamplingConfig:
    """How a stage samples responses; the config sections that sample nest one (`rl.sampling`,
    `eval.sampling`, `rejection.sampling`, `distill.sampling`), each with its own values."""

    temperature: float = 1.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus mass kept, in (0, 1] (1: off)
    top_k: int = 0  # most likely tokens kept (0: whole vocabulary)
    max_new_tokens: int = 256  # response cap; a truncated response has no answer

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError("invalid sampling settings: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        if not self.temperature >= 0:
            problems.append(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        return problems

    def params(self, **request) -> "SamplingParams":
        """These settings for one generate call; `request` adds stop strings and a seed (or overrides)."""
        settings = {f.name: getattr(self, f.name) for f in fields(SamplingConfig)}
        return SamplingParams(**{**settings, **request})


@dataclass(kw_only=True)
class SamplingParams(SamplingConfig):
    """One generate call's sampling: the settings plus what belongs to the request."""

    stop: list[str] = field(default_factory=list)  # stop strings, trimmed from response_text
    stop_token_ids: list[int] = field(default_factory=list)  # besides the tokenizer's eos
    seed: int | None = None  # None: fresh randomness on every call

    def __post_init__(self) -> None:
        problems = self._problems()
        if any(not s for s in self.stop):
            problems.append("stop strings must be non-empty")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def truncated(self) -> bool:
        """Whether top-k / top-p remove any of the distribution (the sampler then sorts the vocabulary)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)


@dataclass(kw_only=True)
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # one per response token, see the module docstring
    finish_reason: str  # "stop" | "length" | "abort"
    prompt_index: int = -1  # index of the prompt in the generate() call
    sample_index: int = 0  # 0..n-1 within the prompt's group
    response_text: str = ""  # decoded response, stop string and stop token removed
    metadata: dict = field(default_factory=dict)
    reward: float | None = None
    rewards: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason={self.finish_reason!r} not in {FINISH_REASONS}")
        if len(self.logprobs) != len(self.response_ids):
            raise ValueError(f"{len(self.logprobs)} logprobs for {len(self.response_ids)} response tokens")


def request_seed(base_seed: int, prompt_index: int, sample_index: int) -> int:
    """Seed of one request: a stable hash, so a request samples the same tokens whatever batch it lands in."""
    digest = hashlib.blake2b(f"{base_seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: fits torch.Generator.manual_seed and int64


def base_seed(sampling: SamplingParams) -> int:
    return sampling.seed if sampling.seed is not None else secrets.randbits(62)


class RolloutEngine(abc.ABC):
    """Generates grouped samples for GRPO and follows the trainer's weights.

    `generate` returns len(prompts) * n samples, prompt-major: samples of prompt i are
    [i*n, (i+1)*n), with prompt_index=i and sample_index=0..n-1. Each request's randomness is
    derived from (sampling.seed, prompt_index, sample_index) only.
    """

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Sample]: ...

    @abc.abstractmethod
    def update_weights(self, model_or_state_dict: nn.Module | dict) -> None:
        """Load the trainer's current weights (r1core parameter names)."""

    @abc.abstractmethod
    def sleep(self) -> None:
        """Free GPU memory (KV cache, and weights where the engine can restore them) for training."""

    @abc.abstractmethod
    def wake(self) -> None:
        """Undo sleep(); the next generate() may also do it implicitly."""
