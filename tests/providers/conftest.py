"""Provider tests: close every openai client a test opened, inside the test's event loop."""

from __future__ import annotations

import pytest

from tests.providers.helpers import OPEN_CLIENTS


@pytest.fixture(autouse=True)
async def _close_clients():
    yield
    while OPEN_CLIENTS:
        await OPEN_CLIENTS.pop().close()
