"""Load for examples/disagg_serving.py: concurrent requests, some cancelled mid-flight, latency percentiles.

    python examples/disagg_serving.py --port 8000 &
    python examples/disagg_load.py --url http://127.0.0.1:8000 --concurrency 8 --requests 200
    python examples/disagg_load.py --concurrency 16 --duration 30 --cancel-fraction 0.2 --json load.json

Each of `--concurrency` clients sends POST /generate, waits for the answer, and
sends the next, until `--requests` were sent or `--duration` seconds passed. A
request picked for cancellation (`--cancel-fraction`) closes its connection after
a random delay in [0, `--cancel-after`] seconds, as a client that goes away does;
if its answer came first it counts as completed. HTTP/1.1 is written by hand over
`anyio.connect_tcp` (one connection per request), so this needs nothing beyond anyio.

Reported: throughput (answers and generated tokens per second), end-to-end latency
p50/p90/p99 of the completed requests, the medians of the server's own phase
timings (queue, prefill, transfer, decode), and the server's /stats counters
before and after (requests cancelled, transfers cancelled, free blocks).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import anyio

VOCAB = 512


def make_prompt(i: int, length: int) -> list[int]:
    """A reproducible prompt: token ids in [0, VOCAB)."""
    rng = random.Random(i)
    return [rng.randrange(VOCAB) for _ in range(length)]


async def http_request(url: str, method: str, path: str, body: Any = None, *, timeout: float = 60.0,
                       give_up_after: float | None = None) -> tuple[int, dict[str, str], bytes] | None:
    """One request on its own connection: (status, headers, body), or None if we hung up after `give_up_after` s."""
    u = urlsplit(url)
    data = b"" if body is None else json.dumps(body).encode()
    head = (f"{method} {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    with anyio.fail_after(timeout):
        async with await anyio.connect_tcp(u.hostname or "127.0.0.1", u.port or 80) as stream:
            await stream.send(head + data)
            raw = bytearray()
            with anyio.move_on_after(give_up_after if give_up_after is not None else float("inf")) as scope:
                while True:
                    try:
                        raw += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
            if scope.cancelled_caught:
                return None  # leaving the `async with` closes the connection: the server sees a disconnect
    header, _, payload = bytes(raw).partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if "content-length" in headers:
        payload = payload[: int(headers["content-length"])]
    return status, headers, payload


async def http_json(url: str, method: str, path: str, body: Any = None, *, timeout: float = 60.0) -> tuple[int, Any]:
    res = await http_request(url, method, path, body, timeout=timeout)
    assert res is not None
    return res[0], json.loads(res[2])


def percentile(xs: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (q in [0, 100]); None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    _, before = await http_json(args.url, "GET", "/stats")
    latencies: list[float] = []
    phases: dict[str, list[float]] = {}
    counts = dict.fromkeys(("sent", "completed", "cancelled", "errors", "answered_before_cancel"), 0)
    tokens = 0
    errors: list[str] = []
    sent = 0
    t_start = time.perf_counter()
    stop_at = t_start + args.duration if args.duration else float("inf")

    def next_job() -> tuple[int, list[int], int, float | None] | None:
        nonlocal sent
        if (args.requests and sent >= args.requests) or time.perf_counter() >= stop_at:
            return None
        i = sent
        sent += 1
        length = rng.randint(args.prompt_len[0], args.prompt_len[1])
        cancel = rng.random() < args.cancel_fraction
        return i, make_prompt(args.seed * 1_000_003 + i, length), args.max_tokens, (
            rng.uniform(0, args.cancel_after) if cancel else None)

    async def client() -> None:
        nonlocal tokens
        while (job := next_job()) is not None:
            i, prompt, n, cancel_after = job
            counts["sent"] += 1
            t = time.perf_counter()
            try:
                res = await http_request(args.url, "POST", "/generate", {"prompt": prompt, "max_tokens": n},
                                         timeout=args.timeout, give_up_after=cancel_after)
            except Exception as e:  # a failed request is counted and reported, the load goes on
                counts["errors"] += 1
                errors.append(f"request {i}: {type(e).__name__}: {e}")
                continue
            if res is None:
                counts["cancelled"] += 1
                continue
            status, _, body = res
            if status != 200:
                counts["errors"] += 1
                errors.append(f"request {i}: HTTP {status}: {body[:200]!r}")
                continue
            counts["completed"] += 1
            counts["answered_before_cancel"] += cancel_after is not None
            latencies.append(time.perf_counter() - t)
            ans = json.loads(body)
            tokens += len(ans["tokens"])
            for k, v in ans["timings"].items():
                phases.setdefault(k, []).append(v)

    async with anyio.create_task_group() as tg:
        for _ in range(args.concurrency):
            tg.start_soon(client)
    elapsed = time.perf_counter() - t_start
    # cancelled requests wind down on the server after the client left: wait (bounded) until nothing is in flight
    after: dict[str, Any] = {}
    with anyio.move_on_after(30):
        while True:
            _, after = await http_json(args.url, "GET", "/stats")
            if after.get("in_flight") == 0 and after.get("free_blocks") == after.get("total_blocks"):
                break
            await anyio.sleep(0.1)

    def delta(key: str, where: str | None = None) -> int | None:
        a, b = (after.get(where) or {}, before.get(where) or {}) if where else (after, before)
        return a[key] - b[key] if key in a and key in b else None

    return {
        "url": args.url, "concurrency": args.concurrency, "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens, "cancel_fraction": args.cancel_fraction, "cancel_after": args.cancel_after,
        **counts, "seconds": elapsed,
        "throughput_rps": counts["completed"] / elapsed if elapsed else 0.0,
        "tokens_per_s": tokens / elapsed if elapsed else 0.0,
        "latency": {f"p{q}": percentile(latencies, q) for q in (50, 90, 99)}
        | {"mean": statistics.fmean(latencies) if latencies else None, "max": max(latencies, default=None)},
        "phase_medians": {k: statistics.median(v) for k, v in sorted(phases.items())},
        "server": {"cancelled": delta("cancelled"), "completed": delta("completed"),
                   "transfers_cancelled": delta("transfers_cancelled"),
                   "transfers_cancelled_prefill": delta("transfers_cancelled", "prefill"),
                   "transfers_cancelled_decode": delta("transfers_cancelled", "decode"),
                   "in_flight_after": after.get("in_flight"), "free_blocks_after": after.get("free_blocks"),
                   "total_blocks": after.get("total_blocks")},
        "errors_sample": errors[:10],
    }


def describe(r: dict[str, Any]) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.1f} ms"

    lat, srv = r["latency"], r["server"]
    lines = [
        f"{r['sent']} requests ({r['concurrency']} concurrent, prompts {r['prompt_len'][0]}-{r['prompt_len'][1]} "
        f"tokens, {r['max_tokens']} new) in {r['seconds']:.1f} s: {r['completed']} answered, {r['cancelled']} "
        f"cancelled by the client, {r['errors']} errors",
        f"throughput {r['throughput_rps']:.1f} requests/s, {r['tokens_per_s']:.0f} tokens/s",
        f"latency p50 {ms(lat['p50'])}, p90 {ms(lat['p90'])}, p99 {ms(lat['p99'])} (max {ms(lat['max'])})",
        "server phase medians: " + ", ".join(f"{k} {ms(v)}" for k, v in r["phase_medians"].items()),
        f"server: {srv['cancelled']} cancelled, {srv['transfers_cancelled']} transfers cancelled "
        f"(prefill side {srv['transfers_cancelled_prefill']}, decode side {srv['transfers_cancelled_decode']}); "
        f"afterwards {srv['in_flight_after']} in flight, {srv['free_blocks_after']}/{srv['total_blocks']} "
        "blocks free",
    ]
    lines += [f"  {e}" for e in r["errors_sample"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=0, help="stop after this many (0: --duration decides)")
    ap.add_argument("--duration", type=float, default=0.0, help="seconds of load (0: --requests decides)")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--cancel-fraction", type=float, default=0.0, help="fraction of requests the client abandons")
    ap.add_argument("--cancel-after", type=float, default=0.05, help="abandon after uniform [0, this] seconds")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    ap.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    args = ap.parse_args(argv)
    if not args.requests and not args.duration:
        args.requests = 100
    result = anyio.run(run, args, backend=args.backend)
    print(describe(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
