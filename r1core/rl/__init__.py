"""GRPO reinforcement learning (DeepSeekMath / DeepSeek-R1) on the r1core engine."""

from .config import AdvantageEstimator, GRPOConfig, LossAgg, Overlong, PolicyLossConfig

__all__ = ["AdvantageEstimator", "GRPOConfig", "LossAgg", "Overlong", "PolicyLossConfig"]
