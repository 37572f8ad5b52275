"""Two training runs' loss curves side by side (e.g. model.precision fp8 against bf16, same seed and data).

    python benchmarks/compare_loss.py bf16.metrics.jsonl fp8.metrics.jsonl --labels bf16,fp8

    python benchmarks/compare_loss.py --across-seeds s0_bf16.jsonl s0_fp8.jsonl s1_bf16.jsonl s1_fp8.jsonl ...

Reads the stages' metrics.jsonl ({"step", "ce" or "loss", ...}), prints the loss of both every few logged
steps and the relative difference of the second to the first: over the last `--tail` logged steps (mean),
the largest after the first `--skip` steps, and the mean of the per-step relative differences over the
last `--window` steps with its 95 % interval (paired by step: both runs saw the same batches; neighbouring
steps of a run are correlated, so the interval is a lower bound on the run-to-run spread). Writes
compare_loss.png and compare_loss.json under $OUT; the last line printed is the JSON record.

--across-seeds takes (reference, candidate) pairs of runs, one pair per seed, and reports each seed's paired
difference over the last `--window` steps and their mean with its 95 % Student-t interval over seeds: the
spread that matters when one seed's difference is dominated by where a perturbation (FP8, another kernel)
sends that seed's trajectory. It also prints the noise floor: how far the reference runs of different seeds
are from each other, and how many pairs a ±`--target` interval would take. Writes compare_seeds.png (a bar
per seed) and compare_seeds.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Table, bar_plot, finish, out_dir  # noqa: E402

from r1core.rl.stats import mean_and_se  # noqa: E402


def read_curve(path: str, key: str) -> dict[int, float]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: float(r[key]) for r in rows if key in r}


def common_steps(
    ref: dict[int, float], cand: dict[int, float], key: str, ref_path: str, cand_path: str
) -> list:
    """The steps both curves logged, in order; none is an error naming the two files."""
    steps = sorted(set(ref) & set(cand))
    if not steps:
        raise SystemExit(f"no common steps with {key!r} in {ref_path} and {cand_path}")
    return steps


def last_window(steps: list[int], window: int) -> list[int]:
    """The steps within `window` of the last one."""
    return [s for s in steps if s > steps[-1] - window]


def paired_rel_diff(ref: dict[int, float], cand: dict[int, float], steps: list[int]) -> tuple[float, float]:
    """Mean of (cand - ref) / ref over `steps` and the half-width of its 95 % normal interval (1.96 standard
    errors, the standard error of r1core.rl.stats)."""
    mean, se = mean_and_se([(cand[s] - ref[s]) / ref[s] for s in steps])
    return mean, 1.96 * se if len(steps) > 1 else float("nan")


# two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (any statistics table); past 30 the
# normal's 1.96 plus the first term of t's expansion in 1/df
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
_T975 += (2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086)
_T975 += (2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.37 / df


def seed_floor(refs: list[dict[int, float]], paths: list[str], key: str, window: int) -> float:
    """The reference runs (read from `paths`) among themselves: the rms over pairs of seeds (i < j) of run j's
    mean relative difference to run i over the last `window` common steps. Two runs that share only the
    recipe differ by about this much; a candidate whose pairs spread as far moves each seed's trajectory as
    far as a new seed does, and pairing by seed removes none of the noise."""
    diffs = []
    for i, j in itertools.combinations(range(len(refs)), 2):
        steps = common_steps(refs[i], refs[j], key, paths[i], paths[j])
        diffs.append(paired_rel_diff(refs[i], refs[j], last_window(steps, window))[0])
    return math.sqrt(sum(d * d for d in diffs) / len(diffs))


def across_seeds(paths: list[str], names: list[str], key: str, window: int, target: float = 0.01) -> dict:
    """Each (reference, candidate) pair's mean relative difference over its last `window` logged steps, and
    the mean of those over the pairs with its 95 % t-interval (n - 1 degrees of freedom). Also the noise
    floor: the pairs' sd, the reference seeds' spread among themselves (`seed_floor`), and how many pairs a
    95 % half-width of `target` would take at that sd (normal approximation: (1.96 sd / target)^2)."""
    if len(paths) < 4 or len(paths) % 2:
        raise SystemExit("--across-seeds takes (reference, candidate) pairs of files, at least two pairs")
    title = f"{key}: {names[1]} against {names[0]}, one row per seed"
    table = Table(title, ["pair", "steps", "window diff %"])
    per_seed, refs = [], []
    for j in range(0, len(paths), 2):
        ref, cand = read_curve(paths[j], key), read_curve(paths[j + 1], key)
        refs.append(ref)
        steps = common_steps(ref, cand, key, paths[j], paths[j + 1])
        diff, _ = paired_rel_diff(ref, cand, last_window(steps, window))
        per_seed.append(diff)
        table.add(f"{os.path.basename(paths[j])} / {os.path.basename(paths[j + 1])}", steps[-1], 100 * diff)
    mean, se = mean_and_se(per_seed)
    half = t975(len(per_seed) - 1) * se
    sd = se * len(per_seed) ** 0.5
    floor = seed_floor(refs, paths[0::2], key, window)
    record = {
        "key": key,
        "labels": names,
        "window_steps": window,
        "per_seed_rel_diff": per_seed,
        "mean_rel_diff": mean,
        "mean_rel_diff_ci95": [mean - half, mean + half],
        "per_seed_sd": sd,
        "reference_seeds_rms_rel_diff": floor,
        "pairs_for_target": math.ceil((1.96 * sd / target) ** 2),
        "target_half_width": target,
        "pairs": [[paths[j], paths[j + 1]] for j in range(0, len(paths), 2)],
    }
    try:
        bar_plot(
            os.path.join(out_dir(), "compare_seeds.png"),
            f"{names[1]} - {names[0]}, last {window} steps: mean {100 * mean:+.2f} % "
            f"[{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}] over {len(per_seed)} seeds",
            [f"pair {j + 1}" for j in range(len(per_seed))],
            [100 * d for d in per_seed],
            "relative difference %",
        )
    except ImportError:
        print("matplotlib missing: no PNG")
    print(
        f"{len(per_seed)} seeds, last {window} steps: {names[1]} - {names[0]} = {100 * mean:+.2f} % "
        f"[{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}] (t interval over seeds)"
    )
    print(
        f"noise floor: the pairs' differences spread by {100 * sd:.2f} % (sd); two {names[0]} runs of "
        f"different seeds differ by {100 * floor:.2f} % (rms over {math.comb(len(per_seed), 2)} pairs). "
        f"A ±{100 * target:g} % 95 % half-width at this sd takes ~{record['pairs_for_target']} pairs."
    )
    finish("compare_seeds", [table], record)
    return record


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reference", nargs="?")
    p.add_argument("candidate", nargs="?")
    p.add_argument(
        "--across-seeds", nargs="+", metavar="RUN", help="(reference, candidate) pairs, one per seed"
    )
    p.add_argument("--labels", default="reference,candidate")
    p.add_argument("--key", default="ce", help="metric to compare (ce: next-token CE, no MTP or aux terms)")
    p.add_argument("--tail", type=int, default=5, help="logged steps averaged at the end")
    p.add_argument("--skip", type=int, default=50, help="steps left out of the largest-difference figure")
    p.add_argument("--window", type=int, default=100, help="steps of the paired mean difference, at the end")
    p.add_argument(
        "--target", type=float, default=0.01, help="--across-seeds: the 95 %% half-width to plan pairs for"
    )
    a = p.parse_args(argv)
    names = a.labels.split(",")
    if a.across_seeds:
        return across_seeds(a.across_seeds, names, a.key, a.window, a.target)
    if not (a.reference and a.candidate):
        p.error("give a reference and a candidate run, or --across-seeds")
    ref, cand = read_curve(a.reference, a.key), read_curve(a.candidate, a.key)
    steps = common_steps(ref, cand, a.key, a.reference, a.candidate)
    table = Table(f"{a.key}: {names[1]} against {names[0]}", ["step", names[0], names[1], "rel diff %"])
    every = max(1, len(steps) // 15)
    for s in steps[::every] + ([steps[-1]] if (len(steps) - 1) % every else []):
        table.add(s, ref[s], cand[s], 100 * (cand[s] - ref[s]) / ref[s])
    tail = steps[-a.tail :]
    ref_tail, cand_tail = sum(ref[s] for s in tail) / len(tail), sum(cand[s] for s in tail) / len(tail)
    late = [s for s in steps if s > a.skip] or steps
    worst = max(abs(cand[s] - ref[s]) / ref[s] for s in late)
    mean, half = paired_rel_diff(ref, cand, last_window(steps, a.window))
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
