"""Pipeline parallelism: split a Transformer into stages and run torch.distributed.pipelining schedules.

Stages own consecutive layers (n_layers / n_stages each). Stage 0 holds the embedding, the last
stage the final norm, the head and the MTP modules, plus a copy of the embedding when MTP or tied
embeddings need it there (its gradient is summed with stage 0's over megatron's embedding group).
Which stages a rank holds depends on the schedule: one (1F1B), `pp_virtual` looped (interleaved),
or two in a V, stage r and 2*pp-1-r (DualPipeV, so rank 0 holds both ends).

The schedules move only activations; every stage reads its microbatch (tokens, positions,
doc_ids) from a shared `StepContext` by index, which the schedule carries as the first stage's
input and as a keyword to all stages. Balance losses of a stage's MoE layers are attached to its
output with megatron-core's MoEAuxLossAutoScaler, so their gradients flow without passing the
loss down the pipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from r1core.model.transformer import Transformer

from .config import ParallelConfig, PPSchedule

SCHEDULES = {
    PPSchedule.one_f_one_b: "Schedule1F1B",
    PPSchedule.interleaved: "ScheduleInterleaved1F1B",
    PPSchedule.dualpipev: "ScheduleDualPipeV",
}


def rank_stages(pp_rank: int, cfg: ParallelConfig) -> list[int]:
    """Pipeline stage indices held by pipeline rank `pp_rank`, in execution order."""
    pp = cfg.pp
    if pp == 1 or cfg.pp_schedule == PPSchedule.one_f_one_b:
        return [pp_rank]
    if cfg.pp_schedule == PPSchedule.interleaved:
        return [pp_rank + k * pp for k in range(cfg.pp_virtual)]
    return [pp_rank, 2 * pp - 1 - pp_rank]


def stage_layers(stage: int, n_layers: int, n_stages: int) -> range:
    per = n_layers // n_stages
    return range(stage * per, (stage + 1) * per)


def needs_embed_on_last(model: Transformer) -> bool:
    return model.args.n_mtp_modules > 0 or model.args.tie_embeddings


def keep_stages_(model: Transformer, stages: list[int], n_stages: int) -> None:
    """Drop every layer and top-level module the given stages do not use (in place)."""
    n = model.args.n_layers
    owned = {str(i) for s in stages for i in stage_layers(s, n, n_stages)}
    for key in [k for k in model.layers if k not in owned]:
        del model.layers[key]
    first, last = 0 in stages, n_stages - 1 in stages
    if not first and not (last and needs_embed_on_last(model)):
        model.embed = None
    if not last:
        model.norm = model.head = None
        model.mtp = nn.ModuleList()


@dataclass
class StepContext:
    """What the stages of one schedule run read by microbatch index."""

    microbatches: list[dict] = field(default_factory=list)
    aux_weight: list[float] = field(default_factory=list)  # each microbatch's share of the batch's sequences
    aux_total: torch.Tensor | None = None  # balance loss of this rank's layers, weighted


class StageModule(nn.Module):
    """One pipeline stage over the (shared) modules of a rank's Transformer."""

    def __init__(self, model: Transformer, stage: int, n_stages: int, ctx: StepContext):
        super().__init__()
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        self.layers = nn.ModuleDict(
            {str(i): model.layers[str(i)] for i in stage_layers(stage, model.args.n_layers, n_stages)}
        )
        self.embed = model.embed if self.is_first else None
        self.norm = model.norm if self.is_last else None
        if self.is_last:
            # What the loss uses must belong to the stage: zero-bubble schedules (DualPipeV) compute weight
            # gradients in a separate pass over the stage module's own parameters only.
            extra = {"head": model.head, "mtp": model.mtp, "embed": model.embed}
            self.loss_modules = nn.ModuleDict({k: m for k, m in extra.items() if m is not None})
        self._attn_meta = model.attn_meta
        self._ctx = ctx

    def forward(self, x: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        i = int(mb.reshape(-1)[0])
        batch = self._ctx.microbatches[i]
        tokens = batch["tokens"]
        meta = self._attn_meta(
            tokens, batch.get("positions"), batch.get("doc_ids"), context=batch.get("context")
        )  # context parallelism (r1core.parallel.context)
        h = self.embed(tokens) if self.is_first else x
        aux = None
        for block in self.layers.values():
            h, a = block(h, meta)
            if a is not None:
                aux = a if aux is None else aux + a
        if aux is not None and torch.is_grad_enabled():
            weighted = aux * self._ctx.aux_weight[i]
            h = MoEAuxLossAutoScaler.apply(h, weighted)
            if not self.is_last:
                # the scaler returns its input as a view; zero-bubble schedules detach_() stage outputs in
                # place
                h = h.clone()
            total = self._ctx.aux_total
            self._ctx.aux_total = weighted.detach() if total is None else total + weighted.detach()
        return self.norm(h) if self.is_last else h


def schedule_class(cfg: ParallelConfig):
    """The torch.distributed.pipelining schedule class for the config; a clear error where torch lacks it."""
    import torch.distributed.pipelining as pipelining

    name = SCHEDULES[cfg.pp_schedule]
    cls = getattr(pipelining, name, None)
    if cls is None:
        raise RuntimeError(
            f"pp_schedule={cfg.pp_schedule.value!r} needs torch.distributed.pipelining.{name}, "
            f"which torch {torch.__version__} does not have; choose another pp_schedule"
        )
    return cls


def build_schedule(
    stages: list[tuple[int, StageModule]],
    cfg: ParallelConfig,
    topo,
    n_microbatches: int,
    act_shape: tuple[int, ...],
    dtype: torch.dtype,
    loss_fn,
):
    """A schedule over this rank's stage modules for microbatches whose activations are `act_shape`."""
    from torch.distributed.pipelining import PipelineStage

    cls = schedule_class(cfg)
    device = topo.device
    act = torch.empty(act_shape, device=device, dtype=dtype)
    # requires_grad on the examples tells the stages that activations carry gradients both ways
    act = act.requires_grad_(loss_fn is not None)
    index = torch.zeros(1, 1, dtype=torch.long, device=device)
    pipe_stages = [
        PipelineStage(
            mod,
            s,
            cfg.n_stages,
            device,
            input_args=index if s == 0 else act,
            output_args=act,
            group=topo.pp_group,
        )
        for s, mod in stages
    ]
    if len(pipe_stages) == 1:
        return cls(pipe_stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(pipe_stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)


class StageRunner:
    """Runs this rank's stages over a list of microbatches: a plain loop without PP, a torch schedule with
    it."""

    def __init__(self, model: Transformer, topo):
        self.topo, self.cfg = topo, topo.cfg
        self.ctx = StepContext()
        stage_ids = rank_stages(topo.rank_in("pp"), self.cfg)
        self.stages = [(s, StageModule(model, s, self.cfg.n_stages, self.ctx)) for s in stage_ids]
        self.is_last = self.cfg.n_stages - 1 in stage_ids
        self.dim = model.args.dim
        self._schedules: dict = {}
        self._loss_fn = None

    def _check(self, mbs: list[dict]) -> None:
        shapes = {tuple(mb["tokens"].shape) for mb in mbs}
        if self.cfg.pp > 1 and len(shapes) > 1:
            raise ValueError(f"pipeline parallelism needs microbatches of one shape, got {sorted(shapes)}")
        if self.cfg.sequence_parallel and any(seq % self.cfg.tp for _, seq in shapes):
            raise ValueError(
                f"sequence parallelism splits sequences over tp={self.cfg.tp} ranks: sequence lengths "
                f"{sorted({seq for _, seq in shapes})} must be multiples of it"
            )

    def _act_shape(self, mbs: list[dict]) -> tuple[int, ...]:
        rows, seq = mbs[0]["tokens"].shape
        return rows, seq // self.cfg.tp if self.cfg.sequence_parallel else seq, self.dim

    def _schedule(self, mbs, dtype, train: bool):
        key = (len(mbs), self._act_shape(mbs), dtype, train)
        if key not in self._schedules:
            # schedules are cached across steps: they call the current step's loss_fn through the runner
            self._schedules[key] = build_schedule(
                self.stages,
                self.cfg,
                self.topo,
                len(mbs),
                key[1],
                dtype,
                (lambda h, index: self._loss_fn(h, index)) if train else None,
            )
        return self._schedules[key]

    def train(self, mbs: list[dict], aux_weight: list[float], loss_fn, dtype) -> None:
        """Forward and backward over all microbatches; loss_fn(h, index) runs on the last stage."""
        self._check(mbs)
        self.ctx.microbatches, self.ctx.aux_weight, self.ctx.aux_total = mbs, aux_weight, None
        self._loss_fn = loss_fn
        index = torch.arange(len(mbs), device=self.topo.device).view(-1, 1)
        if self.cfg.pp == 1:
            ((_, stage),) = self.stages
            for i in index:
                loss_fn(stage(i, i), i).backward()
        else:
            self._schedule(mbs, dtype, train=True).step(index, mb=index, target=index)

    def forward(self, mbs: list[dict], dtype) -> list[torch.Tensor]:
        """Final hidden states per microbatch on the last stage ([] elsewhere); no autograd."""
        self._check(mbs)
        self.ctx.microbatches, self.ctx.aux_weight, self.ctx.aux_total = mbs, [0.0] * len(mbs), None
        index = torch.arange(len(mbs), device=self.topo.device).view(-1, 1)
        if self.cfg.pp == 1:
            ((_, stage),) = self.stages
            return [stage(i, i) for i in index]
        merged = self._schedule(mbs, dtype, train=False).eval(index, mb=index)
        if not self.is_last:
            return []
        return list(merged.split([mb["tokens"].shape[0] for mb in mbs]))
