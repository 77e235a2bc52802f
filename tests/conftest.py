"""Test setup: which (backend, device) pairs this machine can run.

Without a GPU the Triton kernels run on CPU tensors under the Triton interpreter,
which must be switched on before triton is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from catapult_kernels import ops  # noqa: E402


def _triton_ok() -> bool:
    try:
        ops._load_triton()
        return True
    except RuntimeError:
        return False


def backend_devices() -> list:
    """Every (backend, device) pair to test here: C++ on CPU always; the Triton
    interpreter on CPU when it is on; CUDA C++ and compiled Triton when a GPU is."""
    pairs = [pytest.param(("cpu", "cpu"), id="cpu")]
    if _triton_ok() and os.environ.get("TRITON_INTERPRET") == "1":
        pairs.append(pytest.param(("triton", "cpu"), id="triton-interpreter"))
    if torch.cuda.is_available():
        pairs.append(pytest.param(("cuda", "cuda"), id="cuda"))
        if _triton_ok() and os.environ.get("TRITON_INTERPRET") != "1":
            pairs.append(pytest.param(("triton", "cuda"), id="triton-cuda"))
    return pairs


BACKEND_DEVICES = backend_devices()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def pytest_report_header(config):
    return (f"catapult backends under test: {[p.id for p in BACKEND_DEVICES]}; "
            f"CUDA C++ kernels built: {ops.has_cpp_kernels('cuda')}; torch {torch.__version__}")


@pytest.fixture
def saved(monkeypatch) -> list:
    """The figures the code under test saves, kept for inspection (even those the code closes)."""
    from matplotlib.figure import Figure
    figures, real = [], Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def pytest_configure(config):
    # `make test` (CI) runs `-m "not slow"`; `make test-all` runs these too: the trainer under
    # torchrun and its multi-process sweeps, 10-30 s each on 2 cores.
    config.addinivalue_line("markers", "slow: a multi-process trainer test (make test-all runs it)")
