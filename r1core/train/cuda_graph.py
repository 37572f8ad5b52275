"""`parallel.cuda_graph`: the whole optimizer step as one CUDA graph (megatron-core's full-iteration graph).

An ordinary step launches a few thousand kernels from Python and waits on the host several times (the
gradient norm's finiteness check, the metrics, the token count, the chunked CE backward's check of its
incoming gradient); after each wait, and wherever the host is slower than the GPU, the GPU idles. Here
the step (forward and backward of every microbatch, the gradient norm, the clip folded into the fused
AdamW, the master-weight copies and the aux-free expert-bias update) is captured once and replayed: one
launch per step and one host sync, to read the metrics after the replay.

What a graph needs, and how the step provides it:
- no host sync inside: a non-finite gradient norm becomes a device flag (`found_inf`) that makes the fused
  AdamW skip its update and keep its step count, and zeroes the expert-bias update; the host reads the
  norm afterwards, counts the skipped step and applies optim.max_nonfinite_steps as the ordinary step does;
- fixed addresses: the batch is copied into static input tensors, the learning rate is a device tensor that
  is refilled before each replay, the AdamW is capturable, and the gradients live in the graph's memory
  (set to None before capture, so each replay writes them afresh, as the ordinary step's backward does);
- fixed shapes: the batch's shapes (and the objective) are the graph's key; a new key drops the graph and
  warms up and captures again (logged); after GIVE_UP_AFTER changes in a row that never reached a capture
  the batches have no one shape, and ordinary steps run from then on (a warning says so);
- warm kernels: `warmup` ordinary steps come first (compilation, Triton autotuning, AdamW state), on a side
  stream as torch's whole-network capture recipe does.
Every call still performs exactly one optimizer step, warm-up and capture steps included.

`capture=False` runs the same graph-ready step eagerly (static inputs, device-side skip, tensor learning
rate): the CPU tests check it against the ordinary step, and the GPU tests check the replayed graph against
both.
"""

from __future__ import annotations

import gc
import logging
import math
import time

import torch

from r1core.parallel.optim import folds_clip, clip_and_step_

_log = logging.getLogger(__name__)
GIVE_UP_AFTER = 4  # shape changes in a row that never reached a capture: the batches do not have one shape


def _plain(obj) -> tuple:
    """The objective's scalar settings: a change in any of them would be baked into a captured graph."""
    fields = vars(obj) if hasattr(obj, "__dict__") else {}
    return tuple(sorted((k, v) for k, v in fields.items() if isinstance(v, bool | int | float | str)))


def _key(batches: list[dict], objective) -> tuple:
    def entry(k, v):
        if isinstance(v, torch.Tensor):
            return (k, tuple(v.shape), v.dtype, v.device)
        return (k, repr(v))

    return (
        tuple(tuple(entry(k, v) for k, v in sorted(mb.items())) for mb in batches),
        id(objective),
        type(objective).__name__,
        _plain(objective),
    )


