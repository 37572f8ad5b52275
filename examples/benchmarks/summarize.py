"""One line per (bench, shape, provider) from the JSON the benchmarks write: the numbers to read first.

    python examples/benchmarks/summarize.py benchmarks/out

Each benchmark's JSON holds its environment (GPU, torch, commit, date, the measured matmul peak) and
its rows; this prints the time, the speed-up over the plain-PyTorch reference and the share of the
hardware ceiling where the benchmark reports them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# the keys each benchmark uses for time, ratio and ceiling, in order of preference
TIME = ("ms", "seconds")
RATIO = ("x_naive", "x_ref", "x_torch", "x_hf")
CEILING = ("pct_peak", "pct_copy", "mfu")


def _first(row: dict, keys: tuple[str, ...]):
    return next(((k, row[k]) for k in keys if isinstance(row.get(k), (int, float))), (None, None))


def rows(record: dict) -> list[dict]:
    """The benchmark's rows, each with a "provider": a list under "rows" (bench_grpo_loss, bench_train), a
    {row: {provider: result}} map under "rows" (bench_moe) or a {provider: result} map under "results"."""
    found = record.get("rows")
    if isinstance(found, list):
        return [{"provider": r.get("provider", r.get("variant")), **r} for r in found]
    if isinstance(found, dict):
        return [
            {"shape": name, "provider": p, **r}
            for name, by in found.items()
            for p, r in by.items()
            if isinstance(r, dict)
        ]
    return [
        {"provider": name, **r} for name, r in (record.get("results") or {}).items() if isinstance(r, dict)
    ]


def summarize(record: dict) -> list[str]:
    head = (
        f"{record.get('bench')} on {record.get('device')} ({record.get('gpu', record.get('torch'))}, "
        f"commit {record.get('commit')}, {record.get('date')})"
    )
    lines = [head]
    for r in rows(record):
        where = " ".join(str(r[k]) for k in ("shape", "mode") if r.get(k))
        if r.get("status", "ok") != "ok":
            lines.append(f"  {where} {r.get('provider')}: {r['status']}")
            continue
        parts = [f"{k} {v:.4g}" for k, v in (_first(r, TIME), _first(r, RATIO), _first(r, CEILING)) if k]
        for key in ("tokens_per_s", "tokens_s"):
            if isinstance(r.get(key), (int, float)):
                parts.append(f"tokens/s {r[key]:.4g}")
        lines.append(f"  {where} {r.get('provider')}: " + ", ".join(parts))
    return lines


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", nargs="?", default="benchmarks/out")
    a = p.parse_args(argv)
    files = sorted(Path(a.folder).glob("bench_*.json"))
    if not files:
        raise SystemExit(f"no bench_*.json in {a.folder}: run examples/benchmarks/run.sh first")
    out = [line for f in files for line in summarize(json.loads(f.read_text()))]
    print("\n".join(out))
    return out


if __name__ == "__main__":
    main()
