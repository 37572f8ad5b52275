"""The run report: a markdown page a reader can act on.

It holds, in order: what the built-in data is (when the run uses it), the stage table, the held-out
evaluation of every evaluated model with its 95 % interval and pass@k, the comparisons the pipeline
asks for (paired over the same problems, with a verdict decided by the interval, never by the sign),
and PNG figures: accuracy with error bars, pass@k curves, one page of RL curves (accuracy reward,
total reward, response length per RL stage) and the loss curves of the training stages.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from r1core.rl.stats import CONFIDENCE, pass_at_k_curve, paired_difference
from r1core.train.checkpointing import atomic_write_text
from r1core.train.metrics import curves_from_log, moving_average, plot_curves, pyplot, read_jsonl

from .config import RL_KINDS, StageKind
from .long_context import passkey_section

TRAIN_KEYS = ["loss", "ce", "val_ce", "mtp", "grad_norm", "lr", "tokens_per_s"]
RL_KEYS = [
    "reward",
    "reward/accuracy",
    "reward/format",
    "reward/reward_model",
    "response_len",
    "kl",
    "entropy",
    "clip_frac_high",
    "groups_kept",
]
# The one-page RL figure: (metrics key, panel title with units)
RL_PAGE = [
    ("reward/accuracy", "accuracy reward (share of samples correct)"),
    ("reward", "total reward (weighted sum)"),
    ("response_len", "mean response length (tokens)"),
]


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}"
    return str(v)


# ---------------------------------------------------------------------------- data description


def describe_builtin_data(job, kinds: set) -> list[str]:
    """Plain words on what the built-in corpus and problems hold, deliberate noise included; `kinds`:
    the stage kinds the pipeline runs (no corpus without pretraining, no cold start without its stage)."""
    d = job.data
    lines = []
    if not d.pretrain_files and StageKind.pretrain in kinds:
        tasks = ", ".join(f"{t} {dict(d.task_kwargs.get(t, {}))}" for t in d.tasks)
        lines.append(
            f"- **Pretraining corpus**: {d.corpus_docs} documents; {d.prose_fraction:.0%} are paragraphs of "
            f"plain English, the rest are problems of the built-in task(s) ({tasks}; a list means one "
            "value drawn per problem) with a response in R1's format (`<think>` … `</think>` "
            "`\\boxed{answer}`)."
        )
        if d.direct_fraction:
            lines.append(
                f"- **Two habits, on purpose.** {d.direct_fraction:.0%} of those responses answer at once "
                f"(an empty think block), and {d.direct_noise:.0%} of the direct answers are near misses "
                "(off by 1 to 9), as a guess would be. The others work the sum out step by step (one line "
                f"per addition, column by column); {d.answer_noise:.0%} of those end in a near miss. A base "
                "model pretrained on this keeps both habits (the evaluation's `direct_share` is the share "
                "of its samples with an empty think block) and is right far more often when it works the "
                "problem out: the accuracy reward can lift pass@1 and, by choosing the worked habit, the "
                "response length."
            )
        elif d.answer_noise:
            lines.append(
                f"- **Deliberate noise**: {d.answer_noise:.0%} of the worked solutions end in a near miss."
            )
    if d.passkey_fraction and kinds & {StageKind.pretrain, StageKind.long_context}:
        lines.append(
            f"- **Passkey documents**: {d.passkey_fraction:.0%} of the training rows of pretraining and of "
            "each long_context phase hold a passkey retrieval document instead (a five-digit key hidden in "
            "the prose, asked for at the end): in pretraining one that fits the window, in a long_context "
            "phase one as long as its sequence."
        )
    if (not d.rl_prompts_jsonl or not d.eval_jsonl) and kinds & {StageKind.eval, *RL_KINDS}:
        lines.append(
            "- **Problems**: RL prompts come from the train split and the held-out evaluation from the "
            "test split of the same generator; a problem's split is a hash of its text, so none is in both "
            "and none of the evaluation problems is in the pretraining corpus."
        )
    if not d.cold_start_jsonl and StageKind.cold_start_sft in kinds:
        lines.append(
            f"- **Cold start**: {d.cold_start_examples} worked solutions without noise (R1's small, "
            "readable long-CoT set)."
        )
    return ["## The built-in data", "", *lines, ""] if lines else []


# ---------------------------------------------------------------------------- evaluation


def _load_eval(st: dict) -> dict | None:
    path = st.get("outputs", {}).get("eval")
    if not path or not Path(path).exists():
        return None
    return json.loads(Path(path).read_text())


def _per_problem(ev: dict) -> list[float] | None:
    return ev.get("per_problem_pass1")


def _eval_table(evals: list[tuple[str, dict]]) -> list[str]:
    ks = sorted(
        {int(key[5:]) for _, m in evals for key in m if key.startswith("pass@") and key[5:].isdigit()}
    )
    ks = [k for k in ks if k > 1]
    tail = ("greedy", "response_len", "direct_share", "problems", "k")
    head = ["model", "pass@1", f"{CONFIDENCE:.0%} interval", *[f"pass@{k}" for k in ks], "cons@k", *tail]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, m in evals:
        interval = f"[{m['pass@1_lo']:.3f}, {m['pass@1_hi']:.3f}]" if "pass@1_lo" in m else "n/a"
        cells = [name, _fmt(m.get("pass@1")), interval, *[_fmt(m.get(f"pass@{k}", "")) for k in ks]]
        cells += [_fmt(m.get(f"cons@{m.get('k')}", "")), *[_fmt(m.get(c, "")) for c in tail]]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def comparisons(evals: list[tuple[str, dict, dict | None]], baselines: dict[str, str]) -> list[dict]:
    """Paired pass@1 differences: every eval against the first one, and against its named baseline."""
    if len(evals) < 2:
        return []
    first = evals[0][0]
    by_name = {name: ev for name, _, ev in evals}
    out = []
    for name, metrics, ev in evals[1:]:
        against = [first] + ([baselines[name]] if baselines.get(name) not in (None, "", first) else [])
        for base in against:
            a, b = _per_problem(by_name.get(base) or {}), _per_problem(ev or {})
            if a is None or b is None or len(a) != len(b):
                out.append(
                    {
                        "model": name,
                        "against": base,
                        "diff": None,
                        "verdict": "not comparable (different problems or no per-problem results)",
                    }
                )
                continue
            est = paired_difference(a, b)
            out.append(
                {
                    "model": name,
                    "against": base,
                    "diff": est.mean,
                    "se": est.se,
                    "lo": est.lo,
                    "hi": est.hi,
                    "verdict": est.verdict(),
                }
            )
    return out


def _comparison_lines(rows: list[dict]) -> list[str]:
    lines = [
        "## Did each stage help? (paired over the same problems)",
        "",
        f'Differences in pass@1; the {CONFIDENCE:.0%} interval is a bootstrap over problems. "above" or '
        '"below" only when the interval excludes zero.',
        "",
        "| model | against | difference | standard error | interval | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["diff"] is None:
            lines.append(f"| {r['model']} | {r['against']} | | | | {r['verdict']} |")
        else:
            lines.append(
                f"| {r['model']} | {r['against']} | {r['diff']:+.3f} | {r['se']:.3f} | "
                f"[{r['lo']:+.3f}, {r['hi']:+.3f}] | **{r['verdict']}** |"
            )
    return lines + [""]


def _eval_plot(path: Path, evals: list[tuple[str, dict]]) -> None:
    plt = pyplot()
    names = [n for n, _ in evals]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names)), 3.6))
    means = [m.get("pass@1", 0.0) for _, m in evals]
    err = [
        [m["pass@1"] - m.get("pass@1_lo", m["pass@1"]) for _, m in evals],
        [m.get("pass@1_hi", m["pass@1"]) - m["pass@1"] for _, m in evals],
    ]
    ax.bar(range(len(names)), means, 0.6, yerr=err, capsize=4, color="#4878a8", label="pass@1")
    greedy = [m.get("greedy") for _, m in evals]
    if all(g is not None for g in greedy):
        ax.scatter(range(len(names)), greedy, color="#d0743c", zorder=3, label="greedy")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (share of problems)")
    ax.set_title(f"held-out pass@1 with {CONFIDENCE:.0%} intervals")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _passk_plot(path: Path, evals: list[tuple[str, dict, dict | None]]) -> bool:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    drawn = False
    for name, _, ev in evals:
        if not ev or not ev.get("per_problem_correct") or ev.get("k", 1) < 2:
            continue
        curve = pass_at_k_curve(ev["per_problem_correct"], ev["k"])
        ax.plot(list(curve), list(curve.values()), marker="o", markersize=3, label=name)
        drawn = True
    if drawn:
        ax.set_xscale("log", base=2)
        ticks = sorted(
            {k for _, _, ev in evals if ev for k in (1, 2, 4, 8, 16, 32, 64) if k <= ev.get("k", 1)}
        )
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.set_xlabel("k (samples per problem)")
        ax.set_ylabel("pass@k (share of problems)")
        ax.set_ylim(0, 1)
        ax.set_title("pass@k: what sampling k times would solve")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


# ---------------------------------------------------------------------------- curves


def split_constant(series: dict[str, tuple[list, list]]) -> tuple[dict, dict[str, float]]:
    """(series that vary, {name: value} of the constant ones): a flat panel says nothing, so it is named
    instead."""
    varying, constant = {}, {}
    for name, (xs, ys) in series.items():
        finite = [y for y in ys if isinstance(y, (int, float)) and not math.isnan(y)]
        if not finite:
            continue
        if max(finite) == min(finite):
            constant[name] = finite[0]
        else:
            varying[name] = (xs, ys)
    return varying, constant


def _rl_page(path: Path, logs: list[tuple[str, list[dict]]]) -> None:
    """One figure: a row per RL stage, a column per RL_PAGE metric, raw and 5-step moving average."""
    plt = pyplot()
    fig, axes = plt.subplots(
        len(logs), len(RL_PAGE), figsize=(4.3 * len(RL_PAGE), 2.8 * len(logs)), squeeze=False
    )
    for row, (stage, rows) in enumerate(logs):
        series = curves_from_log(rows, [k for k, _ in RL_PAGE])
        for col, (key, title) in enumerate(RL_PAGE):
            ax = axes[row][col]
            xs, ys = series.get(key, ([], []))
            if xs:
                ax.plot(xs, ys, color="#9db7d5", linewidth=1)
                if len(ys) >= 5:
                    ax.plot(xs[4:], moving_average(ys, 5), color="#1f4e89", linewidth=1.6)
            ax.set_title(f"{stage}: {title}", fontsize=9)
            ax.set_xlabel("RL step", fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle("RL stages: accuracy reward, reward and response length per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stage_curves(run_dir: Path, spec, rows: list[dict]) -> tuple[str, str]:
    """A stage's detail PNG (panels that vary) and a note naming the constant ones."""
    rl = spec.kind in RL_KINDS
    series, constant = split_constant(curves_from_log(rows, RL_KEYS if rl else TRAIN_KEYS))
    png = run_dir / f"{spec.name}.png"
    plot_curves(
        png,
        f"{spec.name} ({spec.kind.value})",
        series,
        xlabel="RL step" if rl else "optimizer step",
        smooth=5 if rl else 1,
    )
    note = ""
    if constant:
        note = f"{spec.name}: constant throughout, not plotted: " + ", ".join(
            f"{k} = {_fmt(float(v))}" for k, v in constant.items()
        )
    return png.name, note


