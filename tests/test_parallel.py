"""Parallel layouts reproduce the single-device run (r1core.parallel + r1core.train.engine, gloo on CPU).

Every layout trains the tiny preset for two AdamW steps on the same global batch (data-parallel
ranks take their rows) and must give the single-process run's losses, gradient norms, gathered
gradients and updated weights within fp32 tolerance. Checkpoints saved at one layout load at
another (and on one device) with identical logits, and training continues identically.

To keep CI cheap, one 2-process launch runs every 2-rank layout in sequence (megatron-core's
groups are rebuilt per layout) and one 8-process launch covers TP2 x PP2 x EP2 (+SP); the test
functions assert on their module-scoped results.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from r1core.kernels.grpo_loss_terms import PolicyLossConfig
from r1core.model import presets
from r1core.parallel import ParallelConfig, check_layout
from r1core.checkpoint import dist as dcp_ckpt
from r1core.testing import run_distributed, with_separate_gate_and_up
from r1core.train.engine import LocalEngine, OptimConfig, build_engine
from r1core.train.objectives import GRPOObjective, LMObjective

ARGS = presets["tiny"]
OPTIM = OptimConfig(lr=1e-3, grad_clip=1.0, warmup_steps=0, total_steps=10)
# r1core's AdamW kernel (under TRITON_INTERPRET on the CPU), which ZeRO-1 wraps on each rank's shard
OPTIM_TRITON = OptimConfig(lr=1e-3, grad_clip=1.0, warmup_steps=0, total_steps=10, implementation="triton")
ROWS, SEQ = 4, 16
# (loss rtol, gradient atol relative to each gradient's largest entry, weight atol) per parameter dtype.
# fp32: reordered sums round differently, not a missing term; AdamW's first steps are ~lr * sign(g), so
# rounding near g = 0 moves a weight by up to ~1e-5 while a wrong or missing update moves it by ~1e-3.
# bf16 (fp32 master weights): the model's weights are the masters rounded, one ulp at 1.0 is 7.8e-3.
TOL = {torch.float32: (2e-5, 1e-4, 1e-4), torch.bfloat16: (1e-3, 2e-2, 8e-3)}


def lm_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, ARGS.vocab_size, (ROWS, SEQ + 1), generator=g)
    doc_ids = (
        torch.arange(SEQ) >= torch.tensor([5, 9, 16, 12])[:, None]
    ).long()  # two packed documents per row
    labels = data[:, 1:].masked_fill(
        torch.cat([doc_ids[:, 1:] != doc_ids[:, :-1], torch.zeros(ROWS, 1, dtype=torch.bool)], 1), -100
    )
    starts = torch.tensor([5, 9, 16, 12])[:, None]
    positions = torch.where(doc_ids.bool(), torch.arange(SEQ) - starts, torch.arange(SEQ))
    return {"tokens": data[:, :-1], "labels": labels, "doc_ids": doc_ids, "positions": positions}


def grpo_batch() -> dict:
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, ARGS.vocab_size, (ROWS, SEQ), generator=g)
    mask = (torch.arange(SEQ) >= torch.tensor([3, 6, 8, 16])[:, None]).float()  # the last row has no response
    return {
        "tokens": tokens,
        "targets": tokens.roll(-1, 1),
        "mask": mask,
        "advantages": torch.tensor([1.0, -0.5, 0.25, 0.0]),
        "ref_logprobs": -6.0 + 0.1 * torch.randn(ROWS, SEQ, generator=g),
    }


OBJECTIVES = {
    "lm": (LMObjective, lm_batch),
    "grpo": (lambda: GRPOObjective(PolicyLossConfig(beta=0.04, eps_high=0.28, agg="token_mean")), grpo_batch),
}


def _rows(engine, batch: dict) -> dict:
    n = ROWS // engine.dp_size
    return {k: v[engine.dp_rank * n : (engine.dp_rank + 1) * n] for k, v in batch.items()}


def _steps(engine, kind: str, n: int = 2) -> list[dict]:
    make_objective, make_batch = OBJECTIVES[kind]
    mb = _rows(engine, make_batch())
    return [engine.train_step([mb], make_objective()) for _ in range(n)]


def _logits(engine) -> torch.Tensor | None:
    def fn(h, w, group, mb, model):
        z = F.linear(h, w)
        if group is not None:
            parts = [torch.empty_like(z) for _ in range(torch.distributed.get_world_size(group))]
            torch.distributed.all_gather(parts, z.contiguous(), group=group)
            z = torch.cat(parts, -1)
        return z

    out = engine.forward_only([_rows(engine, lm_batch())], fn)
    return out[0] if out else None


def _np(d):
    return None if d is None else {k: v.detach().float().cpu().numpy().copy() for k, v in d.items()}


def _two_steps(engine, kind: str) -> dict:
    """Metrics of two steps, gradients of the first (before AdamW amplifies rounding), weights after both."""
    metrics = _steps(engine, kind, 1)
    grads = _np(engine.full_grads())
    metrics += _steps(engine, kind, 1)
    return {"metrics": metrics, "grads": grads, "state": _np(engine.full_state_dict())}


def _train_layout(kind: str, cfg: dict, dtype=torch.float32, optim=OPTIM) -> dict:
    return _two_steps(
        build_engine(ARGS, ParallelConfig(**cfg), optim, device="cpu", dtype=dtype, seed=0), kind
    )


def _reshard(save_cfg: dict, load_cfg: dict, path: str) -> dict:
    """Train at one layout, save, load into another (built from a different seed), compare going on."""
    a = build_engine(ARGS, ParallelConfig(**save_cfg), OPTIM, device="cpu", seed=0)
    _steps(a, "lm")
    a.save(path)
    a.export_hf(path + "_hf")
    out = {"logits_a": _logits(a), "step3_a": _steps(a, "lm", 1)}
    out["state_a"] = _np(a.full_state_dict())
    b = build_engine(ARGS, ParallelConfig(**load_cfg), OPTIM, device="cpu", seed=123)
    b.load(path)
    out.update(logits_b=_logits(b), step3_b=_steps(b, "lm", 1), state_b=_np(b.full_state_dict()))
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def _sp_rejects_odd_length() -> str:
    engine = build_engine(ARGS, ParallelConfig(tp=2, sequence_parallel=True), OPTIM, device="cpu")
    mb = {k: v[:, :15] for k, v in lm_batch().items()}
    try:
        engine.train_step([mb], LMObjective())
    except ValueError as e:
        return str(e)
    return "no error"


def _no_mtp_losses(build, cfg: dict) -> list[float]:
    """Without MTP the last pipeline stage holds no embedding copy (and must not wait for its gradient)."""
    engine = build(ARGS.replace(n_mtp_modules=0), ParallelConfig(**cfg), OPTIM, device="cpu", seed=0)
    return [m["loss"] for m in _steps(engine, "lm")]


def _hf_logits(cfg: dict, hf_dir: str):
    engine = build_engine(ARGS, ParallelConfig(**cfg), OPTIM, device="cpu", seed=5)
    engine.load_hf(hf_dir)
    logits = _logits(engine)
    return None if logits is None else logits.numpy()


def _load_legacy(cfg: dict, path: str) -> dict:
    """A checkpoint with separate expert gate / up weights (w1, w3), loaded into this layout's w13 shards."""
    engine = build_engine(ARGS, ParallelConfig(**cfg), OPTIM, device="cpu", seed=123)
    engine.load(path)
    return {"logits": _logits(engine), "step": _steps(engine, "lm", 1)}


