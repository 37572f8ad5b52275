"""Rollout engines: the built-in engine against a full-recompute reference, seeded sampling,
continuous batching, stops, weight updates; the SGLang adapter against a fake `sglang` module."""

from __future__ import annotations

import math

import pytest
import torch

from r1core.model import MoE, Transformer, presets
from r1core.model.moe import route_ref
from r1core.rollout import BuiltinEngine, Sample, SamplingParams, request_seed, request_uniforms, sample
from r1core.rollout.decode import expert_order, moe_auto, moe_dense, moe_grouped, route_topk

PROMPTS = [[5, 17, 99, 3, 250, 8], [42, 7], [300, 301, 302, 303, 304, 305, 306, 307, 308], [11], [60, 61, 62]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls on a shared 2-core machine run ~30x faster without intra-op threading.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(1234)
    return Transformer(presets["tiny"]).eval()


class LetterTokenizer:
    """Token i decodes to one letter, so text positions and token positions coincide."""

    def __init__(self, eos_id: int = -1):
        self.eos_id = eos_id

    def decode(self, ids) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


@torch.no_grad()
def reference_greedy(model: Transformer, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Full recompute: run the whole sequence through model(tokens) at every step, take the argmax."""
    tokens, logprobs = list(prompt), []
    for _ in range(steps):
        logits = model(torch.tensor([tokens]))[0, -1].float()
        tok = int(logits.argmax())
        logprobs.append(float(logits.log_softmax(-1)[tok]))
        tokens.append(tok)
    return tokens[len(prompt) :], logprobs


def greedy(max_new=12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new, **kw)


# ---------------------------------------------------------------- sampler
def test_sampler_frequencies_match_truncated_distribution():
    torch.manual_seed(0)
    V, N = 10, 40000
    logits = torch.randn(V) * 2
    T, top_k, top_p = 0.7, 6, 0.8
    probs = (logits / T).softmax(-1).double()
    order = probs.argsort(descending=True)
    keep = torch.zeros(V, dtype=torch.bool)
    mass = 0.0
    for rank, i in enumerate(order.tolist()):  # smallest top-ranked set reaching top_p, within top_k
        if rank >= top_k or mass >= top_p:
            break
        keep[i], mass = True, mass + float(probs[i])
    expected = torch.where(keep, probs, 0) / probs[keep].sum()
    tokens, logprobs = sample(
        logits.expand(N, V),
        torch.full((N,), T),
        torch.full((N,), top_p),
        torch.full((N,), top_k),
        request_uniforms(7, N),
    )
    freq = torch.bincount(tokens, minlength=V).double() / N
    assert not freq[~keep].any(), "sampled a token outside top-k / top-p"
    assert (freq - expected).abs().max() < 0.015, f"freq {freq} vs expected {expected}"
    # logprobs come from the full temperature-scaled distribution, not the truncated one
    torch.testing.assert_close(logprobs, (logits / T).log_softmax(-1)[tokens], rtol=0, atol=1e-6)


def test_sampler_untruncated_path_matches_sorted_path_without_top_k_top_p():
    torch.manual_seed(0)
    B, V = 64, 50
    logits, u = torch.randn(B, V), request_uniforms(3, B)
    args = (torch.full((B,), 1.3), torch.ones(B), torch.zeros(B, dtype=torch.long), u)
    full, lp_full = sample(logits, *args, truncate=False)
    cdf = (logits / 1.3).softmax(-1).double().cumsum(-1)
    expected = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    assert torch.equal(full, expected)
    assert torch.allclose(lp_full, (logits / 1.3).log_softmax(-1).gather(1, full[:, None])[:, 0])


def test_sampler_greedy_rows_take_argmax_with_unscaled_logprob():
    logits = torch.tensor([[0.1, 2.0, 2.0, -1.0], [3.0, 0.0, 0.0, 0.0]])
    tokens, logprobs = sample(
        logits,
        torch.tensor([0.0, 0.0]),
        torch.tensor([0.5, 1.0]),
        torch.tensor([1, 0]),
        torch.tensor([0.99, 0.99], dtype=torch.float64),
    )
    assert tokens.tolist() == [1, 0]  # ties go to the lower index
    torch.testing.assert_close(logprobs, logits.log_softmax(-1)[[0, 1], [1, 0]])


def test_request_seed_is_stable_and_distinct():
    seeds = {request_seed(5, i, j) for i in range(20) for j in range(8)}
    assert len(seeds) == 160 and all(0 <= s < 2**63 for s in seeds)
    assert request_seed(5, 3, 2) == request_seed(5, 3, 2) != request_seed(6, 3, 2)


def test_sampling_params_reject_invalid_values():
    for bad in (
        dict(temperature=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(max_new_tokens=0),
        dict(stop=[""]),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError):
        Sample(prompt_ids=[1], response_ids=[2], logprobs=[], finish_reason="stop")


# ---------------------------------------------------------------- graph-safe decode pieces
def test_route_topk_equals_route_ref(model):
    moe = model.moe_layers()[0]
    torch.manual_seed(0)
    moe.gate.e_score_correction_bias.normal_(0, 0.05)  # make the bias steer selection
    try:
        logits = torch.randn(37, moe.gate.spec.n_experts)
        w, idx, _ = route_ref(logits, moe.gate.e_score_correction_bias, moe.gate.spec)
        w2, idx2 = route_topk(logits, moe.gate.e_score_correction_bias, moe.gate.spec)
        assert torch.equal(idx2, idx) and torch.equal(w2, w)
    finally:
        moe.gate.e_score_correction_bias.zero_()


@pytest.mark.parametrize("path", [moe_dense, moe_grouped, moe_auto])
def test_decode_moe_paths_match_moe_forward(model, path):
    moe: MoE = model.moe_layers()[1]
    for T in (1, 5, 40, 160):  # T*K below, near and above the expert count; auto turns grouped past 128
        x = torch.randn(1, T, model.args.dim)
        with torch.no_grad():
            torch.testing.assert_close(path(moe, x), moe(x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("E,P", [(8, 1), (8, 16), (32, 1024), (256, 2048)])
def test_expert_order_is_the_stable_sort_by_expert_and_its_offsets(E, P):
    g = torch.Generator().manual_seed(E + P)
    for flat in (torch.randint(0, E, (P,), generator=g), torch.full((P,), E - 1), torch.arange(P) % E):
        order, offs = expert_order(flat, E)
        assert torch.equal(order, torch.sort(flat, stable=True).indices)
        assert offs.dtype == torch.int32
        assert torch.equal(offs, torch.bincount(flat, minlength=E).cumsum(0).int())


# ---------------------------------------------------------------- built-in engine
@pytest.mark.parametrize("decode_moe", ["dense", "grouped", "auto", "model"])
def test_greedy_equals_full_recompute_reference_with_continuous_batching(model, decode_moe):
    # max_batch=2 < 5 prompts: rows are freed and refilled while others decode.
    engine = BuiltinEngine(model, max_batch=2, max_len=64, decode_moe=decode_moe)
    samples = engine.generate(PROMPTS, 1, greedy(12))
    for p, s in zip(PROMPTS, samples):
        ref_tokens, ref_logprobs = reference_greedy(model, p, 12)
        assert s.response_ids == ref_tokens
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(ref_logprobs), rtol=0, atol=1e-4)
        assert s.finish_reason == "length" and s.prompt_ids == p
    assert engine.stats["prefills"] >= 3


def test_decode_over_a_length_bucket_matches_the_exact_key_range(model, monkeypatch):
    # CUDA graphs decode over S = the row's length rounded up to a bucket; the extra slots are masked out.
    exact = BuiltinEngine(model, max_batch=2, max_len=64).generate(PROMPTS, 1, greedy(12))
    engine = BuiltinEngine(model, max_batch=2, max_len=64)
    engine._ensure_runtime()
    step, seen = engine._step, []

    def bucketed(B, S, truncate):
        seen.append((S, next(b for b in engine.len_buckets if b >= S)))
        return step(B, seen[-1][1], truncate)

    monkeypatch.setattr(engine, "_step", bucketed)
    for a, b in zip(exact, engine.generate(PROMPTS, 1, greedy(12))):
        assert a.response_ids == b.response_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
    assert len(seen) > 10 and all(s < b for s, b in seen) and engine.len_buckets == [32, 48, 64]


def test_sampling_is_reproducible_and_independent_of_batching(model):
    sp = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_new_tokens=10, seed=2024)
    runs = [
        BuiltinEngine(model, max_batch=mb, max_len=64, max_prefill_tokens=chunk).generate(PROMPTS, 3, sp)
        for mb, chunk in ((16, 4096), (1, 4096), (4, 8))
    ]
    base = runs[0]
    assert [(s.prompt_index, s.sample_index) for s in base] == [(i, j) for i in range(5) for j in range(3)]
    for other in runs[1:]:
        assert [s.response_ids for s in other] == [s.response_ids for s in base]
        for a, b in zip(base, other):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
    group = [s.response_ids for s in base[:3]]
    assert len({tuple(g) for g in group}) == 3, "samples of one prompt must differ"
    fresh = BuiltinEngine(model, max_batch=4, max_len=64).generate(
        PROMPTS, 3, SamplingParams(max_new_tokens=10)
    )
    assert [s.response_ids for s in fresh] != [s.response_ids for s in base]


def test_rows_freed_by_early_stops_are_refilled_without_changing_any_sample(model):
    # ~1 in 7 tokens stops a sequence, so rows free up at different steps and queued requests
    # are prefilled while other rows are mid-decode.
    sp = SamplingParams(temperature=1.0, max_new_tokens=12, stop_token_ids=list(range(0, 512, 7)), seed=5)
    runs = {}
    for mb in (16, 3, 1):
        engine = BuiltinEngine(model, max_batch=mb, max_len=64)
        runs[mb] = engine.generate(PROMPTS, 3, sp)
        if mb == 3:
            assert engine.stats["prefills"] >= 5
    lengths = {len(s.response_ids) for s in runs[16]}
    assert len(lengths) >= 4, f"want varied finishing steps, got lengths {lengths}"
    for mb in (3, 1):
        assert [s.response_ids for s in runs[mb]] == [s.response_ids for s in runs[16]]
    for s in runs[16]:
        stops = [i for i, t in enumerate(s.response_ids) if t % 7 == 0]
        assert stops == ([len(s.response_ids) - 1] if s.finish_reason == "stop" else [])
        assert s.finish_reason == "stop" or len(s.response_ids) == 12


def test_compacted_rows_shrink_the_batch_without_changing_any_sample(model, monkeypatch):
    # Early stops free rows at different steps; with nothing queued, compact_rows moves the survivors (their
    # latent cache slots and decode state) below the smallest bucket holding them, so later steps run fewer
    # rows. Every sample's tokens and log-probs stay those of the uncompacted engine; the step in flight when
    # rows move is read back by its old rows (results arrive one step late on the host).
    sp = SamplingParams(temperature=1.0, max_new_tokens=16, stop_token_ids=list(range(0, 512, 5)), seed=8)
    sizes = {}
    runs = {}
    for compact in (False, True):
        engine = BuiltinEngine(model, max_batch=16, max_len=64, compact_rows=compact)
        seen = sizes[compact] = []
        real = engine._decode
        monkeypatch.setattr(
            engine, "_decode", lambda B, S, t, real=real, seen=seen: seen.append(B) or real(B, S, t)
        )
        runs[compact] = engine.generate(PROMPTS, 3, sp)
        assert (engine.stats["rows_moved"] > 0) == compact
    lengths = sorted(len(s.response_ids) for s in runs[False])
    assert lengths[0] < lengths[-1] == 16, lengths  # ragged: rows finish at different steps
    assert [s.response_ids for s in runs[True]] == [s.response_ids for s in runs[False]]
    for a, b in zip(runs[True], runs[False]):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
    assert len(sizes[True]) == len(sizes[False]) and sum(sizes[True]) < sum(sizes[False])
    assert BuiltinEngine(model, max_batch=4, max_len=64).compact_rows is False  # CPU default: exact B already


def test_shared_prefill_gives_each_sample_the_tokens_of_its_own_prefill(model):
    # n=4 samples per prompt, early stops so rows are refilled mid-decode: a prompt's samples are
    # admitted together (one prefill, latent rows copied) or split across admissions (max_batch 3).
    sp = SamplingParams(temperature=1.0, max_new_tokens=10, stop_token_ids=list(range(0, 512, 9)), seed=11)
    own = BuiltinEngine(model, max_batch=32, max_len=64, share_prefill=False)
    base = own.generate(PROMPTS, 4, sp)
    assert own.stats["prefill_rows_shared"] == 0
    prefills = {}
    for mb, admit in ((32, 1), (3, 1), (6, 4), (6, 0)):  # admit_min 0: each call's n (here 4)
        shared = BuiltinEngine(model, max_batch=mb, max_len=64, admit_min=admit)
        out = shared.generate(PROMPTS, 4, sp)
        prefills[mb, admit] = shared.stats["prefills"], shared.stats["prefill_rows"]
        assert [s.response_ids for s in out] == [s.response_ids for s in base]
        for a, b in zip(base, out):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
            assert a.finish_reason == b.finish_reason
    assert shared.stats["prefill_rows_shared"] > 0
    assert prefills[6, 0] == prefills[6, 4] != prefills[3, 1]
    engine = BuiltinEngine(model, max_batch=32, max_len=64)
    samples = engine.generate(PROMPTS[:3], 3, greedy(8))
    assert engine.stats["prefill_rows"] == 3 and engine.stats["prefill_rows_shared"] == 6
    for s in samples:
        assert s.response_ids == reference_greedy(model, PROMPTS[s.prompt_index], 8)[0]


def test_logprobs_are_temperature_scaled_full_distribution(model):
    sp = SamplingParams(temperature=0.5, top_k=3, max_new_tokens=6, seed=1)
    s = BuiltinEngine(model, max_batch=2, max_len=64).generate([PROMPTS[0]], 1, sp)[0]
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0] + s.response_ids]))[0, len(PROMPTS[0]) - 1 : -1].float()
    ranks = (logits > logits.gather(1, torch.tensor(s.response_ids)[:, None])).sum(-1)
    assert (ranks < 3).all(), "top_k=3 sampled outside the top 3"
    expected = (logits / 0.5).log_softmax(-1).gather(1, torch.tensor(s.response_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(s.logprobs), expected, rtol=0, atol=1e-4)


def test_stop_token_ids_and_tokenizer_eos_end_the_response(model):
    free_run = BuiltinEngine(model, LetterTokenizer(), max_batch=2, max_len=64).generate(
        [PROMPTS[2]], 1, greedy(12)
    )[0]
    R = free_run.response_ids
    stop_tok = R[5]
    k = R.index(stop_tok)
    for engine, sp in (
        (
            BuiltinEngine(model, LetterTokenizer(), max_batch=2, max_len=64),
            greedy(12, stop_token_ids=[stop_tok]),
        ),
        (BuiltinEngine(model, LetterTokenizer(eos_id=stop_tok), max_batch=2, max_len=64), greedy(12)),
    ):
        s = engine.generate([PROMPTS[2]], 1, sp)[0]
        assert s.response_ids == R[: k + 1] and len(s.logprobs) == k + 1
        assert s.finish_reason == "stop" and s.metadata["matched_stop"] == stop_tok
        assert s.response_text == LetterTokenizer().decode(R[:k])


def test_stop_string_ends_response_and_is_trimmed_from_text(model):
    tok = LetterTokenizer()
    engine = BuiltinEngine(model, tok, max_batch=3, max_len=64)
    R = engine.generate([PROMPTS[0]], 1, greedy(16))[0].response_ids
    text = tok.decode(R)
    stop = text[6:8]
    i = text.find(stop)
    s = engine.generate([PROMPTS[0], PROMPTS[1]], 1, greedy(16, stop=["@@", stop]))[0]
    assert s.response_ids == R[: i + len(stop)]
    assert s.response_text == text[:i]
    assert s.finish_reason == "stop" and s.metadata["matched_stop"] == stop
    with pytest.raises(ValueError, match="tokenizer"):
        BuiltinEngine(model, max_batch=2, max_len=64).generate([PROMPTS[0]], 1, greedy(4, stop=["x"]))


def test_cache_length_caps_generation_and_overlong_prompts_abort(model):
    engine = BuiltinEngine(model, max_batch=2, max_len=16)
    long_ok, too_long = list(range(1, 14)), list(range(1, 17))
    a, b, c = engine.generate([long_ok, too_long, PROMPTS[1]], 1, greedy(8))
    assert len(a.response_ids) == 3 and a.finish_reason == "length"
    assert a.response_ids == reference_greedy(model, long_ok, 3)[0]
    assert b.finish_reason == "abort" and b.response_ids == [] and b.logprobs == []
    assert c.response_ids == reference_greedy(model, PROMPTS[1], 8)[0]


def test_update_weights_private_copy_follows_trainer(model):
    trainer = Transformer(model.args)
    trainer.load_state_dict(model.state_dict())
    engine = BuiltinEngine(trainer, max_batch=2, max_len=64, dtype=torch.float64)  # private copy
    assert engine.model is not trainer and not engine.model.mtp
    assert engine.model.layers["1"].ffn.gate.e_score_correction_bias.dtype == torch.float32
    before = engine.generate(PROMPTS[:2], 1, greedy(6))
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    assert [s.response_ids for s in engine.generate(PROMPTS[:2], 1, greedy(6))] == [
        s.response_ids for s in before
    ]
    engine.update_weights(trainer)
    after = engine.generate(PROMPTS[:2], 1, greedy(6))
    assert [s.response_ids for s in after] == [reference_greedy(trainer.eval(), p, 6)[0] for p in PROMPTS[:2]]
    assert after[0].metadata["weight_version"] == 1
    with pytest.raises(KeyError):
        engine.update_weights({"embed.weight": trainer.embed.weight})


def test_sleep_drops_cache_and_wake_restores_identical_generation(model):
    engine = BuiltinEngine(model, max_batch=2, max_len=32)
    sp = SamplingParams(max_new_tokens=5, seed=9)
    first = engine.generate(PROMPTS, 2, sp)
    engine.sleep()
    assert engine._cache is None
    engine.wake()
    assert [s.response_ids for s in engine.generate(PROMPTS, 2, sp)] == [s.response_ids for s in first]
    assert engine.kv_cache_bytes_per_token() == 4 * (32 + 16) * 4  # layers * (kv_lora_rank + rope) * fp32


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager_decode_gpu():
    torch.manual_seed(1234)
    model = Transformer(presets["tiny"]).cuda().eval()
    eager = BuiltinEngine(model, max_batch=8, max_len=128, cuda_graphs=False)
    graphs = BuiltinEngine(model, max_batch=8, max_len=128, cuda_graphs=True)
    for sp in (
        greedy(24),
        SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=24, seed=3),
        SamplingParams(max_new_tokens=24, seed=4),
        SamplingParams(max_new_tokens=24, stop_token_ids=list(range(0, 512, 5)), seed=6),  # ragged: rows move
    ):
        a, b = eager.generate(PROMPTS, 2, sp), graphs.generate(PROMPTS, 2, sp)
        assert [s.response_ids for s in a] == [s.response_ids for s in b]
        for x, y in zip(a, b):
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), rtol=0, atol=1e-4)
    assert graphs.stats["graphs_captured"] >= 3 and "graph_error" not in graphs.stats
    assert graphs.stats["rows_moved"] > 0 and eager.stats["rows_moved"] == 0  # compact_rows: on with graphs
    graphs.sleep()
    graphs.wake()
    assert [s.response_ids for s in graphs.generate(PROMPTS, 1, greedy(8))] == [
        s.response_ids for s in eager.generate(PROMPTS, 1, greedy(8))
    ]


@pytest.mark.gpu
def test_cuda_graph_greedy_equals_full_recompute_reference_gpu():
    torch.manual_seed(1234)
    model = Transformer(presets["tiny"]).cuda().eval()
    engine = BuiltinEngine(model, max_batch=4, max_len=64)
    samples = engine.generate(PROMPTS, 1, greedy(16))
    for p, s in zip(PROMPTS, samples):
        with torch.no_grad():
            tokens = list(p)
            for _ in range(16):
                tokens.append(int(model(torch.tensor([tokens], device="cuda"))[0, -1].argmax()))
        assert s.response_ids == tokens[len(p) :]


# ---------------------------------------------------------------- SGLang adapter (fake sglang module)
class FakeSGLangEngine:
    """Records calls with the signatures of sglang/srt/entrypoints/engine.py's Engine."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.fail_update = kwargs, [], False
        self.server_args = type(
            "ServerArgs", (), {"enable_weights_cpu_backup": kwargs.get("enable_weights_cpu_backup", False)}
        )()
        self.outputs = None

    def generate(self, input_ids=None, sampling_params=None, return_logprob=False):
        self.calls.append(("generate", input_ids, sampling_params, return_logprob))
        if self.outputs is not None:
            return self.outputs
        outs = []
        for ids, sp in zip(input_ids, sampling_params):
            toks = [(sp["sampling_seed"] + 7 * k + ids[0]) % 500 for k in range(3)]
            outs.append(
                {
                    "output_ids": toks,
                    "meta_info": {
                        "output_token_logprobs": [(-0.25 * (k + 1), t, None) for k, t in enumerate(toks)],
                        "finish_reason": {"type": "length", "length": 3},
                    },
                }
            )
        return outs

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(("update", [(n, t.clone()) for n, t in named_tensors], flush_cache))
        return (False, "shape mismatch") if self.fail_update else (True, "Succeeded")

    def flush_cache(self):
        self.calls.append(("flush",))

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release", tags))

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume", tags))


@pytest.fixture
def fake_sglang(monkeypatch):
    import types

    module = types.ModuleType("sglang")
    module.Engine = FakeSGLangEngine
    monkeypatch.setitem(__import__("sys").modules, "sglang", module)
    return module


def _sglang_engine(model, tmp_path, **kw):
    from r1core.rollout.sglang_engine import SGLangEngine

    return SGLangEngine(model, export_dir=str(tmp_path / "hf"), **kw)


def test_sglang_engine_without_sglang_raises_a_clear_error(model, monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "sglang", None)
    with pytest.raises(ImportError, match=r"r1core\[sglang\]"):
        _sglang_engine(model, tmp_path)


def test_hf_export_names_shapes_match_checkpoint_writer(model, tmp_path):
    from safetensors.torch import load_file

    from r1core.checkpoint.hf import save_pretrained
    from r1core.rollout.sglang_engine import hf_named_tensors

    save_pretrained(model, tmp_path / "ckpt", dtype=torch.bfloat16)
    on_disk = {}
    for f in (tmp_path / "ckpt").glob("*.safetensors"):
        on_disk.update(load_file(str(f)))
    state = model.state_dict()
    full = dict(hf_named_tensors(state, model.args, torch.bfloat16, include_mtp=True))
    assert full.keys() == on_disk.keys()
    for name, t in full.items():
        assert t.dtype == on_disk[name].dtype and torch.equal(t, on_disk[name]), name
    main = dict(hf_named_tensors(state, model.args, torch.bfloat16))
    L = model.args.n_layers
    assert main.keys() == {k for k in on_disk if not k.startswith(f"model.layers.{L}.")}
    assert main["model.layers.1.mlp.experts.5.down_proj.weight"].shape == (
        model.args.dim,
        model.args.moe_inter_dim,
    )
    assert main["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_buckets_respect_the_byte_bound_and_keep_every_tensor_once():
    from r1core.rollout.sglang_engine import buckets

    torch.manual_seed(0)
    named = [(f"t{i}", torch.zeros(int(torch.randint(1, 300, ())))) for i in range(60)] + [
        ("big", torch.zeros(2000))
    ]
    out = list(buckets(named, max_bytes=1024))
    assert [n for b in out for n, _ in b] == [n for n, _ in named]
    for b in out:
        size = sum(t.numel() * t.element_size() for _, t in b)
        assert size <= 1024 or len(b) == 1
    assert any(len(b) == 1 and b[0][0] == "big" for b in out)


def test_sglang_update_weights_sends_every_tensor_once_in_bounded_buckets_then_flushes(
    model, fake_sglang, tmp_path
):
    from r1core.rollout.sglang_engine import hf_named_tensors

    engine = _sglang_engine(model, tmp_path, bucket_bytes=64 << 10)
    kw = engine.engine.kwargs
    assert kw["model_path"] == str(tmp_path / "hf") and (tmp_path / "hf" / "config.json").exists()
    assert kw["skip_tokenizer_init"] and kw["enable_memory_saver"] and kw["dtype"] == "bfloat16"
    trainer = Transformer(model.args)
    engine.update_weights(trainer)
    updates = [c for c in engine.engine.calls if c[0] == "update"]
    assert len(updates) > 3 and all(flush is False for _, _, flush in updates)
    assert engine.engine.calls[-1] == ("flush",)
    for _, bucket, _ in updates:
        assert sum(t.numel() * t.element_size() for _, t in bucket) <= 64 << 10 or len(bucket) == 1
    sent = [(n, t) for _, bucket, _ in updates for n, t in bucket]
    expected = dict(hf_named_tensors(trainer.state_dict(), model.args, torch.bfloat16))
    assert sorted(n for n, _ in sent) == sorted(expected)
    assert all(torch.equal(t, expected[n]) for n, t in sent)
    assert engine.weight_version == 1
    engine.engine.fail_update = True
    with pytest.raises(RuntimeError, match="shape mismatch"):
        engine.update_weights(trainer.state_dict())


def test_sglang_generate_builds_requests_and_reads_logprobs(model, fake_sglang, tmp_path):
    engine = _sglang_engine(model, tmp_path, tokenizer=LetterTokenizer())
    sp = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=3, stop_token_ids=[2], seed=11)
    samples = engine.generate(PROMPTS[:2], 2, sp)
    _, input_ids, params, return_logprob = engine.engine.calls[-1]
    assert return_logprob and input_ids == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert params[0] == {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,
        "max_new_tokens": 3,
        "no_stop_trim": False,
        "stop_token_ids": [2],
        "sampling_seed": request_seed(11, 0, 0) % 2**31,
    }
    assert len({p["sampling_seed"] for p in params}) == 4
    assert [(s.prompt_index, s.sample_index) for s in samples] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    s = samples[3]
    assert s.response_ids == [(params[3]["sampling_seed"] + 7 * k + PROMPTS[1][0]) % 500 for k in range(3)]
    assert s.logprobs == [-0.25, -0.5, -0.75] and s.finish_reason == "length"
    assert s.response_text == LetterTokenizer().decode(s.response_ids)
    with pytest.raises(ValueError, match="tokenizer_path"):
        engine.generate(PROMPTS[:1], 1, SamplingParams(stop=["</answer>"]))
    # A stop-string finish with SGLang's own (already trimmed) text, and an abort.
    engine.engine.outputs = [
        {
            "text": "42",
            "output_ids": [7, 8, 9],
            "meta_info": {
                "output_token_logprobs": [(-1.0, 7, None), (-2.0, 8, None), (-3.0, 9, None)],
                "finish_reason": {"type": "stop", "matched": "</answer>"},
            },
        },
        {
            "output_ids": [],
            "meta_info": {"output_token_logprobs": [], "finish_reason": {"type": "abort", "message": "x"}},
        },
    ]
    stop, abort = engine.generate(PROMPTS[:2], 1, SamplingParams(max_new_tokens=3, top_k=5))
    assert engine.engine.calls[-1][2][0]["top_k"] == 5
    assert (
        stop.response_text == "42"
        and stop.finish_reason == "stop"
        and stop.metadata["matched_stop"] == "</answer>"
    )
    assert abort.finish_reason == "abort" and abort.response_ids == []


def test_sglang_sleep_wake_release_and_resume_memory(model, fake_sglang, tmp_path):
    engine = _sglang_engine(model, tmp_path)
    engine.sleep()
    engine.wake()
    assert engine.engine.calls[-2:] == [("release", None), ("resume", None)]
    with pytest.raises(RuntimeError, match="update_weights"):  # weights were dropped, not backed up
        engine.generate(PROMPTS[:1], 1, SamplingParams(max_new_tokens=2))
    engine.update_weights(model)
    assert len(engine.generate(PROMPTS[:1], 1, SamplingParams(max_new_tokens=2))) == 1
    engine.sleep(tags=["kv_cache"])
    assert engine.engine.calls[-1] == ("release", ["kv_cache"])
    engine.wake(tags=["kv_cache"])
    assert len(engine.generate(PROMPTS[:1], 1, SamplingParams(max_new_tokens=2))) == 1
    backed_up = _sglang_engine(model, tmp_path, enable_weights_cpu_backup=True)
    backed_up.sleep()
    backed_up.wake()
    assert len(backed_up.generate(PROMPTS[:1], 1, SamplingParams(max_new_tokens=2))) == 1


@pytest.mark.gpu
def test_grouped_moe_decode_is_graph_safe_and_accurate_in_bf16_gpu():
    from r1core.testing import assert_close_to_ref

    torch.manual_seed(1234)
    model = Transformer(presets["tiny"]).cuda().eval()
    moe = model.moe_layers()[1]
    x = torch.randn(1, 24, model.args.dim, device="cuda")
    with torch.no_grad():
        ref32 = moe(x)[0]
        model.to(torch.bfloat16)
        moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
        ref16 = moe(x.bfloat16())[0]
        assert_close_to_ref(moe_grouped(moe, x.bfloat16()), ref32, ref16, floor=1e-2, name="moe_grouped bf16")
    engine = BuiltinEngine(model, max_batch=8, max_len=64, decode_moe="grouped")
    samples = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=16, seed=1))
    assert engine.stats["graphs_captured"] >= 1 and "graph_error" not in engine.stats
    assert all(len(s.response_ids) == 16 and all(math.isfinite(lp) for lp in s.logprobs) for s in samples)


