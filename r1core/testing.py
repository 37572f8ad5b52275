"""Helpers shared by the test suite: the kernel tolerance rule and a gloo multi-process launcher."""

from __future__ import annotations

import os
import queue as queue_mod
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


def assert_close_to_ref(
    out: torch.Tensor,
    ref_fp32: torch.Tensor,
    ref_lowp: torch.Tensor | None = None,
    floor: float = 1e-5,
    name: str = "output",
) -> None:
    """flash-attention's rule: |kernel - fp32 ref| <= 2 * |lowp ref - fp32 ref| + floor, elementwise max.

    `ref_lowp` is the PyTorch reference run in the kernel's dtype (None when the kernel runs in
    fp32: then only the floor applies). The message prints max and mean errors.
    """
    out, ref = out.detach().double(), ref_fp32.detach().double()
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{name}: {(~torch.isfinite(out)).sum().item()} non-finite values")
    err = (out - ref).abs()
    budget = floor
    lowp_err = None
    if ref_lowp is not None:
        lowp_err = (ref_lowp.detach().double() - ref).abs()
        budget = 2 * lowp_err.max().item() + floor
    if err.max().item() > budget:
        extra = (
            ""
            if lowp_err is None
            else f", lowp ref max {lowp_err.max().item():.3e} mean {lowp_err.mean().item():.3e}"
        )
        raise AssertionError(
            f"{name}: max err {err.max().item():.3e} mean {err.mean().item():.3e} "
            f"> budget {budget:.3e}{extra}"
        )


@torch.no_grad()
def teacher_forced_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """[len(response)] log p(response[i] | prompt, response[:i]) by one forward of `model` over prompt +
    response (temperature 1, the log-softmax in fp32): an engine's decode log-probs recomputed without it."""
    ids = torch.tensor([prompt + response], device=model.head.weight.device)
    logits = model(ids)[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(-1).gather(1, ids[0, len(prompt) :, None])[:, 0].cpu()


def with_separate_gate_and_up(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An engine state dict (`TrainEngine.state_dict()`) as checkpoints written before the routed experts'
    gate and up weights were stacked held it: each `...experts.w13` entry (weights, moments) as `w1` and `w3`
    [E, I, D], step counts copied to both. For tests of loading such checkpoints."""
    out = {}
    for key, t in state.items():
        if ".experts.w13" not in key:
            out[key] = t
            continue
        for half, old in enumerate(("w1", "w3")):
            out[key.replace(".experts.w13", f".experts.{old}")] = (t if t.dim() == 0 else t[:, half]).clone()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, done):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    from r1core.parallel import init_distributed

    init_distributed("cpu")  # the entry points' own start-up, from the torchrun environment set above: gloo
    try:
        queue.put((rank, fn(rank, world_size, *args), None))
    except Exception:  # the parent re-raises with the traceback
        queue.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()
    # CPU tensors cross the queue as shared memory owned by this process: stay alive until the parent has
    # them.
    done.wait(600)


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Run fn(rank, world_size, *args) in `world_size` gloo processes; return each rank's result.

    fn must be importable (module level) and return something picklable (move tensors to CPU).
    """
    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, done))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            try:
                rank, value, err = queue.get(timeout=1.0)
            except queue_mod.Empty:
                # a rank that died without reporting (segfault, OOM kill) would leave the others hanging in a
                # collective
                dead = [
                    (r, p.exitcode)
                    for r, p in enumerate(procs)
                    if r not in results and p.exitcode not in (None, 0)
                ]
                if dead:
                    raise AssertionError(
                        "distributed run failed: "
                        + ", ".join(f"rank {r} exited with code {code} before reporting" for r, code in dead)
                    ) from None
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"distributed run timed out after {timeout:.0f} s; ranks that reported: "
                        f"{sorted(results)}"
                    ) from None
                continue
            if err:
                errors.append(f"rank {rank}:\n{err}")
            results[rank] = value
    finally:
        done.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed run failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
