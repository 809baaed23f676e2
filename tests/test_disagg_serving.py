"""examples/disagg_serving.py as a service: right answers over HTTP, a client that leaves cancels its transfer.

The service (front end + prefill worker + decode worker, three processes) is started
once per event loop (asyncio, trio) on a free port and killed at the end whatever
happened. Answers are compared with a single-process greedy run of the same model;
a client that hangs up mid-transfer must show up as a cancelled transfer on both
workers, give every KV block back, and leave the service answering others.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("hypercorn", reason="the serving example runs on hypercorn (pip install hypercorn)")
pytest.importorskip("torch")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
from disagg_load import http_json, http_request, make_prompt  # noqa: E402
from disagg_serving import reference  # noqa: E402

pytestmark = pytest.mark.multiprocess

SERVE = str(EXAMPLES / "disagg_serving.py")
LOAD = str(EXAMPLES / "disagg_load.py")


class Service:
    def __init__(self, proc: subprocess.Popen[str], url: str, workers: list[int], log: Path) -> None:
        self.proc, self.url, self.workers, self.log = proc, url, workers, log

    def get(self, path: str) -> Any:
        status, body = anyio.run(lambda: http_json(self.url, "GET", path, timeout=15))
        assert status == 200, body
        return body

    def settled(self, timeout: float = 30.0, **want: int) -> dict[str, Any]:
        """/stats once nothing is in flight, every block is free and the counters named in `want` are reached."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.get("/stats")
            if (st["in_flight"] == 0 and st["free_blocks"] == st["total_blocks"]
                    and st["prefill"]["active"] == 0 and st["decode"]["active"] == 0
                    and all(st[k] >= v for k, v in want.items())):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"the service did not settle within {timeout} s: {st}")
            time.sleep(0.1)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def service(request: pytest.FixtureRequest) -> Iterator[Service]:
    backend = request.param
    with tempfile.TemporaryDirectory(prefix="disagg-serving-") as tmp:
        log = Path(tmp) / "stderr.log"
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, SERVE, "--port", "0", "--backend", backend],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
        workers: list[int] = []
        try:
            lines: list[str] = []
            stdout = proc.stdout
            assert stdout is not None
            threading.Thread(target=lambda: lines.extend(iter(stdout.readline, "")), daemon=True).start()
            deadline = time.monotonic() + 90
            m = None
            while m is None and time.monotonic() < deadline and proc.poll() is None:
                m = next((re.search(r"serving on (http://\S+) .* pids (\d+) (\d+)", ln) for ln in lines
                          if "serving on" in ln), None)
                time.sleep(0.05)
            assert m is not None, f"the service did not start: exit {proc.poll()}\n{log.read_text()[-3000:]}"
            workers = [int(m.group(2)), int(m.group(3))]
            yield Service(proc, m.group(1), workers, log)
            proc.send_signal(signal.SIGTERM)  # a clean stop: workers told to stop, everything exits
            assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pid in workers:
                _kill(pid)


def test_concurrent_answers_equal_one_process_model(service: Service) -> None:
    jobs: list[tuple[Any, int]] = [(make_prompt(i, n), k) for i, (n, k) in
                                   enumerate([(5, 1), (16, 7), (40, 12), (97, 3), (150, 20), (33, 16)])]
    jobs.append(("a prompt given as text", 6))  # bytes as token ids
    results: list[Any] = [None] * len(jobs)

    async def main() -> None:
        async def one(i: int) -> None:
            prompt, n = jobs[i]
            results[i] = await http_json(service.url, "POST", "/generate", {"prompt": prompt, "max_tokens": n},
                                         timeout=60)

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                for i in range(len(jobs)):
                    tg.start_soon(one, i)

    anyio.run(main)
    for (prompt, n), (status, body) in zip(jobs, results, strict=True):
        assert status == 200, body
        ids = list(prompt.encode()) if isinstance(prompt, str) else prompt
        assert body["tokens"] == reference(ids, n), (len(ids), n)
        t = body["timings"]
        assert set(t) >= {"queue", "prefill", "transfer", "decode", "total"}
        assert 0 < t["prefill"] < t["total"] and 0 < t["transfer"] < t["total"], t
    # bad requests are refused, not served
    status, body = anyio.run(lambda: http_json(service.url, "POST", "/generate", {"prompt": [600], "max_tokens": 2}))
    assert status == 400, body
    service.settled()


