"""Model hyper-parameters with DeepSeek's names (DeepSeek-V3 `inference/model.py`, `ModelArgs`)."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass


class ScoreFunc(str, enum.Enum):
    softmax = "softmax"
    sigmoid = "sigmoid"


class Impl(str, enum.Enum):
    """Which implementation of the MoE hot path (routing, permute, expert FFN) runs."""

    ref = "ref"  # pure PyTorch: the numerical specification
    triton = "triton"  # r1core.kernels (Triton, torch._grouped_mm where faster)
    cuda = "cuda"  # csrc/ extension for routing and permute, Triton for the rest


class Precision(str, enum.Enum):
    """Which number format the GEMMs of linear layers and routed experts run in (r1core.model.precision)."""

    bf16 = "bf16"  # every GEMM in the parameters' dtype
    # DeepSeek-V3's recipe: e4m3 GEMMs with 1x128 / 128x128 scales; attention, norms, router, head bf16
    fp8 = "fp8"
    fp8_dense = (
        "fp8_dense"  # fp8 in the linear layers only; routed experts keep bf16 grouped GEMMs (faster today)
    )


@dataclass(kw_only=True)
class ModelArgs:
    vocab_size: int = 129280  # token embedding and output head rows
    dim: int = 7168  # hidden size (hidden_size)
    inter_dim: int = 18432  # dense MLP hidden size (first `n_dense_layers` layers)
    moe_inter_dim: int = 2048  # per-expert hidden size
    n_layers: int = 61  # transformer blocks of the main model (num_hidden_layers; MTP modules come on top)
    n_dense_layers: int = 3  # the first blocks use a dense MLP instead of MoE (first_k_dense_replace)
    n_heads: int = 128  # attention heads
    # MoE
    n_routed_experts: int = 256  # routed experts per MoE layer
    n_shared_experts: int = 1  # always-on experts per MoE layer
    n_activated_experts: int = 8  # routed experts per token (top-k)
    n_expert_groups: int = 8  # expert groups for group-limited routing (n_group)
    n_limited_groups: int = 4  # groups a token may route into (topk_group)
    score_func: ScoreFunc = ScoreFunc.sigmoid  # router scores: sigmoid (V3) or softmax (V2)
    route_scale: float = 2.5  # routing weights are multiplied by this (routed_scaling_factor)
    norm_topk_prob: bool = True  # renormalize the top-k weights to sum to 1 before route_scale
    bias_update_speed: float = 0.001  # aux-loss-free balancing (DeepSeek-V3 §2.1.2, gamma)
    seq_aux_alpha: float = 0.0001  # sequence-wise balance loss weight (alpha)
    # MLA
    q_lora_rank: int = 1536  # 0: queries are not compressed (V2-Lite)
    kv_lora_rank: int = 512  # compressed key/value latent size (the KV cache per token and layer)
    qk_nope_head_dim: int = 128  # per-head query/key size without rotary embedding
    qk_rope_head_dim: int = 64  # per-head query/key size with rotary embedding (even)
    v_head_dim: int = 128  # per-head value size
    # RoPE / YaRN
    max_seq_len: int = 163840  # longest sequence the rotary tables cover (max_position_embeddings)
    original_seq_len: int = 4096  # pretraining context; YaRN extends beyond it
    rope_theta: float = 10000.0  # rotary base frequency
    rope_factor: float = 40.0  # YaRN scaling factor (1: no YaRN)
    beta_fast: int = 32  # YaRN ramp: dimensions rotating faster than this keep their frequency
    beta_slow: int = 1  # YaRN ramp: dimensions rotating slower than this are interpolated fully
    mscale: float = 1.0  # YaRN attention temperature coefficient
    mscale_all_dim: float = 1.0  # YaRN temperature coefficient applied to the softmax scale (0: off)
    # multi-token prediction (DeepSeek-V3 §2.2)
    n_mtp_modules: int = 1  # multi-token prediction modules (num_nextn_predict_layers; 0: none)
    mtp_loss_weight: float = 0.3  # weight of the MTP loss in the training loss (lambda)
    # misc
    norm_eps: float = 1e-6  # RMSNorm epsilon
    init_std: float = 0.02  # standard deviation of the initial weights
    tie_embeddings: bool = False  # the output head shares the embedding matrix
    moe_impl: Impl = Impl.ref  # MoE hot-path implementation: ref (PyTorch), triton, cuda
    precision: Precision = (
        Precision.bf16
    )  # GEMM format: bf16 | fp8 (DeepSeek-V3 FP8) | fp8_dense (experts bf16)

    def __post_init__(self) -> None:
        self.score_func = ScoreFunc(self.score_func)
        self.moe_impl = Impl(self.moe_impl)
        self.precision = Precision(self.precision)
        problems = []
        if self.n_routed_experts % max(self.n_expert_groups, 1):
            problems.append(
                f"n_routed_experts={self.n_routed_experts} is not divisible by "
                f"n_expert_groups={self.n_expert_groups}"
            )
        if not 1 <= self.n_limited_groups <= self.n_expert_groups:
            problems.append(
                f"n_limited_groups={self.n_limited_groups} must be in "
                f"[1, n_expert_groups={self.n_expert_groups}]"
            )
        per_group = self.n_routed_experts // max(self.n_expert_groups, 1)
        if self.n_activated_experts > self.n_limited_groups * per_group:
            problems.append(
                f"n_activated_experts={self.n_activated_experts} exceeds the "
                f"{self.n_limited_groups * per_group} experts in the kept groups"
            )
        if self.n_expert_groups > 1 and self.score_func == ScoreFunc.sigmoid and per_group < 2:
            problems.append(
                "group-limited sigmoid routing scores a group by its top-2 experts: "
                "need >= 2 experts per group"
            )
        if self.n_dense_layers > self.n_layers:
            problems.append(f"n_dense_layers={self.n_dense_layers} > n_layers={self.n_layers}")
        if self.qk_rope_head_dim % 2:
            problems.append(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if self.max_seq_len > self.original_seq_len and self.rope_factor <= 1:
            problems.append(
                f"max_seq_len={self.max_seq_len} exceeds original_seq_len={self.original_seq_len} "
                f"but rope_factor={self.rope_factor} <= 1"
            )
        if problems:
            raise ValueError("invalid ModelArgs: " + "; ".join(problems))

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def uses_yarn(self) -> bool:
        return self.rope_factor > 1 and self.max_seq_len > self.original_seq_len

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.uses_yarn and self.mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
            scale *= m * m
        return scale

    def replace(self, **changes) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN attention temperature (Peng et al. 2023, eq. 8 as DeepSeek parameterizes it)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _tiny() -> ModelArgs:
    # Seconds on a CPU; every code path (q compression, groups, MTP, YaRN) stays on.
    return ModelArgs(
        vocab_size=512,
        dim=128,
        inter_dim=256,
        moe_inter_dim=64,
        n_layers=4,
        n_dense_layers=1,
        n_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        n_activated_experts=2,
        n_expert_groups=4,
        n_limited_groups=2,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_seq_len=1024,
        original_seq_len=256,
        rope_factor=4.0,
        n_mtp_modules=1,
    )


def _small() -> ModelArgs:
    # ~1.7B total / ~0.5B active: trains on one H100 with room for AdamW state.
    return ModelArgs(
        vocab_size=32768,
        dim=2048,
        inter_dim=5632,
        moe_inter_dim=768,
        n_layers=10,
        n_dense_layers=1,
        n_heads=16,
        n_routed_experts=32,
        n_shared_experts=1,
        n_activated_experts=4,
        n_expert_groups=4,
        n_limited_groups=2,
        q_lora_rank=768,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        max_seq_len=16384,
        original_seq_len=4096,
        rope_factor=4.0,
        n_mtp_modules=1,
    )


def _v2_lite() -> ModelArgs:
    # DeepSeek-V2-Lite: 15.7B total / 2.4B active, softmax routing without groups.
    return ModelArgs(
        vocab_size=102400,
        dim=2048,
        inter_dim=10944,
        moe_inter_dim=1408,
        n_layers=27,
        n_dense_layers=1,
        n_heads=16,
        n_routed_experts=64,
        n_shared_experts=2,
        n_activated_experts=6,
        n_expert_groups=1,
        n_limited_groups=1,
        score_func=ScoreFunc.softmax,
        route_scale=1.0,
        norm_topk_prob=False,
        bias_update_speed=0.0,
        seq_aux_alpha=0.001,
        q_lora_rank=0,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        max_seq_len=163840,
        original_seq_len=4096,
        rope_factor=40.0,
        mscale=0.707,
        mscale_all_dim=0.707,
        n_mtp_modules=0,
    )


def _v3() -> ModelArgs:
    return ModelArgs()  # the defaults are the released DeepSeek-V3 / R1 configuration


PRESETS = {"tiny": _tiny, "small": _small, "v2_lite": _v2_lite, "v3": _v3}

# ModelArgs fields with no config.json key: set by the job, never read from a checkpoint
TRAINING_ONLY = frozenset({"bias_update_speed", "seq_aux_alpha", "mtp_loss_weight", "moe_impl", "init_std"})


def model_shape_diff(a: ModelArgs, b: ModelArgs) -> dict[str, tuple]:
    """The fields a checkpoint records (all but TRAINING_ONLY) where a and b differ: name -> (a's, b's)."""
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return {k: (v, db[k]) for k, v in da.items() if k not in TRAINING_ONLY and db[k] != v}


class _Presets(dict):
    """`presets["v3"]` returns a fresh ModelArgs each time, so callers may mutate it."""

    def __getitem__(self, name: str) -> ModelArgs:
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
        return PRESETS[name]()

    def __iter__(self):
        return iter(PRESETS)

    def __len__(self):
        return len(PRESETS)

    def __contains__(self, name):
        return name in PRESETS

    def keys(self):
        return PRESETS.keys()


presets = _Presets()
