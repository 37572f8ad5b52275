"""Test-suite set-up: seeds, GPU-only tests skipped with a reason on CPU machines, and the parallel run.

The README's test command runs the suite on every core (`-n auto`, pytest-xdist from the test extra).
Under it:
- each worker, and every process a test starts, gets `cores // workers` intra-op threads (OMP_NUM_THREADS,
  unless set), so two workers on two cores do not fight over four threads;
- each module's tests go to one worker together, so a module-scoped fixture (a multi-process reference run,
  a sandbox image) runs once, except in the modules in SPLIT, whose long tests share nothing and are handed
  out one at a time (`unit_of`, used by both the workers' ordering and the scheduler);
- work is handed out longest first (tests/durations.json, written by `--store-durations`; a test it does not
  list counts DEFAULT_S), so the short ones fill the end instead of one long test running alone.
An explicit `--dist` other than `load` (e.g. `--dist worksteal`) keeps xdist's own scheduling. Without `-n`,
tests run in collection order in one process, as usual.
"""

import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see r1core/cli.py)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # set in a worker before conftest loads
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // _WORKERS)))

import torch  # noqa: E402

# Triton kernels run under the interpreter on machines without a GPU. This must be set before any
# kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DURATIONS = Path(__file__).with_name("durations.json")
DEFAULT_S = 0.3
# each worker holds torch and transformers (~1 GB); many tests start processes of their own
MAX_AUTO_WORKERS = 8
# modules whose tests share no expensive module-scoped fixture and hold several long tests
SPLIT = ("test_pipeline.py", "test_examples.py", "test_adamw.py", "test_rl_learning.py")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    if torch.cuda.is_available():  # GPU tests at real head sizes: give the cache back between tests
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def pytest_addoption(parser):
    parser.addoption(
        "--store-durations",
        action="store_true",
        help=f"record each test's time (setup + call + teardown) in {DURATIONS.name}: the parallel order",
    )


def pytest_collection_modifyitems(config, items):
    # GPU tests run whenever a GPU is present; without one they are reported as skipped with the reason.
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (runs on the GPU machine: see benchmarks/gpu_session.sh)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _longest_first(items)


def _recorded() -> dict[str, float]:
    return json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}


def unit_of(nodeid: str) -> str:
    """The work unit a test belongs to: its module, or itself in a SPLIT module."""
    module = nodeid.split("::", 1)[0]
    return nodeid if Path(module).name in SPLIT else module


def _longest_first(items) -> None:
    """Order the items unit by unit, longest unit first (the scheduler hands units out in this order). Runs
    in every worker on the same collection, so all workers agree on the order."""
    known = _recorded()
    units: dict[str, list] = {}
    for item in items:
        units.setdefault(unit_of(item.nodeid), []).append(item)
    cost = {key: sum(known.get(i.nodeid, DEFAULT_S) for i in group) for key, group in units.items()}
    items[:] = [i for key in sorted(units, key=lambda k: -cost[k]) for i in units[key]]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    return min(_cores(), MAX_AUTO_WORKERS)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`-n` alone (xdist's default `load`): whole modules per worker, SPLIT modules test by test, in the
    workers' longest-first order (xdist's loadscope would reorder the units by their number of tests)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    config.option.loadscopereorder = False
    return ByUnit(config, log)


_times: dict[str, float] = {}


def pytest_runtest_logreport(report):
    _times[report.nodeid] = _times.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    if session.config.getoption("store_durations") and not os.environ.get("PYTEST_XDIST_WORKER"):
        # merged into the file, so a run of some modules keeps the others' times
        known = _recorded()
        known.update({k: round(v, 2) for k, v in _times.items()})
        DURATIONS.write_text(json.dumps(dict(sorted(known.items())), indent=0) + "\n")
