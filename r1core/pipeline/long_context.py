"""Long-context extension (DeepSeek-V3 §4.3) and the passkey retrieval evaluation that shows it worked.

DeepSeek-V3 pretrains at 4K tokens with plain rotary embeddings, then extends the context in two
phases of continued pretraining with YaRN (Peng et al. 2023): 32K tokens, then 128K, both with
scale s = 40 over the original 4096, beta_fast 32, beta_slow 1 and the attention temperature
sqrt(t) = 0.1 ln s + 1. A `long_context` stage is one such phase: it trains the model it starts
from at `long_context.seq_len` under the YaRN settings of the stage's `model.*` (rope_factor,
original_seq_len, max_seq_len, beta_fast, beta_slow, mscale, mscale_all_dim), and its exported
config.json records them, so every later stage, and `hf_checkpoint=` / `load`, sees the extended
model. (Every other model stage keeps the rotary settings of the model it starts from.)

Whether the extension worked is a question a loss curve does not answer. The `passkey_eval` stage
asks it directly: documents of chosen lengths hide a random number at chosen depths and ask for it
at the end (r1core.data.passkey); the model retrieves it when its greedy prediction of every digit
is right. The same documents go to every passkey stage of a run (they depend on the seed, the
tokenizer, the lengths and the depths only), so the report compares models problem by problem.
For the model to know the question, pretraining mixes passkey documents that fit its own window
into the corpus (`data.passkey_fraction`); whether it can answer beyond that window is the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# passkey documents get their own stream, apart from everything else the seed draws
PASSKEY_SEED_OFFSET = 7919


ROPE_FIELDS = (
    "max_seq_len",
    "original_seq_len",
    "rope_theta",
    "rope_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
)


def rope_of(model_dir: str | Path) -> dict:
    """The rotary settings an exported model's config.json records (ModelArgs field -> value)."""
    from r1core.checkpoint.hf_config import parse_hf_config

    args = parse_hf_config(json.loads((Path(model_dir) / "config.json").read_text()))[0]
    return {f: getattr(args, f) for f in ROPE_FIELDS}


def original_context(args) -> int:
    """The context the model was pretrained at: YaRN's original length, else its whole context."""
    return args.original_seq_len if args.uses_yarn else args.max_seq_len


def rope_summary(args) -> dict:
    """The rotary settings a manifest records for a model stage."""
    return {
        "max_seq_len": args.max_seq_len,
        "original_seq_len": original_context(args),
        "rope_factor": args.rope_factor if args.uses_yarn else 1.0,
    }


@torch.no_grad()
def passkey_correct(model, docs, batch_size: int) -> list[float]:
    """1.0 where the model's greedy prediction of every digit of the key is right, else 0.0, per document.

    Teacher-forced: with the right digits before it, the argmax at each answer position is what greedy
    decoding would emit, so one forward pass scores a document."""
    device = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(docs), batch_size):
        batch = docs[i : i + batch_size]
        width = max(len(d.tokens) for d in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        for j, d in enumerate(batch):  # right-padding: causal attention never reads it
            x[j, : len(d.tokens)] = torch.tensor(d.tokens)
        pred = model(x.to(device)).argmax(-1).cpu()  # [B, T]: the token predicted after each position
        for j, d in enumerate(batch):
            s, n = d.answer_start, d.answer_len
            out.append(float(torch.equal(pred[j, s - 1 : s - 1 + n], x[j, s : s + n])))
    return out


def passkey_table(docs, correct: list[float]) -> dict:
    """Accuracy with its standard error per (length, depth) and per length."""
    from r1core.rl.stats import bootstrap_mean

    cells, lengths = {}, {}
    for d, c in zip(docs, correct):
        cells.setdefault((len(d.tokens), d.depth), []).append(c)
        lengths.setdefault(len(d.tokens), []).append(c)

    def est(values):
        e = bootstrap_mean(values, resamples=200)
        return {"accuracy": e.mean, "se": e.se, "n": e.n}

    return {
        "cells": [{"length": n, "depth": depth, **est(v)} for (n, depth), v in cells.items()],
        "by_length": {str(n): est(v) for n, v in lengths.items()},
    }


def heatmap(path: Path, table: dict, title: str) -> None:
    """Depth x length accuracy, one cell per (length, depth), annotated with accuracy and standard error."""
    from r1core.train.metrics import pyplot

    plt = pyplot()
    lengths = sorted({c["length"] for c in table["cells"]})
    depths = sorted({c["depth"] for c in table["cells"]})
    grid = torch.full((len(depths), len(lengths)), float("nan"))
    notes = {}
    for c in table["cells"]:
        i, j = depths.index(c["depth"]), lengths.index(c["length"])
        grid[i, j] = c["accuracy"]
        notes[i, j] = f"{c['accuracy']:.2f}\n±{c['se']:.2f}"
    fig, ax = plt.subplots(figsize=(1.3 * len(lengths) + 2, 0.6 * len(depths) + 1.6))
    im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), text in notes.items():
        ax.text(
            j, i, text, ha="center", va="center", fontsize=7, color="white" if grid[i, j] < 0.6 else "black"
        )
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="retrieval accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stage_passkey_eval(ctx):
    """Passkey retrieval of the model the stage starts from, over a depth x length grid."""
    from r1core.checkpoint.hf import from_pretrained
    from r1core.data.passkey import passkey_grid
    from r1core.train.checkpointing import atomic_write_json

    if ctx.init_model is None:
        raise ValueError(f"stage {ctx.spec.name!r}: nothing to evaluate (no earlier model stage)")
    cfg = ctx.job.passkey
    tok, _ = ctx.tokenizer()
    model = from_pretrained(ctx.init_model, dtype=ctx.dtype, device=ctx.device)
    model.eval()
    base = original_context(model.args)
    lengths = cfg.lengths or [base, 2 * base, 4 * base]
    docs = passkey_grid(tok, lengths, cfg.depths, cfg.per_cell, seed=ctx.job.seed + PASSKEY_SEED_OFFSET)
    correct = passkey_correct(model, docs, cfg.batch_size)
    table = passkey_table(docs, correct)
    record = {
        "model": ctx.init_model,
        **rope_summary(model.args),
        "lengths": lengths,
        "depths": cfg.depths,
        **table,
        "per_problem": correct,
    }
    path = ctx.stage_dir / "passkey.json"
    if ctx.is_main:
        atomic_write_json(path, record)
        heatmap(
            ctx.stage_dir / "passkey.png",
            table,
            f"{ctx.spec.name}: passkey retrieval "
            f"(context {rope_summary(model.args)['original_seq_len']}, YaRN x{record['rope_factor']:g})",
        )
    metrics = {"model": ctx.init_model, "rope_factor": record["rope_factor"]}
    for n, e in table["by_length"].items():
        metrics[f"passkey@{n}"] = e["accuracy"]
        metrics[f"passkey@{n}_se"] = e["se"]
    return {"passkey": str(path), "heatmap": str(ctx.stage_dir / "passkey.png")}, metrics


