"""Parameter accounting on the meta device: no memory is allocated, even for the 671B preset."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .args import ModelArgs
from .moe import GroupedExperts


@dataclass(frozen=True)
class ParamCount:
    total: int  # main model (embedding, layers, final norm, head)
    active: int  # per token: everything but the routed experts a token does not visit
    mtp: int  # MTP modules as the released checkpoint stores them (with their copies of embedding and head)
    mtp_unique: int  # MTP parameters not shared with the main model


def parameter_breakdown(args: ModelArgs) -> ParamCount:
    from .transformer import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    mtp_unique = sum(p.numel() for p in model.mtp.parameters())
    total = sum(p.numel() for p in model.parameters()) - mtp_unique  # shared embed/head counted once
    inactive = 0
    for name, module in model.named_modules():
        if isinstance(module, GroupedExperts) and not name.startswith("mtp."):
            per_expert = sum(p[0].numel() for p in module.parameters())
            inactive += per_expert * (args.n_routed_experts - args.n_activated_experts)
    shared_copies = args.n_mtp_modules * (model.embed.weight.numel() + model.head.weight.numel())
    return ParamCount(
        total=total, active=total - inactive, mtp=mtp_unique + shared_copies, mtp_unique=mtp_unique
    )


def count_parameters(args: ModelArgs) -> tuple[int, int]:
    """(total, activated) parameters of the main model, MTP excluded (the DeepSeek-V3 paper's 671B / 37B)."""
    c = parameter_breakdown(args)
    return c.total, c.active
