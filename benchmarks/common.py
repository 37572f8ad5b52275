"""Shared benchmark harness: timing, peak memory, measured ceilings, tables, JSON and PNG output.

Every bench_<op>.py measures the ceilings it reports against in the same run (a large bf16
matmul for TFLOP/s, a large device-to-device copy for GB/s), so ratios never rest on datasheets.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of fn in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_interleaved(
    fns: dict[str, Callable[[], object]], warmup: int = 2, repeats: int = 10, isolated: bool = True
) -> dict[str, dict]:
    """Median ms per call of several providers, timed round-robin, two ways each.

    "ms": a stream of calls with no host sync between them (CUDA events around each call, as
    triton.testing.do_bench): the host runs ahead as it does inside a training step, so this is the
    device time of a call unless launching it takes longer. "ms_isolated": one call from an idle GPU
    (synchronize, call, synchronize), which adds the host's launch latency. Round-robin order makes
    clock and thermal drift over the run hit every provider alike. `isolated=False` skips the second
    pass (calls of many milliseconds, where the launch latency is noise). A provider that raises is reported
    as {"error": ...} and dropped from later rounds.
    """
    out: dict[str, dict] = {}
    live = dict(fns)

    def guarded(name, fn):
        try:
            fn()
            return True
        except Exception as err:  # a provider that cannot run is reported, never fatal
            out[name] = {
                "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            }
            live.pop(name, None)
            return False

    for _ in range(warmup):
        for name, fn in list(live.items()):
            guarded(name, fn)
    sync()
    if not torch.cuda.is_available():
        samples = {n: [] for n in live}
        for _ in range(repeats):
            for name, fn in list(live.items()):
                t0 = time.perf_counter()
                if guarded(name, fn):
                    samples[name].append((time.perf_counter() - t0) * 1e3)
        out.update(
            {
                n: {"ms": statistics.median(v), "ms_isolated": statistics.median(v)}
                for n, v in samples.items()
                if n in live
            }
        )
        return out
    events = {n: [] for n in live}
    for _ in range(repeats):
        for name, fn in list(live.items()):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            ok = guarded(name, fn)
            end.record()
            if ok:
                events[name].append((start, end))
    sync()
    for name in live:
        out[name] = {"ms": statistics.median(s.elapsed_time(e) for s, e in events[name])}
    for name, fn in list(live.items()) if isolated else ():
        out[name]["ms_isolated"] = time_ms(fn, warmup=0, repeats=max(3, repeats // 2))
    return out


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak memory fn allocates beyond what was allocated when it started (GPU only; 0 on CPU)."""
    if not torch.cuda.is_available():
        return 0
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    sync()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


@dataclass
class Ceilings:
    matmul_tflops: float  # bf16 8192^3 (GPU) / fp32 1024^3 (CPU)
    copy_gbps: float  # bytes read + written per second by a large device copy

    @classmethod
    def measure(cls) -> "Ceilings":
        dev = device()
        if dev.type == "cuda":
            n, dtype, copy_bytes = 8192, torch.bfloat16, 2 << 30
        else:
            n, dtype, copy_bytes = 1024, torch.float32, 64 << 20
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        ms = time_ms(lambda: a @ b)
        src = torch.randn(copy_bytes // 4, device=dev)
        dst = torch.empty_like(src)
        copy_ms = time_ms(lambda: dst.copy_(src))
        return cls(matmul_tflops=2 * n**3 / ms / 1e9, copy_gbps=2 * copy_bytes / copy_ms / 1e6)


def env_info() -> dict:
    info = {"torch": torch.__version__, "device": "cpu"}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    try:
        info["commit"] = subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = os.environ.get("R1CORE_COMMIT", "unknown")
    info["date"] = time.strftime("%Y-%m-%d")
    return info


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)

    def add(self, *row) -> None:
        self.rows.append(list(row))

    def render(self) -> str:
        cells = [[_fmt(c) for c in row] for row in [self.columns] + self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = [
            f"## {self.title}",
            "| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
            "| " + " | ".join("-" * w for w in widths) + " |",
        ]
        lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
        return "\n".join(lines)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def out_dir() -> str:
    path = os.environ.get("OUT") or os.environ.get("R1CORE_BENCH_OUT") or "benchmarks/out"
    os.makedirs(path, exist_ok=True)
    return path


def bar_plot(path: str, title: str, labels: list[str], values: list[float], ylabel: str) -> None:
    """Write a PNG bar chart (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4))
    ax.bar(range(len(values)), values, color="#4C72B0")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def error_report(e: BaseException, frames: int = 6) -> str:
    """One line per exception of the chain (`raise ... from` and `during handling`), root cause last, then
    the root cause's innermost frames: wrappers such as transformers' lazy import ("Could not import module
    'DeepseekV3ForCausalLM'") hide the real failure in `__cause__`."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    lines = [f"{type(x).__name__}: {x}" for x in chain]
    tb = traceback.extract_tb(chain[-1].__traceback__)[-frames:]
    lines += [f"  at {f.filename}:{f.lineno} in {f.name}: {f.line}" for f in tb]
    return "\n".join(lines)


def finish(name: str, tables: list[Table], record: dict) -> None:
    """Print the tables, save JSON under the output dir, and print the JSON as the last line."""
    record = {"bench": name, **env_info(), **record}
    for t in tables:
        print(t.render(), end="\n\n")
    with open(os.path.join(out_dir(), f"{name}.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record))
