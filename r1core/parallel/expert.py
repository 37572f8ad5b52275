"""Expert parallelism: routed experts sharded over EP (and split over TP), tokens moved by all-to-all.

`ParallelDispatcher` replaces `MoE.dispatcher`; it keeps the dispatch / combine contract of the
model's LocalDispatcher, so MoE.forward (routing, balance loss, shared experts) is untouched.

dispatch: permute the rows to global-expert order (the permute kernel or the model's ref), send
each EP rank the rows of its experts with one variable-split all_to_all_single, then regroup the
received rows, which arrive source-rank-major, into local-expert-major segments.
combine: the exact reverse, then the weighted sum (unpermute). Under TP every rank of a TP group
holds the same tokens and 1/tp of every expert's hidden dim, so the expert outputs are partial:
the combine sums them over TP, and the inputs and routing weights enter the TP region through
megatron's copy_to so their gradients are summed too.

Legend: T tokens, D dim, K experts per token, E global experts, L local experts (E / ep),
P rows sent (T*K), R rows received.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from r1core.model.args import Impl
from r1core.model.moe import GroupedExperts, MoE, moe_ops
from r1core.model.transformer import Transformer

from . import comm
from .topology import Topology


def _permute_ops(impl: Impl):
    ops = moe_ops(impl)
    return ops.permute, ops.unpermute


def _regroup_index(recv_SL: torch.Tensor) -> torch.Tensor:
    """Row order that turns source-major received rows into local-expert-major segments.

    recv_SL[s, l]: rows rank s sent for local expert l, laid out s-major in the receive buffer.
    """
    S, L = recv_SL.shape
    start_SL = (torch.cumsum(recv_SL.flatten(), 0) - recv_SL.flatten()).view(S, L)
    n_LS, start_LS = recv_SL.T.flatten(), start_SL.T.flatten()
    seg_start = torch.cumsum(n_LS, 0) - n_LS
    offset = torch.arange(int(n_LS.sum())) - torch.repeat_interleave(seg_start, n_LS)
    return torch.repeat_interleave(start_LS, n_LS) + offset


class ParallelDispatcher:
    def __init__(self, n_experts: int, impl: Impl, topo: Topology):
        self.n_experts = n_experts
        self.impl = Impl(impl)
        self.pad_multiple = 1
        self.tp_group = topo.tp_group if topo.tp > 1 else None
        self.ep_group = topo.ep_group if topo.ep > 1 else None
        self.ep = topo.ep

    def dispatch(self, x_TD, idx_TK, counts_E):
        permute, _ = _permute_ops(self.impl)
        if self.tp_group is not None:
            x_TD = comm.copy_to(x_TD, self.tp_group)
        x_PD, pos_TK = permute(x_TD, idx_TK, counts_E, 1)
        if self.ep_group is None:
            return x_PD, counts_E, (pos_TK, None)
        send_SL = counts_E.view(self.ep, -1)
        recv_SL = torch.empty_like(send_SL)
        dist.all_to_all_single(recv_SL, send_SL.contiguous(), group=self.ep_group)
        send_SL, recv_SL = send_SL.cpu(), recv_SL.cpu()  # the splits are needed on the host
        send, recv = send_SL.sum(1).tolist(), recv_SL.sum(1).tolist()
        x_RD = comm.all_to_all(x_PD, recv, send, self.ep_group)
        order = _regroup_index(recv_SL).to(x_RD.device)
        seg_L = recv_SL.sum(0).to(counts_E.device)
        return x_RD[order], seg_L, (pos_TK, (send, recv, torch.argsort(order)))

    def combine(self, y_PD, weights_TK, state):
        _, unpermute = _permute_ops(self.impl)
        pos_TK, exchange = state
        if exchange is not None:
            send, recv, inverse = exchange
            y_PD = comm.all_to_all(y_PD[inverse], send, recv, self.ep_group)
        if self.tp_group is not None:
            weights_TK = comm.copy_to(weights_TK, self.tp_group)
        y_TD = unpermute(y_PD, pos_TK, weights_TK)
        if self.tp_group is not None:
            y_TD = comm.reduce_from(y_TD, self.tp_group)
        return y_TD


def _shard_experts_(experts: GroupedExperts, topo: Topology) -> None:
    ep_rank, tp_rank = topo.rank_in("ep"), topo.rank_in("tp")
    for name, tp_dim in (("w13", 2), ("w2", 2)):
        p = getattr(experts, name)
        local = p.detach().chunk(topo.ep, dim=0)[ep_rank].chunk(topo.tp, dim=tp_dim)[tp_rank].clone()
        setattr(experts, name, torch.nn.Parameter(local, requires_grad=p.requires_grad))
    experts.first_expert = ep_rank * (experts.w13.shape[0])


def apply_expert_parallel(model: Transformer, topo: Topology) -> None:
    """Keep this rank's experts (and their TP slice) in every MoE layer and swap in the parallel
    dispatcher."""
    for moe in model.modules():
        if isinstance(moe, MoE):
            _shard_experts_(moe.experts, topo)
            moe.dispatcher = ParallelDispatcher(moe.args.n_routed_experts, moe.impl, topo)
