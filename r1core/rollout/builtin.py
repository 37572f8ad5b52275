"""The built-in rollout engine: continuous batching over the MLA latent cache, CUDA-graph decode.

Scheduling (host side, `generate`):
- a fixed pool of `max_batch` cache rows; a request holds one row from its prefill to its finish;
- queued requests are prefilled (eager, right-padded, chunked by `max_prefill_tokens`) into
  freed rows while the other rows keep decoding;
- a decode step runs rows [0, B) over key slots [0, S), with B and S rounded up to static
  buckets; on GPU each (B, S, truncate) bucket is one CUDA graph, captured on first use and
  replayed after (`DecodeStep` advances the device-side state itself, so replays need no inputs);
- results are copied to pinned host memory asynchronously; the host checks stop conditions of
  step t while step t+1 runs. A row that finished at step t therefore computes one extra token at
  t+1, which is dropped.

Rows are handed out lowest-first so the active rows stay packed at the bottom and B stays small. Once
nothing is queued, rows that finish are not refilled, and the survivors sit scattered up to the top row:
`compact_rows` then moves the rows above the smallest batch bucket that holds them all into free rows
below it (their latent cache slots and decode state, a few MB per row), so the tail of a generate call
(the longest samples, alone) decodes in small buckets instead of the first one's.

The n samples of a prompt admitted together share one prefill (`share_prefill`): the prompt runs
through the model once and its latent rows (MLA: kv_lora_rank + rope dims per token and layer) are
copied into the other samples' cache rows. Each sample still draws its first token from its own
uniform stream, so its tokens are those of a separate prefill.
"""

from __future__ import annotations

import copy
import gc
import heapq
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from r1core.model import Transformer

from .decode import DecodeBuffers, DecodeStep
from .sampling import request_uniforms, sample
from .types import RolloutEngine, Sample, SamplingParams, base_seed, request_seed


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    prompt_index: int
    sample_index: int
    seed: int
    max_new: int  # max_new_tokens, capped by the cache length
    row: int = -1
    next_pos: int = 0  # position of the row's next decode input (host mirror)
    response: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None
    matched: int | str | None = None


