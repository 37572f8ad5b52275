"""A rank that fails ends the whole job with an error instead of leaving the others waiting.

When one rank raises, its peers sit in a collective or a pipeline send/recv that will never
complete: with NCCL until the process-group timeout (10 minutes by default), with gloo for 30.
Letting the exception unwind is not enough either: interpreter shutdown can block in the
communicator's destructor while work is pending. So a failing rank logs the error with its rank
and leaves at once with `os._exit`; torchrun sees a worker exit non-zero and stops the others
(r1core.testing.run_distributed does the same for the gloo tests). The process-group timeout
(`parallel.timeout_s`) bounds the wait of ranks whose peer died without raising (a kill, a hang
inside a kernel): their collective times out, they raise, and they leave the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from typing import NoReturn

import torch.distributed as dist

log = logging.getLogger("r1core")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def exit_rank(code: int) -> NoReturn:
    """End this process with `code`; in a multi-rank job at once, without waiting on the other ranks."""
    _, world = _rank_world()
    if world == 1:
        raise SystemExit(code)
    logging.shutdown()  # flush every handler (files under the run directory included)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def fail_fast(what: str = "r1core", passthrough: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Run the body; an exception on a rank of a multi-rank job is logged with the rank and ends the process.

    On one process the exception propagates unchanged, and so do `passthrough` exceptions (the caller
    reports those itself and ends with `exit_rank`).
    """
    try:
        yield
    except passthrough:
        raise
    except Exception:
        rank, world = _rank_world()
        if world == 1:
            raise
        log.error(
            "%s: rank %d of %d failed; ending this process so the launcher stops the others:\n%s",
            what,
            rank,
            world,
            traceback.format_exc(),
        )
        exit_rank(1)
