"""HF `config.json` <-> ModelArgs for DeepSeek-V3 / V2 checkpoints.

Reading is strict: every key is either mapped, checked against the one value r1core computes
the same math for, or known bookkeeping. Anything else is an error naming the key, so a
config that r1core would silently run differently (another activation, attention biases,
non-interleaved rope, another router) never loads.

YaRN: r1core's `max_seq_len` is `max_position_embeddings` (DeepSeek-V3: 163840 with an original
4096 and factor 40). The rope section is accepted as the released `rope_scaling` or as
transformers-5 `rope_parameters`, and accepted only where transformers and r1core compute the
same frequencies, cos/sin scale and softmax scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from r1core.model.args import ModelArgs, ScoreFunc, yarn_mscale


class CheckpointError(ValueError):
    """A checkpoint or its config cannot be loaded or saved exactly; the message names the culprit."""


# Keys that never change the forward math.
_BOOKKEEPING = frozenset(
    {
        "architectures",
        "auto_map",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "use_cache",
        "initializer_range",
        "output_router_logits",
        "pretraining_tp",
        "_name_or_path",
        "id2label",
        "label2id",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "problem_type",
        "is_encoder_decoder",
        "chunk_size_feed_forward",
        "tokenizer_class",
        "ep_size",
        "seq_aux",
        "aux_loss_alpha",
        # transformers derives these from qk_*_head_dim and overwrites whatever the file says
        "head_dim",
        "qk_head_dim",
    }
)
_MAPPED = frozenset(
    {
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "num_hidden_layers",
        "first_k_dense_replace",
        "num_attention_heads",
        "n_routed_experts",
        "n_shared_experts",
        "num_experts_per_tok",
        "n_group",
        "topk_group",
        "scoring_func",
        "topk_method",
        "routed_scaling_factor",
        "norm_topk_prob",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "max_position_embeddings",
        "num_nextn_predict_layers",
        "num_mtp_layers",
        "rms_norm_eps",
        "tie_word_embeddings",
        "quantization_config",
        "num_key_value_heads",
    }
)
# key -> the only value r1core computes the same math for (None: the key may be absent or null)
_FIXED = {
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "rope_interleave": True,
    "attention_dropout": 0.0,
    "moe_layer_freq": 1,
}
_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
_TOPK_METHODS = {
    "noaux_tc": ScoreFunc.sigmoid,
    "greedy": ScoreFunc.softmax,
    "group_limited_greedy": ScoreFunc.softmax,
}
_ROPE_KEYS = frozenset(
    {
        "type",
        "rope_type",
        "rope_theta",
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "attention_factor",
        "truncate",
    }
)
_QUANT_KEYS = frozenset({"quant_method", "fmt", "activation_scheme", "weight_block_size"})
DEFAULT_BLOCK = (128, 128)


@dataclass(frozen=True)
class HFExtras:
    """What the loader needs beyond ModelArgs."""

    weight_block_size: tuple[int, int] = DEFAULT_BLOCK  # FP8 block of one `weight_scale_inv` entry [out, in]


def _get(config: dict, key: str):
    if key not in config:
        raise CheckpointError(f"config.json: missing key {key!r}")
    return config[key]


def _check_keys(config: dict) -> None:
    unknown = sorted(set(config) - _BOOKKEEPING - _MAPPED - set(_FIXED))
    if unknown:
        raise CheckpointError(
            f"config.json: unknown key(s) {unknown}: r1core cannot tell whether they change the math"
        )
    model_type = config.get("model_type", "deepseek_v3")
    if model_type not in _MODEL_TYPES:
        raise CheckpointError(
            f"config.json: model_type={model_type!r} is not supported (only {list(_MODEL_TYPES)})"
        )
    for key, value in _FIXED.items():
        if config.get(key) is not None and config[key] != value:
            raise CheckpointError(
                f"config.json: {key}={config[key]!r} is not supported (r1core computes {key}={value!r})"
            )
    heads = config.get("num_key_value_heads")
    if heads is not None and heads != _get(config, "num_attention_heads"):
        raise CheckpointError(
            f"config.json: num_key_value_heads={heads} must equal num_attention_heads for MLA"
        )


def _routing(config: dict) -> dict:
    default_score = "sigmoid" if config.get("model_type", "deepseek_v3") == "deepseek_v3" else "softmax"
    score = config.get("scoring_func") or default_score
    if score not in ("sigmoid", "softmax"):
        raise CheckpointError(f"config.json: scoring_func={score!r} is not supported (sigmoid or softmax)")
    n_group, topk_group = config.get("n_group") or 1, config.get("topk_group") or 1
    method = config.get("topk_method")
    if method is None:
        method = "noaux_tc" if score == "sigmoid" else ("group_limited_greedy" if n_group > 1 else "greedy")
    if method not in _TOPK_METHODS:
        raise CheckpointError(
            f"config.json: topk_method={method!r} is not supported (one of {sorted(_TOPK_METHODS)})"
        )
    if _TOPK_METHODS[method].value != score:
        raise CheckpointError(
            f"config.json: topk_method={method!r} needs scoring_func="
            f"{_TOPK_METHODS[method].value!r}, got {score!r}"
        )
    if method == "greedy":  # greedy top-k ignores the groups
        n_group = topk_group = 1
    experts = _get(config, "n_routed_experts")
    if experts % n_group:
        raise CheckpointError(
            f"config.json: n_routed_experts={experts} is not divisible by n_group={n_group}"
        )
    if not 1 <= topk_group <= n_group:
        raise CheckpointError(f"config.json: topk_group={topk_group} must be in [1, n_group={n_group}]")
    top_k = _get(config, "num_experts_per_tok")
    if top_k > topk_group * (experts // n_group):
        raise CheckpointError(
            f"config.json: num_experts_per_tok={top_k} exceeds the experts in topk_group={topk_group} groups"
        )
    return dict(
        n_routed_experts=experts,
        n_activated_experts=top_k,
        n_expert_groups=n_group,
        n_limited_groups=topk_group,
        score_func=ScoreFunc(score),
        route_scale=float(_get(config, "routed_scaling_factor")),
        norm_topk_prob=bool(_get(config, "norm_topk_prob")),
        n_shared_experts=_get(config, "n_shared_experts") or 0,
    )


def _rope_section(config: dict) -> dict:
    params, scaling = config.get("rope_parameters"), config.get("rope_scaling")
    if params and scaling:
        strip = lambda d: {k: v for k, v in d.items() if k not in ("type", "rope_type", "rope_theta")}  # noqa: E731
        if strip(params) != strip(scaling):
            raise CheckpointError("config.json: rope_parameters and rope_scaling disagree")
    rope = dict(params or scaling or {})
    unknown = sorted(set(rope) - _ROPE_KEYS)
    if unknown:
        raise CheckpointError(f"config.json: unknown rope_scaling key(s) {unknown}")
    return rope


def _check_cos_sin_scale(factor: float, mscale, mscale_all_dim, attention_factor) -> None:
    """transformers scales YaRN's cos/sin by attention_factor, else ym(f, mscale) / ym(f, mscale_all_dim)
    when both are set, else ym(f); r1core by ym(f, mscale) / ym(f, mscale_all_dim) when mscale_all_dim is
    set, else 1."""
    hf_scale = attention_factor
    if hf_scale is None:
        hf_scale = (
            yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
            if mscale and mscale_all_dim
            else yarn_mscale(factor, 1.0)
        )
    r1_scale = 1.0
    if mscale_all_dim:
        r1_scale = yarn_mscale(factor, 1.0 if mscale is None else mscale) / yarn_mscale(
            factor, mscale_all_dim
        )
    if not math.isclose(hf_scale, r1_scale, rel_tol=1e-12):
        raise CheckpointError(
            f"config.json: rope_scaling mscale={mscale}, mscale_all_dim={mscale_all_dim}, "
            f"attention_factor={attention_factor} give a cos/sin scale of {hf_scale} in "
            f"transformers but {r1_scale} in r1core; set both mscale and mscale_all_dim"
        )


def _rope(config: dict) -> dict:
    """ModelArgs rope fields, accepted only where transformers' YaRN computes the same numbers."""
    rope = _rope_section(config)
    max_pos = int(_get(config, "max_position_embeddings"))
    theta = float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    kind = rope.get("rope_type", rope.get("type", "default"))
    plain = dict(rope_theta=theta, max_seq_len=max_pos, original_seq_len=max_pos, rope_factor=1.0)
    if kind == "default":
        return plain
    if kind != "yarn":
        raise CheckpointError(f"config.json: rope_scaling type {kind!r} is not supported (yarn or none)")
    if rope.get("truncate", True) is not True:
        raise CheckpointError("config.json: rope_scaling.truncate=false is not supported")
    orig = int(rope.get("original_max_position_embeddings") or max_pos)
    factor = float(rope.get("factor") or max_pos / orig)  # transformers' fallback when factor is null
    if factor < 1:
        raise CheckpointError(f"config.json: rope_scaling.factor={factor} < 1 is not supported")
    if factor == 1:
        return plain
    if max_pos <= orig:
        raise CheckpointError(
            f"config.json: max_position_embeddings={max_pos} must exceed rope_scaling."
            f"original_max_position_embeddings={orig} when factor={factor} (r1core's YaRN switch)"
        )
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    _check_cos_sin_scale(factor, mscale, mscale_all_dim, rope.get("attention_factor"))
    return dict(
        rope_theta=theta,
        max_seq_len=max_pos,
        original_seq_len=orig,
        rope_factor=factor,
        beta_fast=rope.get("beta_fast") or 32,
        beta_slow=rope.get("beta_slow") or 1,
        mscale=1.0 if mscale is None else float(mscale),
        mscale_all_dim=float(mscale_all_dim or 0.0),
    )


