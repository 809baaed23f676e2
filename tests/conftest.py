"""Run every `@pytest.mark.anyio` test on both asyncio and trio."""

import pytest

pytest_plugins = ["reliability"]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param
