"""The GRPO loop. It reads like the algorithm (slime-style):

    for each step:  sample prompts -> generate G responses each -> score -> group advantages
                    (drop uninformative groups, refill) -> old / reference log-probs
                    -> minibatch policy updates -> push weights to the rollout engine -> log, checkpoint

Resuming restores the engine (model, optimizer, schedule), the prompt order and the step; rollout
seeds derive from (run seed, step, refill round), so a resumed run continues exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from r1core import rewards
from r1core.data.resumable import EpochCursor
from r1core.data.tasks import Problem
from r1core.parallel.comm import run_on_rank0
from r1core.rollout import Sample, SamplingParams
from r1core.train.checkpointing import CheckpointManager, save_due
from r1core.train.metrics import MetricsLog, progress

from .algo import (
    build_policy_batch,
    dp_shard,
    group_advantages,
    informative_groups,
    overlong_shaping,
    split_rows,
    truncated_is_weights,
)
from .config import GRPOConfig
from .rewarding import Scorer


class PromptSampler(EpochCursor):
    """Epochs over a fixed problem list in a seeded order; resumable."""

    what = " the prompt order"

    def __init__(self, problems: Sequence[Problem], seed: int):
        if not problems:
            raise ValueError("no RL prompts: the problem set is empty")
        self.problems, self.seed = list(problems), seed
        self.epoch, self.pos = 0, 0

    def order(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return order

    def identity(self) -> dict:
        return {"seed": self.seed, "n": len(self.problems)}

    def take(self, n: int) -> list[Problem]:
        it = self.walk()
        out = [self.problems[next(it)] for _ in range(n)]
        if self.pos == len(self.problems):  # a finished epoch is saved as the next one's start, as before
            self.epoch, self.pos = self.epoch + 1, 0
        return out


@dataclass
class Group:
    problem: Problem
    samples: list[Sample]  # the G responses to `problem`, scored (Sample.reward, Sample.rewards)

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")


class GRPOTrainer:
    """Single-controller GRPO driver over a TrainEngine (policy), an optional frozen reference engine
    and a RolloutEngine. `render(problem) -> prompt ids` comes from the chat format."""

    def __init__(
        self,
        cfg: GRPOConfig,
        engine,
        rollout,
        render: Callable[[Problem], list[int]],
        problems: Sequence[Problem],
        out_dir: str | Path,
        *,
        ref_engine=None,
        pad_id: int = 0,
        seed: int = 0,
        scorer: Scorer | None = None,
        stop: list[str] | None = None,
        eval_fn: Callable[[int], dict] | None = None,
        is_main: bool = True,
    ):
        self.cfg, self.engine, self.rollout, self.render = cfg, engine, rollout, render
        self.ref_engine, self.pad_id, self.seed, self.eval_fn, self.is_main = (
            ref_engine,
            pad_id,
            seed,
            eval_fn,
            is_main,
        )
        self.sampler = PromptSampler(problems, seed)
        # Under torchrun only rank 0 generates, scores and evaluates (a GatheredRollout); the others get
        # its batch.
        self.generates = getattr(rollout, "generates", True) and engine.rank == 0
        # without a scorer: cfg's rewards under R1's answer rule (the pipeline passes the job's require_boxed)
        self.scorer = scorer or Scorer(cfg.rewards, cfg.reward_kwargs, require_boxed=True)
        self.out_dir = Path(out_dir)
        self.stop = stop or []
        if cfg.loss.beta > 0 and ref_engine is None:
            raise ValueError(f"rl.loss.beta={cfg.loss.beta} needs a reference model (ref_engine)")

    # ------------------------------------------------------------------ rollout
    def _sampling(self, step: int, round_: int) -> SamplingParams:
        c = self.cfg
        return c.sampling.params(stop=self.stop, seed=_seed(self.seed, step, round_))

    def collect(self, step: int) -> tuple[list[Group], dict]:
        """prompts_per_step informative groups (or what max_refill_rounds allowed), with stats."""
        c = self.cfg
        kept: list[Group] = []
        seen: list[Sample] = []  # every scored sample: reward statistics unbiased by the filtering
        n_generated = n_tokens = n_groups = 0
        t_generate = 0.0
        for round_ in range(c.max_refill_rounds + 1):
            need = c.prompts_per_step - len(kept)
            if need <= 0:
                break
            problems = self.sampler.take(need)
            t0 = time.perf_counter()
            samples = self.rollout.generate(
                [self.render(p) for p in problems], c.group_size, self._sampling(step, round_)
            )
            t_generate += time.perf_counter() - t0
            n_generated += len(samples)
            n_tokens += sum(len(s.response_ids) for s in samples)
            self.scorer.score_samples(samples, [p for p in problems for _ in range(c.group_size)])
            seen += samples
            for i, problem in enumerate(problems):
                g = Group(problem, samples[i * c.group_size : (i + 1) * c.group_size])
                n_groups += 1
                if not c.dynamic_sampling or bool(informative_groups(torch.tensor([g.rewards]))[0]):
                    kept.append(g)
            if not c.dynamic_sampling:
                break
        stats = {
            "generated": n_generated,
            "gen_tokens": n_tokens,
            "groups_seen": n_groups,
            "groups_kept": len(kept),
            "reward": sum(s.reward for s in seen) / len(seen),
            "t_generate_s": t_generate,
        }
        for name in seen[0].rewards:
            vals = [s.rewards[name] for s in seen if s.rewards[name] == s.rewards[name]]  # NaN: n/a here
            if vals:
                stats[f"reward/{name}"] = sum(vals) / len(vals)
        return kept, stats

    # ------------------------------------------------------------------ batch
    def make_batch(self, groups: list[Group]) -> tuple[dict, dict]:
        c = self.cfg
        samples = [s for g in groups for s in g.samples]
        totals = torch.tensor([g.rewards for g in groups], dtype=torch.float32)  # [N, G]
        lengths = torch.tensor([len(s.response_ids) for s in samples])
        truncated = torch.tensor([s.finish_reason == "length" for s in samples])
        delta, keep = overlong_shaping(
            lengths, truncated, c.sampling.max_new_tokens, c.overlong, c.overlong_buffer, c.overlong_penalty
        )
        shaped = totals + delta.view_as(totals)
        adv = group_advantages(shaped, c.advantage, c.adv_eps).flatten()
        batch = build_policy_batch(
            [s.prompt_ids for s in samples],
            [s.response_ids for s in samples],
            [s.logprobs for s in samples],
            adv.tolist(),
            keep.tolist(),
            self.pad_id,
        )
        stats = {
            "train_reward": shaped.mean().item(),
            "train_reward_std": shaped.std(dim=1).mean().item(),
            "response_len": lengths.float().mean().item(),
            "response_len_max": int(lengths.max()),
            "truncated_frac": truncated.float().mean().item(),
        }
        return batch, stats

    def _logprobs(self, engine, micro: list[dict]) -> list[torch.Tensor]:
        from r1core.train.objectives import TokenLogprobs

        return engine.forward_only(micro, TokenLogprobs(temperature=self._temperature()))

    def _temperature(self) -> float:
        """The sampler's temperature, which the log-probs and the loss use (greedy: the plain
        distribution)."""
        return self.cfg.sampling.temperature if self.cfg.sampling.temperature > 0 else 1.0

    def update(self, batch: dict) -> dict:
        from r1core.train.objectives import GRPOObjective

        c = self.cfg
        micro = split_rows(
            dp_shard(batch, self.engine.dp_rank, self.engine.dp_size),
            max(c.micro_batch_size // self.engine.dp_size, 1),
        )
        t0 = time.perf_counter()
        needs_old = c.minibatches > 1 or c.tis_cap is not None
        mismatch, n_tok = 0.0, 0.0
        if needs_old:
            for mb, lp in zip(micro, self._logprobs(self.engine, micro)):
                mb["old_logprobs"] = lp.float().cpu() * mb["mask"]
                # how far the sampler's probabilities drift from the trainer's (precision, kernels, staleness)
                mismatch += ((mb["old_logprobs"] - mb["sampler_logprobs"]).abs() * mb["mask"]).sum().item()
                n_tok += mb["mask"].sum().item()
                if c.tis_cap is not None:
                    mb["is_weights"] = (
                        truncated_is_weights(mb["old_logprobs"], mb["sampler_logprobs"], c.tis_cap)
                        * mb["mask"]
                    )
        if c.loss.beta > 0:
            for mb, lp in zip(micro, self._logprobs(self.ref_engine, micro)):
                mb["ref_logprobs"] = lp.float().cpu() * mb["mask"]
        t_logprob = time.perf_counter() - t0
        objective = GRPOObjective(c.loss, temperature=self._temperature(), norm_len=c.sampling.max_new_tokens)
        for mb in micro:
            mb.pop("sampler_logprobs", None)
        n_mini = min(c.minibatches, len(micro))
        per = -(-len(micro) // n_mini)
        t1 = time.perf_counter()
        agg: dict[str, float] = {}
        for i in range(0, len(micro), per):
            m = self.engine.train_step(micro[i : i + per], objective)
            for k, v in m.items():
                agg[k] = agg.get(k, 0.0) + float(v) / n_mini
        agg.update(t_logprob_s=t_logprob, t_update_s=time.perf_counter() - t1)
        # data-parallel ranks saw their own rows, only the last PP stage has log-probs; TP replicas scale
        # numerator and denominator alike, so a sum over every rank keeps the ratio exact
        mismatch, n_tok = self.engine.sum_over_ranks([mismatch, n_tok])
        if n_tok:
            agg["sampler_logprob_diff"] = mismatch / n_tok
        return agg

    def rollout_batch(self, step: int) -> tuple[dict, float, tuple[dict, dict] | None, dict]:
        """generate -> score -> advantages: (rollout stats, seconds, (batch, batch stats) or None when every
        group agreed, reward-failure reasons). Rank 0 runs it; `run` hands the result to every rank."""
        t0 = time.perf_counter()
        groups, gen = self.collect(step)
        t_rollout = time.perf_counter() - t0
        made = self.make_batch(groups) if groups else None
        return gen, t_rollout, made, rewards.STATS.flat(reset=True)

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        c = self.cfg
        ckpts = CheckpointManager(self.out_dir / "checkpoints", is_writer=self.is_main)
        state = ckpts.load(self.engine)
        start = 0
        if state is not None:
            start = state["step"]
            self.sampler.load_state_dict(state["sampler"])
            self.rollout.update_weights(self.engine.model)
        log = MetricsLog(self.out_dir / "metrics.jsonl", resume_step=start, enabled=self.is_main)
        bar = progress(c.steps, start, "grpo", enabled=self.is_main)
        last: dict = {}
        rewards.STATS.reset()
        for step in range(start + 1, c.steps + 1):
            t0 = time.perf_counter()
            gen, t_rollout, made, reasons = run_on_rank0(self.rollout_batch, step)
            if made is None:  # every group agreed: nothing to learn from this step (logged, not fatal)
                metrics = {**gen, "skipped": 1, "t_rollout_s": t_rollout}
            else:
                batch, stats = made
                upd = self.update(batch)
                t_refresh = time.perf_counter()
                self.rollout.update_weights(self.engine.model)
                if self.engine.device.type == "cuda":
                    torch.cuda.synchronize()  # the copies are asynchronous: time them, not their launch
                upd["t_refresh_s"] = time.perf_counter() - t_refresh  # ~0 when colocated (shared module)
                n_train = int(batch["mask"].sum())
                metrics = {
                    **stats,
                    **gen,
                    **upd,
                    "t_rollout_s": t_rollout,
                    "rollout_tok_s": gen["gen_tokens"] / max(t_rollout, 1e-9),
                    "train_tok_s": n_train / max(upd["t_update_s"], 1e-9),
                }
            metrics.update({f"reason/{k}": v for k, v in reasons.items()})
            if self.eval_fn is not None and self.generates and c.eval_every and step % c.eval_every == 0:
                metrics.update({f"eval/{k}": v for k, v in self.eval_fn(step).items()})
            metrics["t_step_s"] = time.perf_counter() - t0
            log.log(step, metrics)
            last = metrics
            bar.update(1)
            bar.set_postfix(
                reward=f"{metrics.get('reward', float('nan')):.3f}",
                acc=f"{metrics.get('reward/accuracy', float('nan')):.2f}",
                refresh=False,
            )
            if save_due(step, c.steps, c.save_every, c.last_save_model_only):
                ckpts.save(step, self.engine, {"sampler": self.sampler.state_dict()})
        bar.close()
        return last
