"""Shared test configuration.

Tests marked ``@pytest.mark.cuda`` need a CUDA device and are skipped on CPU-only
machines (CI).  Every piece of engine logic also has a CPU test through the
engine's ``emulate`` mode, so a skip here never hides untested logic.
"""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module's tests: the tiny models run faster without
    thread contention on the 2-core CI machine (``pytestmark = usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
