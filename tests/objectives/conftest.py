"""Fixtures for objective tests (helpers live in objtools.py)."""

from __future__ import annotations

import pytest
import torch
from objtools import EOS, build_batch, tiny_llama


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run ~50x faster on one thread when other jobs share the 2 cores (no OpenMP spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model():
    return tiny_llama(0)


@pytest.fixture
def batch(model):
    """2 prompts x 2 samples; prompt 1 is shorter (left padding), completions of 3, 2, 4, 1 tokens."""
    return build_batch(
        model,
        prompt_ids=[[5, 6, 7], [8, 9]],
        completion_ids=[[10, 11, EOS], [12, EOS], [13, 14, 15, EOS], [EOS]],
        group_size=2,
    )
