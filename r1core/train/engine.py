"""The training engine: one interface for one device and for any tp × pp × cp × ep × dp layout.

    engine = build_engine(model_args, ParallelConfig(...), OptimConfig(...), device=..., dtype=..., seed=0)
    metrics = engine.train_step(microbatches, objective)    # grad accumulation / PP schedule,
                                                            # one optimizer step
    outs = engine.forward_only(microbatches, fn)            # e.g. old-policy or reference log-probs, no grad
    engine.save(dir); engine.load(dir)                      # DCP: sharded, reshardable, atomic
    engine.full_state_dict(); engine.export_hf(dir)         # unsharded weights on rank 0

A step: every rank gets its data-parallel shard of the batch as a list of microbatch dicts (each
split further into `ParallelConfig.microbatches`); the objective's normalizers are summed over all
microbatches and data-parallel ranks first, so the step is exactly a step on the whole batch on
one device. Under context parallelism (parallel.cp) the ranks of a cp group get the same shard and
each keeps its chunks of every sequence (r1core.parallel.context); the normalizers count whole
sequences, and metrics, gradients and expert loads are summed over cp as over dp. Then
forward/backward, gradient reduction, global-norm clipping, AdamW with the LR schedule, and the
aux-free expert-bias update from expert loads summed over the ranks that saw different tokens (so
every rank keeps routing identically).
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

import r1core.kernels  # noqa: F401  (registers the triton / cuda MoE ops behind model.moe_impl)
from r1core.model import ModelArgs, Transformer, update_expert_bias
from r1core.parallel.config import ParallelConfig, check_layout
from r1core.parallel.layout import ParamLayout, to_dtensor
from r1core.parallel.optim import (
    MasterWeights,
    adamw,
    clip_and_step_,
    fuses_masters,
    grad_norm_sq,
    init_adam_state_,
    local_optimizer,
)

_log = logging.getLogger(__name__)
# A checkpoint written before the routed experts' gate and up weights were stacked into w13 holds these.
_LEGACY_GATE = ".experts.w1"


def _w13_name(key: str) -> str | None:
    """The parameter name of a flat-state key that holds a routed experts' w13 (or its optimizer state)."""
    kind, _, rest = key.partition(".")
    if kind == "model" and rest.endswith(".experts.w13"):
        return rest
    if kind == "optim" and ".experts.w13." in rest:
        return rest.rpartition(".")[0]
    return None


class LRSchedule(str, enum.Enum):
    cosine = "cosine"
    constant = "constant"
    linear = "linear"


