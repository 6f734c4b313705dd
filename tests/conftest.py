"""Shared test setup: NaN-poisoned `torch.empty`, worker pools shut down at the end."""

from __future__ import annotations

import pytest
import torch

from tests._harness import shutdown_pools

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Fill `torch.empty` results with NaN so that reading memory nobody wrote fails loudly."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


def pytest_sessionfinish(session, exitstatus):
    shutdown_pools()
