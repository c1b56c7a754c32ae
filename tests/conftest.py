"""Shared test configuration.

One intra-op thread: the test machine has few, noisy cores. The ``slow`` marker is
registered (and deselected by default) in pyproject.toml.
"""

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

# make ``import reference`` work however pytest was invoked
sys.path.insert(0, str(Path(__file__).resolve().parent))
