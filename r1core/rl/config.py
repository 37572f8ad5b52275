"""GRPO configuration (Hydra schema node `rl`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from r1core.kernels.grpo_loss_terms import LossAgg, PolicyLossConfig  # noqa: F401  (LossAgg: r1core.rl)
from r1core.rollout.types import SamplingConfig


class AdvantageEstimator(str, enum.Enum):
    grpo = "grpo"  # (r - mean) / (std + eps) within a group (DeepSeekMath §4.1.2)
    dr_grpo = "dr_grpo"  # r - mean, no std: removes the difficulty bias (Liu et al. 2025, "Dr. GRPO")


class Overlong(str, enum.Enum):
    none = "none"
    filter = "filter"  # truncated responses get no loss (DAPO overlong filtering)
    penalty = "penalty"  # DAPO soft overlong punishment over the last `overlong_buffer` tokens


@dataclass(kw_only=True)
class GRPOConfig:
    steps: int = 40  # GRPO steps (one rollout batch each)
    lr: float = 1e-6  # policy learning rate (DeepSeek-R1: 3e-6 for V3); the schedule is `optim`'s
    prompts_per_step: int = 16  # prompts per rollout batch
    group_size: int = 8  # samples per prompt (G); advantages are relative within a group
    # rollout sampling (pure sampling by default); a truncated response has no answer and scores 0
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=48))
    # advantages and filtering
    advantage: AdvantageEstimator = AdvantageEstimator.grpo  # grpo: (r - mean) / std; dr_grpo: r - mean
    adv_eps: float = 1e-6  # added to the group std before dividing
    dynamic_sampling: bool = True  # drop groups whose rewards all agree, then refill (DAPO)
    max_refill_rounds: int = 2  # extra rollout rounds to refill groups dropped by dynamic sampling
    overlong: Overlong = Overlong.none  # truncated responses: none, filter (no loss) or penalty (DAPO)
    overlong_buffer: int = 8  # penalty: tokens before the cap over which the penalty ramps up
    overlong_penalty: float = 1.0  # penalty: its size at the cap
    # policy loss: clip range, KL weight, aggregation (rl.loss.*)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    tis_cap: float | None = 2.0  # truncated importance weight min(pi_old/pi_sampler, cap); None = off
    # updates per rollout batch
    minibatches: int = 1  # optimizer steps per rollout batch (old log-probs recomputed first)
    micro_batch_size: int = 64  # sequences per forward/backward
    # reward name -> weight (names from the r1core.rewards registry;
    # "accuracy" stands for the task's own checker)
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    reward_kwargs: dict[str, dict] = field(default_factory=dict)  # reward name -> fixed keyword arguments
    reward_model_weight: float = 1.0  # all-scenario RL: weight of the reward model on general prompts
    reward_model_path: str = ""  # scalar-head reward model dir; "" = the built-in reference-overlap judge
    # cadence
    eval_every: int = 0  # held-out eval every N steps during the stage (0: off)
    save_every: int = 10  # checkpoint every N steps (the stage resumes from the last)
    last_save_model_only: bool = True  # see LMTrainConfig: the stage's model export is the last save

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(
                f"rl.group_size={self.group_size}: GRPO needs at least 2 samples per prompt "
                "to compute a group baseline"
            )
        if self.prompts_per_step < 1 or self.steps < 0:
            raise ValueError(
                f"rl.prompts_per_step={self.prompts_per_step}, rl.steps={self.steps} must be positive"
            )
        if self.minibatches < 1 or self.micro_batch_size < 1:
            raise ValueError("rl.minibatches and rl.micro_batch_size must be >= 1")
        if not self.rewards:
            raise ValueError("rl.rewards is empty: name at least one reward function")
