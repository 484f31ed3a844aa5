"""Shared pytest fixtures. Keep it minimal; append fixtures with small edits."""

from __future__ import annotations

import pytest

from tests.scripted_server import ScriptedServer


@pytest.fixture
def scripted_server():
    """A running ScriptedServer (default responder, no faults); reconfigure
    its attributes in the test (responder, latency, faults, max_concurrency...)."""
    with ScriptedServer() as server:
        yield server