def test_client_disconnect_cancels_the_transfer_and_frees_blocks(service: Service) -> None:
    before = service.settled()
    prompt = make_prompt(7, 200)  # 13 blocks

    async def hang_up() -> Any:
        # the decode worker waits 0.4 s after each of the 4 layers of the first step: the KV is on the wire
        # for 1.6 s, and the client goes away after 0.5 s
        return await http_request(service.url, "POST", "/generate",
                                  {"prompt": prompt, "max_tokens": 8, "layer_delay": 0.4}, timeout=30,
                                  give_up_after=0.5)

    assert anyio.run(hang_up) is None
    after = service.settled(cancelled=before["cancelled"] + 1)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]
    # both ends of that one transfer saw it cancelled; every block is back on the free lists
    assert after["decode"]["transfers_cancelled"] == before["decode"]["transfers_cancelled"] + 1, after
    assert after["prefill"]["transfers_cancelled"] == before["prefill"]["transfers_cancelled"] + 1, after
    assert after["decode"]["channel"]["failed"] == before["decode"]["channel"]["failed"] + 1, after
    assert after["free_blocks"] == before["free_blocks"] == after["total_blocks"]
    log = service.log.read_text()
    assert re.search(r"\[front\] request r\d+: client disconnected; cancelled in transfer", log), log[-2000:]
    # and the service goes on: the same request, not abandoned, is answered correctly
    status, body = anyio.run(lambda: http_json(service.url, "POST", "/generate",
                                               {"prompt": prompt, "max_tokens": 8}, timeout=60))
    assert status == 200 and body["tokens"] == reference(prompt, 8), body
    assert service.settled()["completed"] == before["completed"] + 1


def test_load_script_reports_percentiles(service: Service, tmp_path: Path) -> None:
    before = service.settled()
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, LOAD, "--url", service.url, "--requests", "24", "--concurrency", "6",
                           "--prompt-len", "16", "128", "--max-tokens", "8", "--cancel-fraction", "0.25",
                           "--cancel-after", "0.05", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["sent"] == 24 and r["errors"] == 0, r
    assert r["completed"] + r["cancelled"] == 24 and r["completed"] > 0, r
    lat = r["latency"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], lat
    assert {"queue", "prefill", "transfer", "decode", "total"} <= set(r["phase_medians"]), r["phase_medians"]
    assert r["throughput_rps"] > 0 and "p99" in proc.stdout
    srv = r["server"]
    # a client that hung up after its answer was sent counts as completed on the server
    assert srv["completed"] >= r["completed"] and srv["cancelled"] <= r["cancelled"], (r, srv)
    # every request the front end took ended one way or the other (one abandoned within a millisecond of being
    # sent may never have reached it)
    took = after_requests(before, service)
    assert srv["completed"] + srv["cancelled"] == took and r["completed"] <= took <= 24, (r, srv, took)
    assert srv["in_flight_after"] == 0 and srv["free_blocks_after"] == srv["total_blocks"], srv


def after_requests(before: dict[str, Any], service: Service) -> int:
    """How many requests the front end took since `before` (once they have all ended)."""
    return int(service.settled()["requests"] - before["requests"])


def test_check_mode_compares_with_one_process() -> None:
    proc = subprocess.run([sys.executable, SERVE, "--port", "0", "--check", "5", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check: 5/5 answers equal the one-process greedy run" in proc.stdout, proc.stdout
