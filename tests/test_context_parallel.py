"""Context parallelism (parallel.cp, r1core.parallel.context) reproduces the single-device run.

The split is checked against hand-computed chunks. CP2 (with DP2), CP2 x EP2, CP2 x TP2 (+SP) and
CP2 x PP2 train the tiny preset (MTP on) for two AdamW steps on rows of three packed documents,
whose boundaries fall inside chunks and on a chunk edge (and on plain causal rows), and must give
the single-process losses, metrics, gradient norms, gathered gradients and weights within fp32
tolerance, and the same logits; so must GRPO's token-sum losses (token_mean, seq_mean_token_sum_norm)
with responses that leave some chunks empty, and CP2 with activation checkpointing; a checkpoint
saved at CP2 x EP2 loads on one device. The chunked attention alone is checked against MLA's own
in one process (and on the GPU in bf16).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from r1core.kernels.grpo_loss_terms import PolicyLossConfig
from r1core.model import Transformer, presets
from r1core.parallel import ParallelConfig, check_layout
from r1core.parallel.context import ContextParallel, causal_work, chunk_index, merge
from r1core.testing import assert_close_to_ref, run_distributed
from r1core.train.engine import LocalEngine, OptimConfig, build_engine
from r1core.train.objectives import GRPOObjective, LMObjective

ARGS = presets["tiny"]
OPTIM = OptimConfig(lr=1e-3, grad_clip=1.0, warmup_steps=0, total_steps=10)
ROWS, SEQ = 2, 16  # cp=2: four chunks of 4 tokens; attention and MTP cross every chunk edge (4, 8, 12)
# fp32: reordered sums round differently (see tests/test_parallel.py for the reasoning)
LOSS_RTOL, GRAD_ATOL, WEIGHT_ATOL = 2e-5, 1e-4, 1e-4


@pytest.mark.parametrize(
    "seq_len, cp, expected",
    [
        (8, 2, [[0, 1, 6, 7], [2, 3, 4, 5]]),
        (12, 3, [[0, 1, 10, 11], [2, 3, 8, 9], [4, 5, 6, 7]]),
    ],
)
def test_chunk_split_matches_hand_computed_chunks_with_equal_causal_work(seq_len, cp, expected):
    parts = [chunk_index(seq_len, cp, r) for r in range(cp)]
    assert [p.tolist() for p in parts] == expected
    # query at position i attends i + 1 keys: 1+2+7+8 = 3+4+5+6 = 18 (T=8); 26 each for T=12, cp=3
    assert {causal_work(p) for p in parts} == {seq_len * (seq_len + 1) // (2 * cp)}
    contiguous = [torch.arange(r * seq_len // cp, (r + 1) * seq_len // cp) for r in range(cp)]
    assert causal_work(contiguous[-1]) > causal_work(contiguous[0])  # what the two-chunk order balances
    x = torch.arange(3 * seq_len).view(3, seq_len)
    torch.testing.assert_close(merge([x[:, p] for p in parts]), x)


def test_chunk_split_rejects_a_length_not_divisible_into_chunks():
    with pytest.raises(ValueError, match="sequence length 10 is not a multiple of 4"):
        chunk_index(10, 2, 0)


@pytest.fixture
def one_rank_group(request):
    """A one-process default group on the test's device (gloo on the CPU, NCCL on a GPU)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.fail("a process group is already up")
    backend = "nccl" if request.param == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    yield request.param
    dist.destroy_process_group()


