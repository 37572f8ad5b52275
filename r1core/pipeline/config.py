"""The job schema for `r1core run` and its registration in Hydra's ConfigStore.

Only this module and the CLI see Hydra / OmegaConf: `to_job` turns a composed DictConfig into
typed dataclasses at once, and every stage gets its own resolved JobConfig (`stage_job`: the job
with that stage's `overrides` applied), checked by `validate_pipeline` before any work starts.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from r1core.model.args import ModelArgs, model_shape_diff, presets
from r1core.parallel.config import ParallelConfig
from r1core.rl.config import GRPOConfig
from r1core.rollout.config import RolloutConfig, check_engine
from r1core.rollout.types import SamplingConfig
from r1core.rl.evaluate import EvalConfig
from r1core.train.lm import LMTrainConfig
from r1core.train.engine import OptimConfig


class StageKind(str, enum.Enum):
    prepare = "prepare"  # tokenizer + token shards + eval/RL problem sets
    pretrain = "pretrain"  # next-token (+ MTP) training on the shards
    load = "load"  # start from released HF / FP8 weights instead
    cold_start_sft = "cold_start_sft"  # long-CoT SFT in the <think> format
    reasoning_rl = "reasoning_rl"  # GRPO with rule rewards
    rejection_sampling = "rejection_sampling"  # k samples/prompt, filtered, deduped, mixed -> JSONL
    sft = "sft"  # SFT on a dataset (rejection sampling's by default)
    all_scenario_rl = "all_scenario_rl"  # GRPO: rule rewards + the reward-model hook
    distill = "distill"  # SFT a small dense student on teacher samples
    eval = "eval"  # pass@1 over k samples and cons@k
    long_context = "long_context"  # continued pretraining at a longer length under YaRN
    passkey_eval = "passkey_eval"  # passkey retrieval accuracy over a depth x length grid


MODEL_STAGES = {
    StageKind.pretrain,
    StageKind.load,
    StageKind.cold_start_sft,
    StageKind.reasoning_rl,
    StageKind.sft,
    StageKind.all_scenario_rl,
    StageKind.distill,
    StageKind.long_context,
}
RL_KINDS = (StageKind.reasoning_rl, StageKind.all_scenario_rl)  # GRPO stages
SFT_KINDS = (StageKind.cold_start_sft, StageKind.sft, StageKind.distill)  # stages trained by `sft.*`


@dataclass(kw_only=True)
class StageSpec:
    name: str  # unique within the pipeline; the stage's directory name
    kind: StageKind  # what the stage does
    init: str = "previous"  # model to start from: "previous" model stage, a stage name, or "scratch"
    dataset: str = ""  # stage whose dataset this stage trains on ("" = its kind's default)
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted job keys, e.g. {"rl.steps": 20}
    # eval / passkey_eval stages: an earlier one of the same kind the report compares this one with
    # (besides the first)
    baseline: str = ""


@dataclass(kw_only=True)
class PipelineConfig:
    name: str = MISSING  # the pipeline's name (the run directory's prefix)
    stages: list[StageSpec] = MISSING  # stages in order


@dataclass(kw_only=True)
class DataConfig:
    tokenizer: str = ""  # tokenizer.json (or its folder); "" trains a BPE on the corpus
    vocab_size: int = 512  # for a trained tokenizer
    tasks: list[str] = field(
        default_factory=lambda: ["arithmetic"]
    )  # built-in: arithmetic, equations, countdown
    task_kwargs: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"arithmetic": {"digits": 2, "ops": "+-"}}
    )  # per-task generator settings
    corpus_docs: int = 40000  # built-in pretraining corpus (worked solutions + prose)
    prose_fraction: float = 0.1  # built-in corpus: share of plain-English paragraphs
    answer_noise: float = 0.0  # built-in corpus: share of worked solutions whose final answer is corrupted
    direct_fraction: float = (
        0.0  # built-in corpus: share of problems answered at once, with an empty think block
    )
    direct_noise: float = 0.0  # built-in corpus: share of those direct answers that are near misses
    passkey_fraction: float = (
        0.0  # share of pretraining / long_context rows that are passkey retrieval documents
    )
    pretrain_files: list[str] = field(default_factory=list)  # text / JSONL: replaces the built-in corpus
    # held-out documents for the pretraining stages' validation loss (`val_ce`, every `pretrain.eval_every`
    # steps): text / JSONL like pretrain_files; without them the built-in corpus holds out `val_docs` worked
    # solutions of test-split problems, and user pretrain_files get no validation
    val_files: list[str] = field(default_factory=list)
    val_docs: int = 512  # built-in corpus: held-out documents (0: no validation)
    cold_start_jsonl: str = ""  # long-CoT SFT data; "" = generated worked solutions
    cold_start_examples: int = 2000  # built-in cold-start set size (without data.cold_start_jsonl)
    rl_prompts_jsonl: str = ""  # RL problems; "" = built-in tasks
    general_prompts_jsonl: str = ""  # all-scenario RL prompts for the reward model
    eval_jsonl: str = ""  # held-out problems; "" = built-in test split
    eval_problems: int = 200  # held-out problems kept from data.eval_jsonl or the built-in test split
    strict: bool = False  # fail at the first bad line of any data file instead of skipping it
    max_bad_fraction: float = 0.05  # a data file with a larger share of bad lines fails the pre-flight

    def __post_init__(self) -> None:
        if self.val_docs < 0:
            raise ValueError(f"data.val_docs={self.val_docs} must be >= 0")


@dataclass(kw_only=True)
class Filters:
    """Which sampled responses a stage keeps (rejection sampling, the distillation teacher's samples)."""

    require_correct: bool = True  # keep only samples the accuracy checker accepts
    require_finished: bool = True  # keep only samples that stopped before max_new_tokens (not truncated)
    require_format: bool = True  # keep only samples in the <think>...</think> format
    language: str = "en"  # target language of the language-consistency filter
    min_language_share: float = 0.0  # least share of target-language words (0: no language filter)
    max_ngram_repeats: int = 0  # a repetition loop: some 4-gram occurs more often than this (0: off)
    dedupe: bool = True  # drop duplicate responses to the same prompt


@dataclass(kw_only=True)
class RejectionConfig:
    prompts: int = 256  # RL prompts sampled from
    samples_per_prompt: int = 4  # samples drawn for each prompt
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.8, top_p=0.95, max_new_tokens=64)
    )
    filters: Filters = field(default_factory=lambda: Filters(min_language_share=0.9, max_ngram_repeats=4))
    non_reasoning_ratio: float = 0.25  # share of non-reasoning examples in the written dataset
    non_reasoning_jsonl: str = ""  # "" = built-in short prose Q/A


