"""The absorbed-MLA decode attention kernel against its PyTorch specification and the engine's reference."""

from __future__ import annotations

import pytest
import torch

from r1core.kernels.mla_decode import mla_decode, mla_decode_ref
from r1core.model import Transformer, presets
from r1core.rollout import BuiltinEngine, SamplingParams
from r1core.testing import assert_close_to_ref


def _inputs(B, H, C, R, S, dtype=torch.float32, device="cpu", seed=0, spare=3):
    """Queries and a cache slice laid out as the engine holds it: a slice of a larger cache (strided)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, C, generator=g, device=device).to(dtype)
    qp = torch.randn(B, H, R, generator=g, device=device).to(dtype)
    kv = torch.randn(B + spare, S + spare, C, generator=g, device=device).to(dtype)[:B, :S]
    pe = torch.randn(B + spare, S + spare, R, generator=g, device=device).to(dtype)[:B, :S]
    return q, qp, kv, pe


@pytest.mark.parametrize(
    "B,H,C,R,S",
    [(3, 5, 40, 12, 37), (2, 20, 32, 16, 70), (1, 16, 64, 16, 1)],  # heads over two blocks; one slot
)
def test_mla_decode_matches_ref_for_ragged_key_counts(B, H, C, R, S):
    q, qp, kv, pe = _inputs(B, H, C, R, S)
    n_keys = torch.tensor([S, 1, (S + 1) // 2][:B])
    scale = C**-0.5
    out = mla_decode(q, qp, kv, pe, n_keys, scale)
    ref = mla_decode_ref(q, qp, kv, pe, n_keys, scale)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # keys at or past n_keys are never read: changing them changes nothing
    kv2, pe2 = kv.clone(), pe.clone()
    for b, n in enumerate(n_keys.tolist()):
        kv2[b, n:] = 1e4
        pe2[b, n:] = -1e4
    torch.testing.assert_close(mla_decode(q, qp, kv2, pe2, n_keys, scale), out, rtol=0, atol=0)


def test_mla_decode_ref_is_the_model_attention_on_the_latent_cache():
    # mla_decode_ref(q_lat, ...) followed by W_UV is the model's absorbed attention for one decode token
    args = presets["tiny"]
    torch.manual_seed(0)
    attn = Transformer(args).layers["0"].attn
    B, S = 3, 9
    q_nope = torch.randn(B, 1, args.n_heads, args.qk_nope_head_dim)
    q_pe = torch.randn(B, 1, args.n_heads, args.qk_rope_head_dim)
    kv, pe = torch.randn(B, S, args.kv_lora_rank), torch.randn(B, S, args.qk_rope_head_dim)
    pos = torch.tensor([8, 0, 4])
    mask = (torch.arange(S)[None, :] <= pos[:, None])[:, None, None, :]
    with torch.no_grad():
        want = attn._attend_absorbed(q_nope, q_pe, kv, pe, mask)[:, 0]
        w_uk, w_uv = attn.absorbed_weights()
        q_lat = torch.einsum("bhd,hdc->bhc", q_nope[:, 0], w_uk)
        out_lat = mla_decode(q_lat, q_pe[:, 0], kv, pe, pos + 1, attn.softmax_scale)
        got = torch.einsum("bhc,hdc->bhd", out_lat, w_uv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mla_decode_custom_op_fake_agrees_with_the_op_on_strided_inputs():
    # torch.compile traces the op through its fake: its output must have the real op's shape and strides, also
    # for a q_lat laid out heads-first (as inductor may compute the einsum before it)
    q, qp, kv, pe = _inputs(3, 16, 32, 16, 9)
    q_heads_first = q.transpose(0, 1).contiguous().transpose(0, 1)
    n = torch.tensor([9, 1, 5])
    result = torch.library.opcheck(torch.ops.r1core.mla_decode.default, (q_heads_first, qp, kv, pe, n, 0.25))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_mla_decode_rejects_bad_arguments():
    q, qp, kv, pe = _inputs(2, 4, 16, 16, 5)
    n = torch.tensor([5, 5])
    with pytest.raises(ValueError, match="q_lat"):
        mla_decode(q[0], qp, kv, pe, n, 1.0)
    with pytest.raises(ValueError, match="disagree"):
        mla_decode(q, qp, kv[..., :8], pe, n, 1.0)
    with pytest.raises(ValueError, match="unit stride"):
        mla_decode(q, qp, kv.transpose(1, 2).contiguous().transpose(1, 2), pe, n, 1.0)
    with pytest.raises(ValueError, match="fp32"):
        mla_decode(*(t.bfloat16() for t in (q, qp, kv, pe)), n, 1.0)


def test_engine_with_the_kernel_decodes_the_tokens_of_the_pytorch_attention():
    # the CPU runs the kernel under the interpreter (fp32): greedy and seeded sampling give the same tokens
    torch.manual_seed(1234)
    model = Transformer(presets["tiny"]).eval()
    prompts = [[5, 17, 99, 3, 250, 8], [42, 7], [300, 301, 302, 303, 304, 305, 306, 307, 308]]
    for sp in (
        SamplingParams(temperature=0.0, max_new_tokens=8),
        SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=8, seed=5),
    ):
        a = BuiltinEngine(model, max_batch=2, max_len=32, mla_kernel=False).generate(prompts, 2, sp)
        kernel = BuiltinEngine(model, max_batch=2, max_len=32, mla_kernel=True)
        b = kernel.generate(prompts, 2, sp)
        assert kernel._step.mla_kernel
        assert [s.response_ids for s in a] == [s.response_ids for s in b]
        for x, y in zip(a, b):
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_gpu_mla_decode_small_preset_shapes_bf16():
    # the small preset's decode shapes (B256, 16 heads, rank 512, rope 64), strided cache, bf16: the kernel
    # within the rule of the PyTorch path in bf16 (scores rounded to bf16 before the softmax) against fp32
    B, H, C, R, S = 256, 16, 512, 64, 136
    q, qp, kv, pe = _inputs(B, H, C, R, S, torch.bfloat16, "cuda")
    n_keys = torch.randint(1, S + 1, (B,), device="cuda")
    scale = (128 + 64) ** -0.5
    out = mla_decode(q, qp, kv, pe, n_keys, scale)
    ref32 = mla_decode_ref(q, qp, kv, pe, n_keys, scale)
    scores = (torch.einsum("bhc,bsc->bhs", q, kv) + torch.einsum("bhr,bsr->bhs", qp, pe)).float() * scale
    valid = torch.arange(S, device="cuda")[None, :] < n_keys[:, None]
    probs = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(-1).to(kv.dtype)
    ref_lp = torch.einsum("bhs,bsc->bhc", probs, kv)
    assert_close_to_ref(out, ref32, ref_lp, floor=1e-3, name="out_lat")


@pytest.mark.gpu
def test_gpu_engine_with_the_kernel_decodes_the_tokens_of_the_pytorch_attention_under_cuda_graphs():
    # fp32 on the GPU (no TF32 in either path): the same tokens, greedy and sampled, with CUDA graphs
    torch.manual_seed(1234)
    model = Transformer(presets["tiny"]).cuda().eval()
    prompts = [[5, 17, 99, 3, 250, 8], [42, 7], [300, 301, 302, 303, 304, 305, 306, 307, 308], [11]]
    for sp in (SamplingParams(temperature=0.0, max_new_tokens=24), SamplingParams(max_new_tokens=24, seed=4)):
        a = BuiltinEngine(model, max_batch=8, max_len=128, mla_kernel=False).generate(prompts, 2, sp)
        kernel = BuiltinEngine(model, max_batch=8, max_len=128, mla_kernel=True)
        b = kernel.generate(prompts, 2, sp)
        assert kernel._step.mla_kernel and kernel.stats["graphs_captured"] >= 1
        assert [s.response_ids for s in a] == [s.response_ids for s in b]
        for x, y in zip(a, b):
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), rtol=0, atol=1e-4)
