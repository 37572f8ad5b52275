"""The language-model training loop shared by pretraining, SFT and distillation.

generate batches -> engine.train_step -> log -> checkpoint, resumable at any step: the engine
state (model, optimizer, schedule) and the data position are saved together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from .checkpointing import CheckpointManager, save_due
from .metrics import MetricsLog, progress


@dataclass(kw_only=True)
class LMTrainConfig:
    steps: int = 300  # optimizer steps of this stage
    lr: float = 3e-4  # peak learning rate of this stage (the rest of the schedule: `optim`)
    batch_size: int = 32  # sequences per optimizer step (global)
    micro_batch_size: int = 32  # sequences per forward/backward
    seq_len: int = 96  # tokens per training sequence
    doc_masking: bool = True  # attention stays inside each packed document
    log_every: int = 10  # steps between metrics.jsonl rows
    save_every: int = 100  # steps between resumable checkpoints
    keep_checkpoints: int = 2  # checkpoints kept (older ones are deleted)
    # validation: next-token CE on held-out windows (`val_ce` in metrics.jsonl) every eval_every steps and at
    # the last step, in pretrain and long_context stages (held-out data: data.val_files / data.val_docs); 0:
    # off. SFT-type stages have no held-out data: a nonzero sft.eval_every is a config error
    eval_every: int = 100
    eval_batches: int = 4  # micro-batches of held-out windows per evaluation (the same ones every time)
    # The last step writes no full (optimizer) checkpoint: the stage's model export is the last save,
    # as torchtitan's `checkpoint.last_save_model_only`. At 1.7B parameters the full state is ~24 GB
    # (fp32 masters + AdamW), a 36 s write on an H100 node's disk. False keeps it, to extend the run.
    last_save_model_only: bool = True

    def __post_init__(self) -> None:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}"
            )
        if min(self.steps, self.seq_len, self.micro_batch_size) < 1:
            raise ValueError("steps, seq_len and micro_batch_size must be >= 1")
        if self.eval_every < 0 or self.eval_batches < 1:
            raise ValueError(
                f"eval_every={self.eval_every} must be >= 0 and eval_batches={self.eval_batches} >= 1"
            )


class ResumableBatches(Protocol):
    """A data source yielding micro-batch dicts with state_dict() / load_state_dict()."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def train_lm(
    engine,
    data: ResumableBatches,
    cfg: LMTrainConfig,
    out_dir: str | Path,
    objective,
    desc: str = "train",
    is_main: bool = True,
    val_batches: list[dict] | None = None,
) -> dict:
    """Run (or resume) `cfg.steps` optimizer steps; returns the last logged metrics. With `val_batches`
    (this rank's held-out micro-batches) the validation CE over them is logged as `val_ce` every
    `cfg.eval_every` steps and at the last step."""
    out_dir = Path(out_dir)
    ckpts = CheckpointManager(out_dir / "checkpoints", keep=cfg.keep_checkpoints, is_writer=is_main)
    state = ckpts.load(engine)
    start = 0
    if state is not None:
        start = state["step"]
        data.load_state_dict(state["data"])
    log = MetricsLog(out_dir / "metrics.jsonl", resume_step=start, enabled=is_main)
    accum = cfg.batch_size // cfg.micro_batch_size
    it = iter(data)
    bar = progress(cfg.steps, start, desc, enabled=is_main)
    last: dict = {}
    t0, tokens_seen, val_s = time.perf_counter(), 0, 0.0  # tokens_per_s counts training time only
    for step in range(start + 1, cfg.steps + 1):
        micro = [next(it) for _ in range(accum)]
        metrics = engine.train_step(micro, objective)
        tokens_seen += int(metrics.get("n_tokens", 0))
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
        evaluate = (
            val_batches is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps)
        )
        if evaluate:
            t_val = time.perf_counter()
            metrics = {**metrics, "val_ce": validation_ce(engine, val_batches)}
            val_s += time.perf_counter() - t_val
        if evaluate or step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - t0 - val_s
            last = {**metrics, "tokens_per_s": tokens_seen / max(elapsed, 1e-9)}
            log.log(step, last)
            t0, tokens_seen, val_s = time.perf_counter(), 0, 0.0
        if save_due(step, cfg.steps, cfg.save_every, cfg.last_save_model_only):
            ckpts.save(step, engine, {"data": data.state_dict()})
    bar.close()
    return last


def validation_ce(engine, batches: list[dict]) -> float:
    """Mean next-token CE (nats per token, no MTP) of the model over every rank's held-out micro-batches.

    Ranks that hold no head (earlier pipeline stages) add nothing; ranks holding the same rows (tensor or
    context parallel) add the same sum and count, which leaves the mean as it is."""
    from .objectives import CESum

    sums = engine.forward_only(batches, CESum())
    ce, n = engine.sum_over_ranks([sum(s for s, _ in sums), sum(c for _, c in sums)])
    return ce / max(n, 1.0)


class DatasetBatches:
    """Engine micro-batch dicts from a resumable dataset's stacked rows (`dataset.batches(n)`).

    The dataset's position is the whole state: it advances before each row is handed out, so the
    state saved after a step names the first row of the next one.
    """

    def __init__(self, dataset, micro_batch_size: int):
        self.dataset, self.micro_batch_size = dataset, micro_batch_size

    def micro_batch(self, rows) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for rows in self.dataset.batches(self.micro_batch_size):
            yield self.micro_batch(rows)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)


class WindowBatches(DatasetBatches):
    """Token-shard windows (r1core.data.TokenShardDataset) as engine micro-batches."""

    def __init__(self, dataset, micro_batch_size: int, doc_masking: bool = True):
        super().__init__(dataset, micro_batch_size)
        self.doc_masking = doc_masking

    def micro_batch(self, rows) -> dict[str, torch.Tensor]:
        from r1core.data.shards import positions_from_doc_ids

        mb = {"tokens": rows.tokens, "labels": rows.labels}
        if self.doc_masking:
            mb["doc_ids"] = rows.doc_ids
            mb["positions"] = positions_from_doc_ids(rows.doc_ids)
        return mb


class SFTBatches(DatasetBatches):
    """Packed SFT rows (r1core.data.PackedSFTDataset) as engine micro-batches."""

    def micro_batch(self, rows) -> dict[str, torch.Tensor]:
        return {
            "tokens": rows.tokens,
            "labels": rows.labels,
            "doc_ids": rows.doc_ids,
            "positions": rows.positions,
        }