class GraphedTrainStep:
    """Drop-in for TrainEngine.train_step on one device: `step(batches_on_device, objective) -> metrics`."""

    def __init__(self, engine, warmup: int = 2, capture: bool | None = None):
        self.engine, self.warmup = engine, warmup
        self.capture = engine.device.type == "cuda" if capture is None else capture
        if self.capture and engine.device.type != "cuda":
            raise ValueError(f"parallel.cuda_graph needs a CUDA device; this engine runs on {engine.device}")
        if not self.capture:
            _log.warning(
                "parallel.cuda_graph on %s: nothing to capture; the graph-ready step runs eagerly",
                engine.device,
            )
        if engine.world_size > 1:
            raise ValueError("parallel.cuda_graph runs on one device (the collectives would need capturing)")
        if not all(folds_clip(o) for o in engine.optimizers):
            raise ValueError(
                "parallel.cuda_graph needs the fused AdamW (it skips a non-finite step on the device); "
                f"the optimizers are {[type(o).__name__ for o in engine.optimizers]}"
            )
        impls = {str(getattr(m, "impl", "")) for m in engine.model.moe_layers()}
        if self.capture and any(i.endswith("ref") for i in impls):
            raise ValueError(
                "parallel.cuda_graph needs model.moe_impl=triton or cuda: the reference MoE loops over "
                "experts on the host (seg_E.tolist()), which a CUDA graph cannot capture"
            )
        self.lr = torch.zeros((), dtype=torch.float32, device=engine.device)
        self.key = None
        self.warm = 0
        self.graph = self.static = self.out = self.keys = None
        self.captures = 0
        self.changes_before_capture, self.gave_up = 0, False

    # ------------------------------------------------------------------ the step
    def __call__(self, batches: list[dict], objective) -> dict:
        if self.gave_up:
            return self.engine.eager_train_step(batches, objective)
        key = _key(batches, objective)
        if key != self.key:
            if self.key is not None:
                self.changes_before_capture += 1
                if self.changes_before_capture >= GIVE_UP_AFTER:
                    self.gave_up = True
                    self.reset()
                    _log.warning(
                        "parallel.cuda_graph: the batch shapes changed %d times before a graph could be "
                        "captured; ordinary steps from now on (pad the batches to one shape to graph them)",
                        self.changes_before_capture,
                    )
                    return self.engine.eager_train_step(batches, objective)
                _log.info("cuda_graph: the batch shapes or objective changed; warming up to capture again")
            self.reset()
            self.key = key
        if self.warm < self.warmup:
            self.warm += 1
            return self._eager(batches, objective)
        if self.static is None:
            self._prepare(batches, objective)
        for mb, static in zip(batches, self.static):
            for k, v in mb.items():
                if isinstance(v, torch.Tensor):
                    static[k].copy_(v, non_blocking=True)
        lr = self.engine.current_lr()
        self.lr.fill_(lr)
        if self.graph is not None:
            self.graph.replay()
            out = self.out
        else:
            out = self._device_step(self.static, objective)
        return self._finish(out.tolist(), lr)

    def reset(self) -> None:
        """Drop the graph and its memory (a new batch shape, or a caller that changed what it captured)."""
        self.graph = self.static = self.out = self.keys = None
        self.key, self.warm = None, 0
        if self.capture:
            gc.collect()
            torch.cuda.empty_cache()

    def _eager(self, batches, objective) -> dict:
        if not self.capture:
            return self.engine.eager_train_step(batches, objective)
        side = torch.cuda.Stream(self.engine.device)  # torch's recipe: warm up off the capture's stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            metrics = self.engine.eager_train_step(batches, objective)
        torch.cuda.current_stream().wait_stream(side)
        return metrics

    def _prepare(self, batches, objective) -> None:
        self.static = [
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in mb.items()} for mb in batches
        ]
        self.changes_before_capture = 0
        for opt in self.engine.optimizers:
            for group in opt.param_groups:
                group["lr"] = self.lr  # the kernel reads it from the device, so each replay sees its value
        if not self.capture:
            return
        gc.collect()
        torch.cuda.empty_cache()  # hand the warm-up's cached blocks back, for the graph's own pool
        t0 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.out = self._device_step(self.static, objective)
        except Exception as err:
            self.reset()
            raise RuntimeError(
                f"parallel.cuda_graph: the training step could not be captured ({type(err).__name__}: "
                f"{str(err)[:300]}). Something in it waits on the host (.item(), .tolist(), a shape that "
                "depends on the data); set parallel.cuda_graph=false"
            ) from err
        self.graph = graph
        self.captures += 1
        _log.info(
            "cuda_graph: captured the training step (capture %d, %.2f s, %d microbatches, shapes %s)",
            self.captures,
            time.perf_counter() - t0,
            len(batches),
            {k: tuple(v.shape) for k, v in batches[0].items() if isinstance(v, torch.Tensor)},
        )

    def _device_step(self, batches, objective) -> torch.Tensor:
        """The whole step with no host sync; returns [metrics in self.keys order, grad norm, n_tokens]."""
        e = self.engine
        sums, denoms, norm = e.gradients(batches, objective)
        norm = norm.float()
        found_inf = (~torch.isfinite(norm)).float()
        e.masters_in()
        params = [p for _, p in e.optimized_params]
        clip_and_step_(e.optimizers, params, e.optim_cfg.grad_clip, norm, found_inf)
        e.masters_out()
        e._update_expert_bias(keep=1.0 - found_inf)
        self.keys = sorted(sums)
        tokens = denoms["tokens"].float() if "tokens" in denoms else torch.full_like(norm, -1.0)
        return torch.stack([sums[k] for k in self.keys] + [norm, tokens])

    def _finish(self, values: list[float], lr: float) -> dict:
        e, n = self.engine, len(self.keys)
        metrics = dict(zip(self.keys, values[:n]))
        norm, tokens = values[n], values[n + 1]
        if not math.isfinite(norm):
            e.count_nonfinite_step(metrics, norm, e.nonfinite_grads())
            metrics.update(grad_norm=norm, lr=lr, step=e.step, skipped_nonfinite=1)
            return metrics
        e.nonfinite_streak = 0
        e.step += 1
        metrics.update(grad_norm=norm, lr=lr, step=e.step)
        if tokens >= 0:
            metrics["n_tokens"] = int(tokens)
        return metrics