def _attention_and_grads(device: str, dtype, docs: bool, cp: bool):
    """One MLA layer's output and input / weight gradients, plain or through context parallelism's attend."""
    torch.manual_seed(0)
    args = presets["tiny"] if device == "cpu" else presets["small"].replace(n_layers=2, n_dense_layers=1)
    seq = 32 if device == "cpu" else 1024
    with torch.device(device):
        model = Transformer(args)
    model.to(dtype)
    attn = model.layers["0"].attn
    batch = {"tokens": torch.zeros(2, seq, dtype=torch.long, device=device)}
    if docs:
        starts = torch.tensor([[seq // 3], [seq // 2]], device=device)
        doc_ids = (torch.arange(seq, device=device) >= starts).long()
        batch.update(doc_ids=doc_ids, positions=torch.arange(seq, device=device).expand(2, seq))
    if cp:  # one rank holding both chunks: the bottom-right causal (or masked) chunk path
        batch = ContextParallel(torch.distributed.group.WORLD, 1, 0).shard(batch)
    meta = model.attn_meta(
        batch["tokens"], batch.get("positions"), batch.get("doc_ids"), context=batch.get("context")
    )
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(2, seq, args.dim, device=device, generator=g).to(dtype).requires_grad_()
    out = attn(x, meta)
    out.backward(torch.randn(out.shape, device=device, generator=g).to(dtype))
    return [t.detach().float() for t in (out, x.grad, attn.wkv_a.weight.grad, attn.wkv_b.weight.grad)]


@pytest.mark.parametrize("docs", [False, True], ids=["causal", "docs"])
@pytest.mark.parametrize(
    "one_rank_group", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)], indirect=True
)
def test_context_parallel_attention_matches_the_models_attention(one_rank_group, docs):
    """cp=1 still cuts each sequence into two chunks, so the chunked attention (SDPA's kernels on a GPU) runs;
    it must agree with MLA's own attention: exactly in fp32 on the CPU, by the tolerance rule in bf16."""
    device = one_rank_group
    if device == "cpu":
        for got, want in zip(
            _attention_and_grads("cpu", torch.float32, docs, cp=True),
            _attention_and_grads("cpu", torch.float32, docs, cp=False),
        ):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        return
    ref = _attention_and_grads(device, torch.float32, docs, cp=False)
    lowp = _attention_and_grads(device, torch.bfloat16, docs, cp=False)
    got = _attention_and_grads(device, torch.bfloat16, docs, cp=True)
    for name, g, r, low in zip(["out", "dx", "dwkv_a", "dwkv_b"], got, ref, lowp):
        assert_close_to_ref(g, r, low, floor=1e-3 * r.abs().max().item(), name=name)


def test_layout_check_counts_cp_in_the_world_and_names_the_culprit():
    assert check_layout(ARGS, ParallelConfig(cp=2, tp=2), 8).dp == 2
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tp\*pp\*cp = 1\*1\*4"):
        check_layout(ARGS, ParallelConfig(cp=4), 6)
    with pytest.raises(ValueError, match=r"tp\*pp\*cp\*dp = 1\*1\*2\*2 != world size 2"):
        check_layout(ARGS, ParallelConfig(cp=2, dp=2), 2)
    with pytest.raises(ValueError, match="invalid ParallelConfig: cp=0"):
        ParallelConfig(cp=0)


def lm_batch(docs: bool = True) -> dict:
    """Three packed documents per row (or one sequence per row, no doc_ids / positions)."""
    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, ARGS.vocab_size, (ROWS, SEQ + 1), generator=g)
    starts = torch.tensor([[0, 3, 10], [0, 6, 12]])  # three documents per row; 12 is a chunk edge
    doc_ids = (torch.arange(SEQ)[None, None, :] >= starts[:, :, None]).sum(1) - 1
    positions = torch.arange(SEQ) - starts.gather(1, doc_ids)
    last = torch.cat([doc_ids[:, 1:] != doc_ids[:, :-1], torch.ones(ROWS, 1, dtype=torch.bool)], 1)
    labels = data[:, 1:].masked_fill(last, -100)
    if not docs:
        return {"tokens": data[:, :-1], "labels": data[:, 1:]}
    return {"tokens": data[:, :-1], "labels": labels, "doc_ids": doc_ids, "positions": positions}


def grpo_batch() -> dict:
    """Responses start mid-row, so some ranks hold chunks with no response token."""
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, ARGS.vocab_size, (ROWS, SEQ), generator=g)
    mask = (torch.arange(SEQ) >= torch.tensor([[9], [3]])).float()
    ref_logprobs = -6.0 + 0.1 * torch.randn(ROWS, SEQ, generator=g)
    return {
        "tokens": tokens,
        "targets": tokens.roll(-1, 1),
        "mask": mask,
        "advantages": torch.tensor([1.0, -0.5]),
        "ref_logprobs": ref_logprobs,
    }


# batch kind: (batch, objective)
KINDS = {
    "docs": (lm_batch, LMObjective),
    "causal": (lambda: lm_batch(docs=False), LMObjective),
    "grpo_token_mean": (grpo_batch, lambda: GRPOObjective(PolicyLossConfig(beta=0.04, agg="token_mean"))),
    "grpo_sum_norm": (
        grpo_batch,
        lambda: GRPOObjective(PolicyLossConfig(agg="seq_mean_token_sum_norm"), norm_len=SEQ),
    ),
}


def _rows(engine, batch: dict) -> dict:
    n = ROWS // engine.dp_size
    return {k: v[engine.dp_rank * n : (engine.dp_rank + 1) * n] for k, v in batch.items()}


def _np(d):
    return None if d is None else {k: v.detach().float().cpu().numpy().copy() for k, v in d.items()}


def _logits(engine, batch: dict):
    def fn(h, w, group, mb, model):
        z = F.linear(h, w)
        if group is not None:
            parts = [torch.empty_like(z) for _ in range(torch.distributed.get_world_size(group))]
            torch.distributed.all_gather(parts, z.contiguous(), group=group)
            z = torch.cat(parts, -1)
        return z.numpy()

    out = engine.forward_only([_rows(engine, batch)], fn)
    return out[0] if out else None


