"""Worker processes for the multi-process tests: one per rank, killed at exit whatever happened.

A worker script is run as `python WORKER SCENARIO RANK WORLD PORT BACKEND [EXTRA...]`
and prints `RESULT <json>` with what its rank observed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Ranks:
    """The processes of one world. `only`: start just these ranks (start the rest later)."""

    def __init__(self, worker: str, scenario: str, world: int, backend: str, *, only: list[int] | None = None,
                 port: int | None = None, env: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> None:
        self.worker = worker
        self.extra = list(extra)
        self.port = port or free_port()
        self.env = dict(os.environ, **(env or {}))
        self.procs: dict[int, subprocess.Popen[str]] = {}
        for r in only if only is not None else range(world):
            self.start(scenario, r, world, backend)

    def start(self, scenario: str, rank: int, world: int, backend: str) -> None:
        self.procs[rank] = subprocess.Popen(
            [sys.executable, self.worker, scenario, str(rank), str(world), str(self.port), backend, *self.extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env)

    def wait_line(self, rank: int, text: str, timeout: float) -> None:
        proc = self.procs[rank]
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if text in line:
                return
            if not line and proc.poll() is not None:
                break
        self.kill_all()
        raise AssertionError(f"rank {rank} never printed {text!r}: {proc.stderr.read() if proc.stderr else ''}")

    def results(self, timeout: float, ranks: list[int] | None = None,
                clean_exit: bool = False) -> dict[int, dict[str, object]]:
        """Each rank's RESULT, waiting at most `timeout` seconds in all (then: a hang)."""
        out: dict[int, dict[str, object]] = {}
        deadline = time.monotonic() + timeout
        for r in ranks if ranks is not None else list(self.procs):
            proc = self.procs[r]
            try:
                stdout, stderr = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill_all()
                raise AssertionError(f"rank {r} did not finish within {timeout} s (hang)") from None
            lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
            assert lines, f"rank {r} exited {proc.returncode} without a result:\n{stderr[-3000:]}"
            out[r] = json.loads(lines[-1].removeprefix("RESULT "))
            if clean_exit:
                assert proc.returncode == 0, f"rank {r} exited {proc.returncode}:\n{stderr[-3000:]}"
        return out

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
                proc.kill()
                proc.wait()

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()
