"""Rollouts on SGLang (optional `[sglang]` extra): `sglang.Engine` serving the r1core model in HF layout.

Follows SGLang's offline-engine API as its source defines it (sgl-project/sglang,
python/sglang/srt/entrypoints/engine.py, class `Engine`):
- `Engine(**server_args)`: keyword arguments are `ServerArgs` fields (srt/server_args.py):
  model_path, tokenizer_path, skip_tokenizer_init, dtype, enable_memory_saver,
  enable_deterministic_inference, ...;
- `Engine.generate(input_ids=[[...], ...], sampling_params=[{...}, ...], return_logprob=True)`
  returns one dict per request: "output_ids", "text", and "meta_info" with
  "output_token_logprobs" = [(logprob, token_id, text|None), ...]
  (TokenizerManager.detokenize_logprob_tokens) and "finish_reason" =
  {"type": "stop", "matched": id|str} | {"type": "length", "length": n} | {"type": "abort", ...}
  (managers/schedule_batch.py, FINISH_MATCHED_TOKEN / FINISH_MATCHED_STR / FINISH_LENGTH / FINISH_ABORT);
- sampling params (srt/sampling/sampling_params.py, SamplingParams): temperature, top_p,
  top_k (-1: whole vocabulary), max_new_tokens, stop, stop_token_ids, sampling_seed (honoured
  only with enable_deterministic_inference), no_stop_trim;
- `update_weights_from_tensor(named_tensors=[(name, tensor), ...], load_format=None, flush_cache=True)`
  and `flush_cache()`; `release_memory_occupation(tags=None)` / `resume_memory_occupation(tags=None)`
  with tags from srt/constants.py ("kv_cache", "weights", "cuda_graph"; None = all), which need
  `enable_memory_saver=True`.
SGLang's default logprobs are taken after temperature scaling (without
SGLANG_RETURN_ORIGINAL_LOGPROB), which is the `Sample.logprobs` contract.

Weight names go through r1core.checkpoint.hf_names (`save_plan`), the same mapping the HF
checkpoint writer uses: stacked experts are sent as one tensor per expert, MTP layers only on request.
"""

from __future__ import annotations

import re
import tempfile
from typing import Iterable, Iterator

import torch
from torch import nn

from r1core.checkpoint.hf import save_pretrained
from r1core.checkpoint.hf_names import save_plan
from r1core.model import ModelArgs, Transformer

from .types import RolloutEngine, Sample, SamplingParams, base_seed, request_seed

MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")  # sglang/srt/constants.py GPU_MEMORY_TYPE_*
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_FP32 = "e_score_correction_bias"  # routing bias stays fp32 (as in the HF checkpoint)


def import_sglang():
    try:
        import sglang
    except ImportError as e:
        raise ImportError(
            "SGLangEngine needs SGLang: pip install 'r1core[sglang]' (SGLang brings its own torch/CUDA "
            "stack; see docs/sglang.md). "
            "The built-in engine, r1core.rollout.BuiltinEngine, needs nothing extra."
        ) from e
    return sglang


