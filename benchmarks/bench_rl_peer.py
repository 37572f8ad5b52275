"""Same-run peer benchmark of GRPO: TRL's GRPOTrainer against r1core's, from one base model.

Both trainers start from the same HF DeepSeek-V3 directory (the `pretrain` stage of an `r1core run`),
see the same prompts at the same steps (r1core's PromptSampler order, handed to TRL unshuffled), are
rewarded by the same function (r1core's accuracy Scorer with R1's boxed rule, on the response decoded
by r1core's tokenizer) and spend the same sample budget (steps x prompts x group; r1core's dynamic
sampling is off). One `PeerSettings` holds every shared knob; `r1core_configs` and `trl_kwargs` map it
to each side, and `UNMATCHED` lists what cannot be made equal. The base and both trained models are
then evaluated on the same held-out problems with r1core's `evaluate` (k samples at temperature 0.6,
the same sampling seeds), and each gain is the paired bootstrap difference over problems
(r1core.rl.stats), so "no significant change" means the 95 % interval straddles zero.

Why the comparison is fair on the loss: TRL's `loss_type="dapo"` averages over every completion token
of the generation batch, which is r1core's `rl.loss.agg=token_mean`; with beta 0, one update per batch
(r1core `minibatches=1`, TRL `num_iterations=1`) and no sampler correction (r1core `tis_cap=None`) both
take the on-policy gradient, and on one batch the two agree to 4e-6 (FACTS.md). What remains different
is sampling noise, the generation engine (r1core's BuiltinEngine vs transformers' `generate`) and the
training step's implementation, which is what seconds per step measures.

  python benchmarks/bench_rl_peer.py --tiny                     # CPU: makes a tiny base, then both runs
  python benchmarks/bench_rl_peer.py --tiny --run-dir runs/x    # CPU, a finished run as the base
  python benchmarks/bench_rl_peer.py --run-dir runs/small       # GPU, larger budget (untested)
  python benchmarks/bench_rl_peer.py --speed-only --base-preset small --pretrain-steps 30 --steps 6
      # GPU speed comparison only: seconds per step, samples/s and r1core's step split, no evals

Speed-only mode skips the held-out evaluations and prints, per provider, seconds per step (median over
the steps after the first, which carries compilation and autotuning) and samples/s, and r1core's step
split from its metrics: generation, scoring, trainer log-prob pass, update, weight refresh. Where
`datasets` (pyarrow: a 55 MB wheel) or `pandas` cannot be installed, `--standins auto` (the default)
replaces them with the list-backed stand-ins of benchmarks/standins.py before TRL is imported.

Needs the bench extra (`pip install -e ".[bench]"`: trl, datasets, accelerate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Table, env_info, error_report  # noqa: E402

from r1core.data import ChatFormat, Tokenizer  # noqa: E402
from r1core.data.tasks import Problem  # noqa: E402
from r1core.rl.config import AdvantageEstimator, GRPOConfig, LossAgg, Overlong, PolicyLossConfig  # noqa: E402
from r1core.rl.stats import Estimate, bootstrap_mean, paired_difference  # noqa: E402
from r1core.rollout.types import SamplingConfig  # noqa: E402
from r1core.train.engine import LRSchedule, OptimConfig  # noqa: E402

BENCH = "rl_peer"
PIPELINE = "pipeline.stages=[{name: prepare, kind: prepare},{name: pretrain, kind: pretrain}]"


@dataclass(kw_only=True)
class PeerSettings:
    """Everything both trainers must share; each side's config is derived from this alone."""

    steps: int
    prompts_per_step: int
    group_size: int  # TRL: num_generations
    max_new_tokens: int = 48  # TRL: max_completion_length
    temperature: float = 1.0
    lr: float = 3e-5  # constant, no warmup
    eps_low: float = 0.2  # TRL: epsilon
    eps_high: float = 0.28  # TRL: epsilon_high
    weight_decay: float = 0.0  # 0: HF's Trainer exempts biases and norms from decay, r1core does not
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    adv_eps: float = 1e-4  # TRL adds a fixed 1e-4 to the group std
    seed: int = 0
    eval_problems: int = 100
    eval_k: int = 4

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


# CPU: minutes on 2 cores. GPU: the demo's RL budget (small preset base from --run-dir).
PRESETS = {
    "tiny": dict(steps=15, prompts_per_step=8, group_size=8, eval_problems=100),
    "gpu": dict(steps=30, prompts_per_step=16, group_size=8, eval_problems=200),
}

