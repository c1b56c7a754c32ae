"""Integration tests of GradWatch inside the libraries where people train RNNs with Lightning.

They run in their own environment (``make test-integrations``: ``.venv-integrations`` with the
versions pinned in ``requirements/integrations.txt``). Every module here starts with
``pytest.importorskip`` of its library, so a plain ``pytest`` in the dev environment skips
them, and every test is marked ``integrations`` so that it can be selected or deselected
with ``-m``. Each test trains for a handful of steps on a tiny synthetic series, on the CPU,
with one thread, no progress bar and its logs in a temporary folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    # Also registered in pyproject.toml; registering here too keeps --strict-markers happy
    # when this folder is run on its own with another configuration.
    config.addinivalue_line(
        "markers",
        "integrations: tests with darts, pytorch-forecasting, neuralforecast, scan packages, "
        "xlstm and ncps",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integrations)


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
