"""Per-step metrics as JSONL (resume-safe), a progress bar with rate and ETA, and PNG curves."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Iterable

from tqdm.auto import tqdm


class MetricsLog:
    """Append-only JSONL of {"step": n, ...}. On resume, rows past the resumed step are dropped so a
    crashed-and-resumed run's log reads exactly like an uninterrupted one."""

    def __init__(self, path: str | os.PathLike, resume_step: int = 0, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = (
            [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            if self.path.exists()
            else []
        )
        with open(self.path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        # the engine's own counter (optimizer steps) is kept apart: in RL a skipped step makes no update
        row = {
            "step": step,
            "time": round(time.time(), 3),
            **{("optim_step" if k == "step" else k): _plain(v) for k, v in metrics.items()},
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a kill: everything before it is intact
    return rows


# The newest progress bar of this process: what an interrupted stage reports as its step (Ctrl-C
# arrives between two steps of whichever trainer is running; the bar is the one counter all share).
_bars: list[tqdm] = []


def current_step() -> int | None:
    """The step count of the newest progress bar (None: no bar since `forget_progress`)."""
    return int(_bars[-1].n) if _bars else None


def forget_progress() -> None:
    _bars.clear()


def progress(total: int, initial: int, desc: str, enabled: bool = True) -> tqdm:
    """A tqdm bar (rate and ETA) that also prints plain periodic lines when stderr is not a terminal."""
    import sys

    tty = sys.stderr.isatty()
    bar = tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=1.0 if tty else 15.0,
        smoothing=0.1,
        ascii=not tty,
        file=sys.stderr if tty else _Lines(sys.stderr),
    )
    _bars[:] = [bar]
    return bar


class _Lines:
    """tqdm output for logs and pipes: one full line per refresh instead of carriage returns."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (runs have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    path: str | os.PathLike,
    title: str,
    series: dict[str, tuple[list, list]],
    xlabel: str = "step",
    smooth: int = 1,
) -> None:
    """One PNG with a subplot per series: {name: (steps, values)}."""
    plt = pyplot()
    series = {k: v for k, v in series.items() if v[0]}
    if not series:
        return
    n = len(series)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, (xs, ys)) in zip(axes.flat, series.items()):
        ax.plot(xs, ys, color="#9db7d5", linewidth=1)
        if smooth > 1 and len(ys) >= smooth:
            ax.plot(xs[smooth - 1 :], moving_average(ys, smooth), color="#1f4e89", linewidth=1.6)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def moving_average(values: Iterable[float], k: int) -> list[float]:
    values = list(values)
    out, acc = [], sum(values[:k])
    out.append(acc / k)
    for i in range(k, len(values)):
        acc += values[i] - values[i - k]
        out.append(acc / k)
    return out


def curves_from_log(rows: list[dict], keys: list[str]) -> dict[str, tuple[list, list]]:
    out = {}
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        out[key] = ([p[0] for p in pts], [p[1] for p in pts])
    return out