class OptimImpl(str, enum.Enum):
    torch = "torch"
    triton = "triton"


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-4  # peak learning rate (r1core run stages use their own: pretrain.lr, sft.lr, rl.lr)
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 0  # linear warmup steps
    total_steps: int = 1000  # schedule length (r1core run stages set it to their own step count)
    schedule: LRSchedule = LRSchedule.cosine  # learning-rate decay after warmup
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    master_weights: bool = True  # fp32 master weights and AdamW state when the model's dtype is lower
    # torch: torch's AdamW (fused on CUDA). triton: r1core's AdamW kernel, one bandwidth-bound launch per
    # parameter group that also reads the bf16 gradients and writes the rounded model weights when there are
    # masters; the gradient norm in one launch too
    implementation: OptimImpl = OptimImpl.torch
    bf16_moments: bool = False  # AdamW moments in BF16, as DeepSeek-V3 trained (needs implementation=triton)
    # A step whose global gradient norm is inf/NaN is skipped (no update, no expert-bias change, the LR
    # schedule does not advance), logged with the parameters whose gradients were non-finite; this many
    # in a row stop training with an error instead of carrying on with a broken model. 0: stop at once.
    max_nonfinite_steps: int = 3

    def __post_init__(self) -> None:
        self.schedule = LRSchedule(self.schedule)
        self.implementation = OptimImpl(self.implementation)
        problems = []
        if self.bf16_moments and self.implementation != OptimImpl.triton:
            problems.append(
                "bf16_moments=true needs implementation=triton (torch's AdamW keeps the params' dtype)"
            )
        if not self.lr > 0:
            problems.append(f"lr={self.lr} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.warmup_steps < 0 or self.total_steps < 1:
            problems.append(
                f"warmup_steps={self.warmup_steps} must be >= 0 and total_steps={self.total_steps} >= 1"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas={self.betas} must be two numbers in [0, 1)")
        if self.max_nonfinite_steps < 0:
            problems.append(f"max_nonfinite_steps={self.max_nonfinite_steps} must be >= 0")
        if not self.eps > 0 or self.grad_clip < 0 or self.weight_decay < 0:
            problems.append(
                f"eps={self.eps} must be > 0, grad_clip={self.grad_clip} and "
                f"weight_decay={self.weight_decay} >= 0"
            )
        if problems:
            raise ValueError("invalid OptimConfig: " + "; ".join(problems))


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then the schedule down to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == LRSchedule.constant:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == LRSchedule.linear:
        return cfg.lr - (cfg.lr - floor) * progress
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def split_microbatches(microbatches: list[dict], n: int) -> list[dict]:
    """Split every batch dict into n along rows (tensors whose first dim is the batch); others are shared."""
    if n == 1:
        return list(microbatches)
    out = []
    for mb in microbatches:
        rows = mb["tokens"].shape[0]
        if rows % n:
            raise ValueError(f"a batch of {rows} rows does not split into microbatches={n}")
        parts = [{} for _ in range(n)]
        for key, value in mb.items():
            split = isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows
            for part, chunk in zip(parts, value.chunk(n) if split else [value] * n):
                part[key] = chunk
        out += parts
    return out


def _on_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on the engine's device (data loaders build them on the CPU)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def _add(acc: dict, new: dict, device) -> None:
    """acc[k] += new[k] as fp32 tensors on `device` (no host sync: metrics stay on the GPU until the step
    ends). Host numbers (a row count) become device scalars by a fill, not a copy from host memory: a copy
    from pageable memory waits for the stream, and cannot be captured in a CUDA graph."""
    device = torch.device(device)
    for key, value in new.items():
        if isinstance(value, torch.Tensor) and value.device.type == device.type:
            value = value.detach().float()
        else:  # a Python number or a host scalar tensor (reading a CPU tensor syncs nothing)
            value = torch.full((), float(value), dtype=torch.float32, device=device)
        acc[key] = acc[key] + value if key in acc else value


def init_model(args: ModelArgs, device, seed: int) -> Transformer:
    """The full model on `device` in fp32 from `seed`: identical on every rank and in every layout."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(args)
    return model


def cast_params_(model: Transformer, dtype: torch.dtype) -> None:
    # Parameters only: the expert bias and load buffers stay fp32 (updates of 1e-3 vanish in bf16).
    for p in model.parameters():
        p.data = p.data.to(dtype)


class TrainEngine:
    """One-device engine (LocalEngine) and the base of the parallel one: shared step logic."""

    is_last_stage = True
    dp_rank, dp_size, rank, world_size = 0, 1, 0, 1

    def __init__(
        self, args: ModelArgs, parallel: ParallelConfig, optim: OptimConfig, device, dtype, seed: int
    ):
        self.args, self.parallel, self.optim_cfg = args, parallel, optim
        self.device, self.dtype = torch.device(device), dtype
        # optim.implementation=triton: the gradient norm's sum of squares in r1core's multi-tensor kernel too
        self._triton_norm = optim.implementation == OptimImpl.triton
        self.step = 0
        self.nonfinite_streak = 0  # optimizer steps in a row skipped for a non-finite gradient norm
        self.model = init_model(args, self.device, seed)
        self.layouts: dict[str, ParamLayout] = {n: ParamLayout() for n, _ in self.model.named_parameters()}
        with torch.device("meta"):
            full = Transformer(args)
        self._full_shapes = {k: v.shape for k, v in full.state_dict().items()}
        self._full_param_names = {n for n, p in full.named_parameters() if p.requires_grad}

    def _finish_setup(self) -> None:
        from r1core.parallel.parallelize import apply_activation_checkpointing, apply_compile

        cast_params_(self.model, self.dtype)
        if self.parallel.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if self.parallel.compile:
            apply_compile(self.model)
        self.named_params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.master = None
        if self.optim_cfg.master_weights and self.dtype != torch.float32:
            self.master = MasterWeights(self.named_params)
        self.optimizers = self._build_optimizers()
        self.optimizers_fuse_masters = all(fuses_masters(o) for o in self.optimizers)
        if not self.optimizers_fuse_masters:  # e.g. ZeRO shards one group: every optimizer steps the masters'
            for opt in self.optimizers:  # own (clipped) gradients then
                if fuses_masters(opt):
                    opt.sources = {}
        self.model.train()
        self.graphed = None
        if self.parallel.cuda_graph:
            from .cuda_graph import GraphedTrainStep

            self.graphed = GraphedTrainStep(self)

    @property
    def optimized_params(self) -> list[tuple[str, torch.Tensor]]:
        """What the optimizers step: the fp32 masters when there are any, else the model's parameters."""
        return self.master.named if self.master is not None else self.named_params

    # ------------------------------------------------------------------ hooks the parallel engine overrides
    def _build_optimizers(self) -> list:
        sources = self.master.sources() if self.master is not None else None
        return [
            adamw(self.optimized_params, self.optim_cfg, graphable=self.parallel.cuda_graph, sources=sources)
        ]

    def masters_in(self) -> None:
        """Before the optimizers step: the fp32 master gradients, unless every optimizer reads the model's."""
        if self.master is not None and not self.optimizers_fuse_masters:
            self.master.grads_in()

    def masters_out(self) -> None:
        """After the optimizers step: the masters rounded into the model, unless every optimizer did it."""
        if self.master is not None and not self.optimizers_fuse_masters:
            self.master.weights_out()

    def _all_reduce(self, t: torch.Tensor, group_name: str) -> torch.Tensor:
        return t

    def _forward_backward(self, mbs: list[dict], objective, denoms: dict) -> dict:
        sums: dict = {}
        for mb in mbs:
            h, aux = self.model.hidden_states(mb["tokens"], mb.get("positions"), mb.get("doc_ids"))
            loss, metrics = objective(h, self.model.head.weight, None, mb, self.model, denoms=denoms)
            aux = aux * (mb["tokens"].shape[0] / denoms["_seqs"])
            (loss + aux).backward()
            _add(sums, {**metrics, "aux": aux, "loss": loss + aux}, self.device)
        return sums

    def _reduce_grads(self) -> None:
        pass

    def _grad_norm(self) -> torch.Tensor:
        return grad_norm_sq([p.grad for _, p in self.named_params], self.device, self._triton_norm).sqrt()

    def _reduce_metrics(self, sums: dict) -> dict:
        keys = sorted(sums)
        return dict(zip(keys, torch.stack([sums[k] for k in keys]).tolist())) if keys else {}  # one host sync

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        """Each number summed over every rank (host floats, e.g. a metric each rank takes from its own
        rows)."""
        return list(values)

    # ------------------------------------------------------------------ the step
    def _totals(self, objective, mbs: list[dict]) -> dict[str, torch.Tensor]:
        sums: dict = {}
        for mb in mbs:
            _add(sums, {**objective.totals(mb, self.model), "_seqs": mb["tokens"].shape[0]}, self.device)
        keys = sorted(sums)
        flat = self._all_reduce(torch.stack([sums[k] for k in keys]), "dp")
        return dict(zip(keys, flat))

    def _zero_grad(self) -> None:
        # None, not zeros: the first backward then writes each gradient instead of adding it to a zeroed
        # buffer (a pass to zero and a read-add-write of every gradient per step, as torch's
        # zero_grad(set_to_none=True) avoids); _fill_missing_grads restores zeros where backward wrote none.
        for _, p in self.named_params:
            p.grad = None

    def _fill_missing_grads(self) -> None:
        # Zeros for the parameters this step's backward did not reach (an expert no token chose, a pipeline
        # stage's unused embedding): every parameter then steps and reduces identically in every layout
        # (AdamW skips None grads).
        for _, p in self.named_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _update_expert_bias(self, keep: torch.Tensor | None = None) -> None:
        gates = [m.gate for m in self.model.moe_layers()]
        if not gates:
            return
        loads = self._all_reduce(torch.stack([g.expert_load for g in gates]), "dp_cp")
        for gate, load in zip(gates, loads):
            update_expert_bias(gate, load, keep)

    def train_step(self, microbatches: list[dict], objective) -> dict:
        """One optimizer step on this rank's microbatches; returns the whole batch's metrics (every rank):
        loss, the objective's metrics, aux, grad_norm (before clipping), lr, step, n_tokens."""
        batches = [_on_device(mb, self.device) for mb in microbatches]
        if self.graphed is not None:
            return self.graphed(batches, objective)
        return self.eager_train_step(batches, objective)

    def split(self, batches: list[dict]) -> list[dict]:
        """The step's microbatches: each batch split into parallel.microbatches."""
        return split_microbatches(batches, self.parallel.microbatches)

    def current_lr(self) -> float:
        """The learning rate of the next optimizer step."""
        return lr_at(self.step, self.optim_cfg)

    def gradients(self, batches: list[dict], objective) -> tuple[dict, dict, torch.Tensor]:
        """Forward and backward over the step's microbatches, gradients reduced: (metric sums, the objective's
        normalizers, the global gradient norm), all on the device (no host sync)."""
        mbs = self.split(batches)
        denoms = self._totals(objective, mbs)
        self._zero_grad()
        sums = self._forward_backward(mbs, objective, denoms)
        self._fill_missing_grads()
        self._reduce_grads()
        return sums, denoms, self._grad_norm()

    def eager_train_step(self, batches: list[dict], objective) -> dict:
        """train_step without a CUDA graph, on batches already on the device."""
        sums, denoms, norm = self.gradients(batches, objective)
        norm_value = float(norm)  # global: every rank takes the same branch below
        lr = self.current_lr()
        metrics = self._reduce_metrics(sums)
        if not math.isfinite(norm_value):
            self._skip_nonfinite_step(metrics, norm_value)
            metrics.update(grad_norm=norm_value, lr=lr, step=self.step, skipped_nonfinite=1)
            return metrics
        self.nonfinite_streak = 0
        self.masters_in()
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        clip_and_step_(self.optimizers, [p for _, p in self.optimized_params], self.optim_cfg.grad_clip, norm)
        self.masters_out()
        self.step += 1
        self._update_expert_bias()
        metrics.update(grad_norm=norm_value, lr=lr, step=self.step)
        if "tokens" in denoms:
            metrics["n_tokens"] = int(denoms["tokens"])
        return metrics

    def _skip_nonfinite_step(self, metrics: dict, norm: float) -> None:
        """No update from a non-finite gradient (megatron's found-inf skip); stop after too many in a row."""
        bad = self.nonfinite_grads()
        self._zero_grad()
        self._fill_missing_grads()
        for gate in (m.gate for m in self.model.moe_layers()):  # this forward's expert loads are not applied
            gate.expert_load.zero_()
        self.count_nonfinite_step(metrics, norm, bad)

    def nonfinite_grads(self) -> list[str]:
        """The parameters whose gradient holds an inf or NaN (what a skipped step's warning names)."""
        return [n for n, p in self.named_params if p.grad is not None and not torch.isfinite(p.grad).all()]

    def count_nonfinite_step(self, metrics: dict, norm: float, bad: list[str]) -> None:
        """Count a skipped step (its update already withheld); raise past optim.max_nonfinite_steps in a
        row."""
        self.nonfinite_streak += 1
        what = (
            f"loss={metrics.get('loss', float('nan')):.4g}, grad_norm={norm}; "
            f"non-finite gradients on this rank in {len(bad)} tensors, e.g. {bad[:5]}"
        )
        if self.nonfinite_streak > self.optim_cfg.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self.nonfinite_streak} consecutive optimizer steps (after step {self.step}) had a "
                f"non-finite gradient norm ({what}); the weights are still those of the last finite step. "
                "Lower the learning rate, raise optim.warmup_steps, or check the data; "
                "optim.max_nonfinite_steps sets the tolerance"
            )
        _log.warning("skipped optimizer step %d: %s", self.step + 1, what)

    @torch.no_grad()
    def forward_only(self, microbatches: list[dict], fn) -> list:
        """fn(hidden, head_weight, vocab_group, mb, model) per microbatch in eval mode (no balance-loss
        bookkeeping, no expert-load counting); results on the last pipeline stage, [] elsewhere."""
        self.model.eval()
        try:
            return self._forward_only([_on_device(mb, self.device) for mb in microbatches], fn)
        finally:
            self.model.train()

    def _forward_only(self, microbatches, fn) -> list:
        out = []
        for mb in microbatches:
            h, _ = self.model.hidden_states(mb["tokens"], mb.get("positions"), mb.get("doc_ids"))
            out.append(fn(h, self.model.head.weight, None, mb, self.model))
        return out

    # ------------------------------------------------------------------ state
    def _dtensor(self, name: str, t: torch.Tensor, as_dtensor: bool):
        return t

    def _flat_state(self, as_dtensor: bool) -> dict:
        """Global-name-keyed tensors of this rank: model.<name>, optim.<name>.<stat>, step."""
        state = {"step": torch.tensor(self.step)}
        masters = dict(self.master.named) if self.master is not None else {}
        for name, t in self.model.state_dict().items():
            # with master weights the checkpoint holds them (fp32), not their rounded copies
            state[f"model.{name}"] = self._dtensor(name, masters.get(name, t), as_dtensor)
        names = {id(p): n for n, p in self.optimized_params}
        for opt in self.optimizers:
            inner = local_optimizer(opt)
            for p, st in inner.state.items():
                for stat, value in st.items():
                    keep = value if value.dim() == 0 else self._dtensor(names[id(p)], value, as_dtensor)
                    state[f"optim.{names[id(p)]}.{stat}"] = keep
        return state

    def state_dict(self) -> dict:
        """This rank's model + optimizer state and the step (the LR schedule is a function of the step)."""
        return {k: v.detach().clone() for k, v in self._flat_state(as_dtensor=False).items()}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of state_dict for the same layout."""
        for opt in self.optimizers:
            init_adam_state_(opt)
        mine = self._flat_state(as_dtensor=False)
        missing = sorted(set(mine) - set(state))
        if missing:
            raise KeyError(f"state dict lacks {len(missing)} entries, e.g. {missing[:3]}")
        with torch.no_grad():
            for key, t in mine.items():
                if key != "step":
                    t.copy_(state[key])
        self.step = int(state["step"])
        if self.master is not None:
            self.master.weights_out()

    def save(self, path) -> None:
        from r1core.checkpoint import dist as dcp_ckpt

        dcp_ckpt.save(self._flat_state(as_dtensor=True), path)

    def load(self, path) -> None:
        """Load a checkpoint saved by any layout (or one device) into this engine's layout."""
        from r1core.checkpoint import dist as dcp_ckpt

        for opt in self.optimizers:
            init_adam_state_(opt)
        state = self._flat_state(as_dtensor=True)
        step = state["step"]
        if any(k.endswith(_LEGACY_GATE) for k in dcp_ckpt.saved_keys(path)):
            _log.info("%s: routed experts saved as separate w1 / w3; loading them into w13", path)
            state = self._legacy_expert_state(state)
        dcp_ckpt.load(state, path)
        self.step = int(step)
        if self.master is not None:
            self.master.weights_out()

    def _legacy_expert_state(self, state: dict) -> dict:
        """`state` with every routed experts' w13 entry (weights, masters, moments) replaced by views of its
        halves under the names of checkpoints written before gate and up were stacked (`w1`, `w3`)."""
        out = {}
        for key, t in state.items():
            name = _w13_name(key)
            if name is None:
                out[key] = t
                continue
            if t.dim() == 0:  # a step count: both halves saved the same one; w3's copy is read and dropped
                out[key.replace(".experts.w13", ".experts.w1")] = t
                out[key.replace(".experts.w13", ".experts.w3")] = t.clone()
                continue
            local = t.to_local() if hasattr(t, "to_local") else t
            for half, old in enumerate(("w1", "w3")):
                out[key.replace(".experts.w13", f".experts.{old}")] = self._legacy_half(name, local[:, half])
        return out

    def _legacy_half(self, name: str, half: torch.Tensor):
        return half

    def iter_full_state(self):
        """(name, whole tensor) one at a time on rank 0, (name, None) elsewhere; collective. For pushing
        weights into a rollout engine in buckets without holding the whole model twice."""
        for name, t in self.model.state_dict().items():
            yield name, t.detach()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's unsharded state dict on rank 0 (None elsewhere); collective. On one device
        the tensors are the live parameters (no copy)."""
        full = dict(self.iter_full_state())
        return full if self.rank == 0 else None

    def _shard_of(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return full

    @torch.no_grad()
    def load_hf(self, path) -> None:
        """Start from an HF DeepSeek-V3 checkpoint's weights; every rank reads it and keeps its shard.
        The optimizer state and step are left as they are (fresh for a new stage)."""
        from r1core.checkpoint.hf import from_pretrained

        source = from_pretrained(path, dtype=torch.float32, device="cpu").state_dict()
        masters = dict(self.master.named) if self.master is not None else {}
        for name, t in self.model.state_dict().items():
            masters.get(name, t).copy_(self._shard_of(name, source[name]))
        if self.master is not None:
            self.master.weights_out()

    def full_grads(self) -> dict[str, torch.Tensor] | None:
        """The whole model's gradients of the last step (reduced, clipped) on rank 0; for checks.
        Collective."""
        return {n: p.grad.detach().clone() for n, p in self.named_params}

    def export_hf(self, path) -> None:
        """Write the model as an HF DeepSeek-V3 checkpoint directory (rank 0 writes); collective."""
        from r1core.checkpoint.hf import save_pretrained

        full = self.full_state_dict()
        if full is not None:
            with torch.device("meta"):
                model = Transformer(self.args)
            model.to_empty(device="cpu")
            model.load_state_dict({k: v.cpu() for k, v in full.items()})
            save_pretrained(model, path)
        if dist.is_initialized():
            dist.barrier()


class LocalEngine(TrainEngine):
    """Plain single-device training: the reference every parallel layout must match."""

    def __init__(self, args, parallel, optim, device, dtype, seed):
        super().__init__(args, parallel, optim, device, dtype, seed)
        self._finish_setup()


class ParallelEngine(TrainEngine):
    """tp × pp × cp × ep × dp on torch.distributed: megatron-core groups, r1core.parallel sharding, torch
    schedules. Context-parallel ranks receive the same batches and each keeps its chunks of every sequence."""

    def __init__(self, args, parallel, optim, device, dtype, seed):
        from r1core.parallel.layout import Meshes
        from r1core.parallel.parallelize import parallelize
        from r1core.parallel.pipeline import StageRunner, needs_embed_on_last
        from r1core.parallel.topology import init_topology

        super().__init__(args, parallel, optim, device, dtype, seed)
        self.topo = topo = init_topology(parallel, self.device)
        self.layouts = parallelize(self.model, topo)
        self.meshes = Meshes(topo)
        self.runner = StageRunner(self.model, topo)
        self.is_last_stage = self.runner.is_last
        self.rank, self.world_size = topo.rank, topo.world_size
        self.dp_rank, self.dp_size = topo.rank_in("dp"), topo.dp
        # context-parallel ranks get the same batches (the data-parallel shard) and split every sequence
        self.context = None
        if topo.cp > 1:
            from r1core.parallel.context import ContextParallel

            self.context = ContextParallel(topo.cp_group, topo.cp, topo.rank_in("cp"))
        self.vocab_group = topo.tp_group if topo.tp > 1 else None
        stages = {s for s, _ in self.runner.stages}
        # the embedding's copy on the last stage (MTP, tied head) is summed with stage 0's, unless one rank
        # holds both ends (V shape)
        shared = needs_embed_on_last(self.model) and topo.pp > 1 and self.model.embed is not None
        self.embed_group = topo.embed_group if shared and not {0, parallel.n_stages - 1} <= stages else None
        self._finish_setup()

    def _build_optimizers(self) -> list:
        topo, zero = self.topo, self.parallel.zero1
        dense = [(n, p) for n, p in self.optimized_params if not self.layouts[n].is_expert]
        experts = [(n, p) for n, p in self.optimized_params if self.layouts[n].is_expert]
        src = self.master.sources() if self.master is not None else None
        opts = (
            [adamw(dense, self.optim_cfg, topo.dp_cp_group, topo.dp * topo.cp, zero, sources=src)]
            if dense
            else []
        )
        if experts:
            opts.append(adamw(experts, self.optim_cfg, topo.edp_group, topo.edp, zero, sources=src))
        return opts

    def _all_reduce(self, t: torch.Tensor, group_name: str) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=getattr(self.topo, f"{group_name}_group"))
        return t

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        sums = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(sums)
        return sums.tolist()

    def _forward_backward(self, mbs, objective, denoms) -> dict:
        from r1core.parallel import comm

        sums: dict = {}
        head = self.model.head.weight if self.is_last_stage else None
        if self.context is not None:
            if not getattr(objective, "context_parallel", False):
                raise ValueError(
                    f"{type(objective).__name__} does not support context parallelism "
                    f"(parallel.cp={self.topo.cp}): its loss needs whole sequences on one rank"
                )
            mbs = [self.context.shard(mb) for mb in mbs]

        def loss_fn(h, index):
            mb = mbs[int(index.reshape(-1)[0])]
            if self.parallel.sequence_parallel:
                h = comm.gather_seq_replicated(h, self.topo.tp_group)
            loss, metrics = objective(h, head, self.vocab_group, mb, self.model, denoms=denoms)
            _add(sums, {**metrics, "loss": loss}, self.device)
            return loss

        weights = [mb["tokens"].shape[0] / float(denoms["_seqs"]) for mb in mbs]
        self.runner.train(mbs, weights, loss_fn, self.dtype)
        aux = self.runner.ctx.aux_total
        if aux is not None:
            _add(sums, {"aux": aux, "loss": aux}, self.device)
        return sums

    def _reduce_grads(self) -> None:
        from r1core.parallel.optim import reduce_gradients

        reduce_gradients(self.named_params, self.layouts, self.topo, self.embed_group)

    def _grad_norm(self) -> torch.Tensor:
        from r1core.parallel.optim import global_grad_norm

        return global_grad_norm(self.named_params, self.layouts, self.topo, self._triton_norm)

    def _reduce_metrics(self, sums: dict) -> dict:
        keys = sorted(sums)
        local = {}
        if keys:
            flat = self._all_reduce(torch.stack([sums[k] for k in keys]), "dp_cp")
            local = dict(zip(keys, flat.tolist()))
        if self.topo.pp == 1:
            return local
        stages = [None] * self.topo.pp
        dist.all_gather_object(stages, local, group=self.topo.pp_group)
        merged: dict = {}
        for part in stages:
            for k, v in part.items():
                merged[k] = merged.get(k, 0.0) + v
        return merged

    def _forward_only(self, microbatches, fn) -> list:
        from r1core.parallel import comm

        n = self.parallel.microbatches
        mbs = split_microbatches(microbatches, n)
        if self.context is not None:
            mbs = [self.context.shard(mb) for mb in mbs]
        hs = self.runner.forward(mbs, self.dtype)
        hs = [torch.cat(hs[i : i + n]) for i in range(0, len(hs), n)]  # back to the given batches
        out = []
        for h, mb in zip(hs, microbatches):
            if self.parallel.sequence_parallel:
                h = comm.gather_seq_replicated(h, self.topo.tp_group)
            if self.context is not None:  # fn sees whole sequences
                h = self.context.gather(h)
            out.append(fn(h, self.model.head.weight, self.vocab_group, mb, self.model))
        return out

    def _dtensor(self, name: str, t: torch.Tensor, as_dtensor: bool):
        base = name.removeprefix("model.")
        lay = self.layouts.get(base)
        if not as_dtensor or lay is None:
            return t
        return to_dtensor(t, lay, self.meshes, self._full_shapes[base])

    def _legacy_half(self, name: str, half: torch.Tensor):
        E, _, I, D = self._full_shapes[name]  # the old w1 / w3: [E, I, D], E over EP, I over TP
        return to_dtensor(half, ParamLayout(tp_dim=1, ep_dim=0), self.meshes, torch.Size((E, I, D)))

    def _shard_of(self, name: str, full: torch.Tensor) -> torch.Tensor:
        from r1core.parallel.layout import local_shard

        topo = self.topo
        ranks = {"ep": topo.rank_in("ep"), "tp": topo.rank_in("tp")}
        return local_shard(full, self.layouts.get(name, ParamLayout()), ranks, {"ep": topo.ep, "tp": topo.tp})

    def iter_full_state(self):
        from r1core.parallel.gather import iter_full_state

        yield from iter_full_state(self.model.state_dict(), self.layouts, self.meshes, self._full_shapes)

    def full_grads(self) -> dict[str, torch.Tensor] | None:
        from r1core.parallel.gather import iter_full_state

        local = {n: p.grad for n, p in self.named_params}
        shapes = {n: s for n, s in self._full_shapes.items() if n in self._full_param_names}
        full = dict(iter_full_state(local, self.layouts, self.meshes, shapes))
        return full if self.rank == 0 else None


def build_engine(
    model_args: ModelArgs,
    parallel: ParallelConfig,
    optim: OptimConfig,
    *,
    device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> TrainEngine:
    """A LocalEngine when the world has one rank (torch.distributed optional), else the parallel engine."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    parallel = check_layout(model_args, parallel, world)
    if world == 1:
        return LocalEngine(model_args, parallel, optim, device, dtype, seed)
    return ParallelEngine(model_args, parallel, optim, device, dtype, seed)
