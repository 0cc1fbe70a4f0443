"""Test setup: Triton kernels run through the interpreter when no GPU is present; every test starts from a fixed seed."""

import os

import pytest

if os.environ.get("HIAP_TEST_NO_INTERPRETER") is None:
    try:
        import torch as _torch_probe  # noqa: F401  (torch import is cheap next to the interpreter decision)

        _has_gpu = _torch_probe.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_gpu = False
    if not _has_gpu:
        # Must be set before the first `import triton` anywhere in the process.
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# The NaN-poisoned allocation fixture of kernel tests, and the gated-weight ops' tile sizes.
from tests.kernel_checks import gated_weight_tiles, poisoned  # noqa: E402,F401


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: end-to-end runs that take more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
