"""Pure single-device PyTorch DeepSeek-V3: the numerical specification for kernels and parallel layouts."""

from .args import Impl, ModelArgs, ScoreFunc, presets
from .attention import MLA, AttnMeta, LatentKVCache
from .moe import MoE, RouterSpec, update_expert_bias
from .params import count_parameters, parameter_breakdown
from .transformer import IGNORE_INDEX, LossOutput, Transformer

__all__ = [
    "IGNORE_INDEX",
    "Impl",
    "MLA",
    "AttnMeta",
    "LatentKVCache",
    "LossOutput",
    "ModelArgs",
    "MoE",
    "RouterSpec",
    "ScoreFunc",
    "Transformer",
    "count_parameters",
    "parameter_breakdown",
    "presets",
    "update_expert_bias",
]
