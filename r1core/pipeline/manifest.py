"""The run manifest: what each stage produced, where, from which config. Rewritten atomically.

    {"pipeline": "r1", "stages": {"pretrain": {"status": "done", "config_hash": "...",
        "outputs": {"model": "<run>/stages/pretrain/model"}, "metrics": {...}, "seconds": 81.2}}}

A stage is skipped on a rerun only when it is `done` with the same config hash and its outputs
still exist; otherwise it (and so every later stage reading its outputs) runs again.

`seconds` is, for every stage, the wall time of all attempts that produced its current state under
its current config: each attempt from its start to its end (done, failed or interrupted), and an
attempt that was killed outright up to its last logged step or checkpoint. A changed config (or a
rerun of a done stage whose outputs went missing) starts again from 0; `attempts` counts the runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from r1core.train.checkpointing import atomic_write_json


class Manifest:
    def __init__(self, run_dir: str | Path, pipeline: str):
        self.path = Path(run_dir) / "manifest.json"
        self.data = {"pipeline": pipeline, "stages": {}}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as e:
                raise RuntimeError(
                    f"run manifest {self.path} is not valid JSON ({e}); it is only ever written "
                    "atomically, so it was edited by hand: fix or delete it"
                ) from None
            if self.data.get("pipeline") != pipeline:
                raise RuntimeError(
                    f"{self.path} belongs to pipeline {self.data.get('pipeline')!r}, not {pipeline!r}: "
                    "use another run_dir"
                )

    def stage(self, name: str) -> dict:
        return self.data["stages"].get(name, {})

    def is_done(self, name: str, config_hash: str) -> bool:
        st = self.stage(name)
        if st.get("status") != "done" or st.get("config_hash") != config_hash:
            return False
        return all(
            Path(p).exists() for p in st.get("outputs", {}).values() if isinstance(p, str) and "/" in p
        )

    def start(self, name: str, config_hash: str, last_activity: float | None = None) -> None:
        """A new attempt. `last_activity`: when the stage last wrote progress, which closes an earlier attempt
        that was killed before it could record its end."""
        prev = self.stage(name)
        resumed = prev.get("status") == "running" and prev.get("config_hash") == config_hash
        seconds = prev.get("seconds", 0.0) if resumed else 0.0
        killed_at = prev.get("attempt_started")
        if resumed and killed_at is not None and last_activity is not None:
            seconds += max(0.0, last_activity - killed_at)
        now = time.time()
        self.data["stages"][name] = {
            "status": "running",
            "config_hash": config_hash,
            "started": prev.get("started") if resumed else now,
            "attempts": prev.get("attempts", 0) + 1 if resumed else 1,
            "seconds": round(seconds, 2),
            "attempt_started": now,
        }
        self.save()

    def _end_attempt(self, name: str, seconds: float) -> dict:
        st = self.data["stages"].setdefault(name, {})
        st.pop("attempt_started", None)
        st["seconds"] = round(st.get("seconds", 0.0) + seconds, 2)
        return st

    def finish(self, name: str, outputs: dict, metrics: dict, seconds: float) -> None:
        self._end_attempt(name, seconds).update(
            status="done", outputs=outputs, metrics=metrics, finished=time.time()
        )
        self.save()

    def fail(self, name: str, error: str, seconds: float) -> None:
        self._end_attempt(name, seconds).update(status="running", error=error)
        self.save()

    def output(self, name: str, key: str):
        return self.stage(name).get("outputs", {}).get(key)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.data)
