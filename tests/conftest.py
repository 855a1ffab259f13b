"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors run fastest on one thread, without OpenMP contention on a busy machine
    (measured here: two threads fighting other jobs made small operations 10-150x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-count",
        type=int,
        default=150,
        help="mutations per file kind in test_fuzz.py (default 150; bench/reliability.py runs "
        "ten thousand)",
    )