@dataclass(kw_only=True)
class DistillConfig:
    student: ModelArgs = field(  # the dense student; its vocab_size follows the teacher's
        default_factory=lambda: presets["tiny"].replace(n_dense_layers=4, n_mtp_modules=0)
    )
    prompts: int = 512  # teacher prompts
    samples_per_prompt: int = 2  # teacher samples per prompt
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.7, max_new_tokens=64)
    )
    filters: Filters = field(default_factory=lambda: Filters(require_format=False))  # teacher samples kept
    # the student's starting weights: an earlier stage whose model has the student's shape (e.g. a pretrain
    # stage with the student's model.* overrides), or an HF directory; "" = fresh weights. DeepSeek-R1
    # distills into pretrained bases (§2.4).
    student_init: str = ""


@dataclass(kw_only=True)
class PasskeyConfig:
    """The passkey_eval stage's grid (run by r1core.pipeline.long_context)."""

    lengths: list[int] = field(
        default_factory=list
    )  # document lengths in tokens; [] = 1, 2, 4 x the model's original context
    depths: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0]
    )  # needle depths (0: first, 1: last)
    per_cell: int = 20  # documents per (length, depth)
    batch_size: int = 8  # documents per forward pass

    def __post_init__(self) -> None:
        if any(n < 1 for n in self.lengths) or not self.depths or self.per_cell < 1 or self.batch_size < 1:
            raise ValueError("passkey: lengths must be >= 1, depths non-empty, per_cell and batch_size >= 1")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"passkey.depths={self.depths} must lie in [0, 1]")