@dataclass
class _Pending:
    """A step's results on their way to the host; entries map result index -> request."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    entries: list[tuple[int, _Request]]
    event: object = None

    def wait(self) -> tuple[list[int], list[float]]:
        if self.event is not None:
            self.event.synchronize()
        return self.tokens.tolist(), self.logprobs.tolist()


def _readback(tokens: torch.Tensor, logprobs: torch.Tensor, entries) -> _Pending:
    if tokens.device.type != "cuda":
        return _Pending(tokens.clone(), logprobs.clone(), entries)
    host_t = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host_l = torch.empty(logprobs.shape, dtype=logprobs.dtype, pin_memory=True)
    host_t.copy_(tokens, non_blocking=True)
    host_l.copy_(logprobs, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return _Pending(host_t, host_l, entries, event)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned source + non_blocking: the host does not wait for the decode steps already queued.
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _buckets(limit: int, base: list[int]) -> list[int]:
    return sorted({b for b in base if b < limit} | {limit})


def _round_up(x: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= x)


def _eos_id(tokenizer) -> int | None:
    for name in ("eos_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None


def private_copy(model: Transformer, device, dtype) -> Transformer:
    """A rollout copy of `model` on device/dtype, without MTP; router biases stay fp32 (routing fidelity)."""
    args = copy.deepcopy(model.args)
    args.n_mtp_modules = 0
    with torch.device("meta"):
        clone = Transformer(args)
    clone = clone.to_empty(device=device)
    for p in clone.parameters():
        p.data = p.data.to(dtype)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    clone.load_state_dict(state, strict=True)
    for moe in clone.moe_layers():
        moe.gate.expert_load.zero_()  # non-persistent, so to_empty left it uninitialized
    return clone.eval()


class BuiltinEngine(RolloutEngine):
    """Batched generation from an r1core Transformer (see the module docstring).

    model: used as is when device/dtype match it (colocated: the trainer's own module, so
        update_weights is a no-op); otherwise a private copy is made.
    tokenizer: anything with `decode(ids) -> str` and `eos_id` / `eos_token_id`; needed for stop
        strings and response_text, optional otherwise.
    decode_moe: "dense" (all-experts batched GEMM), "grouped" (torch._grouped_mm over routed rows),
        both graph-safe (see decode.py), "auto" (dense for small batch buckets, grouped above; see
        decode.py), or "model" (the model's own MoE implementation, e.g. after
        `model.set_moe_impl("triton")`; it must be free of host syncs to be captured).
    share_prefill: prefill each prompt once per admission and copy its latent rows to its other samples.
    admit_min: queued requests wait until this many rows are free (1: refill every freed row at once;
        0: each generate call's n, so the samples of a prompt are admitted together and share a prefill).
    compact_rows: move the surviving rows down when nothing is queued, so B shrinks with them (see the
        module docstring); None: on where decode steps are bucketed (CUDA graphs). A request's tokens never
        depend on its row.
    mla_kernel: decode attention by one Triton kernel per layer that reads each row's latent cache once
        (r1core.kernels.mla_decode) instead of two batched GEMMs and a softmax. Off by default (see
        `rollout.builtin.mla_kernel`); on the CPU it runs under the Triton interpreter, fp32 only.
    compile_decode: torch.compile the decode step (inductor) before its CUDA graphs are captured, so
        its elementwise work runs fused (see decode.DecodeStep); a torch.compile backend (name or callable)
        instead of True picks another (the CPU tests use "aot_eager"). Compile time is counted in
        stats["decode_compile_s"], apart from the decode steps; a failed compile is warned about, recorded
        in stats["compile_error"], and the engine compiles only the model's layers, or else decodes
        uncompiled: stats["decode_compiled"] says which ("step", "layers", "none").
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer=None,
        max_batch: int = 64,
        max_len: int = 4096,
        device=None,
        dtype=None,
        cuda_graphs: bool = True,
        decode_moe: str = "dense",
        max_prefill_tokens: int = 16384,
        offload_weights_on_sleep: bool = False,
        share_prefill: bool = True,
        admit_min: int = 1,
        compile_decode: bool | str | Callable = False,
        compact_rows: bool | None = None,
        mla_kernel: bool = False,
    ):
        ref = model.head.weight
        self.device = torch.device(device) if device is not None else ref.device
        self.dtype = dtype or ref.dtype
        self._owns_model = self.device != ref.device or self.dtype != ref.dtype
        self.model = private_copy(model, self.device, self.dtype) if self._owns_model else model
        self.tokenizer = tokenizer
        self.max_batch, self.max_len = max_batch, max_len
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.decode_moe = decode_moe
        self.compact_rows = self.cuda_graphs if compact_rows is None else compact_rows
        self.mla_kernel = mla_kernel
        self.max_prefill_tokens = max_prefill_tokens
        self.offload_weights_on_sleep = offload_weights_on_sleep
        self.share_prefill = share_prefill
        if admit_min < 0:
            raise ValueError(f"admit_min={admit_min} must be >= 0 (0: each generate call's n)")
        self.admit_min = admit_min
        self.compile_backend = (
            None if compile_decode is False else "inductor" if compile_decode is True else compile_decode
        )
        self.batch_buckets = _buckets(
            max_batch, [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
        )
        # Every row of a step reads S cache slots: steps of 1.5x (32, 48, 64, 96, ...) keep the slots read
        # within 1.5x of the longest row (powers of two allowed 2x) for twice the graphs of one batch bucket.
        steps = [2**i for i in range(5, 24)] + [3 * 2**i for i in range(4, 23)]
        self.len_buckets = _buckets(max_len, sorted(steps))
        self.weight_version = 0
        # host_s: host time in the generate loop outside waits; wait_s: time blocked on the device's
        # results. wait_s near 0 means the host, not the GPU, sets the pace of decoding.
        self.stats = {
            "decode_steps": 0,
            "rows_moved": 0,  # by compact_rows
            "prefills": 0,
            "graphs_captured": 0,
            "prefill_rows": 0,
            "prefill_rows_shared": 0,
            "host_s": 0.0,
            "wait_s": 0.0,
            "decode_compiles": 0,  # torch.compile runs of the decode step (compile_decode)
            "decode_compile_s": 0.0,  # wall time of the decode calls that compiled
            "capture_s": 0.0,  # wall time of CUDA-graph captures, their warm-up step (and compile) included
        }
        self._cache = self._bufs = self._step = self._pool = None
        self._graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        self._offloaded = False

    # ------------------------------------------------------------------ lifecycle
    def _ensure_runtime(self) -> None:
        if self._offloaded:
            self.wake()
        if self._cache is None:
            # One slot more than any row uses: a decode step's key range [0, S) then never spans a whole
            # cache row, so the sliced cache keeps one layout for every S (a compiled step would otherwise
            # specialize, and compile again, for S == the cache length).
            self._cache = self.model.new_cache(self.max_batch, self.max_len + 1, dtype=self.dtype)
            self._bufs = DecodeBuffers(self.max_batch, self.max_len, self.device)
            self._step = DecodeStep(
                self.model,
                self._cache,
                self._bufs,
                self.decode_moe,
                compile_backend=self.compile_backend,
                stats=self.stats,
                mla_kernel=self.mla_kernel,
            )

    def kv_cache_bytes_per_token(self) -> int:
        a = self.model.args
        return a.n_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * torch.finfo(self.dtype).bits // 8

    @torch.no_grad()
    def update_weights(self, model_or_state_dict: nn.Module | dict) -> None:
        """Copy r1core-named weights in place (captured CUDA graphs keep pointing at the same storage)."""
        if model_or_state_dict is self.model:
            self.weight_version += 1
            return
        src = (
            model_or_state_dict.state_dict()
            if isinstance(model_or_state_dict, nn.Module)
            else model_or_state_dict
        )
        own = self.model.state_dict()
        unexpected = [k for k in src if k not in own and not k.startswith("mtp.")]
        missing = [k for k in own if k not in src]
        if unexpected or missing:
            raise KeyError(f"update_weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, dst in own.items():
            dst.copy_(src[name], non_blocking=True)
        self.weight_version += 1

    def sleep(self, offload_weights: bool | None = None) -> None:
        """Drop the KV cache and CUDA graphs; with offload_weights, move a private model copy to CPU."""
        self._graphs.clear()
        self._cache = self._bufs = self._step = self._pool = None
        offload = self.offload_weights_on_sleep if offload_weights is None else offload_weights
        if offload and self.device.type == "cuda":
            if not self._owns_model:
                raise RuntimeError(
                    "the engine shares the trainer's model: offloading it would move the trainer's weights"
                )
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                t.data = t.data.to("cpu").pin_memory()
            self._offloaded = True
        if self.device.type == "cuda":
            gc.collect()  # the decode step refers to itself (its step function), so only gc frees the cache
            torch.cuda.empty_cache()

    def wake(self) -> None:
        if self._offloaded:
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                t.data = t.data.to(self.device, non_blocking=True)
            self._offloaded = False
        self._ensure_runtime()

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Sample]:
        if n < 1:
            raise ValueError(f"n={n} must be >= 1")
        if sampling.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (BuiltinEngine(tokenizer=...))")
        self._ensure_runtime()
        seed = base_seed(sampling)
        reqs = [
            _Request(
                list(p),
                i,
                j,
                request_seed(seed, i, j),
                max_new=min(sampling.max_new_tokens, self.max_len - len(p)),
            )
            for i, p in enumerate(prompts)
            for j in range(n)
        ]
        for r in reqs:
            if not r.prompt_ids or r.max_new < 1:  # empty prompt, or no room in the cache
                r.finish = "abort"
        self._bufs.temperature.fill_(sampling.temperature)
        self._bufs.top_p.fill_(sampling.top_p)
        self._bufs.top_k.fill_(sampling.top_k)
        was_training = self.model.training
        self.model.eval()
        t0, wait0 = time.perf_counter(), self.stats["wait_s"]
        try:
            self._run(deque(r for r in reqs if r.finish is None), sampling, self.admit_min or n)
        finally:
            self.model.train(was_training)
        self.stats["host_s"] += time.perf_counter() - t0 - (self.stats["wait_s"] - wait0)
        return [self._to_sample(r, sampling) for r in reqs]

    def _run(self, queue: deque, sampling: SamplingParams, admit_min: int) -> None:
        stop_ids = set(sampling.stop_token_ids)
        eos = _eos_id(self.tokenizer)
        if eos is not None:
            stop_ids.add(eos)
        free = list(range(self.max_batch))
        running: dict[int, _Request] = {}
        pending: deque[_Pending] = deque()
        truncate = sampling.truncated
        while queue or running or pending:
            if self.compact_rows and running and not queue:
                self._compact(running, free)
            launched = None
            if running:
                launched = self._launch_decode(running, truncate)
            while pending:  # everything older than the step just launched
                self._consume(pending.popleft(), stop_ids, sampling, free, running)
            if launched is not None:
                pending.append(launched)
            admitted = []
            # Admit only once admit_min rows are free (or nothing runs): fewer, larger prefills, each of
            # which stalls the decode pipeline, and a prompt's samples more often share one.
            ready = len(free) >= min(admit_min, len(queue)) or not running
            while ready and queue and free:
                req = queue.popleft()
                req.row = heapq.heappop(free)
                running[req.row] = req
                admitted.append(req)
            if admitted:
                pending.extend(self._prefill(admitted, truncate))
            if not running and not queue:
                while pending:
                    self._consume(pending.popleft(), stop_ids, sampling, free, running)

    def _compact(self, running: dict[int, _Request], free: list[int]) -> None:
        """Move the running rows at or above the smallest batch bucket that holds them all into free rows
        below it. Queued on the device after the step in flight, so they carry its writes; that step's
        results are read back by their old row index, and its requests are freed at their new rows."""
        target = _round_up(len(running), self.batch_buckets) if self.cuda_graphs else len(running)
        src = sorted(r for r in running if r >= target)
        if not src:
            return
        # every row below target is free or running, so there are enough free ones
        dst = sorted(r for r in free if r < target)[: len(src)]
        n_slots = max(running[r].next_pos for r in src)  # slots written, the step in flight's included
        s, d = (_to_device(torch.tensor(rows), self.device) for rows in (src, dst))
        cache, bufs = self._cache, self._bufs
        cache.kv[:, d, :n_slots] = cache.kv[:, s, :n_slots]
        cache.pe[:, d, :n_slots] = cache.pe[:, s, :n_slots]
        for t in (bufs.tokens, bufs.positions, bufs.gen_idx, bufs.temperature, bufs.top_p, bufs.top_k):
            t[d] = t[s]
        bufs.uniforms[d] = bufs.uniforms[s]
        for a, b in zip(src, dst):
            req = running.pop(a)
            req.row, running[b] = b, req
        free[:] = sorted((set(free) - set(dst)) | set(src))  # a sorted list is a heap
        self.stats["rows_moved"] += len(src)

    def _consume(
        self,
        p: _Pending,
        stop_ids: set[int],
        sampling: SamplingParams,
        free: list[int],
        running: dict[int, _Request],
    ) -> None:
        t0 = time.perf_counter()
        tokens, logprobs = p.wait()
        self.stats["wait_s"] += time.perf_counter() - t0
        for i, req in p.entries:
            if req.finish is not None:
                continue  # the extra step of a row that had already finished
            req.response.append(tokens[i])
            req.logprobs.append(logprobs[i])
            self._check_finish(req, stop_ids, sampling.stop)
            if req.finish is not None:
                heapq.heappush(free, req.row)
                del running[req.row]

    def _check_finish(self, req: _Request, stop_ids: set[int], stops: list[str]) -> None:
        tok = req.response[-1]
        if tok in stop_ids:
            req.finish, req.matched = "stop", tok
        elif stops and self.tokenizer is not None and (hit := self._stop_string_hit(req.response, stops)):
            req.finish, req.matched = "stop", hit
        elif len(req.response) >= req.max_new:
            req.finish = "length"

    def _stop_string_hit(self, response: list[int], stops: list[str]) -> str | None:
        # A stop string of L characters ends within the last L tokens (a token decodes to >= 1
        # character; a few more cover tokens that are partial UTF-8 sequences).
        window = max(len(s) for s in stops) + 4
        tail = self.tokenizer.decode(response[-window:])
        return next((s for s in stops if s in tail), None)

    def _to_sample(self, req: _Request, sampling: SamplingParams) -> Sample:
        text = ""
        if self.tokenizer is not None and req.response:
            ids = req.response[:-1] if isinstance(req.matched, int) else req.response
            text = self.tokenizer.decode(ids)
            cuts = [i for s in sampling.stop if (i := text.find(s)) >= 0]
            if isinstance(req.matched, str) and cuts:
                text = text[: min(cuts)]
        meta = {"weight_version": self.weight_version}
        if req.matched is not None:
            meta["matched_stop"] = req.matched
        return Sample(
            prompt_ids=req.prompt_ids,
            response_ids=req.response,
            logprobs=req.logprobs,
            finish_reason=req.finish or "abort",
            prompt_index=req.prompt_index,
            sample_index=req.sample_index,
            response_text=text,
            metadata=meta,
        )

    # ------------------------------------------------------------------ device work
    def _prefill(self, reqs: list[_Request], truncate: bool) -> list[_Pending]:
        """Prefill new rows in padded chunks; sample each request's first token from its last prompt position.

        With share_prefill, requests of one prompt form a group: only its first request's row is run
        through the model, the others get a copy of that row's latents.
        """
        groups: dict[int, list[_Request]] = {}
        for r in reqs:
            groups.setdefault(r.prompt_index if self.share_prefill else id(r), []).append(r)
        units = sorted(groups.values(), key=lambda g: len(g[0].prompt_ids))  # similar lengths per chunk
        out, start = [], 0
        while start < len(units):
            end = start + 1
            while (
                end < len(units)
                and (end - start + 1) * len(units[end][0].prompt_ids) <= self.max_prefill_tokens
            ):
                end += 1
            out.append(self._prefill_chunk(units[start:end], truncate))
            start = end
        return out

    def _prefill_chunk(self, groups: list[list[_Request]], truncate: bool) -> _Pending:
        bufs, cache, dev = self._bufs, self._cache, self.device
        leaders = [g[0] for g in groups]
        reqs = [r for g in groups for r in g]
        lens = [len(r.prompt_ids) for r in leaders]
        T, U = max(lens), max(r.max_new for r in reqs)
        tokens = torch.zeros(len(leaders), T, dtype=torch.long)
        uniforms = torch.zeros(len(reqs), U, dtype=torch.float64)
        for i, r in enumerate(leaders):
            tokens[i, : lens[i]] = torch.tensor(r.prompt_ids)
        for i, r in enumerate(reqs):
            uniforms[i, : r.max_new] = request_uniforms(r.seed, r.max_new)
            r.next_pos = len(r.prompt_ids)
        lead_rows = _to_device(torch.tensor([r.row for r in leaders]), dev)
        rows = _to_device(torch.tensor([r.row for r in reqs]), dev)
        # unit_R: index of each request's leader among the leaders
        unit_R = _to_device(torch.tensor([u for u, g in enumerate(groups) for _ in g]), dev)
        lens_d = _to_device(torch.tensor(lens), dev)
        tokens = _to_device(tokens, dev)
        bufs.uniforms[rows, :U] = _to_device(uniforms, dev)
        # Right padding is harmless: pad tokens sit at positions past the prompt, which no real
        # query attends to, and decode overwrites each slot before attending to it.
        positions = torch.arange(T, device=dev).expand(len(leaders), T)
        cache.rows = lead_rows
        try:
            h, _ = self.model.hidden_states(tokens, positions, cache=cache)
        finally:
            cache.rows = None
        if len(reqs) > len(leaders):  # followers: copy the leader's latent rows, all layers at once
            src, dst = lead_rows[unit_R], rows
            cache.kv[:, dst, :T] = cache.kv[:, src, :T]
            cache.pe[:, dst, :T] = cache.pe[:, src, :T]
        logits = self.model.head(h[torch.arange(len(leaders), device=dev), lens_d - 1])[unit_R]
        tok, lp = sample(
            logits,
            bufs.temperature[rows],
            bufs.top_p[rows],
            bufs.top_k[rows],
            bufs.uniforms[rows, 0],
            truncate,
        )
        bufs.tokens[rows] = tok
        bufs.positions[rows] = lens_d[unit_R]
        bufs.gen_idx[rows] = 1
        self.stats["prefills"] += 1
        self.stats["prefill_rows"] += len(leaders)
        self.stats["prefill_rows_shared"] += len(reqs) - len(leaders)
        return _readback(tok, lp, list(enumerate(reqs)))

    def _launch_decode(self, running: dict[int, _Request], truncate: bool) -> _Pending:
        if self.cuda_graphs:
            B = _round_up(max(running) + 1, self.batch_buckets)
            S = _round_up(max(r.next_pos for r in running.values()) + 1, self.len_buckets)
        else:  # eager: exact sizes cost least
            B, S = max(running) + 1, max(r.next_pos for r in running.values()) + 1
        self._decode(B, S, truncate)
        for r in running.values():
            r.next_pos += 1
        self.stats["decode_steps"] += 1
        return _readback(
            self._bufs.out_tokens[:B], self._bufs.out_logprobs[:B], [(r.row, r) for r in running.values()]
        )

    def _decode(self, B: int, S: int, truncate: bool) -> None:
        if not self.cuda_graphs:
            self._step(B, S, truncate)
            return
        key = (B, S, truncate)
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = self._graphs[key] = self._capture(B, S, truncate)
            except RuntimeError as e:  # e.g. a MoE path with a host sync (decode_moe="model" on the ref impl)
                warnings.warn(f"CUDA graph capture failed, decoding eagerly from now on: {e}")
                self.stats["graph_error"] = str(e)[:300]
                self.cuda_graphs = False
                self._graphs.clear()
                self._step(B, S, truncate)
                return
        graph.replay()

    def _capture(self, B: int, S: int, truncate: bool) -> torch.cuda.CUDAGraph:
        # Warm up on a side stream first (lazy library init, and torch.compile's compile, must not happen
        # inside capture). The warm-up step's cache writes are idempotent (same token, same slot); its state
        # advance is undone.
        t0 = time.perf_counter()
        snap = self._bufs.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(B, S, truncate)
            self._bufs.restore(snap)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(B, S, truncate)
        self.stats["graphs_captured"] += 1
        self.stats["capture_s"] += time.perf_counter() - t0
        return graph
