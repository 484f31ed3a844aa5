"""Shared pytest fixtures. Keep it minimal; append fixtures with small edits."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.loop_fixtures import tiny_model, tiny_tokenizer
from tests.scripted_server import ScriptedServer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random student (2 layers, 64 dims) and its tokenizer saved as a model folder, once per module."""
    path = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer()
    tiny_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def scripted_server():
    """A running ScriptedServer (default responder, no faults); reconfigure
    its attributes in the test (responder, latency, faults, max_concurrency...)."""
    with ScriptedServer() as server:
        yield server
