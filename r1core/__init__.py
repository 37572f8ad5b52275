"""r1core: DeepSeek-V3-style MoE training and the DeepSeek-R1 recipe.

Top-level names load lazily, so `import r1core.data` or `import r1core.rewards` never pulls in
the model (rollout workers and data tools stay light).
"""

import importlib
import warnings

# megatron-core warns at import, from several modules, that Transformer Engine and Apex are absent;
# r1core uses neither (its own kernels and torch optimizers), so the warnings only hide real ones.
warnings.filterwarnings(
    "ignore", message="Transformer Engine and Apex are not installed", module=r"megatron\."
)

__version__ = "0.1.0"

_LAZY = {
    "ModelArgs": "r1core.model",
    "Transformer": "r1core.model",
    "count_parameters": "r1core.model",
    "parameter_breakdown": "r1core.model",
    "presets": "r1core.model",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'r1core' has no attribute {name!r}")


def from_pretrained(path, dtype=None, device=None, **kwargs):
    """Load an HF DeepSeek-V3 checkpoint directory (bf16 or FP8 block-quantized) as a Transformer."""
    from r1core.checkpoint.hf import from_pretrained as _load

    return _load(path, dtype=dtype, device=device, **kwargs)


def save_pretrained(model, out_dir, **kwargs):
    """Write a Transformer as an HF DeepSeek-V3 checkpoint directory (readable by transformers)."""
    from r1core.checkpoint.hf import save_pretrained as _save

    return _save(model, out_dir, **kwargs)


__all__ = [
    "ModelArgs",
    "Transformer",
    "count_parameters",
    "parameter_breakdown",
    "from_pretrained",
    "presets",
    "save_pretrained",
]
