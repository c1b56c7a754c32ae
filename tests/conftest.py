"""Shared test configuration.

One intra-op thread: the test machine has few, noisy cores. The ``slow`` marker is
registered (and deselected by default) in pyproject.toml.
"""

import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

# make ``import reference`` work however pytest was invoked
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _restore_torch_global_state():
    """``Trainer(deterministic=True)`` switches torch to deterministic algorithms for the rest
    of the process; put that back after each test so later tests (the allocator counts of
    test_replay_memory) see torch's defaults whatever ran before them."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
