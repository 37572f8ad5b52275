"""Two training runs' loss curves side by side (e.g. model.precision fp8 against bf16, same seed and data).

    python benchmarks/compare_loss.py bf16.metrics.jsonl fp8.metrics.jsonl --labels bf16,fp8

Reads the stages' metrics.jsonl ({"step", "ce" or "loss", ...}), prints the loss of both every few logged
steps and the relative difference of the second to the first: over the last `--tail` logged steps (mean),
the largest after the first `--skip` steps, and the mean of the per-step relative differences over the
last `--window` steps with its 95 % interval (paired by step: both runs saw the same batches; neighbouring
steps of a run are correlated, so the interval is a lower bound on the run-to-run spread). Writes
compare_loss.png and compare_loss.json under $OUT; the last line printed is the JSON record.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Table, finish, out_dir  # noqa: E402

from r1core.rl.stats import mean_and_se  # noqa: E402


def read_curve(path: str, key: str) -> dict[int, float]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: float(r[key]) for r in rows if key in r}


def paired_rel_diff(ref: dict[int, float], cand: dict[int, float], steps: list[int]) -> tuple[float, float]:
    """Mean of (cand - ref) / ref over `steps` and the half-width of its 95 % normal interval (1.96 standard
    errors, the standard error of r1core.rl.stats)."""
    mean, se = mean_and_se([(cand[s] - ref[s]) / ref[s] for s in steps])
    return mean, 1.96 * se if len(steps) > 1 else float("nan")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument("--labels", default="reference,candidate")
    p.add_argument("--key", default="ce", help="metric to compare (ce: next-token CE, no MTP or aux terms)")
    p.add_argument("--tail", type=int, default=5, help="logged steps averaged at the end")
    p.add_argument("--skip", type=int, default=50, help="steps left out of the largest-difference figure")
    p.add_argument("--window", type=int, default=100, help="steps of the paired mean difference, at the end")
    a = p.parse_args(argv)
    names = a.labels.split(",")
    ref, cand = read_curve(a.reference, a.key), read_curve(a.candidate, a.key)
    steps = sorted(set(ref) & set(cand))
    if not steps:
        raise SystemExit(f"no common steps with {a.key!r} in {a.reference} and {a.candidate}")
    table = Table(f"{a.key}: {names[1]} against {names[0]}", ["step", names[0], names[1], "rel diff %"])
    every = max(1, len(steps) // 15)
    for s in steps[::every] + ([steps[-1]] if (len(steps) - 1) % every else []):
        table.add(s, ref[s], cand[s], 100 * (cand[s] - ref[s]) / ref[s])
    tail = steps[-a.tail :]
    ref_tail, cand_tail = sum(ref[s] for s in tail) / len(tail), sum(cand[s] for s in tail) / len(tail)
    late = [s for s in steps if s > a.skip] or steps
    worst = max(abs(cand[s] - ref[s]) / ref[s] for s in late)
    mean, half = paired_rel_diff(ref, cand, [s for s in steps if s > steps[-1] - a.window])
    record = {
        "key": a.key,
        "labels": names,
        "steps": steps[-1],
        "tail_steps": tail,
        f"{names[0]}_tail": ref_tail,
        f"{names[1]}_tail": cand_tail,
        "tail_rel_diff": (cand_tail - ref_tail) / ref_tail,
        "max_rel_diff_after_skip": worst,
        "window_steps": a.window,
        "window_rel_diff": mean,
        "window_rel_diff_ci95": [mean - half, mean + half],
        "curves": {"steps": steps, names[0]: [ref[s] for s in steps], names[1]: [cand[s] for s in steps]},
    }
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, curve in ((names[0], ref), (names[1], cand)):
            ax.plot(steps, [curve[s] for s in steps], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(a.key)
        diff = 100 * record["tail_rel_diff"]
        ax.set_title(
            f"{names[1]} vs {names[0]}: last {a.window} steps {100 * mean:+.2f} % ± {100 * half:.2f} "
            f"(last {len(tail)} logged {diff:+.2f} %)"
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir(), "compare_loss.png"), dpi=120)
    except ImportError:
        print("matplotlib missing: no PNG")
    print(
        f"last {a.window} steps: {names[1]} - {names[0]} = {100 * mean:+.2f} % "
        f"[{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}] (paired by step)"
    )
    finish("compare_loss", [table], record)
    return record


if __name__ == "__main__":
    main()