UNMATCHED = [
    "sampling seeds and engines: r1core's BuiltinEngine vs transformers' generate draw different samples",
    (
        "r1core's aux-loss-free expert-bias update (bias_update_speed) runs after each step; "
        "HF's model keeps the bias"
    ),
    "TRL's model is transformers' DeepseekV3ForCausalLM (no MTP layer; unused by the GRPO loss either way)",
    "on GPU: r1core trains bf16 weights with fp32 master copies, TRL fp32 weights under bf16 autocast",
]


def r1core_configs(s: PeerSettings) -> tuple[GRPOConfig, OptimConfig]:
    """r1core's GRPO and optimizer settings for the shared settings (DAPO loss, no dynamic sampling)."""
    rl = GRPOConfig(
        steps=s.steps,
        lr=s.lr,
        prompts_per_step=s.prompts_per_step,
        group_size=s.group_size,
        sampling=SamplingConfig(
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=1.0, top_k=0
        ),
        advantage=AdvantageEstimator.grpo,
        adv_eps=s.adv_eps,
        dynamic_sampling=False,
        overlong=Overlong.none,
        loss=PolicyLossConfig(
            beta=0.0, eps_low=s.eps_low, eps_high=s.eps_high, dual_clip=None, agg=LossAgg.token_mean
        ),
        tis_cap=None,
        minibatches=1,
        micro_batch_size=s.samples_per_step,
        rewards={"accuracy": 1.0},
        reward_kwargs={},
        eval_every=0,
        save_every=s.steps + 1,
    )
    optim = OptimConfig(
        lr=s.lr,
        warmup_steps=0,
        total_steps=max(s.steps, 1),
        schedule=LRSchedule.constant,
        weight_decay=s.weight_decay,
        betas=s.betas,
        eps=1e-8,
        grad_clip=s.grad_clip,
    )
    return rl, optim


def grpo_config_kwargs(trl, s: PeerSettings, output_dir: str, cuda: bool) -> dict:
    """trl_kwargs for the installed GRPOConfig: transformers before 5.2x names activation checkpointing
    `gradient_checkpointing` (the GPU machines' 5.17 has no `activation_checkpointing`)."""
    kw = trl_kwargs(s, output_dir, cuda)
    fields = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    if "activation_checkpointing" not in fields:
        kw["gradient_checkpointing"] = kw.pop("activation_checkpointing")
    return kw


def trl_kwargs(s: PeerSettings, output_dir: str, cuda: bool) -> dict:
    """Keyword arguments of trl.GRPOConfig for the shared settings (no trl import needed)."""
    return dict(
        output_dir=output_dir,
        max_steps=s.steps,
        per_device_train_batch_size=s.samples_per_step,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=s.group_size,
        max_completion_length=s.max_new_tokens,
        temperature=s.temperature,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        use_vllm=False,
        loss_type="dapo",
        beta=0.0,
        epsilon=s.eps_low,
        epsilon_high=s.eps_high,
        scale_rewards="group",
        mask_truncated_completions=False,
        learning_rate=s.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=s.weight_decay,
        adam_beta1=s.betas[0],
        adam_beta2=s.betas[1],
        adam_epsilon=1e-8,
        max_grad_norm=s.grad_clip,
        activation_checkpointing=False,
        shuffle_dataset=False,
        seed=s.seed,
        use_cpu=not cuda,
        bf16=cuda,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        log_completions=False,
    )


# ---------------------------------------------------------------------------- the common base


@dataclass
class Base:
    run_dir: Path
    model_dir: Path
    tokenizer_file: Path
    tok: Tokenizer
    fmt: ChatFormat
    rl_problems: list[Problem]
    eval_problems: list[Problem]

    def render(self, problem: Problem) -> list[int]:
        return self.tok.encode(self.fmt.render_prompt(problem.prompt))

    def max_len(self, new_tokens: int) -> int:
        longest = max(len(self.render(p)) for p in self.rl_problems[:1000] + self.eval_problems)
        return longest + new_tokens + 8