# ---------------------------------------------------------------------------- report


def passkey_section(run_dir: Path, manifest, resolved) -> list[str]:
    """The report's passkey tables (accuracy ± standard error per length) and paired comparisons
    against the first passkey stage and each stage's baseline, at every length both evaluated."""
    from r1core.rl.stats import paired_difference

    from .config import StageKind

    stages = []
    for spec, _ in resolved:
        st = manifest.stage(spec.name)
        path = st.get("outputs", {}).get("passkey") if spec.kind == StageKind.passkey_eval else None
        if path and Path(path).exists():
            stages.append((spec, json.loads(Path(path).read_text())))
    if not stages:
        return []
    lengths = sorted({int(n) for _, r in stages for n in r["by_length"]})
    lines = [
        "## Passkey retrieval (depth x length)",
        "",
        "Share of documents whose hidden key the model predicts digit for digit (greedy), ± standard error "
        "over documents; every passkey stage reads the same documents.",
        "",
        "| stage | model context | YaRN factor | "
        + " | ".join(f"{n} tokens" for n in lengths)
        + " | heatmap |",
        "| --- | --- | --- |" + " --- |" * (len(lengths) + 1),
    ]
    for spec, r in stages:
        cells = [_acc(r["by_length"].get(str(n))) for n in lengths]
        png = Path(manifest.stage(spec.name)["outputs"].get("heatmap", ""))
        link = (
            f"![{spec.name}]({png.relative_to(run_dir)})"
            if png.is_file() and png.is_relative_to(run_dir)
            else ""
        )
        lines.append(
            f"| {spec.name} | {r['original_seq_len']} | {r['rope_factor']:g} | "
            + " | ".join(cells)
            + f" | {link} |"
        )
    rows = _passkey_comparisons(stages, paired_difference)
    if rows:
        lines += [
            "",
            'Paired differences in retrieval accuracy (same documents); "above" or "below" only when '
            "the 95 % interval excludes zero.",
            "",
            "| stage | against | length | difference | standard error | interval | verdict |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['model']} | {r['against']} | {r['length']} | {r['diff']:+.3f} | {r['se']:.3f} | "
            f"[{r['lo']:+.3f}, {r['hi']:+.3f}] | **{r['verdict']}** |"
            for r in rows
        ]
    return lines + [""]


def _acc(e: dict | None) -> str:
    return "" if e is None else f"{e['accuracy']:.3f} ± {e['se']:.3f}"


def per_length(record: dict) -> dict[int, list[float]]:
    """A passkey record's per-document results grouped by document length, in document order."""
    out: dict[int, list[float]] = {}
    n_depths = len(record["depths"])
    per = len(record["per_problem"]) // max(len(record["lengths"]) * n_depths, 1)
    for i, n in enumerate(record["lengths"]):
        out[int(n)] = record["per_problem"][i * n_depths * per : (i + 1) * n_depths * per]
    return out


def _passkey_comparisons(stages, paired_difference) -> list[dict]:
    first, by_name = stages[0][0].name, {spec.name: r for spec, r in stages}
    out = []
    for spec, r in stages[1:]:
        for against in dict.fromkeys([first, spec.baseline or first]):
            base = by_name.get(against)
            if base is None or base["depths"] != r["depths"]:
                continue
            a, b = per_length(base), per_length(r)
            for n in sorted(set(a) & set(b)):
                if len(a[n]) != len(b[n]):
                    continue
                e = paired_difference(a[n], b[n])
                out.append(
                    {
                        "model": spec.name,
                        "against": against,
                        "length": n,
                        "diff": e.mean,
                        "se": e.se,
                        "lo": e.lo,
                        "hi": e.hi,
                        "verdict": e.verdict(),
                    }
                )
    return out