@dataclass(kw_only=True)
class JobConfig:
    run_dir: str = "runs/default"  # manifest, stages and report (the CLI sets it to Hydra's run directory)
    seed: int = 0  # seeds data order, initialization, sampling
    device: str = "auto"  # auto: cuda when present
    dtype: str = "auto"  # auto: bf16 on cuda, fp32 on cpu
    hf_checkpoint: str = (
        ""  # HF DeepSeek-V3/V2 directory to start from: sets model.*, the tokenizer; pretrain -> load
    )
    require_boxed: bool = True  # R1's rule for RL rewards, eval, sample filters: \boxed{} after </think>
    model: ModelArgs = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: LMTrainConfig = field(default_factory=LMTrainConfig)
    # SFT-type stages (cold_start_sft, sft, distill) have no held-out data: no validation loss (eval_every 0)
    sft: LMTrainConfig = field(default_factory=lambda: LMTrainConfig(steps=150, save_every=50, eval_every=0))
    rl: GRPOConfig = field(default_factory=GRPOConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # one YaRN phase of context extension (its YaRN settings: the stage's model.* overrides)
    long_context: LMTrainConfig = field(
        default_factory=lambda: LMTrainConfig(
            steps=50, seq_len=384, batch_size=8, micro_batch_size=8, lr=1e-3, save_every=25
        )
    )
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)
    pipeline: PipelineConfig = MISSING


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="r1core_job", node=JobConfig)
    for name in presets:
        cs.store(group="model", name=name, node=presets[name])


class ConfigError(ValueError):
    """A job configuration that cannot run; raised before any work starts."""


def check_known_keys(cfg: DictConfig, schema: type = None, prefix: str = "") -> None:
    """Every key of `cfg` is a setting of the typed schema. Hydra's `+key=value` (which its own error hint
    suggests for a typo'd key) adds keys past the schema's struct flag; they would be ignored silently."""
    schema = schema or OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return  # a free-form dict setting (task_kwargs, a stage's overrides)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        where = f"{prefix}{key}"
        node = cfg._get_node(key)
        if key not in fields:
            while isinstance(node, DictConfig) and len(node) == 1:  # name the whole key the user typed
                sub = next(iter(node.keys()))
                where, node = f"{where}.{sub}", node._get_node(sub)
            section = repr(prefix.rstrip(".")) if prefix else "the job"
            raise ConfigError(
                f"unknown setting {where!r}: {section} has no key {key!r} (a leading '+' does not "
                "create settings; docs/config.md and `r1core run --cfg job` list them)"
            )
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
            check_known_keys(node, OmegaConf.get_type(node), where + ".")
        elif isinstance(node, ListConfig) and not node._is_none() and not node._is_missing():
            for i, item in enumerate(node):
                if isinstance(item, DictConfig):
                    check_known_keys(item, OmegaConf.get_type(item), f"{where}[{i}].")


def resolve_job_config(cfg: DictConfig) -> DictConfig:
    """The composed config made ready to type-check: unknown keys rejected, and with `hf_checkpoint` set,
    the model's shape, the tokenizer and the start of the pipeline taken from that directory."""
    check_known_keys(cfg)
    if cfg.get("hf_checkpoint"):
        cfg = cfg.copy()
        apply_hf_checkpoint(cfg)
    return cfg


def apply_hf_checkpoint(cfg: DictConfig) -> None:
    """Bring your own model: `hf_checkpoint=<dir>` starts from that HF DeepSeek-V3 / V2 directory.

    The model's shape comes from its config.json (training-only settings such as `model.moe_impl`
    stay the job's), the tokenizer from the directory unless `data.tokenizer` names one, and every
    `pretrain` stage becomes a `load` stage. A checkpoint saved by transformers, which drops the MTP
    layers its config promises, runs without multi-token prediction (with a warning).
    """
    import logging
    import warnings

    from r1core.checkpoint.hf import CheckpointError, hf_model_args
    from r1core.model.args import TRAINING_ONLY

    log = logging.getLogger("r1core")
    path = Path(cfg.hf_checkpoint)
    if not path.exists():
        raise ConfigError(f"hf_checkpoint={str(path)!r} does not exist")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            args = hf_model_args(path)[0]
        except CheckpointError as e:
            raise ConfigError(f"hf_checkpoint={str(path)!r}: {e}") from None
    for w in caught:
        log.warning("hf_checkpoint: %s", w.message)
    user = cfg.model
    with open_dict(cfg):
        cfg.model = args.replace(**{k: user[k] for k in TRAINING_ONLY - {"init_std"}})
        if not cfg.data.tokenizer:
            if not (path / "tokenizer.json").is_file():
                raise ConfigError(
                    f"hf_checkpoint={str(path)!r} has no tokenizer.json: set "
                    "data.tokenizer=<its tokenizer.json or folder>"
                )
            cfg.data.tokenizer = str(path)
        for st in cfg.pipeline.stages:
            if st.kind == StageKind.pretrain:
                st.kind = StageKind.load
                log.info("hf_checkpoint: stage %r loads %s instead of pretraining", st.name, path)