def hf_named_tensors(
    state: dict[str, torch.Tensor],
    args: ModelArgs,
    dtype: torch.dtype | None = None,
    include_mtp: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of an r1core state dict, in checkpoint order.

    Stacked experts yield one view per expert; `dtype` casts everything but the fp32 routing bias.
    """
    for hf, key, index in save_plan(state.keys(), args):
        m = _HF_LAYER.match(hf)
        if not include_mtp and m and int(m.group(1)) >= args.n_layers:
            continue
        t = state[key][index]
        to = torch.float32 if key.endswith(_FP32) else (dtype or t.dtype)
        yield hf, t.detach().to(to)


def buckets(
    named: Iterable[tuple[str, torch.Tensor]], max_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors into consecutive buckets of at most max_bytes (a larger tensor travels alone)."""
    bucket, size = [], 0
    for name, t in named:
        n = t.numel() * t.element_size()
        if bucket and size + n > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


def sglang_sampling_params(sp: SamplingParams, seed: int | None) -> dict:
    """Our SamplingParams as an SGLang sampling_params dict (SGLang maps temperature 0 to greedy itself)."""
    out = {
        "temperature": sp.temperature,
        "top_p": sp.top_p,
        "top_k": sp.top_k if sp.top_k > 0 else -1,
        "max_new_tokens": sp.max_new_tokens,
        "no_stop_trim": False,
    }
    if sp.stop:
        out["stop"] = list(sp.stop)
    if sp.stop_token_ids:
        out["stop_token_ids"] = list(sp.stop_token_ids)
    if seed is not None:
        out["sampling_seed"] = seed
    return out


def sample_from_output(
    out: dict, prompt_ids: list[int], prompt_index: int, sample_index: int, tokenizer=None
) -> Sample:
    """One SGLang generate() result as a Sample (ids and logprobs from meta_info.output_token_logprobs)."""
    meta = out["meta_info"]
    entries = meta.get("output_token_logprobs") or []
    logprobs = [e[0] for e in entries]
    if any(lp is None for lp in logprobs):
        raise ValueError(
            "SGLang returned no logprob for some output tokens (was return_logprob=True passed?)"
        )
    ids = list(out.get("output_ids") or [e[1] for e in entries])
    if len(ids) != len(logprobs):
        raise ValueError(f"SGLang returned {len(ids)} output ids but {len(logprobs)} logprobs")
    finish = meta.get("finish_reason") or {"type": "abort"}
    if not isinstance(finish, dict):  # some versions flatten it to the type string
        finish = {"type": str(finish)}
    reason = finish.get("type", "abort")
    text = out.get("text")
    if text is None:
        text = (
            tokenizer.decode(ids[:-1] if isinstance(finish.get("matched"), int) else ids) if tokenizer else ""
        )
    metadata = {"sglang_finish_reason": finish}
    if reason == "stop" and finish.get("matched") is not None:
        metadata["matched_stop"] = finish["matched"]
    return Sample(
        prompt_ids=list(prompt_ids),
        response_ids=ids,
        logprobs=[float(x) for x in logprobs],
        finish_reason=reason if reason in ("stop", "length") else "abort",
        prompt_index=prompt_index,
        sample_index=sample_index,
        response_text=text,
        metadata=metadata,
    )


class SGLangEngine(RolloutEngine):
    """`sglang.Engine` on an HF-layout export of the r1core model (see docs/sglang.md).

    model: the r1core Transformer to serve (exported once with `save_pretrained` into export_dir).
    tokenizer_path: an HF tokenizer directory for SGLang (needed for stop strings and text); without
        it SGLang runs with skip_tokenizer_init and `tokenizer` (ours) decodes response_text.
    colocated: training shares the GPUs, so enable SGLang's memory saver for sleep()/wake().
    deterministic: enable_deterministic_inference, so per-request sampling seeds are honoured.
    bucket_bytes: bound on one update_weights_from_tensor call.
    engine_kwargs: more ServerArgs fields (tp_size, base_gpu_id, mem_fraction_static, ...).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer=None,
        tokenizer_path: str | None = None,
        export_dir: str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        colocated: bool = True,
        deterministic: bool = False,
        bucket_bytes: int = 512 << 20,
        include_mtp: bool = False,
        **engine_kwargs,
    ):
        sglang = import_sglang()
        self.args, self.dtype, self.tokenizer = model.args, dtype, tokenizer
        self.bucket_bytes, self.include_mtp = bucket_bytes, include_mtp
        self.export_dir = export_dir or tempfile.mkdtemp(prefix="r1core-sglang-")
        save_pretrained(model, self.export_dir, dtype=dtype)
        self.has_tokenizer = tokenizer_path is not None
        kwargs = dict(
            model_path=self.export_dir,
            tokenizer_path=tokenizer_path,
            skip_tokenizer_init=not self.has_tokenizer,
            dtype=str(dtype).removeprefix("torch."),
            enable_memory_saver=colocated,
            enable_deterministic_inference=deterministic,
        )
        kwargs.update(engine_kwargs)
        self.engine = sglang.Engine(**kwargs)
        self.weight_version = 0
        self._released: set[str] = set()

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Sample]:
        if n < 1:
            raise ValueError(f"n={n} must be >= 1")
        if sampling.stop and not self.has_tokenizer:
            raise ValueError("stop strings need SGLang's tokenizer: pass tokenizer_path")
        if "weights" in self._released:
            raise RuntimeError("weights were released by sleep(): call wake() and update_weights() first")
        seed = base_seed(sampling)
        index = [(i, j) for i in range(len(prompts)) for j in range(n)]
        # One request per sample (not SGLang's own n): each gets its own seed and a fixed output slot.
        # SGLang stores sampling_seed as int32 in some versions: keep 31 bits.
        params = [sglang_sampling_params(sampling, request_seed(seed, i, j) % 2**31) for i, j in index]
        outs = self.engine.generate(
            input_ids=[list(prompts[i]) for i, _ in index], sampling_params=params, return_logprob=True
        )
        samples = [sample_from_output(o, prompts[i], i, j, self.tokenizer) for o, (i, j) in zip(outs, index)]
        for s in samples:
            s.metadata["weight_version"] = self.weight_version
        return samples

    @torch.no_grad()
    def update_weights(self, model_or_state_dict: nn.Module | dict) -> None:
        """Push weights in buckets of at most bucket_bytes, then flush SGLang's prefix cache once."""
        state = (
            model_or_state_dict.state_dict()
            if isinstance(model_or_state_dict, nn.Module)
            else model_or_state_dict
        )
        for bucket in buckets(
            hf_named_tensors(state, self.args, self.dtype, self.include_mtp), self.bucket_bytes
        ):
            result = self.engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=False)
            if isinstance(result, tuple) and result and result[0] is False:
                raise RuntimeError(
                    f"SGLang rejected a weight update: {result[1] if len(result) > 1 else result}"
                )
        self.engine.flush_cache()  # cached prefixes hold KV computed with the old weights
        self._released.discard("weights")
        self.weight_version += 1

    def sleep(self, tags: list[str] | None = None) -> None:
        """Release GPU memory (all of MEMORY_TAGS by default). Weights released without SGLang's
        enable_weights_cpu_backup come back uninitialized: push them with update_weights after wake()."""
        self.engine.release_memory_occupation(tags=tags)
        backup = bool(getattr(getattr(self.engine, "server_args", None), "enable_weights_cpu_backup", False))
        released = set(MEMORY_TAGS if tags is None else tags)
        self._released |= released - ({"weights"} if backup else set())

    def wake(self, tags: list[str] | None = None) -> None:
        self.engine.resume_memory_occupation(tags=tags)
        self._released -= set(MEMORY_TAGS if tags is None else tags) - {"weights"}  # weights: see sleep()

    def shutdown(self) -> None:
        self.engine.shutdown()