def _train(engine, kind: str) -> dict:
    """Metrics of two steps, gradients of the first, weights after both, then logits."""
    make_batch, make_objective = KINDS[kind]
    batch = make_batch()
    mb = _rows(engine, batch)
    metrics = [engine.train_step([mb], make_objective())]
    grads = _np(engine.full_grads())
    metrics.append(engine.train_step([mb], make_objective()))
    return {
        "metrics": metrics,
        "grads": grads,
        "state": _np(engine.full_state_dict()),
        "logits": _logits(engine, batch),
    }


def _per_row_mean_refused() -> str:
    engine = build_engine(ARGS, ParallelConfig(cp=2), OPTIM, device="cpu")
    try:
        objective = GRPOObjective(PolicyLossConfig(agg="seq_mean_token_mean"))
        engine.train_step([_rows(engine, grpo_batch())], objective)
    except ValueError as e:
        return str(e)
    return "no error"


def _run_layouts(rank, world, layouts, path):
    out = {}
    for name, (cfg, kind) in layouts.items():
        engine = build_engine(ARGS, ParallelConfig(**cfg), OPTIM, device="cpu", seed=0)
        out[name] = _train(engine, kind)
        if name == "cp2_ep2_dp2":
            engine.save(path)
    out["per_row_mean_refused"] = _per_row_mean_refused()
    return out


# One 4-process launch (cheap CI): cp=2 with dp=2 unless tp or pp take the other factor of 2.
LAYOUTS = {
    "cp2_dp2": (dict(cp=2), "docs"),
    "cp2_dp2_no_docs": (dict(cp=2), "causal"),  # plain causal sequences: the bottom-right causal path
    "cp2_ep2_dp2": (dict(cp=2, ep=2), "docs"),
    "cp2_dp2_recompute": (dict(cp=2, activation_checkpointing=True), "causal"),  # gathers rerun in backward
    "cp2_tp2_sp": (dict(cp=2, tp=2, sequence_parallel=True), "docs"),
    "cp2_pp2": (dict(cp=2, pp=2, microbatches=2), "docs"),
    "cp2_dp2_grpo_token_mean": (dict(cp=2), "grpo_token_mean"),
    "cp2_tp2_grpo_sum_norm": (dict(cp=2, tp=2), "grpo_sum_norm"),
}


@pytest.fixture(scope="module")
def reference():
    return {
        kind: _train(LocalEngine(ARGS, ParallelConfig(), OPTIM, "cpu", torch.float32, 0), kind)
        for kind in KINDS
    }


def _merge_ranks(per_rank: list[dict]) -> dict:
    """Rank 0's results; logits from a rank of the last pipeline stage."""
    out = per_rank[0]
    for name in out:
        if isinstance(out[name], dict) and out[name].get("logits", 0) is None:
            out[name]["logits"] = next(r[name]["logits"] for r in per_rank if r[name]["logits"] is not None)
    return out


@pytest.fixture(scope="module")
def four_rank(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cp_ckpt") / "cp2_ep2_dp2")
    return _merge_ranks(run_distributed(_run_layouts, 4, LAYOUTS, path, timeout=300)), path


def _assert_matches(run: dict, ref: dict, name: str) -> None:
    for step, (got, want) in enumerate(zip(run["metrics"], ref["metrics"]), start=1):
        assert set(got) == set(want), name
        for key in set(want) - {"step", "lr"}:
            np.testing.assert_allclose(got[key], want[key], rtol=LOSS_RTOL, err_msg=f"{name} {step} {key}")
    assert set(run["grads"]) == set(ref["grads"]), name
    for key, want in ref["grads"].items():
        atol = GRAD_ATOL * max(np.abs(want).max(), 1e-8)
        np.testing.assert_allclose(run["grads"][key], want, rtol=0, atol=atol, err_msg=f"{name} grad {key}")
    for key, want in ref["state"].items():
        np.testing.assert_allclose(run["state"][key], want, rtol=0, atol=WEIGHT_ATOL, err_msg=f"{name} {key}")
    want = ref["logits"][: len(run["logits"])]  # data-parallel rank 0's rows
    # from weights that agree to rounding (above): relative to the largest logit, as the losses
    np.testing.assert_allclose(run["logits"], want, rtol=0, atol=LOSS_RTOL * np.abs(want).max(), err_msg=name)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_cp2_layout_matches_single_device(four_rank, reference, name):
    _assert_matches(four_rank[0][name], reference[LAYOUTS[name][1]], name)


def test_checkpoint_saved_at_cp2_ep2_loads_on_one_device(four_rank):
    results, path = four_rank
    local = LocalEngine(ARGS, ParallelConfig(), OPTIM, "cpu", torch.float32, 7)
    local.load(path)
    assert local.step == 2
    for key, want in results["cp2_ep2_dp2"]["state"].items():
        np.testing.assert_array_equal(local.full_state_dict()[key].numpy(), want, err_msg=key)


def test_cp_refuses_grpos_per_row_token_mean(four_rank):
    refused = four_rank[0]["per_row_mean_refused"]
    assert "GRPOObjective does not support context parallelism (parallel.cp=2)" in refused
