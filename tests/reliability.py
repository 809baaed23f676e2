"""Collects the fault tests' outcomes for docs/reliability.md.

A test marked `@pytest.mark.fault("what was done", "what must happen")` becomes
one run of that fault in the report; its pass/fail/skip is the outcome, and a
time it hands to the `detected` fixture (seconds from the fault to the error)
is the time to detect, and `record_property("note", text)` adds a remark to
its row. `pytest -m fault --reliability-json F` writes the runs;
`scripts/reliability.py` turns them into the table. The report is made from
the very tests that prove each line, so it cannot claim what they do not show.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

_runs: list[dict[str, Any]] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reliability-json", metavar="FILE", default=None,
                     help="write every @pytest.mark.fault test's outcome and detection time to FILE")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fault(fault, expect): a fault or bad input and the outcome it must have "
                                       "(collected into docs/reliability.md)")


@pytest.fixture(autouse=True)
def _fault_marker(request: pytest.FixtureRequest) -> None:
    mark = request.node.get_closest_marker("fault")
    if mark is not None:
        fault, expect = mark.args
        request.node.user_properties.append(("fault", fault))
        request.node.user_properties.append(("expect", expect))


@pytest.fixture
def detected(request: pytest.FixtureRequest) -> Callable[[float], None]:
    """Record the time from the fault to the error, in seconds, for the report."""
    def record(seconds: float) -> None:
        request.node.user_properties.append(("detect_s", float(seconds)))
    return record


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    props = dict(report.user_properties)
    if "fault" not in props:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        detect = [v for k, v in report.user_properties if k == "detect_s"]
        notes = [str(v) for k, v in report.user_properties if k == "note"]
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2])
        _runs.append({"test": report.nodeid, "fault": props["fault"], "expect": props["expect"],
                      "outcome": report.outcome, "detect_s": detect, "notes": notes, "skip_reason": reason,
                      "duration_s": round(report.duration, 3)})


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("--reliability-json")
    if path:
        Path(path).write_text(json.dumps(_runs, indent=1))