def to_job(cfg: DictConfig) -> JobConfig:
    try:
        return OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, ValueError, TypeError) as e:
        raise ConfigError(f"invalid configuration: {e}") from None


def stage_job(base: DictConfig, stage: StageSpec) -> JobConfig:
    """The job as `stage` sees it: `stage.overrides` applied on top of the base config."""
    cfg = base.copy()
    OmegaConf.set_struct(cfg, True)
    for key, value in stage.overrides.items():
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"stage {stage.name!r}: override key {key!r} is not a job setting")
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"stage {stage.name!r}: override {key}={value!r}: {e}") from None
    try:
        return to_job(cfg)
    except ConfigError as e:
        raise ConfigError(f"stage {stage.name!r}: {e}") from None


_COMMON = ("seed", "device", "dtype", "model", "parallel")
# The job sections each stage kind reads; its hash covers only these (plus, through the runner's
# hash chain, every earlier stage), so editing rl.* reruns the RL stages and what follows them only.
STAGE_SECTIONS = {
    StageKind.prepare: ("seed", "data", "rejection", "model", "hf_checkpoint"),
    StageKind.load: ("hf_checkpoint", "model"),
    StageKind.pretrain: _COMMON + ("optim", "pretrain"),
    StageKind.cold_start_sft: _COMMON + ("optim", "sft"),
    StageKind.sft: _COMMON + ("optim", "sft"),
    StageKind.reasoning_rl: _COMMON + ("optim", "rl", "eval", "rollout", "require_boxed"),
    StageKind.all_scenario_rl: _COMMON + ("optim", "rl", "eval", "rollout", "require_boxed"),
    StageKind.rejection_sampling: _COMMON + ("rejection", "rollout", "require_boxed"),
    StageKind.distill: _COMMON + ("optim", "sft", "distill", "rollout", "require_boxed"),
    StageKind.eval: _COMMON + ("eval", "rollout", "require_boxed"),
    StageKind.long_context: _COMMON + ("optim", "long_context", "data"),
    StageKind.passkey_eval: _COMMON + ("passkey",),
}


