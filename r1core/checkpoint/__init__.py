"""Checkpoints: HF DeepSeek-V3 safetensors (bf16 or block FP8) load and save."""

from .hf import CheckpointError, args_from_hf_config, from_pretrained, hf_config_from_args, save_pretrained

__all__ = [
    "CheckpointError",
    "args_from_hf_config",
    "from_pretrained",
    "hf_config_from_args",
    "save_pretrained",
]
