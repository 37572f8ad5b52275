import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see r1core/cli.py)

import torch  # noqa: E402

# Triton kernels run under the interpreter on machines without a GPU. This must be set before any
# kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    if torch.cuda.is_available():  # GPU tests at real head sizes: give the cache back between tests
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def pytest_collection_modifyitems(config, items):
    # GPU tests run whenever a GPU is present; without one they are reported as skipped with the reason.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (runs on the GPU machine: see benchmarks/gpu_session.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
