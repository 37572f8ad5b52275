"""The built-in engine's compiled decode step (compile_decode) against the op-by-op decode step.

On the CPU the step is traced by dynamo and functionalized by AOTAutograd (backend "aot_eager": the
in-place cache writes and buffer updates, B and S symbolic), which is where compiling can go wrong
apart from code generation; inductor's generated kernels are checked on the GPU, under CUDA graphs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from r1core.model import Transformer, presets
from r1core.rollout import BuiltinEngine, SamplingParams
from r1core.rollout.config import BuiltinArgs, RolloutConfig, build_rollout
from test_rollout import PROMPTS, _one_thread  # noqa: F401  (the prompts, and the module's one-thread fixture)


def _model(n_layers: int, device: str = "cpu") -> Transformer:
    # One dense and one MoE layer on the CPU: tracing time grows with the layers, the paths do not.
    torch.manual_seed(1234)
    args = dataclasses.replace(presets["tiny"], n_layers=n_layers, n_mtp_modules=0)
    return Transformer(args).to(device).eval()


def _assert_same_rollouts(ref, out, atol: float) -> None:
    for a, b in zip(ref, out, strict=True):
        assert b.response_ids == a.response_ids, (a.prompt_index, a.response_ids, b.response_ids)
        assert b.finish_reason == a.finish_reason
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=0, atol=atol)


def _stop_ids(samples, at: int, which) -> list[int]:
    """Tokens that some responses produce early: with them as stops, rows finish at different steps."""
    return sorted({samples[i].response_ids[at] for i in which})


def test_compiled_decode_gives_the_reference_tokens_finishes_logprobs_and_cache():
    model = _model(2)
    # max_batch 2 < 5 prompts: continuous batching, B in {1, 2}; S takes every length from 3 to 19, the
    # longest prompt (9 tokens) fills max_len = 19.
    first = BuiltinEngine(model, max_batch=2, max_len=19).generate(
        PROMPTS, 1, SamplingParams(temperature=0.0, max_new_tokens=10)
    )
    sp = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=_stop_ids(first, 3, (0, 1, 4)))
    ref_engine = BuiltinEngine(model, max_batch=2, max_len=19)
    ref = ref_engine.generate(PROMPTS, 1, sp)
    assert {s.finish_reason for s in ref} == {"stop", "length"} and ref[2].finish_reason == "length"
    engine = BuiltinEngine(model, max_batch=2, max_len=19, compile_decode="aot_eager")
    _assert_same_rollouts(ref, engine.generate(PROMPTS, 1, sp), atol=1e-5)
    # The cache writes reached the engine's own cache: both engines leave the same latents behind.
    torch.testing.assert_close(engine._cache.kv, ref_engine._cache.kv, rtol=0, atol=1e-6)
    torch.testing.assert_close(engine._cache.pe, ref_engine._cache.pe, rtol=0, atol=1e-6)
    # One compile per batch class (B = 1, B >= 2), not one per key length (nor one more at S = max_len).
    assert 1 <= engine.stats["decode_compiles"] <= 2 and engine.stats["decode_compile_s"] > 0
    assert ref_engine.stats["decode_compiles"] == 0
    # An engine of other sizes in the same process shares the compiled code object: it compiles its own
    # graph (torch 2.13 once failed to build guards when dynamo made those sizes symbolic on its own).
    sp = SamplingParams(temperature=0.0, max_new_tokens=4)
    ref = BuiltinEngine(model, max_batch=3, max_len=24).generate(PROMPTS[:2], 1, sp)
    other = BuiltinEngine(model, max_batch=3, max_len=24, compile_decode="aot_eager")
    _assert_same_rollouts(ref, other.generate(PROMPTS[:2], 1, sp), atol=1e-5)
    assert other.stats["decode_compiles"] == 1 and "compile_error" not in other.stats


def test_a_failed_compile_is_reported_and_the_engine_decodes_uncompiled():
    def failing_backend(gm, example_inputs):
        raise RuntimeError("no kernels for this graph")

    model = _model(1)  # one dense layer: the shortest trace
    sp = SamplingParams(temperature=0.0, max_new_tokens=4)
    ref = BuiltinEngine(model, max_batch=2, max_len=16).generate(PROMPTS[:2], 1, sp)
    engine = BuiltinEngine(model, max_batch=2, max_len=16, compile_decode=failing_backend)
    with pytest.warns(UserWarning, match="compile_decode: compiling the decode step failed"):
        out = engine.generate(PROMPTS[:2], 1, sp)
    _assert_same_rollouts(ref, out, atol=0)
    assert "no kernels for this graph" in engine.stats["compile_error"]
    assert engine.stats["decode_compiles"] == 0 and engine._step.compile_backend is None


def test_compile_decode_setting_reaches_the_builtin_engine():
    model = _model(2)
    on = build_rollout(RolloutConfig(builtin=BuiltinArgs(compile_decode=True)), model, None, max_len=16)
    off = build_rollout(RolloutConfig(), model, None, max_len=16)
    assert on.compile_backend == "inductor" and off.compile_backend is None


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_inductor_decode_under_cuda_graphs_matches_the_uncompiled_engine_gpu():
    model = _model(4, "cuda")  # fp32: the same tokens are expected, rounding aside
    plain = BuiltinEngine(model, max_batch=8, max_len=128)
    compiled = BuiltinEngine(model, max_batch=8, max_len=128, compile_decode=True)
    first = plain.generate(PROMPTS, 2, SamplingParams(temperature=0.0, max_new_tokens=24))
    for sp in (
        SamplingParams(
            temperature=0.0, max_new_tokens=24, stop_token_ids=_stop_ids(first, 6, range(0, 10, 3))
        ),
        SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=24, seed=3),
    ):
        _assert_same_rollouts(plain.generate(PROMPTS, 2, sp), compiled.generate(PROMPTS, 2, sp), atol=1e-4)
    torch.testing.assert_close(compiled._cache.kv, plain._cache.kv, rtol=0, atol=1e-4)
    st = compiled.stats
    assert "graph_error" not in st and "compile_error" not in st, st
    assert st["graphs_captured"] >= 3 and 1 <= st["decode_compiles"] <= 4, st
    # Replays need nothing from dynamo: a second rollout over the same buckets compiles nothing.
    n = st["decode_compiles"]
    compiled.generate(PROMPTS, 2, SamplingParams(temperature=0.0, max_new_tokens=24))
    assert st["decode_compiles"] == n


@pytest.mark.gpu
def test_inductor_decode_with_grouped_moe_in_bf16_samples_what_the_uncompiled_engine_samples_gpu():
    model = _model(4, "cuda").to(torch.bfloat16)
    for moe in model.moe_layers():  # the router bias stays fp32, as in the engine's private copies
        moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
    # Sampling, not greedy: a random model's logits are nearly flat, so bf16 rounding that fusion moves
    # flips argmax near-ties often, while a sampled token moves only when its uniform falls within the
    # rounding of a CDF boundary. A wrong step (e.g. a broken MoE) shifts the CDF by whole tokens instead.
    sp = SamplingParams(temperature=1.0, max_new_tokens=16, seed=5)
    plain = BuiltinEngine(model, max_batch=8, max_len=64, decode_moe="grouped").generate(PROMPTS, 1, sp)
    engine = BuiltinEngine(model, max_batch=8, max_len=64, decode_moe="grouped", compile_decode=True)
    out = engine.generate(PROMPTS, 1, sp)
    assert "graph_error" not in engine.stats and engine.stats["decode_compiles"] >= 1
    assert "compile_error" not in engine.stats, engine.stats["compile_error"]
    # bf16: fusion keeps some intermediates in fp32 that the op-by-op step rounds, so a sample may part
    # from the uncompiled one; up to there the log-probs agree to bf16 rounding.
    agreed = 0
    for a, b in zip(plain, out, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a.response_ids, b.response_ids)) if x != y), 16)
        agreed += n
        torch.testing.assert_close(
            torch.tensor(b.logprobs[:n]), torch.tensor(a.logprobs[:n]), rtol=0, atol=3e-2
        )
    assert agreed >= 0.8 * 16 * len(PROMPTS), agreed
