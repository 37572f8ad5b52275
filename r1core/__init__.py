"""r1core: DeepSeek-V3-style MoE training and the DeepSeek-R1 recipe."""

from r1core.model import ModelArgs, Transformer, count_parameters, parameter_breakdown, presets

__version__ = "0.1.0"


def from_pretrained(path, dtype=None, device=None, **kwargs):
    """Load an HF DeepSeek-V3 checkpoint directory (bf16 or FP8 block-quantized) as a Transformer."""
    from r1core.checkpoint.hf import from_pretrained as _load

    return _load(path, dtype=dtype, device=device, **kwargs)


__all__ = ["ModelArgs", "Transformer", "count_parameters", "parameter_breakdown", "from_pretrained", "presets"]