# ---------------------------------------------------------------------------- the page


def write_report(run_dir: Path, manifest, resolved, job) -> Path:
    stages_md = ["| stage | kind | status | seconds | metrics |", "| --- | --- | --- | --- | --- |"]
    evals, plots, notes, rl_logs, baselines = [], [], [], [], {}
    total = 0.0
    for spec, _ in resolved:
        st = manifest.stage(spec.name)
        metrics = st.get("metrics", {})
        total += st.get("seconds", 0.0)
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if isinstance(v, (int, float)))[:300]
        stages_md.append(
            f"| {spec.name} | {spec.kind.value} | {st.get('status', 'pending')} | "
            f"{st.get('seconds', 0):.1f} | {shown} |"
        )
        if spec.kind == StageKind.eval and st.get("status") == "done":
            evals.append((spec.name, metrics, _load_eval(st)))
            baselines[spec.name] = spec.baseline
        log_path = run_dir / "stages" / spec.name / "metrics.jsonl"
        if log_path.exists():
            rows = read_jsonl(log_path)
            png, note = _stage_curves(run_dir, spec, rows)
            plots.append(png)
            if note:
                notes.append(note)
            if spec.kind in RL_KINDS:
                rl_logs.append((spec.name, rows))
    lines = [
        f"# r1core run: pipeline `{job.pipeline.name}`",
        "",
        f"Model: dim {job.model.dim}, {job.model.n_layers} layers, "
        f"{job.model.n_routed_experts} routed experts; "
        f"total stage time {total:.0f} s.",
        "",
        *describe_builtin_data(job, {s.kind for s, _ in resolved}),
        "## Stages",
        "",
        *stages_md,
        "",
    ]
    if evals:
        plain = [(n, m) for n, m, _ in evals]
        e = job.eval.sampling
        lines += [
            f"## Held-out evaluation ({evals[0][1].get('problems', '?')} problems, k samples each at "
            f"temperature {e.temperature}, top-p {e.top_p}; pass@1 is the mean share of correct samples)",
            "",
            *_eval_table(plain),
            "",
        ]
        lines += _comparison_lines(comparisons(evals, baselines))
        _eval_plot(run_dir / "eval.png", plain)
        figures = ["eval.png"]
        if _passk_plot(run_dir / "pass_at_k.png", evals):
            figures.append("pass_at_k.png")
        plots = figures + plots
    lines += passkey_section(run_dir, manifest, resolved)
    if rl_logs:
        _rl_page(run_dir / "rl.png", rl_logs)
        plots.insert(1 if evals else 0, "rl.png")
    if plots:
        lines += ["## Figures", ""] + [f"![{p}]({p})" for p in plots]
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