def make_base(out: Path, preset: str, pretrain_steps: int, overrides: list[str]) -> Path:
    """An `r1core run` of only prepare + pretrain; reruns reuse it (finished stages are skipped)."""
    run_dir = (out / f"base-{preset}").resolve()
    cmd = [
        sys.executable,
        "-m",
        "r1core.cli",
        "run",
        f"run_dir={run_dir}",
        PIPELINE,
        f"model={preset}",
        "seed=0",
        f"pretrain.steps={pretrain_steps}",
        *overrides,
    ]
    print(f"base: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=out)
    return run_dir


def load_base(run_dir: Path, eval_problems: int) -> Base:
    from r1core.pipeline.prepare import read_problems

    prep, model_dir = run_dir / "stages" / "prepare", run_dir / "stages" / "pretrain" / "model"
    missing = [
        p
        for p in (prep / "tokenizer.json", prep / "rl_prompts.jsonl", prep / "eval.jsonl", model_dir)
        if not p.exists()
    ]
    if missing:
        raise SystemExit(f"--run-dir {run_dir}: not a finished prepare + pretrain run (missing {missing[0]})")
    tok = Tokenizer.from_file(prep / "tokenizer.json")
    return Base(
        run_dir,
        model_dir,
        prep / "tokenizer.json",
        tok,
        ChatFormat.for_tokenizer(tok),
        read_problems(prep / "rl_prompts.jsonl"),
        read_problems(prep / "eval.jsonl")[:eval_problems],
    )


def prompt_sequence(base: Base, s: PeerSettings) -> list[Problem]:
    """The problems r1core's trainer will draw, in order (one take per step without dynamic sampling)."""
    from r1core.rl.trainer import PromptSampler

    return PromptSampler(base.rl_problems, s.seed).take(s.steps * s.prompts_per_step)


def trl_reward(problems: list[Problem], tok, eos_id: int):
    """TRL reward function: r1core's accuracy on the completion decoded by r1core's tokenizer up to eos,
    i.e. exactly the text r1core's rollout hands its own Scorer."""
    from r1core.rl.rewarding import Scorer

    scorer = Scorer({"accuracy": 1.0}, require_boxed=True)

    def accuracy(prompts, completions, completion_ids, problem_idx, **_):
        out = []
        for ids, i in zip(completion_ids, problem_idx):
            ids = list(ids)
            ids = ids[: ids.index(eos_id)] if eos_id in ids else ids
            out.append(scorer.score(tok.decode(ids), problems[i])[0])
        return out

    return accuracy


# ---------------------------------------------------------------------------- training


@dataclass
class Trained:
    provider: str
    model_dir: Path
    step_s: list[float]
    train_reward: float
    split: dict[str, float] = dataclasses.field(default_factory=dict)  # median seconds per step part


def train_r1core(
    base: Base, s: PeerSettings, work: Path, device: torch.device, dtype: torch.dtype, moe_impl: str = "ref"
) -> Trained:
    """stage_rl's construction, without the pipeline: engine from the base, BuiltinEngine rollout,
    GRPOTrainer."""
    from r1core.checkpoint.hf import hf_model_args
    from r1core.model.args import Impl
    from r1core.parallel.config import ParallelConfig
    from r1core.rl.rewarding import Scorer
    from r1core.rl.trainer import GRPOTrainer
    from r1core.rollout import BuiltinEngine
    from r1core.train.engine import build_engine
    from r1core.train.metrics import read_jsonl

    rl, optim = r1core_configs(s)
    args, _, _ = hf_model_args(base.model_dir)
    args.moe_impl = Impl(moe_impl)  # training-only (not in the HF config): triton on the GPU, as the pipeline
    engine = build_engine(args, ParallelConfig(), optim, device=device, dtype=dtype, seed=s.seed)
    engine.load_hf(base.model_dir)
    rollout = BuiltinEngine(
        engine.model, tokenizer=base.tok, max_batch=256, max_len=base.max_len(s.max_new_tokens)
    )
    out = work / "r1core"
    scorer = Scorer(rl.rewards, rl.reward_kwargs, require_boxed=True)  # the rule trl_reward applies
    GRPOTrainer(
        rl,
        engine,
        rollout,
        base.render,
        base.rl_problems,
        out,
        pad_id=base.tok.pad_id,
        seed=s.seed,
        scorer=scorer,
    ).run()
    rows = read_jsonl(out / "metrics.jsonl")
    engine.export_hf(out / "model")
    return Trained(
        "r1core",
        out / "model",
        [r["t_step_s"] for r in rows],
        statistics.fmean(r["reward/accuracy"] for r in rows),
        step_split(rows[1:] or rows),
    )


def step_split(rows: list[dict]) -> dict[str, float]:
    """Median seconds per step of each part of r1core's GRPO step (metrics.jsonl fields)."""

    def med(fn):
        vals = [fn(r) for r in rows]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else float("nan")

    return {
        "rollout": med(lambda r: r.get("t_generate_s")),
        "scoring": med(lambda r: r["t_rollout_s"] - r["t_generate_s"] if "t_generate_s" in r else None),
        "logprob": med(lambda r: r.get("t_logprob_s")),
        "update": med(lambda r: r.get("t_update_s")),
        "refresh": med(lambda r: r.get("t_refresh_s")),
        "step": med(lambda r: r.get("t_step_s")),
    }


def train_trl(base: Base, s: PeerSettings, work: Path, cuda: bool) -> Trained:
    import datasets
    import transformers
    import trl

    transformers.logging.set_verbosity_error()  # r1core's MTP layer is "unexpected" to HF
    special = base.tok.special_tokens
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(base.tokenizer_file),
        bos_token=special["bos"],
        eos_token=special["eos"],
        pad_token=special.get("pad", special["eos"]),
    )
    problems = prompt_sequence(base, s)
    texts = [base.fmt.render_prompt(p.prompt) for p in problems]
    if hf_tok(text=texts[0])["input_ids"] != base.render(
        problems[0]
    ):  # TRL tokenizes the rendered text itself
        raise RuntimeError("the HF tokenizer does not reproduce r1core's prompt ids")
    data = datasets.Dataset.from_list(
        [{"prompt": t, "answer": p.answer, "problem_idx": i} for i, (t, p) in enumerate(zip(texts, problems))]
    )
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(base.model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = base.tok.eos_id  # stop where r1core's rollout stops, nowhere else
    reward = trl_reward(problems, base.tok, base.tok.eos_id)
    timer = _step_timer()
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        train_dataset=data,
        processing_class=hf_tok,
        args=trl.GRPOConfig(**grpo_config_kwargs(trl, s, str(work / "trl"), cuda)),
        callbacks=[timer],
    )
    trainer.train()
    trainer.model.save_pretrained(work / "trl" / "model")
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return Trained(f"trl {trl.__version__}", work / "trl" / "model", timer.step_s, statistics.fmean(rewards))