def config_hash(job: JobConfig, stage: StageSpec) -> str:
    """What a finished stage's output depends on, so a rerun with a changed config redoes it."""
    full = OmegaConf.to_container(OmegaConf.structured(job), resolve=True)
    settings = {k: full[k] for k in STAGE_SECTIONS[stage.kind]}
    blob = json.dumps(
        {"job": settings, "stage": OmegaConf.to_container(OmegaConf.structured(stage))},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def validate_pipeline(
    base: DictConfig, job: JobConfig, world_size: int = 1
) -> list[tuple[StageSpec, JobConfig]]:
    """Every stage resolved and checked: names, references, datasets, layouts. One clear error, before any
    work."""
    from r1core.parallel.config import check_layout

    stages = job.pipeline.stages
    if not stages:
        raise ConfigError("pipeline.stages is empty")
    _check_files(job)
    try:
        check_engine(job.rollout)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    base_paths = _job_paths(job)
    seen: dict[str, StageSpec] = {}
    resolved = []
    for i, st in enumerate(stages):
        if st.name in seen:
            raise ConfigError(f"pipeline {job.pipeline.name!r}: stage name {st.name!r} appears twice")
        evals = (StageKind.eval, StageKind.passkey_eval)
        if st.baseline and (st.kind not in evals or seen.get(st.baseline, st).kind != st.kind):
            raise ConfigError(
                f"stage {st.name!r}: baseline={st.baseline!r} must name an earlier stage of its kind, "
                "and only eval and passkey_eval stages take one"
            )
        for ref, what in ((st.init, "init"), (st.dataset, "dataset")):
            if ref not in ("", "previous", "scratch") and ref not in seen:
                raise ConfigError(
                    f"stage {st.name!r}: {what}={ref!r} names no earlier stage "
                    f"(earlier: {', '.join(seen) or 'none'})"
                )
        sj = stage_job(base, st)
        _check_files(sj, st, base_paths)
        try:
            check_layout(sj.model, sj.parallel, world_size)
        except ValueError as e:
            raise ConfigError(f"stage {st.name!r}: incompatible parallel layout: {e}") from None
        if st.kind == StageKind.distill:
            _check_student(st, sj, world_size, {s.name: (s, j) for s, j in resolved})
        if st.kind == StageKind.long_context and sj.long_context.seq_len > sj.model.max_seq_len:
            raise ConfigError(
                f"stage {st.name!r}: long_context.seq_len={sj.long_context.seq_len} exceeds the "
                f"model's context (model.max_seq_len={sj.model.max_seq_len}): set the stage's YaRN "
                "settings (model.rope_factor, model.original_seq_len, model.max_seq_len)"
            )
        if st.kind in RL_KINDS and sj.parallel.cp > 1 and not sj.rl.loss.context_parallel:
            raise ConfigError(
                f"stage {st.name!r}: rl.loss.agg={sj.rl.loss.agg.value} averages each sequence's tokens, "
                f"which needs whole sequences on one rank, but parallel.cp={sj.parallel.cp} splits them: "
                "use rl.loss.agg=token_mean or seq_mean_token_sum_norm, or parallel.cp=1"
            )
        if st.kind in SFT_KINDS and sj.sft.eval_every:
            raise ConfigError(
                f"stage {st.name!r}: sft.eval_every={sj.sft.eval_every}, but {st.kind.value} stages have no "
                "held-out data to validate on (pretrain and long_context stages have a validation loss): "
                "set sft.eval_every=0, and judge the stage by an eval stage after it"
            )
        if st.kind == StageKind.load and not sj.hf_checkpoint:
            raise ConfigError(f"stage {st.name!r} loads released weights: set hf_checkpoint=<HF directory>")
        seen[st.name] = st
        resolved.append((st, sj))
    if not any(s.kind == StageKind.prepare for s in stages):
        raise ConfigError(
            f"pipeline {job.pipeline.name!r} has no prepare stage (it makes the tokenizer and data)"
        )
    return resolved


def _job_paths(job: JobConfig) -> dict[str, str]:
    d = job.data
    paths = {
        "data.tokenizer": d.tokenizer,
        "data.cold_start_jsonl": d.cold_start_jsonl,
        "data.rl_prompts_jsonl": d.rl_prompts_jsonl,
        "data.general_prompts_jsonl": d.general_prompts_jsonl,
        "data.eval_jsonl": d.eval_jsonl,
        "rejection.non_reasoning_jsonl": job.rejection.non_reasoning_jsonl,
        "hf_checkpoint": job.hf_checkpoint,
    }
    paths.update({f"data.pretrain_files[{i}]": p for i, p in enumerate(d.pretrain_files)})
    paths.update({f"data.val_files[{i}]": p for i, p in enumerate(d.val_files)})
    return {k: p for k, p in paths.items() if p}


def _check_student(st: StageSpec, sj: JobConfig, world_size: int, earlier: dict) -> None:
    """The distill stage's student fits the layout, and its `student_init` names an earlier stage whose
    model has the student's shape, or a directory (an HF checkpoint, checked when the stage starts)."""
    from r1core.parallel.config import check_layout

    student = dataclasses.replace(sj.distill.student, vocab_size=sj.model.vocab_size)
    try:
        check_layout(student, sj.parallel, world_size)
    except ValueError as e:
        raise ConfigError(
            f"stage {st.name!r}: the student (distill.student) does not fit the parallel layout: {e}"
        ) from None
    ref = sj.distill.student_init
    if not ref or (ref not in earlier and Path(ref).is_dir()):
        return
    if ref not in earlier:
        raise ConfigError(
            f"stage {st.name!r}: distill.student_init={ref!r} names no earlier stage "
            f"(earlier: {', '.join(earlier) or 'none'}) and no directory"
        )
    spec, job = earlier[ref]
    if spec.kind not in MODEL_STAGES:
        raise ConfigError(
            f"stage {st.name!r}: distill.student_init={ref!r} is a {spec.kind.value} stage: no model"
        )
    diff = model_shape_diff(student, job.model)
    if diff:
        raise ConfigError(
            f"stage {st.name!r}: distill.student_init={ref!r} trains another shape than distill.student: "
            + ", ".join(f"{k} (student {a}, {ref} {b})" for k, (a, b) in sorted(diff.items()))
        )


def _check_files(job: JobConfig, st: StageSpec | None = None, base: dict[str, str] | None = None) -> None:
    """Every file the job names exists. A job-level setting's error names the setting only; a stage is named
    only when its own `overrides` set the path."""
    for key, path in _job_paths(job).items():
        if base is not None and base.get(key) == path:
            continue  # checked once for the whole job
        if not Path(path).exists():
            where = f"stage {st.name!r}: " if st is not None else ""
            raise ConfigError(f"{where}{key}={path!r} does not exist (missing dataset or checkpoint)")
