"""Rule rewards for GRPO and the reward-model hook.

    from r1core import rewards
    rewards.names()  # ['code', 'format', 'language_consistency', 'math_accuracy', 'reward_model']
    r = rewards.get("math_accuracy")("<think>...</think> \\boxed{1/2}", "0.5")  # -> 1.0
    rewards.score_batch("code", responses, tests, limits={"wall_s": 5})
    rewards.STATS.snapshot(reset=True)  # {"code": {"passed": 3, "timeout": 1}, ...}

Every reward is `(response, answer, **kwargs) -> float` in [0, 1]; outcomes are counted per reason
in STATS. Modules: registry (register/get/STATS/combine), math_accuracy, format_reward, language,
code_reward + sandbox, reward_model, batch. This package never imports torch or r1core.model:
rewards run in rollout worker processes.
"""

from r1core.rewards import code_reward as _code_reward  # noqa: F401  (each module registers its reward)
from r1core.rewards import countdown as _countdown  # noqa: F401
from r1core.rewards import format_reward as _format_reward  # noqa: F401
from r1core.rewards import language as _language  # noqa: F401
from r1core.rewards import math_accuracy as _math_accuracy  # noqa: F401
from r1core.rewards.batch import score_batch
from r1core.rewards.registry import (
    STATS,
    Reward,
    RewardConfigError,
    RewardError,
    RewardStats,
    combine,
    get,
    names,
    register,
)
from r1core.rewards.reward_model import (
    RewardModel,
    RewardModelError,
    ScalarHeadRewardModel,
    get_reward_model,
    set_reward_model,
)
from r1core.rewards.sandbox import RunResult, SandboxLimits, SandboxUnavailable, run_python

__all__ = [
    "STATS",
    "Reward",
    "RewardConfigError",
    "RewardError",
    "RewardModel",
    "RewardModelError",
    "RewardStats",
    "RunResult",
    "SandboxLimits",
    "SandboxUnavailable",
    "ScalarHeadRewardModel",
    "combine",
    "get",
    "get_reward_model",
    "names",
    "register",
    "run_python",
    "score_batch",
    "set_reward_model",
]