def _run_layouts(rank, world, layouts, reshard, path, hf_dir=None, legacy_path=None):
    results = {name: _train_layout(*layout) for name, layout in layouts.items()}
    results["reshard"] = _reshard(*reshard, path)
    if world == 2:
        results["legacy_tp2"] = _load_legacy(dict(tp=2), legacy_path)
        results["legacy_ep2"] = _load_legacy(dict(ep=2), legacy_path)
        results["sp_odd_length"] = _sp_rejects_odd_length()
        results["pp2_no_mtp"] = _no_mtp_losses(build_engine, dict(pp=2, microbatches=2))
        results["hf_tp2_logits"] = _hf_logits(dict(tp=2), hf_dir)
    return results


TWO_RANK = {
    "tp2": ("lm", dict(tp=2)),
    "ep2": ("lm", dict(ep=2)),
    "dp2_zero1": ("lm", dict()),
    "tp2_sp": ("lm", dict(tp=2, sequence_parallel=True)),
    "pp2_1f1b": ("lm", dict(pp=2, microbatches=2)),
    "pp2_interleaved": ("lm", dict(pp=2, pp_schedule="interleaved", microbatches=2)),
    "pp2_dualpipev": ("lm", dict(pp=2, pp_schedule="dualpipev", microbatches=4)),
    "tp2_grpo": ("grpo", dict(tp=2)),
    "dp2_grpo_no_zero": ("grpo", dict(zero1=False)),
    "dp2_bf16_master": ("lm", dict(), torch.bfloat16),  # ZeRO-1 over fp32 master weights of a bf16 model
    # ZeRO-1 with r1core's AdamW kernel and gradient norm (fp32: bf16's tolerance would not see the update)
    "dp2_zero1_triton_adamw": ("lm", dict(), torch.float32, OPTIM_TRITON),
}
EIGHT_RANK = {"tp2_pp2_ep2_sp": ("lm", dict(tp=2, pp=2, ep=2, microbatches=2, sequence_parallel=True))}