def _quant(config: dict) -> HFExtras:
    quant = config.get("quantization_config")
    if not quant:
        return HFExtras()
    unknown = sorted(set(quant) - _QUANT_KEYS)
    if unknown:
        raise CheckpointError(f"config.json: unknown quantization_config key(s) {unknown}")
    if quant.get("quant_method") != "fp8":
        raise CheckpointError(
            f"config.json: quantization_config.quant_method={quant.get('quant_method')!r} "
            "is not supported (fp8)"
        )
    if quant.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(
            f"config.json: quantization_config.fmt={quant['fmt']!r} is not supported (e4m3)"
        )
    block = tuple(quant.get("weight_block_size") or DEFAULT_BLOCK)
    if len(block) != 2 or min(block) < 1:
        raise CheckpointError(
            f"config.json: quantization_config.weight_block_size={list(block)} must be [out, in] > 0"
        )
    return HFExtras(weight_block_size=(int(block[0]), int(block[1])))


def parse_hf_config(config: dict) -> tuple[ModelArgs, HFExtras]:
    _check_keys(config)
    n_layers, n_dense = _get(config, "num_hidden_layers"), _get(config, "first_k_dense_replace")
    if not 0 <= n_dense <= n_layers:
        raise CheckpointError(
            f"config.json: first_k_dense_replace={n_dense} must be in [0, num_hidden_layers={n_layers}]"
        )
    n_mtp = config.get("num_nextn_predict_layers", config.get("num_mtp_layers")) or 0
    fields = dict(
        vocab_size=_get(config, "vocab_size"),
        dim=_get(config, "hidden_size"),
        inter_dim=_get(config, "intermediate_size"),
        moe_inter_dim=_get(config, "moe_intermediate_size"),
        n_layers=n_layers,
        n_dense_layers=n_dense,
        n_heads=_get(config, "num_attention_heads"),
        q_lora_rank=_get(config, "q_lora_rank") or 0,
        kv_lora_rank=_get(config, "kv_lora_rank"),
        qk_nope_head_dim=_get(config, "qk_nope_head_dim"),
        qk_rope_head_dim=_get(config, "qk_rope_head_dim"),
        v_head_dim=_get(config, "v_head_dim"),
        n_mtp_modules=n_mtp,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=float(config.get("initializer_range", 0.02)),
        **_routing(config),
        **_rope(config),
    )
    try:
        args = ModelArgs(**fields)
    except ValueError as e:  # the remaining cross-field checks live in ModelArgs
        raise CheckpointError(f"config.json: {e}") from e
    return args, _quant(config)


