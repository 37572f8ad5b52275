"""Tensor names: r1core state_dict keys <-> the released DeepSeek-V3 / HF checkpoint keys.

One table of per-block suffixes serves both directions. Routed experts are stacked r1core tensors
(`ffn.experts.w13` [E, 2, I, D] holds every expert's gate and up projections, `ffn.experts.w2` [E, D, I]
the down projections) but separate HF tensors (`mlp.experts.{e}.gate_proj.weight`, ...), so a name maps
to (r1core key, index into it): () for a whole tensor, (e,) for an expert's down projection, (e, 0) and
(e, 1) for its gate and up projections.

The MTP module k is HF layer `num_hidden_layers + k`: its block uses the ordinary layer names and
it adds `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, plus `embed_tokens` and `shared_head.head`,
which the release stores as copies of the main embedding and output head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from r1core.model.args import ModelArgs

_ATTN = {
    "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b",
    "q_proj": "wq",
    "kv_a_proj_with_mqa": "wkv_a",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "wkv_b",
    "o_proj": "wo",
}
_SWIGLU = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}  # dense MLPs and shared experts
# routed experts: HF projection -> (stacked r1core tensor, index after the expert's)
_EXPERT_PROJ = {"gate_proj": ("w13", (0,)), "up_proj": ("w13", (1,)), "down_proj": ("w2", ())}

# HF suffix inside `model.layers.{i}.` -> r1core suffix inside `layers.{i}.` (or `mtp.{k}.block.`)
_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.e_score_correction_bias",
    **{f"self_attn.{h}.weight": f"attn.{r}.weight" for h, r in _ATTN.items()},
    **{f"mlp.{h}.weight": f"ffn.{r}.weight" for h, r in _SWIGLU.items()},
    **{f"mlp.shared_experts.{h}.weight": f"ffn.shared_experts.{r}.weight" for h, r in _SWIGLU.items()},
}
_BLOCK_INV = {r: h for h, r in _BLOCK.items()}
# HF suffix inside `model.layers.{L+k}.` -> r1core suffix inside `mtp.{k}.`
_MTP = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "shared_head.norm.weight": "norm.weight",
}
_MTP_INV = {r: h for h, r in _MTP.items()}
# MTP tensors the release stores as copies of main-model tensors
_MTP_COPIES = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}
_TOP = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
}
_TOP_INV = {r: h for h, r in _TOP.items()}

_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_R1_EXPERT = re.compile(r"ffn\.experts\.(w13|w2)")
_R1_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_R1_MTP = re.compile(r"mtp\.(\d+)\.(.+)")
# Tensors some exporters write that carry no weights r1core needs (rope tables it recomputes).
IGNORED_HF = re.compile(r"(.*\.)?rotary_emb\.inv_freq")


@dataclass(frozen=True)
class Target:
    name: str  # r1core state_dict key
    index: tuple[int, ...] = ()  # slice of a stacked expert tensor: (e,) or (e, 0 | 1); () for all of it
    copy: bool = False  # a duplicate of `name` (MTP embed/head copies, tied lm_head): verified, not loaded


def _block_hf_to_r1(rest: str, prefix: str) -> Target | None:
    if rest in _BLOCK:
        return Target(prefix + _BLOCK[rest])
    m = _HF_EXPERT.fullmatch(rest)
    if m:
        name, part = _EXPERT_PROJ[m.group(2)]
        return Target(f"{prefix}ffn.experts.{name}", index=(int(m.group(1)), *part))
    return None


def hf_to_r1(hf_name: str, args: ModelArgs) -> Target | None:
    """Where an HF tensor goes in r1core; None for a name r1core has no place for."""
    if hf_name in _TOP:
        target = Target(_TOP[hf_name])
        if hf_name == "lm_head.weight" and args.tie_embeddings:
            target = Target("embed.weight", copy=True)
        return target
    m = _HF_LAYER.fullmatch(hf_name)
    if not m:
        return None
    i, rest = int(m.group(1)), m.group(2)
    if i < args.n_layers:
        return _block_hf_to_r1(rest, f"layers.{i}.")
    k = i - args.n_layers
    if k >= args.n_mtp_modules:
        return None
    if rest in _MTP:
        return Target(f"mtp.{k}.{_MTP[rest]}")
    if rest in _MTP_COPIES:
        main = _MTP_COPIES[rest]
        return Target("embed.weight" if args.tie_embeddings else main, copy=True)
    return _block_hf_to_r1(rest, f"mtp.{k}.block.")


def _block_r1_to_hf(rest: str, hf_prefix: str, n_experts: int) -> list[tuple[str, tuple[int, ...]]]:
    if rest in _BLOCK_INV:
        return [(hf_prefix + _BLOCK_INV[rest], ())]
    m = _R1_EXPERT.fullmatch(rest)
    if m:
        projs = [(h, part) for h, (r, part) in _EXPERT_PROJ.items() if r == m.group(1)]
        return [
            (f"{hf_prefix}mlp.experts.{e}.{proj}.weight", (e, *part))
            for e in range(n_experts)
            for proj, part in projs
        ]
    raise KeyError(rest)


def r1_to_hf(r1_name: str, args: ModelArgs) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, index into the r1core tensor) of an r1core state_dict key: one per expert and
    projection for stacked experts, else one with index ()."""
    try:
        if r1_name in _TOP_INV:
            return [(_TOP_INV[r1_name], ())]
        m = _R1_LAYER.fullmatch(r1_name)
        if m:
            return _block_r1_to_hf(m.group(2), f"model.layers.{m.group(1)}.", args.n_routed_experts)
        m = _R1_MTP.fullmatch(r1_name)
        if m:
            layer, rest = args.n_layers + int(m.group(1)), m.group(2)
            if rest in _MTP_INV:
                return [(f"model.layers.{layer}.{_MTP_INV[rest]}", ())]
            if rest.startswith("block."):
                return _block_r1_to_hf(rest[len("block.") :], f"model.layers.{layer}.", args.n_routed_experts)
    except KeyError:
        pass
    raise KeyError(f"r1core tensor {r1_name!r} has no HF DeepSeek-V3 name")


def mtp_copies(args: ModelArgs) -> list[tuple[str, str]]:
    """(HF name, r1core source) of the copies the release keeps in each MTP layer."""
    head = "embed.weight" if args.tie_embeddings else "head.weight"
    out = []
    for k in range(args.n_mtp_modules):
        layer = args.n_layers + k
        out += [
            (f"model.layers.{layer}.embed_tokens.weight", "embed.weight"),
            (f"model.layers.{layer}.shared_head.head.weight", head),
        ]
    return out


def save_plan(state_keys, args: ModelArgs) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name, r1core key, index) for every tensor a checkpoint of `args` holds, in release order:
    `state[key][index]` is the tensor (index () for a whole one).

    A tied output head is not written (transformers re-ties it from `tie_word_embeddings`).
    """
    plan = []
    for key in state_keys:
        if key == "head.weight" and args.tie_embeddings:
            continue
        plan += [(hf, key, e) for hf, e in r1_to_hf(key, args)]
    plan += [(hf, src, ()) for hf, src in mtp_copies(args)]
    return plan
