"""Run a pipeline: stages in order, finished ones skipped, an interrupted one resumed, then the report.

A stage's identity is the hash of its resolved config chained with every earlier stage's, so
changing a setting reruns that stage and everything after it, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from r1core.parallel import init_distributed
from r1core.parallel.comm import broadcast_from_rank0
from r1core.train.metrics import forget_progress

from .config import (
    MODEL_STAGES,
    ConfigError,
    StageKind,
    config_hash,
    resolve_job_config,
    to_job,
    validate_pipeline,
)
from .manifest import Manifest
from .report import write_report
from .stages import STAGES, StageContext

log = logging.getLogger("r1core")


class StageFailed(RuntimeError):
    """A stage stopped on bad input (a checkpoint, a data file): the message names the stage and the
    culprit."""


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C during a stage; the message says where and how to resume."""


# Errors that name their culprit and need no traceback; anything else is a bug and keeps its traceback.
def _user_errors() -> tuple[type, ...]:
    from r1core.checkpoint.hf_config import CheckpointError
    from r1core.data.preflight import DataError

    return (CheckpointError, DataError, ConfigError)


# Stages that only read a model and write files run on rank 0; the others wait for it.
RANK0_STAGES = {
    StageKind.prepare,
    StageKind.eval,
    StageKind.rejection_sampling,
    StageKind.load,
    StageKind.passkey_eval,
}


