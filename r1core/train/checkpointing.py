"""Crash-safe checkpoint directories for every trainer.

Layout under `root`:
    step_000100/          engine checkpoint (engine.save writes it atomically) + trainer_state.json
    latest                text file naming the newest complete step directory

A checkpoint counts only once `latest` names it, and `latest` is replaced atomically (write a
temp file, fsync, rename) after the step directory and its trainer state are complete. A kill at
any moment therefore leaves either the previous or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from r1core.checkpoint.atomic import atomic_write_json, atomic_write_text  # noqa: F401  (re-exported)


def save_due(step: int, last_step: int, every: int, last_save_model_only: bool) -> bool:
    """Whether a training loop writes its full checkpoint after `step`: every `every` steps, and at the
    last step only when the caller does not export the final model itself (last_save_model_only=False).
    A kill between the last step and the export then loses at most `every` steps, like any other."""
    if step == last_step:
        return not last_save_model_only
    return step % every == 0


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, keep: int = 2, is_writer: bool = True):
        self.root = Path(root)
        self.keep = max(1, keep)
        self.is_writer = is_writer  # rank 0 writes the pointer and prunes; every rank writes its shards
        self.root.mkdir(parents=True, exist_ok=True)

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / "trainer_state.json").exists():
            raise RuntimeError(
                f"checkpoint pointer {pointer} names {path}, which has no trainer_state.json: "
                "the checkpoint directory was modified outside r1core"
            )
        return path

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def save(self, step: int, engine, trainer_state: dict) -> Path:
        path = self.step_dir(step)
        engine.save(str(path))
        if self.is_writer:
            atomic_write_json(path / "trainer_state.json", {"step": step, **trainer_state})
            atomic_write_text(self.root / "latest", path.name)
            self._prune(keep_name=path.name)
        return path

    def load(self, engine, path: Path | None = None) -> dict | None:
        path = path or self.latest()
        if path is None:
            return None
        engine.load(str(path))
        with open(path / "trainer_state.json") as f:
            return json.load(f)

    def _prune(self, keep_name: str) -> None:
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        complete = [p for p in steps if (p / "trainer_state.json").exists()]
        for p in complete[: max(0, len(complete) - self.keep)]:
            if p.name != keep_name:
                shutil.rmtree(p, ignore_errors=True)
        for p in steps:  # leftovers of a killed save that never got its trainer state
            if p not in complete and p.name != keep_name:
                shutil.rmtree(p, ignore_errors=True)
