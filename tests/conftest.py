"""Test-suite set-up: seeds, GPU-only tests skipped with a reason on CPU machines, and the parallel run.

The README's test command runs the suite on every core (`-n auto --dist loadgroup`, pytest-xdist from the
test extra). Under it:
- each worker, and every process a test starts, gets `cores // workers` intra-op threads (OMP_NUM_THREADS,
  unless set), so two workers on two cores do not fight over four threads;
- every module's tests go to one worker as a group, so a module-scoped fixture (a multi-process reference
  run, a sandbox image) runs once, except the modules in SPLIT, whose long tests share nothing and are
  handed out one at a time;
- groups and tests are handed out longest first (tests/durations.json, written by `--store-durations`;
  a test it does not list counts DEFAULT_S), so the short ones fill the end instead of one long test
  running alone.
Without `-n`, tests run in collection order in one process, as usual.
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
MAX_AUTO_WORKERS = (
    8  # each worker holds torch and transformers (~1 GB); many tests start processes of their own
)
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
        help=f"write each test's time (setup + call + teardown) to {DURATIONS.name}: the parallel order",
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


def _longest_first(items) -> None:
    """Order the work units (a module's tests, or one test of a SPLIT module) by their recorded time,
    longest first, and mark grouped modules for `--dist loadgroup`. Runs in every worker on the same
    collection, so all workers agree on the order."""
    known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    units: dict[str, list] = {}
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        units.setdefault(item.nodeid if Path(module).name in SPLIT else module, []).append(item)
    cost = {key: sum(known.get(i.nodeid, DEFAULT_S) for i in group) for key, group in units.items()}
    items[:] = [i for key in sorted(units, key=lambda k: -cost[k]) for i in units[key]]
    for key, group in units.items():
        if len(group) > 1:
            for item in group:
                item.add_marker(pytest.mark.xdist_group(key))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    return min(_cores(), MAX_AUTO_WORKERS)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """loadgroup, keeping the workers' longest-first order (xdist would reorder groups by test count)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    config.option.loadscopereorder = False
    return LoadGroupScheduling(config, log)


_times: dict[str, float] = {}


def pytest_runtest_logreport(report):
    nodeid = report.nodeid.split("@", 1)[0]  # loadgroup's group suffix
    _times[nodeid] = _times.get(nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    if session.config.getoption("store_durations") and not os.environ.get("PYTEST_XDIST_WORKER"):
        DURATIONS.write_text(json.dumps({k: round(v, 2) for k, v in sorted(_times.items())}, indent=0) + "\n")