def _dtype(job, device: torch.device) -> torch.dtype:
    names = {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if job.dtype not in names:
        raise ConfigError(f"dtype={job.dtype!r}: choose one of {sorted(names)}")
    return names[job.dtype]


def _resolve_init(spec, last_model: str | None, manifest: Manifest) -> str | None:
    if spec.init == "scratch" or spec.kind in (StageKind.prepare, StageKind.load):
        return None
    if spec.init == "previous":
        return last_model
    return manifest.output(spec.init, "model")


def _student_init(spec, sj, manifest: Manifest) -> str | None:
    """A distill stage's student base: the model of the stage `distill.student_init` names, or that
    directory."""
    ref = sj.distill.student_init
    if spec.kind != StageKind.distill or not ref:
        return None
    return manifest.output(ref, "model") or ref


def _chains(resolved) -> list[str]:
    """Each stage's identity: its config hash chained with every earlier stage's."""
    chain, out = "", []
    for spec, sj in resolved:
        chain = hashlib.sha256((chain + config_hash(sj, spec)).encode()).hexdigest()[:16]
        out.append(chain)
    return out


def _preflight(resolved, chains: list[str], manifest: Manifest, rank: int) -> None:
    """The data pre-flight of the files of every prepare stage still to run, on rank 0, before any stage runs
    (a finished prepare has read its files already; a rerun need not read a large corpus again)."""
    from r1core.data.preflight import DataError

    from .prepare import preflight_data

    error = None
    if rank == 0:
        try:
            for (spec, sj), chain in zip(resolved, chains):
                if spec.kind == StageKind.prepare and not manifest.is_done(spec.name, chain):
                    preflight_data(sj)
        except DataError as e:
            error = str(e)
    error = broadcast_from_rank0(error)
    if error:
        raise ConfigError(error)


def run_pipeline(cfg: DictConfig) -> Path:
    cfg = resolve_job_config(cfg)
    job = to_job(cfg)
    device = init_distributed(job.device, job.parallel.timeout_s)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    resolved = validate_pipeline(cfg, job, world)  # every config error surfaces here, before any work
    run_dir = Path(job.run_dir)
    manifest = Manifest(run_dir, job.pipeline.name)  # reads an earlier run's manifest; writes nothing yet
    chains = _chains(resolved)
    _preflight(resolved, chains, manifest, rank)
    dtype = _dtype(job, device)
    run_dir.mkdir(parents=True, exist_ok=True)
    prepared: dict = {}
    last_model: str | None = None
    t_start = time.time()
    for i, ((spec, sj), chain) in enumerate(zip(resolved, chains), start=1):
        if world > 1:
            manifest = Manifest(run_dir, job.pipeline.name)  # rank 0 may have advanced it
        header = f"[{i}/{len(resolved)}] {spec.name} ({spec.kind.value})"
        if manifest.is_done(spec.name, chain):
            outputs = manifest.stage(spec.name)["outputs"]
            if rank == 0:
                log.info("%s: done earlier, skipped", header)
        else:
            outputs = _run_stage(
                spec, sj, run_dir, manifest, chain, prepared, last_model, device, dtype, rank, world, header
            )
        if spec.kind == StageKind.prepare:
            prepared = outputs
        if spec.kind in MODEL_STAGES and "model" in outputs:
            last_model = outputs["model"]
    if rank == 0:
        report = write_report(run_dir, Manifest(run_dir, job.pipeline.name), resolved, job)
        log.info(
            "pipeline %s finished in %.0f s; report: %s", job.pipeline.name, time.time() - t_start, report
        )
    if world > 1:
        dist.barrier()
    return run_dir


def _set_aside_stale(stage_dir: Path, recorded_hash: str | None, chain: str) -> None:
    """A stage directory left by a different config (its checkpoints, samples, model) must not be
    resumed from: move it aside (never delete work) so the stage starts fresh."""
    if recorded_hash == chain or not stage_dir.is_dir() or not any(stage_dir.iterdir()):
        return
    dest = stage_dir.with_name(f"{stage_dir.name}.stale-{recorded_hash or 'unrecorded'}")
    n = 1
    while dest.exists():
        dest, n = stage_dir.with_name(f"{stage_dir.name}.stale-{recorded_hash or 'unrecorded'}-{n}"), n + 1
    stage_dir.rename(dest)
    log.info(
        "stage %s: its config changed since %s was written; that directory was moved to %s",
        stage_dir.name,
        stage_dir,
        dest,
    )


def _run_stage(
    spec, sj, run_dir, manifest, chain, prepared, last_model, device, dtype, rank, world, header
) -> dict:
    ctx = StageContext(
        spec=spec,
        job=sj,
        stage_dir=run_dir / "stages" / spec.name,
        init_model=_resolve_init(spec, last_model, manifest),
        dataset=manifest.output(spec.dataset, "dataset") if spec.dataset else None,
        prepared=prepared,
        device=device,
        dtype=dtype,
        is_main=rank == 0,
        student_init=_student_init(spec, sj, manifest),
    )
    if rank == 0:
        _set_aside_stale(ctx.stage_dir, manifest.stage(spec.name).get("config_hash"), chain)
    if world > 1:
        dist.barrier()
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    if (
        spec.kind
        in (
            StageKind.pretrain,
            StageKind.cold_start_sft,
            StageKind.sft,
            StageKind.reasoning_rl,
            StageKind.all_scenario_rl,
            StageKind.distill,
        )
        and spec.init == "scratch"
    ):
        ctx.init_model = None
    only_rank0 = spec.kind in RANK0_STAGES
    if rank == 0:
        manifest.start(spec.name, chain, last_activity=_last_activity(ctx.stage_dir))
        log.info("%s: running -> %s", header, ctx.stage_dir)
        resume_step = _checkpoint_step(ctx.stage_dir)
        if resume_step is not None:
            log.info("resuming %s from step %d", spec.name, resume_step)
    t0 = time.time()
    outputs, metrics = {}, {}
    forget_progress()
    try:
        if rank == 0 or not only_rank0:
            outputs, metrics = STAGES[spec.kind](ctx)
    except KeyboardInterrupt:
        if rank == 0:
            manifest.fail(spec.name, "interrupted", time.time() - t0)
        raise StageInterrupted(
            f"interrupted in stage {spec.name} at step {_step_reached(ctx.stage_dir)}; "
            "rerun the same command to resume"
        ) from None
    except BaseException as e:
        if rank == 0:
            manifest.fail(spec.name, f"{type(e).__name__}: {e}", time.time() - t0)
        if isinstance(e, _user_errors()):
            raise StageFailed(f"stage {spec.name!r} ({spec.kind.value}): {e}") from e
        log.error("stage %r (%s) failed: %s: %s", spec.name, spec.kind.value, type(e).__name__, e)
        raise
    if rank == 0:
        manifest.finish(spec.name, outputs, metrics, time.time() - t0)
        log.info("%s: done in %.1f s %s", header, time.time() - t0, _short(metrics))
    from_rank0 = broadcast_from_rank0(outputs)  # once the manifest records them; also the stage's end barrier
    if only_rank0:
        outputs = from_rank0
    return outputs


def _checkpoint_step(stage_dir: Path) -> int | None:
    """The step of the stage's latest complete checkpoint, which its trainer resumes from (None: none)."""
    from r1core.train.checkpointing import CheckpointManager

    if not (stage_dir / "checkpoints" / "latest").exists():
        return None
    latest = CheckpointManager(stage_dir / "checkpoints").latest()
    return json.loads((latest / "trainer_state.json").read_text())["step"]


def _step_reached(stage_dir: Path) -> int:
    """The step the stage's trainer had reached: its progress bar, else its metrics log (0 before the
    first)."""
    from r1core.train.metrics import current_step, read_jsonl

    step = current_step()
    if step is not None:
        return step
    path = stage_dir / "metrics.jsonl"
    rows = read_jsonl(path) if path.exists() else []
    return int(rows[-1].get("step", 0)) if rows else 0


def _last_activity(stage_dir: Path) -> float | None:
    """When the stage last logged a step or wrote a checkpoint: the end of an attempt that was killed."""
    marks = (stage_dir / "metrics.jsonl", stage_dir / "checkpoints" / "latest")
    times = [p.stat().st_mtime for p in marks if p.exists()]
    return max(times) if times else None


def _short(metrics: dict) -> str:
    keys = ("pass@1", "greedy", "reward/accuracy", "loss", "kept")
    return " ".join(f"{k}={metrics[k]:.3g}" for k in keys if isinstance(metrics.get(k), (int, float)))
