"""The run report: a markdown page with the stage table, the eval table and PNG curves per stage."""

from __future__ import annotations

import math
from pathlib import Path

from r1core.train.checkpointing import atomic_write_text
from r1core.train.metrics import curves_from_log, plot_curves, read_jsonl

from .config import StageKind

TRAIN_KEYS = ["loss", "ce", "mtp", "grad_norm", "lr", "tokens_per_s"]
RL_KEYS = ["reward", "reward/accuracy", "reward/format", "reward/reward_model", "response_len", "kl", "entropy",
           "clip_frac_high", "groups_kept"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}"
    return str(v)


def _eval_plot(path: Path, evals: list[tuple[str, dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, _ in evals]
    keys = [k for k in ("pass@1", "greedy") if all(k in m for _, m in evals)]
    cons = next((k for k in evals[0][1] if k.startswith("cons@")), None)
    if cons and all(cons in m for _, m in evals):
        keys.append(cons)
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(names)), 3.4))
    width = 0.8 / max(len(keys), 1)
    for j, key in enumerate(keys):
        ax.bar([i + j * width for i in range(len(names))], [m[key] for _, m in evals], width, label=key)
    ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(names))], names, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.set_title("held-out evaluation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: Path, manifest, resolved, job) -> Path:
    stages_md = ["| stage | kind | status | seconds | metrics |", "| --- | --- | --- | --- | --- |"]
    evals, plots = [], []
    total = 0.0
    for spec, _ in resolved:
        st = manifest.stage(spec.name)
        metrics = st.get("metrics", {})
        total += st.get("seconds", 0.0)
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if isinstance(v, (int, float)))[:300]
        stages_md.append(f"| {spec.name} | {spec.kind.value} | {st.get('status', 'pending')} | "
                         f"{st.get('seconds', 0):.1f} | {shown} |")
        if spec.kind == StageKind.eval and st.get("status") == "done":
            evals.append((spec.name, metrics))
        log_path = run_dir / "stages" / spec.name / "metrics.jsonl"
        if log_path.exists():
            rows = read_jsonl(log_path)
            rl = spec.kind in (StageKind.reasoning_rl, StageKind.all_scenario_rl)
            png = run_dir / f"{spec.name}.png"
            plot_curves(png, f"{spec.name} ({spec.kind.value})", curves_from_log(rows, RL_KEYS if rl else TRAIN_KEYS),
                        smooth=5 if rl else 1)
            plots.append(png.name)
    lines = [f"# r1core run: pipeline `{job.pipeline.name}`", "",
             f"Model: dim {job.model.dim}, {job.model.n_layers} layers, {job.model.n_routed_experts} routed experts; "
             f"total stage time {total:.0f} s.", "", "## Stages", "", *stages_md, ""]
    if evals:
        keys = [k for k in evals[0][1] if isinstance(evals[0][1][k], (int, float)) and k not in ("problems",)]
        lines += ["## Evaluation (held-out problems)", "", "| model | " + " | ".join(keys) + " |",
                  "| --- | " + " | ".join("---" for _ in keys) + " |"]
        lines += [f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in keys) + " |" for name, m in evals]
        base = evals[0][1].get("pass@1")
        if base is not None and len(evals) > 1:  # every later model against the first evaluated one
            lines += ["", f"pass@1 against the base model ({evals[0][0]}: {base:.3f}):"]
            for name, m in evals[1:]:
                p1 = m.get("pass@1")
                if p1 is not None:
                    lines.append(f"- {name}: {p1:.3f} ({p1 - base:+.3f}, {'above' if p1 > base else 'NOT above'} the base)")
        _eval_plot(run_dir / "eval.png", evals)
        plots.insert(0, "eval.png")
        lines.append("")
    if plots:
        lines += ["## Curves", ""] + [f"![{p}]({p})" for p in plots]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
