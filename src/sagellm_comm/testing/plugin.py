"""pytest plugin (entry point `sagellm_comm`): fixtures for multi-rank tests.

`free_port` hands out a loopback port for a rendezvous; `fault_plan` a fresh
`FaultPlan`. Run your async tests on both backends the anyio way: parametrize
the `anyio_backend` fixture in your conftest.
"""

from __future__ import annotations

import socket

import pytest

from .faults import FaultPlan


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def fault_plan() -> FaultPlan:
    return FaultPlan()