def _merge(per_rank: list[dict]) -> dict:
    """Rank 0's gathered results; logits from whichever rank holds the last pipeline stage."""
    out = per_rank[0]
    for key in ("logits_a", "logits_b"):
        out["reshard"][key] = next(r["reshard"][key] for r in per_rank if r["reshard"][key] is not None)
    return out


@pytest.fixture(scope="module")
def reference():
    """Single-device runs of each objective, plus logits of the LM run's weights."""
    out = {}
    for kind, dtype in [("lm", torch.float32), ("grpo", torch.float32), ("lm", torch.bfloat16)]:
        out[kind, dtype] = _two_steps(LocalEngine(ARGS, ParallelConfig(), OPTIM, "cpu", dtype, 0), kind)
    return out


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt2")
    path, hf_dir = str(root / "tp2"), str(root / "hf_in")
    source = LocalEngine(ARGS, ParallelConfig(), OPTIM, "cpu", torch.float32, 11)
    source.export_hf(hf_dir)
    # a checkpoint as written before the experts' gate and up weights were stacked, one step into training
    legacy = LocalEngine(ARGS, ParallelConfig(), OPTIM, "cpu", torch.float32, 21)
    _steps(legacy, "lm", 1)
    legacy_path = str(root / "legacy")
    dcp_ckpt.save(with_separate_gate_and_up(legacy.state_dict()), legacy_path)
    reshard = (dict(tp=2), dict(pp=2, microbatches=2))
    results = _merge(
        run_distributed(_run_layouts, 2, TWO_RANK, reshard, path, hf_dir, legacy_path, timeout=600)
    )
    results["hf_source_logits"] = _logits(source).numpy()
    results["legacy_source"] = {"logits": _logits(legacy).numpy(), "step": _steps(legacy, "lm", 1)}
    return results, path


