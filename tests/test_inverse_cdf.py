"""The rollout sampler's one-kernel inverse CDF (r1core.kernels.inverse_cdf) against its torch reference
(the fp64 cumsum and searchsorted the sampler runs on the CPU). On the CPU the kernel runs under
TRITON_INTERPRET."""

from __future__ import annotations

import pytest
import torch

from r1core.kernels.inverse_cdf import inverse_cdf, inverse_cdf_ref
from r1core.rollout import request_uniforms, sample

ONE_BELOW_1 = 1.0 - 2.0**-53  # the largest fp64 uniform


def _logp(B: int, V: int, seed: int, zero_every: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 3
    if zero_every:
        logits[:, ::zero_every] = float("-inf")  # zero-probability entries, the first included
    return logits.log_softmax(-1).to(dtype)


@pytest.mark.parametrize("B,V,zero_every", [(6, 1, 0), (5, 17, 0), (9, 100, 3), (4, 1000, 7), (3, 200, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inverse_cdf_equals_the_fp64_cumsum_reference(B, V, zero_every, dtype):
    logp = _logp(B, V, seed=B * V, zero_every=zero_every, dtype=dtype)
    u = request_uniforms(V, B)
    u[0], u[-1] = 0.0, ONE_BELOW_1
    got, want = inverse_cdf(logp, u), inverse_cdf_ref(logp, u)
    assert got.dtype == torch.int64 and got.shape == (B,)
    assert torch.equal(got, want), (got.tolist(), want.tolist())
    if zero_every and V > 1:
        assert (logp.gather(1, got[:, None]) > float("-inf")).all()  # never a zero-probability entry


def test_inverse_cdf_never_steps_past_the_last_nonzero_entry_and_reads_strided_rows():
    # u at its largest on a row whose tail has zero probability: the pick is the last entry that has any.
    logp = _logp(4, 130, seed=1)
    logp[:, 90:] = float("-inf")
    u = torch.full((4,), ONE_BELOW_1, dtype=torch.float64)
    assert inverse_cdf(logp, u).tolist() == [89] * 4
    wide = _logp(130, 8, seed=2).t()  # [8, 130] with stride 1 along the rows, not the vocabulary
    u = request_uniforms(5, 8)
    assert torch.equal(inverse_cdf(wide, u), inverse_cdf_ref(wide, u))


def test_benchmark_smoke_run_times_the_kernel_and_it_draws_the_torch_paths_tokens(tmp_path, monkeypatch):
    import os
    import sys

    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    )
    import bench_inverse_cdf

    monkeypatch.setenv("OUT", str(tmp_path))
    rows = {r["provider"]: r for r in bench_inverse_cdf.main(["--tiny", "--repeats", "1"])["rows"]}
    assert set(rows) == {"torch", "triton"}
    assert rows["triton"]["ms"] > 0 and rows["triton"]["rows_differing"] == 0


@pytest.mark.gpu
def test_sampler_on_cuda_takes_the_kernel_and_matches_the_torch_path_gpu():
    # The small preset's vocabulary, 1024 rows: the kernel (what sample() runs on CUDA) against the torch
    # path on the same logp. The GPU's fp32 exp may move an index whose target lies within its rounding
    # of a boundary: at most 1 of 1024 rows may differ. Compiled (fullgraph) gives the eager kernel's tokens.
    torch.manual_seed(0)
    B, V = 1024, 32768
    logits = (torch.randn(B, V, device="cuda") * 2).bfloat16()
    u = request_uniforms(7, B).cuda()
    args = (
        torch.ones(B, device="cuda"),
        torch.ones(B, device="cuda"),
        torch.zeros(B, dtype=torch.long, device="cuda"),
    )
    tokens, logprobs = sample(logits, *args, u, truncate=False)
    logp = logits.float().log_softmax(-1)
    want = inverse_cdf_ref(logp, u)
    assert (tokens != want).sum().item() <= 1
    torch.testing.assert_close(logprobs, logp.gather(1, tokens[:, None])[:, 0], rtol=0, atol=0)
    compiled = torch.compile(lambda lg, uu: sample(lg, *args, uu, truncate=False), fullgraph=True)
    c_tokens, c_logprobs = compiled(logits, u)
    assert (c_tokens != tokens).sum().item() <= 1
    torch.testing.assert_close(
        c_logprobs[c_tokens == tokens], logprobs[c_tokens == tokens], rtol=0, atol=1e-5
    )
