"""Which rollout engine generates for the RL, rejection-sampling, distillation and eval stages.

`rollout.engine: builtin` (default) needs nothing beyond r1core. `rollout.engine: sglang` serves the
policy with SGLang (the optional `[sglang]` extra, docs/sglang.md); choosing it where SGLang is not
installed fails before any work with one line, not at the first rollout hours later.
"""

from __future__ import annotations

import enum
import importlib.util
from dataclasses import dataclass, field
from typing import Any


class DecodeMoE(str, enum.Enum):
    dense = "dense"  # every expert over the whole batch, routing weights masking: best at few rows
    grouped = "grouped"  # torch._grouped_mm over the rows each expert was routed
    auto = "auto"  # dense up to 128 rows of a decode step, grouped above
    model = "model"  # the model's own MoE implementation (model.moe_impl)


class EngineKind(str, enum.Enum):
    builtin = "builtin"  # r1core.rollout.BuiltinEngine: continuous batching, CUDA-graph decode
    sglang = "sglang"  # r1core.rollout.SGLangEngine on sglang.Engine


@dataclass(kw_only=True)
class SGLangArgs:
    tokenizer_path: str = ""  # HF tokenizer folder for SGLang (stop strings, text); "" = r1core decodes
    colocated: bool = True  # training shares the GPUs: SGLang's memory saver, sleep/wake around rollouts
    deterministic: bool = False  # batch-invariant kernels, so per-request sampling seeds are honoured
    bucket_bytes: int = 512 << 20  # bound on one weight-update call
    tp_size: int = 1  # SGLang's own tensor parallelism for inference
    mem_fraction_static: float = 0.5  # GPU memory share for SGLang's weights and KV cache
    server_args: dict[str, Any] = field(default_factory=dict)  # any other sglang ServerArgs field


@dataclass(kw_only=True)
class BuiltinArgs:
    # torch.compile (inductor) the decode step before its CUDA graphs are captured: fused elementwise
    # work; costs a compile per engine and batch shape class (tens of seconds on a GPU)
    compile_decode: bool = False
    decode_moe: DecodeMoE = DecodeMoE.auto  # the decode step's MoE: dense, grouped, auto or model
    # queued samples wait until this many rows are free, so a prompt's samples are admitted together and
    # share one prefill; 0: each generate call's samples per prompt (the RL group size)
    admit_min: int = 0
    # once nothing is queued, move the surviving samples' rows down so the tail of a rollout decodes in
    # small CUDA-graph batch buckets (GPU only: the CPU decodes exact batch sizes)
    compact_rows: bool = True
    # decode attention by r1core's Triton kernel, which reads each row's latent KV cache once per layer
    # instead of twice (two batched GEMMs): GPU only (the CPU keeps PyTorch's path); with compile_decode it
    # made the small preset's B256 decode step 1.13x faster on an H100
    mla_kernel: bool = True


@dataclass(kw_only=True)
class RolloutConfig:
    engine: EngineKind = EngineKind.builtin  # builtin, or sglang (the [sglang] extra)
    builtin: BuiltinArgs = field(default_factory=BuiltinArgs)
    sglang: SGLangArgs = field(default_factory=SGLangArgs)


def check_engine(cfg: RolloutConfig) -> None:
    """ValueError with one line when the chosen engine cannot be built here."""
    if cfg.builtin.admit_min < 0:
        raise ValueError(
            f"rollout.builtin.admit_min={cfg.builtin.admit_min} must be >= 0 (0: the samples per prompt)"
        )
    if EngineKind(cfg.engine) != EngineKind.sglang:
        return
    if importlib.util.find_spec("sglang") is None:
        raise ValueError(
            "rollout.engine=sglang but SGLang is not installed: pip install 'r1core[sglang]' "
            "(docs/sglang.md), or use rollout.engine=builtin"
        )


def build_rollout(cfg: RolloutConfig, model, tokenizer, max_len: int, max_batch: int = 256):
    """The configured engine serving `model` (the trainer pushes weights with update_weights)."""
    if EngineKind(cfg.engine) == EngineKind.builtin:
        from .builtin import BuiltinEngine

        return BuiltinEngine(
            model,
            tokenizer=tokenizer,
            max_batch=max_batch,
            max_len=max_len,
            compile_decode=cfg.builtin.compile_decode,
            decode_moe=DecodeMoE(cfg.builtin.decode_moe).value,
            admit_min=cfg.builtin.admit_min,
            compact_rows=None if cfg.builtin.compact_rows else False,  # None: where batches are bucketed
            mla_kernel=cfg.builtin.mla_kernel and model.head.weight.is_cuda,  # GPU only
        )
    from .sglang_engine import SGLangEngine

    s = cfg.sglang
    return SGLangEngine(
        model,
        tokenizer=tokenizer,
        tokenizer_path=s.tokenizer_path or None,
        colocated=s.colocated,
        deterministic=s.deterministic,
        bucket_bytes=s.bucket_bytes,
        tp_size=s.tp_size,
        mem_fraction_static=s.mem_fraction_static,
        **s.server_args,
    )