@pytest.fixture(scope="module")
def eight_rank(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt8") / "tp2_pp2_ep2")
    reshard = (EIGHT_RANK["tp2_pp2_ep2_sp"][1], dict(tp=4, ep=2))
    return _merge(run_distributed(_run_layouts, 8, EIGHT_RANK, reshard, path, timeout=600)), path


def _assert_matches(run: dict, ref: dict, name: str, dtype=torch.float32) -> None:
    loss_rtol, grad_atol, weight_atol = TOL[dtype]
    for step, (got, want) in enumerate(zip(run["metrics"], ref["metrics"]), start=1):
        for key in ("loss", "grad_norm", "ce", "policy_loss", "aux"):
            if key in want:
                np.testing.assert_allclose(
                    got[key], want[key], rtol=loss_rtol, err_msg=f"{name} step {step} {key}"
                )
    assert set(run["grads"]) == set(ref["grads"]), name
    for key, want in ref["grads"].items():
        atol = grad_atol * max(np.abs(want).max(), 1e-8)
        np.testing.assert_allclose(run["grads"][key], want, rtol=0, atol=atol, err_msg=f"{name} grad {key}")
    for key, want in ref["state"].items():
        np.testing.assert_allclose(
            run["state"][key], want, rtol=0, atol=weight_atol, err_msg=f"{name} weight {key}"
        )


@pytest.mark.parametrize("name", sorted(TWO_RANK))
def test_two_rank_layout_matches_single_device(two_rank, reference, name):
    results, _ = two_rank
    kind, _, *dtype = TWO_RANK[name]
    dtype = dtype[0] if dtype else torch.float32
    _assert_matches(results[name], reference[kind, dtype], name, dtype)


def test_tp2_pp2_ep2_with_sequence_parallel_matches_single_device(eight_rank, reference):
    results, _ = eight_rank
    _assert_matches(results["tp2_pp2_ep2_sp"], reference["lm", torch.float32], "tp2_pp2_ep2_sp")


def _assert_reshard(res: dict, path: str) -> None:
    np.testing.assert_allclose(res["logits_b"], res["logits_a"], rtol=0, atol=1e-5)
    loss_rtol, _, weight_atol = TOL[torch.float32]
    np.testing.assert_allclose(res["step3_b"][0]["loss"], res["step3_a"][0]["loss"], rtol=loss_rtol)
    for key, want in res["state_a"].items():  # optimizer moments resharded too: the next step agrees
        np.testing.assert_allclose(res["state_b"][key], want, rtol=0, atol=weight_atol, err_msg=key)
    local = LocalEngine(ARGS, ParallelConfig(), OPTIM, "cpu", torch.float32, 7)
    local.load(path)
    rows = len(res["logits_a"])  # the parallel logits are data-parallel rank 0's rows
    np.testing.assert_allclose(_logits(local).numpy()[:rows], res["logits_a"], rtol=0, atol=1e-5)
    from r1core.checkpoint.hf import from_pretrained

    exported = from_pretrained(path + "_hf", dtype=torch.float32).eval()
    mb = lm_batch()
    with torch.no_grad():
        logits = exported(mb["tokens"], mb["positions"], mb["doc_ids"])
    np.testing.assert_allclose(logits.numpy()[:rows], res["logits_a"], rtol=0, atol=1e-5)


def test_checkpoint_saved_at_tp2_loads_at_pp2_on_one_device_and_as_hf_export(two_rank):
    results, path = two_rank
    _assert_reshard(results["reshard"], path)


def test_checkpoint_saved_at_tp2_pp2_ep2_loads_at_tp4_ep2_on_one_device_and_as_hf_export(eight_rank):
    results, path = eight_rank
    _assert_reshard(results["reshard"], path)


@pytest.mark.parametrize(
    "cfg, world, words",
    [
        (dict(tp=3), 6, ["n_heads=4 is not divisible by tp=3", "vocab_size=512"]),
        (dict(tp=2, pp=2), 6, ["world size 6 is not divisible by tp*pp"]),
        (dict(ep=3), 3, ["n_routed_experts=8 is not divisible by ep=3"]),
        (dict(ep=4), 2, ["ep=4 must divide cp*dp=1*2"]),
        (dict(pp=3), 3, ["n_layers=4 is not divisible by the 3 pipeline stages"]),
        (dict(pp=2, pp_schedule="interleaved", pp_virtual=4), 2, ["8 pipeline stages"]),
        (dict(tp=2, dp=2), 2, ["tp*pp*cp*dp = 2*1*1*2 != world size 2"]),
        (dict(sequence_parallel=True), 1, ["sequence_parallel needs tp > 1"]),
        (dict(pp=2), 2, ["pp=2 with 1f1b needs parallel.microbatches >= 2, got 1"]),
        (dict(pp=2, pp_schedule="dualpipev", microbatches=2), 2, ["needs parallel.microbatches >= 4, got 2"]),
    ],
)
def test_bad_layout_fails_at_start_with_one_message_naming_every_problem(cfg, world, words):
    with pytest.raises(ValueError, match="bad parallel layout") as err:
        check_layout(ARGS, ParallelConfig(**cfg), world)
    for w in words:
        assert w in str(err.value)


def test_build_engine_on_one_process_rejects_a_parallel_layout():
    with pytest.raises(ValueError, match="world size 1 is not divisible by tp\\*pp\\*cp = 2\\*1\\*1"):
        build_engine(ARGS, ParallelConfig(tp=2), OPTIM, device="cpu")


def test_sequence_parallel_rejects_a_length_tp_does_not_divide(two_rank):
    results, _ = two_rank
    assert "sequence lengths [15] must be multiples of it" in results["sp_odd_length"]


@pytest.mark.parametrize("layout", ["tp2", "ep2"])
def test_a_checkpoint_with_separate_expert_gate_and_up_weights_loads_into_w13_shards(two_rank, layout):
    # TP splits w13 on I (w1 / w3 on their dim 1), EP on E: the old tensors' shards land in the right halves,
    # and the moments too (the next step's loss agrees)
    results, _ = two_rank
    got, want = results[f"legacy_{layout}"], results["legacy_source"]
    rows = len(got["logits"])  # EP2 on two ranks is also DP2: rank 0 holds the first half of the rows
    np.testing.assert_allclose(got["logits"], want["logits"][:rows], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["step"][0]["loss"], want["step"][0]["loss"], rtol=TOL[torch.float32][0])


def test_hf_weights_load_into_a_tensor_parallel_engine(two_rank):
    results, _ = two_rank
    np.testing.assert_allclose(results["hf_tp2_logits"], results["hf_source_logits"], rtol=0, atol=1e-5)


def test_pipeline_without_mtp_matches_single_device(two_rank):
    results, _ = two_rank
    local = lambda args, cfg, optim, device, seed: LocalEngine(args, cfg, optim, device, torch.float32, seed)  # noqa: E731
    np.testing.assert_allclose(results["pp2_no_mtp"], _no_mtp_losses(local, {}), rtol=TOL[torch.float32][0])


def _rank1_dies(rank, world_size):
    import torch.distributed as dist

    if rank == 1:
        os._exit(7)  # no report, no exception: what a segfault or an OOM kill looks like to the launcher
    dist.barrier()
    return rank


def test_launcher_names_a_rank_that_died_without_reporting():
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="rank 1 exited with code 7 before reporting"):
        run_distributed(_rank1_dies, 2, timeout=120)
    assert time.monotonic() - t0 < 60  # reported when it happens, not at the timeout


@pytest.mark.parametrize(
    "mode, failing, cause",
    [
        ("stage", 0, "deliberate failure in stage 0"),  # an exception mid-schedule; the peer waits in a recv
        ("timeout", 1, "Timed out waiting 3000ms"),  # a peer that hangs without raising: parallel.timeout_s
    ],
)
def test_a_failing_rank_ends_a_torchrun_job_with_an_error_instead_of_hanging(mode, failing, cause):
    import subprocess
    import sys

    job = os.path.join(os.path.dirname(__file__), "dist_fail_fast_job.py")
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    t0 = time.monotonic()
    # the hang this guards against lasts the process-group timeout (600 s in "stage", gloo's 30 min by
    # default)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", job, mode],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"rank {failing} of 2 failed" in proc.stderr and cause in proc.stderr, proc.stderr[-3000:]
    assert elapsed < 120, f"the job took {elapsed:.0f} s to end"
