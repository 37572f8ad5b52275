"""Parallel layout schema (Hydra node `parallel`) and the start-up layout check.

Degrees are `tp, pp, cp, ep, dp`. As in megatron-core, the world is tp × pp × cp × dp and expert
parallelism is carved out of the ranks that see different tokens (cp × dp): the `ep` ranks of an
expert group hold different experts *and* see different tokens, so `ep` must divide `cp × dp`.
Routed experts are additionally split over TP (megatron's expert_tensor_parallel_size = tp), so
experts are sharded over ep × tp ranks and replicated over cp × dp / ep "expert data parallel"
ranks. Context parallel ranks hold the same weights and different pieces of the same sequences
(r1core.parallel.context), so for gradients and optimizer sharding they are data parallel.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from r1core.model.args import ModelArgs


class PPSchedule(str, enum.Enum):
    one_f_one_b = "1f1b"  # torch Schedule1F1B: one stage per rank
    interleaved = "interleaved"  # torch ScheduleInterleaved1F1B: `pp_virtual` stages per rank, looped
    dualpipev = "dualpipev"  # torch ScheduleDualPipeV: two stages per rank in a V (DeepSeek-V3 §3.2.1)


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1  # tensor parallel degree (inside a node)
    pp: int = 1  # pipeline parallel stages (layers split evenly)
    cp: int = 1  # context parallel degree: each sequence split over cp ranks
    ep: int = 1  # expert parallel degree, carved out of cp x dp
    dp: int = -1  # -1: world_size // (tp * pp * cp)
    pp_schedule: PPSchedule = PPSchedule.one_f_one_b  # pipeline schedule
    pp_virtual: int = 2  # stages per rank for the interleaved schedule
    microbatches: int = 1  # each batch dict given to train_step is split into this many along rows
    sequence_parallel: bool = False  # shard activations along the sequence between TP regions (needs tp > 1)
    zero1: bool = True  # shard optimizer state over the data-parallel ranks
    activation_checkpointing: bool = False  # recompute every block in backward
    compile: bool = False  # torch.compile every block
    # One CUDA graph for the whole optimizer step (forward, backward, clipping, AdamW, expert-bias update),
    # captured after two ordinary steps and replayed: no kernel-launch overhead and no host sync inside the
    # step. One device, a fused AdamW and a fixed batch shape (a new shape warms up and captures again).
    cuda_graph: bool = False
    timeout_s: float = 600.0  # process-group timeout: seconds a collective waits for the other ranks

    def __post_init__(self) -> None:
        self.pp_schedule = PPSchedule(self.pp_schedule)
        bad = [
            f"{k}={getattr(self, k)}"
            for k in ("tp", "pp", "cp", "ep", "microbatches", "pp_virtual")
            if getattr(self, k) < 1
        ]
        if self.dp == 0 or self.dp < -1:
            bad.append(f"dp={self.dp}")
        if not self.timeout_s > 0:
            bad.append(f"timeout_s={self.timeout_s}")
        if bad:
            raise ValueError(f"invalid ParallelConfig: {', '.join(bad)} (degrees are >= 1; dp=-1 infers it)")

    @property
    def stages_per_rank(self) -> int:
        if self.pp == 1:
            return 1
        return {PPSchedule.one_f_one_b: 1, PPSchedule.interleaved: self.pp_virtual, PPSchedule.dualpipev: 2}[
            self.pp_schedule
        ]

    @property
    def n_stages(self) -> int:
        return self.pp * self.stages_per_rank

    def resolved(self, world_size: int) -> "ParallelConfig":
        """A copy with dp filled in (the layout must already be valid)."""
        import dataclasses

        dp = world_size // (self.tp * self.pp * self.cp) if self.dp == -1 else self.dp
        return dataclasses.replace(self, dp=dp)


def check_layout(args: ModelArgs, cfg: ParallelConfig, world_size: int) -> ParallelConfig:
    """Every reason the layout cannot run, in one ValueError; else the config with dp resolved."""
    problems = []
    tp, pp, cp, ep = cfg.tp, cfg.pp, cfg.cp, cfg.ep
    if world_size % (tp * pp * cp):
        problems.append(f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}")
        dp = None
    else:
        dp = world_size // (tp * pp * cp)
        if cfg.dp not in (-1, dp):
            problems.append(f"tp*pp*cp*dp = {tp}*{pp}*{cp}*{cfg.dp} != world size {world_size}")
        elif (cp * dp) % ep:
            problems.append(
                f"ep={ep} must divide cp*dp={cp}*{dp} (expert parallelism is carved out of the "
                "ranks that see different tokens)"
            )
    if cfg.cuda_graph and world_size > 1:
        problems.append(
            f"cuda_graph=true runs on one device; this world has {world_size} ranks (their collectives "
            "would have to be captured too)"
        )
    if args.n_routed_experts % ep:
        problems.append(f"n_routed_experts={args.n_routed_experts} is not divisible by ep={ep}")
    for name, value in (
        ("n_heads", args.n_heads),
        ("vocab_size", args.vocab_size),
        ("inter_dim", args.inter_dim),
        ("moe_inter_dim", args.moe_inter_dim),
    ):
        if value % tp:
            problems.append(f"{name}={value} is not divisible by tp={tp}")
    if args.n_layers % cfg.n_stages:
        problems.append(
            f"n_layers={args.n_layers} is not divisible by the {cfg.n_stages} pipeline stages "
            f"(pp={pp} x {cfg.stages_per_rank} per rank for {cfg.pp_schedule.value})"
        )
    # torch's schedules: 1F1B needs a micro-batch per stage, DualPipeV one per stage of the V (2 per rank);
    # interleaved 1F1B runs rounds of pp micro-batches, so their count must split into whole rounds
    if pp > 1:
        need = {PPSchedule.one_f_one_b: pp, PPSchedule.dualpipev: cfg.n_stages}.get(cfg.pp_schedule, 1)
        mb = cfg.microbatches
        if mb < need:
            problems.append(
                f"pp={pp} with {cfg.pp_schedule.value} needs parallel.microbatches >= {need}, got {mb}"
            )
        elif cfg.pp_schedule == PPSchedule.interleaved and mb % max(1, mb // pp):
            problems.append(
                f"interleaved 1F1B needs parallel.microbatches divisible into rounds of pp={pp}, got {mb}"
            )
    if args.tie_embeddings and tp > 1:
        problems.append("tie_embeddings is not supported with tp > 1")
    if cfg.sequence_parallel and tp == 1:
        problems.append("sequence_parallel needs tp > 1")
    if problems:
        raise ValueError(
            f"bad parallel layout (world size {world_size}, tp={tp} pp={pp} cp={cp} ep={ep} "
            f"dp={cfg.dp}): " + "; ".join(problems)
        )
    return cfg.resolved(world_size)