@pytest.mark.gpu
def test_sleep_offloads_a_private_copy_and_frees_gpu_memory_gpu():
    torch.manual_seed(1234)
    model = Transformer(presets["tiny"]).cuda().eval()
    shared = BuiltinEngine(model, max_batch=4, max_len=64)
    with pytest.raises(RuntimeError, match="trainer"):
        shared.sleep(offload_weights=True)
    engine = BuiltinEngine(model, max_batch=64, max_len=2048, dtype=torch.bfloat16)  # private bf16 copy
    before = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=2))
    torch.cuda.synchronize()
    awake = torch.cuda.memory_allocated()
    engine.sleep(offload_weights=True)
    asleep = torch.cuda.memory_allocated()
    assert awake - asleep >= engine.model.args.n_layers * 64 * 2048 * 48 * 2, "KV cache not freed"
    assert all(p.device.type == "cpu" for p in engine.model.parameters())
    engine.wake()
    after = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=2))
    assert [s.response_ids for s in after] == [s.response_ids for s in before]


@pytest.mark.gpu
def test_triton_moe_kernels_decode_under_cuda_graphs_gpu():
    """The model's own MoE on r1core.kernels (set_moe_impl("triton")) must be capturable: no host syncs."""
    torch.manual_seed(1234)
    model = Transformer(presets["tiny"]).cuda().eval()
    dense = BuiltinEngine(model, max_batch=8, max_len=64).generate(PROMPTS, 1, greedy(12))
    model.set_moe_impl("triton")
    engine = BuiltinEngine(model, max_batch=8, max_len=64, decode_moe="model")
    samples = engine.generate(PROMPTS, 1, greedy(12))
    assert "graph_error" not in engine.stats, engine.stats.get("graph_error")
    assert engine.stats["graphs_captured"] >= 1
    assert [s.response_ids for s in samples] == [s.response_ids for s in dense]