def _step_timer():
    """A transformers callback timing whole optimizer steps (TRL generates inside the step)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_s: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self._t0)

    return StepTimer()


# ---------------------------------------------------------------------------- evaluation and summary


def evaluate_model(name: str, model_dir: Path, base: Base, s: PeerSettings, device, dtype) -> list[float]:
    """Per-problem pass@1 (correct / k) of one model on the held-out problems, same seed for every model."""
    from r1core.checkpoint.hf import from_pretrained
    from r1core.rl.evaluate import EvalConfig, evaluate
    from r1core.rollout import BuiltinEngine

    with warnings.catch_warnings():  # TRL's save has no MTP layer: the loader says so, and that is expected
        warnings.simplefilter("ignore")
        model = from_pretrained(model_dir, dtype=dtype, device=device)
    rollout = BuiltinEngine(model, tokenizer=base.tok, max_batch=256, max_len=base.max_len(s.max_new_tokens))
    sampling = dataclasses.replace(EvalConfig().sampling, max_new_tokens=s.max_new_tokens)
    cfg = EvalConfig(problems=s.eval_problems, k=s.eval_k, sampling=sampling, greedy=False)
    t0 = time.perf_counter()
    metrics, rows = evaluate(rollout, base.render, base.eval_problems, cfg, seed=s.seed)
    dt = time.perf_counter() - t0
    print(
        f"eval {name}: pass@1 {metrics['pass@1']:.3f} on {len(rows)} problems x {s.eval_k} "
        f"in {dt:.0f} s ({len(rows) * s.eval_k / dt:.1f} samples/s)",
        flush=True,
    )
    return [r["pass1"] for r in rows]


def _est(e: Estimate) -> dict:
    return {"mean": e.mean, "se": e.se, "lo": e.lo, "hi": e.hi, "n": e.n}


def summarize(s: PeerSettings, base_pass: list[float], runs: list[tuple[Trained, list[float]]]) -> dict:
    """The record printed as the last line: settings, base accuracy, one entry per provider, head-to-head."""
    providers = []
    for run, after in runs:
        step = statistics.median(run.step_s)
        gain = paired_difference(base_pass, after, seed=s.seed)
        providers.append(
            {
                "provider": run.provider,
                "s_per_step": step,
                "s_per_step_mean": statistics.fmean(run.step_s),
                "steps_timed": len(run.step_s),
                "samples_per_s": s.samples_per_step / step,
                "train_reward": run.train_reward,
                "pass1_after": _est(bootstrap_mean(after, seed=s.seed)),
                "gain": _est(gain),
                "verdict": gain.verdict(),
            }
        )
    record = {
        "settings": dataclasses.asdict(s),
        "unmatched": UNMATCHED,
        "pass1_base": _est(bootstrap_mean(base_pass, seed=s.seed)),
        "providers": providers,
    }
    if len(runs) == 2:  # second minus first, problem by problem
        diff = paired_difference(runs[0][1], runs[1][1], seed=s.seed)
        record["head_to_head"] = {
            "what": f"{runs[1][0].provider} - {runs[0][0].provider}",
            **_est(diff),
            "verdict": diff.verdict(),
        }
    return record


def _interval(e: dict) -> str:
    return f"{e['mean']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}]"


def table(record: dict) -> Table:
    s = record["settings"]
    t = Table(
        f"GRPO peer: {s['steps']} steps x {s['prompts_per_step']} prompts x {s['group_size']} samples, "
        f"held-out pass@1 over {record['pass1_base']['n']} problems x {s['eval_k']}",
        ["provider", "s/step", "samples/s", "pass@1 base -> after", "gain [95% CI]", "verdict"],
    )
    base = record["pass1_base"]["mean"]
    for p in record["providers"]:
        t.add(
            p["provider"],
            p["s_per_step"],
            p["samples_per_s"],
            f"{base:.3f} -> {p['pass1_after']['mean']:.3f}",
            _interval(p["gain"]),
            p["verdict"],
        )
    return t


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = record["providers"]
    means = [p["gain"]["mean"] for p in ps]
    err = [[m - p["gain"]["lo"] for m, p in zip(means, ps)], [p["gain"]["hi"] - m for m, p in zip(means, ps)]]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar(range(len(ps)), means, yerr=err, capsize=6, color="#4C72B0")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(ps)), [p["provider"] for p in ps])
    ax.set_ylabel("held-out pass@1 gain over base (95 % CI)")
    ax.set_title(f"GRPO peer, {record['settings']['steps']} steps, same base and budget", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(record: dict, out: Path) -> None:
    """Table, notes, JSON and PNG under `out`; the JSON is the last line printed."""
    print(table(record).render(), end="\n\n")
    if "head_to_head" in record:
        h = record["head_to_head"]
        print(f"after training, {h['what']}: {_interval(h)} ({h['verdict']})")
    print("not matched: " + "; ".join(record["unmatched"]))
    with open(out / f"{BENCH}.json", "w") as f:
        json.dump(record, f, indent=1)
    plot(record, out / f"{BENCH}.png")
    print(json.dumps(record))


# ---------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU-sized run (tiny preset base, small budget)")
    p.add_argument("--run-dir", help="finished r1core run (prepare + pretrain) used as the common base")
    p.add_argument("--out", default="benchmarks/out", help="JSON, PNG and a made base go here")
    for name in (
        "steps",
        "prompts-per-step",
        "group-size",
        "max-new-tokens",
        "eval-problems",
        "eval-k",
        "seed",
    ):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument(
        "--pretrain-steps", type=int, default=400, help="base made without --run-dir (the demo's 400)"
    )
    p.add_argument(
        "--base-override", action="append", default=[], help="extra Hydra override for the made base"
    )
    p.add_argument(
        "--base-preset", help="model preset of a made base (default: tiny with --tiny, else small)"
    )
    p.add_argument("--speed-only", action="store_true", help="seconds per step and r1core's split, no evals")
    p.add_argument(
        "--moe-impl", choices=["ref", "triton", "cuda"], help="r1core's MoE (default: triton on GPU)"
    )
    p.add_argument(
        "--standins",
        choices=["auto", "force", "off"],
        default="auto",
        help="list-backed stand-ins for datasets/pandas where missing (force: always, a CPU check)",
    )
    return p.parse_args(argv)


def settings_from_args(a: argparse.Namespace) -> PeerSettings:
    kw = dict(PRESETS["tiny" if a.tiny else "gpu"])
    for f in dataclasses.fields(PeerSettings):
        if getattr(a, f.name, None) is not None:
            kw[f.name] = getattr(a, f.name)
    return PeerSettings(**kw)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    s = settings_from_args(a)
    if a.standins != "off":
        import standins

        replaced = standins.install(force=a.standins == "force")
        if replaced:
            print(f"stand-ins for {replaced} (benchmarks/standins.py)", flush=True)
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit('bench_rl_peer needs TRL: pip install -e ".[bench]"') from None
    cuda = torch.cuda.is_available() and not a.tiny
    a.moe_impl = a.moe_impl or ("triton" if cuda else "ref")
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.run_dir:
        run_dir = Path(a.run_dir).resolve()
    elif a.tiny or a.base_preset or a.speed_only:
        preset = a.base_preset or ("tiny" if a.tiny else "small")
        run_dir = make_base(out, preset, a.pretrain_steps, a.base_override)
    else:
        raise SystemExit(
            "without --tiny, give --run-dir (a finished prepare + pretrain run, e.g. model=small)"
        )
    base = load_base(run_dir, s.eval_problems)
    print(f"settings: {s}", flush=True)
    if a.speed_only:
        return speed_only(base, s, device, dtype, cuda, run_dir, out, a.moe_impl)
    with tempfile.TemporaryDirectory(prefix="rl_peer-") as tmp:
        work = Path(tmp)
        print("[1/5] held-out eval of the base", flush=True)
        base_pass = evaluate_model("base", base.model_dir, base, s, device, dtype)
        print("[2/5] r1core GRPO", flush=True)
        ours = train_r1core(base, s, work, device, dtype, a.moe_impl)
        print("[3/5] TRL GRPO", flush=True)
        theirs = train_trl(base, s, work, cuda)
        runs = []
        for i, run in enumerate((theirs, ours)):
            print(f"[{4 + i}/5] held-out eval after {run.provider}", flush=True)
            runs.append((run, evaluate_model(run.provider, run.model_dir, base, s, device, dtype)))
    record = {
        "bench": BENCH,
        **env_info(),
        "run_dir": str(run_dir),
        "device_kind": device.type,
        **summarize(s, base_pass, runs),
    }
    report(record, out)
    return record


def speed_only(
    base: Base, s: PeerSettings, device, dtype, cuda: bool, run_dir: Path, out: Path, moe_impl: str
) -> dict:
    """Both trainers on the same base, prompts and budget; step times only. A failing provider is reported,
    the other still prints."""
    runs, errors = [], {}
    with tempfile.TemporaryDirectory(prefix="rl_peer-") as tmp:
        for name, fn in (
            ("r1core", lambda: train_r1core(base, s, Path(tmp), device, dtype, moe_impl)),
            ("trl", lambda: train_trl(base, s, Path(tmp), cuda)),
        ):
            print(f"[{name}] GRPO, {s.steps} steps", flush=True)
            try:
                runs.append(fn())
            except Exception as e:  # noqa: BLE001 - keep the other provider's figures
                errors[name] = error_report(e)[:2000]
                print(f"[{name}] failed: {errors[name]}", flush=True)
    t = Table(
        f"GRPO step speed: {s.prompts_per_step} prompts x {s.group_size} samples, "
        f"{s.max_new_tokens} new tokens, {s.steps} steps (median of steps 2..)",
        [
            "provider",
            "s/step",
            "samples/s",
            "x slowest",
            "rollout",
            "scoring",
            "log-prob",
            "update",
            "refresh",
        ],
    )
    providers = []
    for run in runs:
        step = statistics.median(run.step_s[1:] or run.step_s)
        providers.append(
            {
                "provider": run.provider,
                "s_per_step": step,
                "samples_per_s": s.samples_per_step / step,
                "step_s": run.step_s,
                "train_reward": run.train_reward,
                "split": run.split,
            }
        )
    slowest = max((p["s_per_step"] for p in providers), default=float("nan"))
    for p in providers:
        p["x_slowest"] = slowest / p["s_per_step"]
        sp = p["split"]
        t.add(
            p["provider"],
            p["s_per_step"],
            p["samples_per_s"],
            p["x_slowest"],
            *(sp.get(k, "-") for k in ("rollout", "scoring", "logprob", "update", "refresh")),
        )
    print(t.render(), end="\n\n")
    record = {
        "bench": BENCH + "_speed",
        **env_info(),
        "run_dir": str(run_dir),
        "device_kind": device.type,
        "settings": dataclasses.asdict(s),
        "unmatched": UNMATCHED,
        "providers": providers,
        "errors": errors,
    }
    with open(out / f"{BENCH}_speed.json", "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
