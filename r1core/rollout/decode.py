"""One decode step of the r1core Transformer with no host syncs and static shapes (CUDA-graph safe).

The model's own cached forward is written for eager use: MLA reads `positions.max()` to size
the key range, and the MoE reference routes with `bincount` and loops experts over
`seg_E.tolist()`; each is a device-to-host sync that a CUDA graph cannot capture. This module
walks the same modules (same weights, same `_queries` / `_latents` / `_attend_absorbed` math) with
a key range S fixed per graph and a mask from each row's position.

MoE for decode has two graph-safe paths besides the model's own ("model"):
- dense: a decode batch of T <= ~200 tokens is memory-bound however the experts are computed
  (arithmetic intensity ~T flop/byte against an H100 ridge of ~250), and with T*K >= E nearly every
  expert is visited anyway, so running all E experts as one batched GEMM reads the same bytes as a
  grouped GEMM, needs no permutation, and has static shapes;
- grouped: `torch._grouped_mm` over the T*K routed rows reads only the visited experts, which wins
  in the tail of a rollout when few rows remain (T*K << E).

auto picks per batch bucket (a static choice, so each graph keeps one path): dense while the tokens'
arithmetic intensity stays under the ridge (B <= AUTO_DENSE_MAX_TOKENS), grouped above, where dense
would compute E/K times the needed flops (at B=1024, E=32, K=4: 8x) and turn compute-bound.

Legend: B rows (batch bucket), S key slots (length bucket), D dim, E experts, K top-k, I expert dim.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from r1core.model import AttnMeta, LatentKVCache, MoE, Transformer
from r1core.model.moe import RouterSpec, route_ref
from r1core.model.rope import rope_cos_sin

from .sampling import sample


def route_topk(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, spec: RouterSpec):
    """`route_ref`'s (weights_TK, idx_TK); route_ref counts with scatter_add, so it is graph-safe."""
    weights_TK, idx_TK, _ = route_ref(logits_TE, bias_E, spec)
    return weights_TK, idx_TK