def args_from_hf_config(config: dict) -> ModelArgs:
    """ModelArgs for an HF DeepSeek-V3 / V2 `config.json` dict; CheckpointError names any key r1core cannot
    honour."""
    return parse_hf_config(config)[0]


def _rope_config(args: ModelArgs) -> dict | None:
    if not args.uses_yarn:
        return None
    if not args.mscale_all_dim:  # transformers would scale cos/sin by ym(factor) where r1core uses 1
        raise CheckpointError("ModelArgs with YaRN and mscale_all_dim=0 have no transformers equivalent")
    return {
        "type": "yarn",
        "factor": args.rope_factor,
        "original_max_position_embeddings": args.original_seq_len,
        "beta_fast": args.beta_fast,
        "beta_slow": args.beta_slow,
        "mscale": args.mscale,
        "mscale_all_dim": args.mscale_all_dim,
    }


def hf_config_from_args(args: ModelArgs) -> dict:
    """The released DeepSeek config keys for `args` (V2-style softmax routing is written as deepseek_v2).

    Training-only fields (bias_update_speed, seq_aux_alpha, mtp_loss_weight, moe_impl) have no HF key
    and are not written.
    """
    sigmoid = args.score_func == ScoreFunc.sigmoid
    if sigmoid:
        topk_method = "noaux_tc"
    else:
        topk_method = "group_limited_greedy" if args.n_expert_groups > 1 else "greedy"
    return {
        "architectures": ["DeepseekV3ForCausalLM" if sigmoid else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if sigmoid else "deepseek_v2",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.inter_dim,
        "moe_intermediate_size": args.moe_inter_dim,
        "num_hidden_layers": args.n_layers,
        "first_k_dense_replace": args.n_dense_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_heads,
        "n_routed_experts": args.n_routed_experts,
        "n_shared_experts": args.n_shared_experts,
        "num_experts_per_tok": args.n_activated_experts,
        "n_group": args.n_expert_groups,
        "topk_group": args.n_limited_groups,
        "scoring_func": args.score_func.value,
        "topk_method": topk_method,
        "routed_scaling_factor": args.route_scale,
        "norm_topk_prob": args.norm_topk_prob,
        "moe_layer_freq": 1,
        "q_lora_rank": args.q_lora_rank or None,
        "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "rope_interleave": True,
        "rope_theta": args.rope_theta,
        "rope_scaling": _rope_config(args),
        "max_position_embeddings": args.max_seq_len,
        "num_nextn_predict_layers": args.n_mtp_modules,
        "rms_norm_eps": args.norm_eps,
        "tie_word_embeddings": args.tie_embeddings,
        "initializer_range": args.init_std,
    }