def _shared(moe: MoE, x_TD: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
    return y_TD if moe.shared_experts is None else y_TD + moe.shared_experts(x_TD)


def moe_dense(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """MoE output for x [B, T, D], every expert run on every token and weighted by the routing matrix."""
    B, T, D = x.shape
    x_TD = x.reshape(-1, D)
    weights_TK, idx_TK = route_topk(moe.gate.logits(x_TD), moe.gate.e_score_correction_bias, moe.gate.spec)
    w_TE = torch.zeros(x_TD.shape[0], moe.gate.spec.n_experts, device=x.device).scatter_(
        1, idx_TK, weights_TK
    )
    ex = moe.experts
    h1_ETI, h3_ETI = torch.matmul(x_TD, ex.w13.flatten(1, 2).transpose(1, 2)).chunk(2, dim=-1)
    h_ETI = F.silu(h1_ETI) * h3_ETI
    y_ETD = torch.bmm(h_ETI, ex.w2.transpose(1, 2))
    y_TD = torch.einsum("te,etd->td", w_TE, y_ETD.float()).to(x.dtype)  # fp32 combine, as unpermute_ref
    return _shared(moe, x_TD, y_TD).view(B, T, D)


def expert_order(flat_P: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order_P, offs_E): the stable sort of the routed rows by expert (rows by expert, then (token, k)),
    and each expert's end offset in it (int32), as `torch.sort(flat_P, stable=True).indices` and a
    cumsum of the counts would give.

    A counting sort over the E experts (E x P one-hot prefix sums, fused by inductor) instead of a sort:
    the radix sort was 7.6 % of the compiled small-preset decode step at B256 on an H100 (0.25 of 3.35 ms).
    """
    P = flat_P.shape[0]
    hit_EP = (flat_P[None, :] == torch.arange(n_experts, device=flat_P.device)[:, None]).to(torch.int32)
    seen_EP = hit_EP.cumsum(-1, dtype=torch.int32)  # rows of each expert up to and including p
    counts_E = seen_EP[:, -1]
    offs_E = counts_E.cumsum(0, dtype=torch.int32)
    dest_P = (offs_E - counts_E)[flat_P] + seen_EP.gather(0, flat_P[None, :])[0] - 1
    order_P = torch.empty_like(flat_P).scatter_(0, dest_P.long(), torch.arange(P, device=flat_P.device))
    return order_P, offs_E


def moe_grouped(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """MoE output for x [B, T, D] through `torch._grouped_mm`: only the visited experts' weights are read.

    Static shapes throughout (T*K rows, E group offsets from a scatter-add, not a bincount), so it is
    graph-safe; cheaper than moe_dense when T*K is well below E (the tail of a rollout).
    """
    B, T, D = x.shape
    x_TD = x.reshape(-1, D)
    spec, ex = moe.gate.spec, moe.experts
    weights_TK, idx_TK = route_topk(moe.gate.logits(x_TD), moe.gate.e_score_correction_bias, spec)
    order_P, offs_E = expert_order(idx_TK.flatten(), spec.n_experts)
    x_PD = x_TD[order_P // spec.top_k]
    h1_PI, h3_PI = torch._grouped_mm(x_PD, ex.w13.flatten(1, 2).transpose(1, 2), offs=offs_E).chunk(2, dim=-1)
    h_PI = F.silu(h1_PI) * h3_PI
    y_PD = torch._grouped_mm(h_PI, ex.w2.transpose(1, 2), offs=offs_E)
    y_TKD = torch.empty_like(y_PD).index_copy_(0, order_P, y_PD).view(-1, spec.top_k, D)
    y_TD = (y_TKD.float() * weights_TK[..., None]).sum(1).to(x.dtype)  # fp32 combine, as unpermute_ref
    return _shared(moe, x_TD, y_TD).view(B, T, D)


AUTO_DENSE_MAX_TOKENS = 128  # an H100's bf16 ridge is ~250 flop/byte; dense runs at ~T flop/byte


def moe_auto(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    return (moe_dense if x.shape[0] * x.shape[1] <= AUTO_DENSE_MAX_TOKENS else moe_grouped)(moe, x)


MOE_PATHS = {"dense": moe_dense, "grouped": moe_grouped, "auto": moe_auto}


class DecodeBuffers:
    """Static per-row state that decode steps (and their CUDA graphs) read and advance in place.

    tokens/positions: the next input token of each cache row and its position; gen_idx: how many
    tokens the row has sampled (it indexes the row's uniform stream); out_*: the last step's result.
    """

    def __init__(self, n_rows: int, max_len: int, device):
        kw = dict(device=device)
        self.tokens = torch.zeros(n_rows, dtype=torch.long, **kw)
        self.positions = torch.zeros(n_rows, dtype=torch.long, **kw)
        self.gen_idx = torch.zeros(n_rows, dtype=torch.long, **kw)
        self.temperature = torch.ones(n_rows, dtype=torch.float32, **kw)
        self.top_p = torch.ones(n_rows, dtype=torch.float32, **kw)
        self.top_k = torch.zeros(n_rows, dtype=torch.long, **kw)
        self.uniforms = torch.zeros(n_rows, max_len, dtype=torch.float64, **kw)
        self.out_tokens = torch.zeros(n_rows, dtype=torch.long, **kw)
        self.out_logprobs = torch.zeros(n_rows, dtype=torch.float32, **kw)
        self.row_ids = torch.arange(n_rows, **kw)
        self.slot_ids = torch.arange(max_len, **kw)

    def snapshot(self) -> tuple[torch.Tensor, ...]:
        return self.tokens.clone(), self.positions.clone(), self.gen_idx.clone()

    def restore(self, snap: tuple[torch.Tensor, ...]) -> None:
        for dst, src in zip((self.tokens, self.positions, self.gen_idx), snap):
            dst.copy_(src)


# Compiles of the decode step allowed per process before dynamo would silently run it eagerly: each engine
# compiles about 2 per sampling variant (B = 1, B >= 2; decode_moe auto splits at its threshold), and a
# process may build many engines (benchmarks, sleep / wake), which share the compiled code when shapes fit.
RECOMPILE_LIMIT = 64


class DecodeStep:
    """Callable `step(B, S, truncate)`: decode rows [0, B) attending to key slots [0, S).

    Writes each row's latent at its position, samples the next token with the row's own uniform,
    stores it in out_tokens / out_logprobs, then advances tokens, positions and gen_idx, so
    consecutive calls (or graph replays) need nothing from the host.

    compile_backend: None runs the step op by op; a torch.compile backend ("inductor") compiles the
    whole step (every layer, sampling and the state advance) into fused kernels first. A decode step is
    hundreds of small kernels (norms, rope, residual adds, routing, sampling), so on the GPU it is bound
    by kernel latency, not bandwidth; fusion cuts the kernel count, and the engine still captures the
    compiled step in one CUDA graph per bucket (so the compile mode must not add CUDA graphs of its own).
    B and S are symbolic in the compiled code (marked dynamic from the first call): one compile serves
    every bucket, where a static compile per (B, S) bucket would cost tens of seconds each. Dynamo still
    specializes B = 1 and every static branch (truncate, decode_moe auto's threshold): a few compiles
    per engine, counted in stats["decode_compiles"] and stats["decode_compile_s"] (wall time of the calls
    that compiled; `stats` is the engine's).

    A compile that fails falls back one part at a time, each fall warned about: the whole step, then the
    layers only (`logits`: the model and its cache writes compiled, sampling and the state advance op by
    op), then nothing. stats["decode_compiled"] says which part runs compiled ("step", "layers", "none");
    stats["compile_error"] keeps the whole step's error, stats["compile_error_layers"] the layers'. A new
    DecodeStep sharing those stats (the engine's, after sleep / wake) starts from the part that compiled.
    """

    def __init__(
        self,
        model: Transformer,
        cache: LatentKVCache,
        bufs: DecodeBuffers,
        moe_path: str = "dense",
        compile_backend: str | Callable | None = None,
        stats: dict | None = None,
        mla_kernel: bool = False,
    ):
        if moe_path not in (*MOE_PATHS, "model"):
            raise ValueError(f"moe_path={moe_path!r}: choose one of {[*MOE_PATHS, 'model']}")
        self.model, self.cache, self.bufs, self.moe_path = model, cache, bufs, moe_path
        self.mla_kernel = mla_kernel  # attention by r1core.kernels.mla_decode: the latent cache read once
        cos, sin = rope_cos_sin(model.args, bufs.slot_ids)  # a table, so steps compute no angles on the host
        self.rope_cos, self.rope_sin = cos, sin
        self.layer_ids = torch.arange(cache.kv.shape[0], device=bufs.row_ids.device)
        self.compile_backend = compile_backend
        self.stats = stats if stats is not None else {}
        self.stats.setdefault("decode_compiles", 0)
        self.stats.setdefault("decode_compile_s", 0.0)
        self._run, self._logits = self._rows_step, self._logits_rows
        part = self.stats.get("decode_compiled", "step") if compile_backend is not None else "none"
        self._compile(part)

    def _compile(self, part: str) -> None:
        """Run `part` ("step", "layers" or "none") compiled from the next call on, the rest op by op."""
        self.stats["decode_compiled"] = part
        if part == "none":
            self.compile_backend, self._run, self._logits = None, self._rows_step, self._logits_rows
            return
        # decode_moe="model" may call kernels dynamo cannot trace: graph breaks are allowed there only.
        fn = self._rows_step if part == "step" else self._logits_rows
        compiled = torch.compile(fn, backend=self.compile_backend, fullgraph=self.moe_path != "model")
        if part == "step":
            self._run, self._logits = compiled, self._logits_rows
        else:
            self._run, self._logits = self._rows_step, compiled

    def _attend(self, attn, h, meta: AttnMeta, mask, B: int, S: int) -> torch.Tensor:
        q_nope, q_pe = attn._queries(h, meta)
        kv, k_pe = attn._latents(h, meta)  # [B, 1, C], [B, 1, R]
        layer, rows, pos = attn.layer_id, self.bufs.row_ids[:B], meta.positions[:, 0]
        # Index the whole cache tensor (layer as a one-element index, a view of a static arange), not a
        # kv[layer] view: under torch.compile a scatter into a graph input is rewritten in place, while a
        # scatter into a view of one may be functionalized into a copy of the whole cache.
        at = (self.layer_ids[layer : layer + 1], rows, pos)
        self.cache.kv.index_put_(at, kv[:, 0].to(self.cache.kv.dtype))
        self.cache.pe.index_put_(at, k_pe[:, 0].to(self.cache.pe.dtype))
        if self.mla_kernel:
            from r1core.kernels.mla_decode import mla_decode

            w_uk, w_uv = attn.absorbed_weights()
            q_lat = torch.einsum("bhd,hdc->bhc", q_nope[:, 0], w_uk)
            kv_c, pe_c = self.cache.kv[layer, :B, :S], self.cache.pe[layer, :B, :S]
            out_lat = mla_decode(q_lat, q_pe[:, 0], kv_c, pe_c, pos + 1, attn.softmax_scale)
            return attn.wo(torch.einsum("bhc,hdc->bhd", out_lat, w_uv).flatten(1))[:, None]
        kv_all = self.cache.kv[layer, :B, :S].to(h.dtype)
        pe_all = self.cache.pe[layer, :B, :S].to(h.dtype)
        return attn.wo(attn._attend_absorbed(q_nope, q_pe, kv_all, pe_all, mask).flatten(2))

    def _ffn(self, ffn, h: torch.Tensor) -> torch.Tensor:
        if isinstance(ffn, MoE):
            return ffn(h)[0] if self.moe_path == "model" else MOE_PATHS[self.moe_path](ffn, h)
        return ffn(h)

    def logits(self, B: int, S: int) -> torch.Tensor:
        bufs, model = self.bufs, self.model
        pos_B = bufs.positions[:B]
        meta = AttnMeta(
            positions=pos_B[:, None], cos=self.rope_cos[pos_B][:, None], sin=self.rope_sin[pos_B][:, None]
        )
        mask = (bufs.slot_ids[None, :S] <= pos_B[:, None])[:, None, None, :]  # [B, 1, 1, S]
        x = model.embed(bufs.tokens[:B, None])
        for block in model.layers.values():
            x = x + self._attend(block.attn, block.attn_norm(x), meta, mask, B, S)
            x = x + self._ffn(block.ffn, block.ffn_norm(x))
        return model.head(model.norm(x))[:, 0]

    def _logits_rows(self, rows_B: torch.Tensor, slots_S: torch.Tensor) -> torch.Tensor:
        """`logits` with B and S the sizes of row_ids[:B] and slot_ids[:S] (symbolic when compiled)."""
        return self.logits(rows_B.shape[0], slots_S.shape[0])

    def __call__(self, B: int, S: int, truncate: bool) -> None:
        rows_B, slots_S = self.bufs.row_ids[:B], self.bufs.slot_ids[:S]
        if self.compile_backend is None:
            self._run(rows_B, slots_S, truncate)
            return
        import torch._dynamo
        from torch._dynamo.utils import counters

        torch._dynamo.maybe_mark_dynamic(rows_B, 0)
        torch._dynamo.maybe_mark_dynamic(slots_S, 0)
        graphs = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        while self.compile_backend is not None:
            try:
                # No automatic dynamic shapes: an engine of other sizes (cache rows, max_len) compiles its own
                # static-shaped step instead of turning those sizes symbolic too, which costs a compile but
                # keeps the graphs simple (torch 2.13 failed to build guards for such a recompile).
                with torch._dynamo.config.patch(
                    recompile_limit=RECOMPILE_LIMIT, automatic_dynamic_shapes=False
                ):
                    self._run(rows_B, slots_S, truncate)
                break
            except (torch._dynamo.exc.TorchDynamoException, AssertionError) as e:
                # Tracing or code generation failed before the compiled part ran (fullgraph: nothing has
                # moved), e.g. an op without a meta function for these dtypes, or an internal check of
                # dynamo's (a bare AssertionError): compile less, and say so.
                self._fall_back(e)
        else:
            self._run(rows_B, slots_S, truncate)
            return
        if counters["stats"]["unique_graphs"] > graphs:  # dynamo traced (and compiled) a graph
            self.stats["decode_compiles"] += 1
            self.stats["decode_compile_s"] += time.perf_counter() - t0

    def _fall_back(self, e: Exception) -> None:
        part = self.stats["decode_compiled"]
        after = "compiling its layers only" if part == "step" else "decoding uncompiled"
        warnings.warn(f"compile_decode: compiling the decode {part} failed, {after}: {e}")
        self.stats["compile_error" if part == "step" else f"compile_error_{part}"] = (
            f"{type(e).__name__}: {e}"[:300]
        )
        self._compile("layers" if part == "step" else "none")

    def _rows_step(self, rows_B: torch.Tensor, slots_S: torch.Tensor, truncate: bool) -> None:
        """The step of `__call__` with B and S read from the sizes of row_ids[:B] and slot_ids[:S]."""
        B = rows_B.shape[0]
        bufs = self.bufs
        logits_BV = self._logits(rows_B, slots_S)
        u_B = bufs.uniforms[bufs.row_ids[:B], bufs.gen_idx[:B].clamp(max=bufs.uniforms.shape[1] - 1)]
        tokens_B, logprobs_B = sample(
            logits_BV, bufs.temperature[:B], bufs.top_p[:B], bufs.top_k[:B], u_B, truncate
        )
        bufs.out_tokens[:B].copy_(tokens_B)
        bufs.out_logprobs[:B].copy_(logprobs_B)
        bufs.tokens[:B].copy_(tokens_B)
        # Rows that finished but still sit in the bucket keep stepping; clamping keeps their writes in the
        # cache.
        bufs.positions[:B] = (bufs.positions[:B] + 1).clamp_(max=bufs.slot_ids.shape[0] - 1)
        bufs.gen_idx[:B] += 1
