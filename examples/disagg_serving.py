"""Disaggregated serving over HTTP: a front end, a prefill worker and a decode worker in three processes.

    python examples/disagg_serving.py --port 8000                 # starts everything, prints the URL
    python examples/disagg_serving.py --port 8000 --backend trio
    curl -s localhost:8000/generate -d '{"prompt": [1, 2, 3], "max_tokens": 8}'
    curl -s localhost:8000/generate -d '{"prompt": "hello", "max_tokens": 8}'
    curl -s localhost:8000/stats
    python examples/disagg_serving.py --port 0 --check 8           # serve, check 8 concurrent requests, exit
    python examples/disagg_load.py --url http://127.0.0.1:8000 --concurrency 8 --requests 200

Three sagellm-comm ranks, one command:

- rank 0, the front end: an ASGI app served by hypercorn, on asyncio or trio
  (`--backend`). POST /generate {"prompt": [token ids] or "text", "max_tokens": n}
  answers {"tokens": [...], "timings": {"queue", "prefill", "transfer", "decode",
  "total"}} (seconds). GET /stats: counters of all three ranks. GET /health.
  "layer_delay": s (optional, at most 5) makes the decode worker wait s seconds after
  each layer of the first decode step, as a slower model would, so that a transfer
  stays in flight long enough to watch it being cancelled.
- rank 1, the prefill worker: a task per request; waits for blocks of its paged KV
  cache and for the compute slot ("queue"), runs the prompt through
  `tiny_model.TinyLlama` ("prefill"), sends the first token to the decode worker
  and the request's KV with `KVChannel.send`.
- rank 2, the decode worker: a task per request; allocates blocks, receives the KV
  with `async for layer in chan.receive(...)`, running layer l of the first decode
  step as soon as layer l has landed ("transfer": until the last layer landed),
  then decodes greedily ("decode") and answers the front end.

Requests, first tokens, cancellations and answers are sagellm-comm messages
(fixed-size JSON frames, `comm.send` / `comm.recv`); the KV goes straight from the
prefill worker's cache to the decode worker's, never through the front end.
Model compute runs in a worker thread (one at a time per process, like one device
queue), so each process's event loop keeps moving transfers and messages.

Cancellation follows the request down the pipeline. When the HTTP client goes
away before its answer (ASGI `http.disconnect`), the front end tells the prefill
worker. A request still queued or being prefilled ends there. A request whose KV is
on the wire: the prefill worker cancels its `chan.send`, which tells the receiver
(its `receive` raises `TransferCancelled` when it next waits on the channel), and
passes the cancel on to the decode worker, which ends the receive at once (it may
be computing a layer, or waiting for an offer the cancelled send never made). A
request already decoding: the cancel is passed on (behind the request's handoff, on
the same ordered tag) and the decode worker stops between two steps. In every case
the blocks go back to the cache's free list, and both workers count the cancelled
transfer (GET /stats: `transfers_cancelled`).

`--check N` serves on a free port, sends N concurrent requests over HTTP and
compares every answer with a single-process greedy run of the same model (same
seed, same thread count): with no codec the tokens must be exactly equal.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import numpy as np
import torch

import sagellm_comm as sc
from sagellm_comm import kv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_model import TinyConfig, TinyLlama, blocks_needed, greedy

FRONT, PREFILL, DECODE = 0, 1, 2
TAG_CTRL = 21  # front end -> worker: prefill requests, cancels, stats, stop
TAG_UP = 22  # worker -> front end: answers (done, cancelled, error) and stats
TAG_HANDOFF = 23  # prefill -> decode: a request's first token (its KV follows on the channel), or a cancel
MSG_BYTES = 16384  # one message: 4-byte length, then JSON
MAX_BODY = 1 << 20

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


# -- messages ---------------------------------------------------------------------------------------
def pack(obj: dict[str, Any]) -> np.ndarray:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > MSG_BYTES - 4:
        raise ValueError(f"message of {len(data)} bytes does not fit in {MSG_BYTES - 4}")
    buf = np.zeros(MSG_BYTES, dtype=np.uint8)
    buf[:4] = np.frombuffer(len(data).to_bytes(4, "little"), dtype=np.uint8)
    buf[4:4 + len(data)] = np.frombuffer(data, dtype=np.uint8)
    return buf


def unpack(buf: np.ndarray) -> dict[str, Any]:
    n = int.from_bytes(buf[:4].tobytes(), "little")
    out: dict[str, Any] = json.loads(buf[4:4 + n].tobytes())
    return out


async def post(comm: sc.Communicator, dst: int, tag: int, obj: dict[str, Any]) -> None:
    """Send one message, whole: a send cancelled half-way would fail the receiver's loop."""
    with anyio.CancelScope(shield=True):
        await comm.send(pack(obj), dst, tag=tag, timeout=30)


async def inbox(comm: sc.Communicator, src: int, tag: int) -> dict[str, Any]:
    buf = np.empty(MSG_BYTES, dtype=np.uint8)
    await comm.recv(buf, src, tag=tag, timeout=1e9)  # no limit: a worker waits for work as long as it takes
    return unpack(buf)


# -- workers ----------------------------------------------------------------------------------------
class BlockPool:
    """The free list of a paged KV cache; `allocate` waits until enough blocks are free."""

    def __init__(self, num_blocks: int) -> None:
        self.total = num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        self._freed = anyio.Event()

    async def allocate(self, n: int) -> list[int]:
        if n > self.total:
            raise ValueError(f"{n} blocks asked for, the cache has {self.total}")
        while len(self.free_ids) < n:
            await self._freed.wait()
        return [self.free_ids.popleft() for _ in range(n)]

    def free(self, ids: list[int]) -> None:
        self.free_ids.extend(ids)
        self._freed.set()
        self._freed = anyio.Event()


class Worker:
    """What both workers share: the model, the cache and its free list, the channel, counters."""

    def __init__(self, args: argparse.Namespace, comm: sc.Communicator) -> None:
        self.args = args
        self.comm = comm
        self.model = TinyLlama(TinyConfig(seed=args.seed))
        self.cache = self.model.allocate_cache(args.blocks)
        self.pool = BlockPool(args.blocks)
        self.chan = kv.KVChannel(comm, self.cache, name="serve")
        self.compute = anyio.CapacityLimiter(1)  # one model computation at a time, as on one device queue
        self.scopes: dict[str, anyio.CancelScope] = {}
        self.stages: dict[str, str] = {}  # where each active request is
        self.counters = dict.fromkeys(("requests", "completed", "cancelled", "failed", "transfers",
                                       "transfers_cancelled"), 0)
        self.stop = anyio.Event()

    async def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.compute)

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "active": len(self.scopes), "active_stages": dict(Counter(self.stages.values())),
                "free_blocks": len(self.pool.free_ids),
                "total_blocks": self.pool.total, "channel": dict(self.chan.counters)}

    def log(self, text: str) -> None:
        if not self.args.quiet:
            print(f"[{self.args.role}] {text}", file=sys.stderr, flush=True)

    async def listen(self, src: int, tag: int, handle: Callable[[dict[str, Any]], Awaitable[None] | None]) -> None:
        """Messages from rank `src`, in order; a peer that has gone (the others stopping too) stops this worker."""
        try:
            while not self.stop.is_set():
                done = handle(await inbox(self.comm, src, tag))
                if done is not None:
                    await done
        except sc.CommError as e:
            if not self.stop.is_set():
                self.log(f"stopping: {type(e).__name__}: {e}")
            self.stop.set()

    async def control(self, tg: anyio.abc.TaskGroup) -> None:
        """Messages from the front end, in order."""
        await self.listen(FRONT, TAG_CTRL, lambda msg: self.on_front(msg, tg))

    async def on_front(self, msg: dict[str, Any], tg: anyio.abc.TaskGroup) -> None:
        op = msg["op"]
        if op == "stop":
            self.stop.set()
        elif op == "stats":
            await post(self.comm, FRONT, TAG_UP, {"id": msg["id"], "event": "stats", "stats": self.stats()})
        else:
            self.on_control(msg, tg)

    def on_control(self, msg: dict[str, Any], tg: anyio.abc.TaskGroup) -> None:
        raise NotImplementedError


class PrefillWorker(Worker):
    def __init__(self, args: argparse.Namespace, comm: sc.Communicator) -> None:
        super().__init__(args, comm)
        self.handed_over: set[str] = set()  # requests whose first token went to the decode worker

    def on_control(self, msg: dict[str, Any], tg: anyio.abc.TaskGroup) -> None:
        rid = msg["id"]
        if msg["op"] == "prefill":
            self.counters["requests"] += 1
            scope = self.scopes[rid] = anyio.CancelScope()
            tg.start_soon(self.handle, msg, scope)
        elif msg["op"] == "cancel":
            scope = self.scopes.get(rid)
            if scope is not None:
                scope.cancel()  # handle() passes it on if the decode worker already has the request
            else:  # done here: the decode worker has it; pass the cancel on, after the handoff on the same tag
                tg.start_soon(post, self.comm, DECODE, TAG_HANDOFF, {"id": rid, "op": "cancel"})

    async def handle(self, req: dict[str, Any], scope: anyio.CancelScope) -> None:
        rid = req["id"]
        prompt: list[int] = req["prompt"]
        arrived = time.perf_counter()
        stage = self.stages[rid] = "queue"
        ids: list[int] = []
        try:
            with scope:
                try:
                    ids = await self.pool.allocate(blocks_needed(self.model.config, len(prompt)))
                    async with self.compute:  # waiting here is queueing too
                        stage = self.stages[rid] = "prefill"
                        started = time.perf_counter()
                        logits = await anyio.to_thread.run_sync(self.model.prefill, prompt, self.cache, ids)
                    prefilled = time.perf_counter()
                    # a cancel that came during the compute ends it here; one that comes from now on is passed on
                    # to the decode worker (after this message, on the same tag), which will be waiting for the KV
                    await anyio.lowlevel.checkpoint_if_cancelled()
                    self.handed_over.add(rid)
                    await post(self.comm, DECODE, TAG_HANDOFF, {
                        "id": rid, "op": "decode", "prompt_len": len(prompt), "max_tokens": req["max_tokens"],
                        "first_token": int(logits.argmax()), "queue": started - arrived,
                        "prefill": prefilled - started, "layer_delay": req["layer_delay"]})
                    stage = self.stages[rid] = "transfer"
                    await self.chan.send(rid, DECODE, ids, timeout=self.args.transfer_timeout)
                    self.counters["transfers"] += 1
                    stage = self.stages[rid] = "sent"
                except sc.TransferCancelled as e:  # the decode worker ended the transfer
                    self.counters["transfers_cancelled"] += 1
                    self.counters["cancelled"] += 1
                    self.log(f"request {rid}: transfer cancelled by the receiver: {e}")
                    return
                except Exception as e:
                    self.counters["failed"] += 1
                    self.log(f"request {rid} failed in {stage}: {type(e).__name__}: {e}")
                    if rid in self.handed_over:  # the decode worker may be waiting for an offer: end it there
                        await post(self.comm, DECODE, TAG_HANDOFF, {"id": rid, "op": "cancel", "stage": stage,
                                                                    "error": f"{type(e).__name__}: {e}"})
                    else:
                        await post(self.comm, FRONT, TAG_UP, {"id": rid, "event": "error", "stage": stage,
                                                              "error": f"{type(e).__name__}: {e}"})
                    return
            if scope.cancelled_caught:
                self.counters["cancelled"] += 1
                if stage == "transfer":
                    self.counters["transfers_cancelled"] += 1
                self.log(f"request {rid}: cancelled in {stage}")
                if rid in self.handed_over:
                    # the cancelled send has told the receiver (TransferCancelled there) if its offer went out;
                    # if not, the decode worker waits for an offer that will not come: this ends it
                    await post(self.comm, DECODE, TAG_HANDOFF, {"id": rid, "op": "cancel"})
                else:  # the decode worker never heard of it: answer here
                    await post(self.comm, FRONT, TAG_UP, {"id": rid, "event": "cancelled", "stage": stage,
                                                          "transfer_cancelled": False})
            else:
                self.counters["completed"] += 1
        finally:
            self.pool.free(ids)
            del self.scopes[rid], self.stages[rid]
            self.handed_over.discard(rid)


class DecodeWorker(Worker):
    def __init__(self, args: argparse.Namespace, comm: sc.Communicator) -> None:
        super().__init__(args, comm)
        self.errors: dict[str, str] = {}

    def on_control(self, msg: dict[str, Any], tg: anyio.abc.TaskGroup) -> None:
        pass  # only stats and stop come from the front end

    async def handoffs(self, tg: anyio.abc.TaskGroup) -> None:
        """First tokens and cancels from the prefill worker, in order."""
        await self.listen(PREFILL, TAG_HANDOFF, lambda msg: self.on_handoff(msg, tg))

    def on_handoff(self, msg: dict[str, Any], tg: anyio.abc.TaskGroup) -> None:
        rid = msg["id"]
        if msg["op"] == "decode":
            self.counters["requests"] += 1
            scope = self.scopes[rid] = anyio.CancelScope()
            tg.start_soon(self.handle, msg, scope)
        elif msg["op"] == "cancel" and rid in self.scopes:  # else it has ended (finished, or its transfer failed)
            self.scopes[rid].cancel()
            if "error" in msg:  # not a client's cancel: the prefill worker failed after the handoff
                self.errors[rid] = f"prefill worker, in {msg['stage']}: {msg['error']}"

    async def handle(self, req: dict[str, Any], scope: anyio.CancelScope) -> None:
        rid = req["id"]
        n_prompt, max_tokens = int(req["prompt_len"]), int(req["max_tokens"])
        model, cache, cfg = self.model, self.cache, self.model.config
        arrived = time.perf_counter()
        stage = self.stages[rid] = "queue"
        ids: list[int] = []
        tokens = [int(req["first_token"])]
        timings = {"queue": req["queue"], "prefill": req["prefill"]}
        try:
            with scope:
                try:
                    ids = await self.pool.allocate(blocks_needed(cfg, n_prompt + max_tokens))
                    timings["decode_queue"] = time.perf_counter() - arrived
                    stage = self.stages[rid] = "transfer"
                    async with self.chan.receive(rid, PREFILL, ids[:blocks_needed(cfg, n_prompt)],
                                                 timeout=self.args.transfer_timeout) as layers:
                        x = model.decode_embed(tokens[0])
                        async for li in layers:  # layer li of the first decode step, as soon as its KV landed
                            x = await self.run_sync(model.decode_layer, li, x, n_prompt, cache, ids)
                            if req["layer_delay"]:  # a slower model: the rest of the KV stays on the wire meanwhile
                                await anyio.sleep(req["layer_delay"])
                        logits = model.decode_logits(x)
                    assert layers.stats is not None
                    self.counters["transfers"] += 1
                    timings["transfer"] = layers.stats.seconds
                    stage = self.stages[rid] = "decode"
                    t = time.perf_counter()
                    tokens.append(int(logits.argmax()))
                    while len(tokens) < max_tokens:
                        logits = await self.run_sync(model.decode_step, tokens[-1], n_prompt + len(tokens) - 1,
                                                     cache, ids)
                        tokens.append(int(logits.argmax()))
                    timings["decode"] = time.perf_counter() - t
                    answer = {"id": rid, "event": "done", "tokens": tokens[:max_tokens], "timings": timings}
                except sc.TransferCancelled as e:  # the prefill worker ended the transfer
                    self.counters["transfers_cancelled"] += 1
                    self.counters["cancelled"] += 1
                    self.log(f"request {rid}: transfer cancelled by the sender: {e}")
                    answer = {"id": rid, "event": "cancelled", "stage": stage, "transfer_cancelled": True,
                              "error": str(e)}
                except Exception as e:
                    self.counters["failed"] += 1
                    self.log(f"request {rid} failed in {stage}: {type(e).__name__}: {e}")
                    answer = {"id": rid, "event": "error", "stage": stage, "error": f"{type(e).__name__}: {e}"}
            if scope.cancelled_caught:
                self.counters["cancelled"] += 1
                if stage == "transfer":
                    self.counters["transfers_cancelled"] += 1
                self.log(f"request {rid}: cancelled in {stage}")
                answer = {"id": rid, "event": "cancelled", "stage": stage, "transfer_cancelled": stage == "transfer"}
                if rid in self.errors:
                    answer.update(event="error", error=self.errors[rid])
            elif answer["event"] == "done":
                self.counters["completed"] += 1
        finally:
            self.pool.free(ids)
            del self.scopes[rid], self.stages[rid]
            self.errors.pop(rid, None)
        await post(self.comm, FRONT, TAG_UP, answer)


async def parent_watch(parent: int) -> None:
    """A worker outlives no front end: exit when the process that started it is gone."""
    while os.getppid() == parent:
        await anyio.sleep(0.5)
    raise SystemExit(f"front end (pid {parent}) is gone")


async def run_worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    rank = PREFILL if args.role == "prefill" else DECODE
    parent = os.getppid()
    # timeout: for the init (and the default of every op, but each one here names its own)
    async with sc.init_process_group(f"tcp://127.0.0.1:{args.rdzv_port}", rank=rank, world_size=3,
                                     timeout=60) as comm:
        worker: Worker = PrefillWorker(args, comm) if rank == PREFILL else DecodeWorker(args, comm)
        async with anyio.create_task_group() as tg:
            tg.start_soon(parent_watch, parent)
            tg.start_soon(worker.control, tg)
            if isinstance(worker, DecodeWorker):
                tg.start_soon(worker.handoffs, tg)
            await worker.stop.wait()
            tg.cancel_scope.cancel()


# -- front end --------------------------------------------------------------------------------------
class FrontEnd:
    """The ASGI app and rank 0: parses requests, dispatches them, waits for answers or a disconnect."""

    def __init__(self, args: argparse.Namespace, comm: sc.Communicator, shutdown: anyio.Event) -> None:
        self.args = args
        self.comm = comm
        self.shutdown = shutdown
        self.vocab = TinyConfig().vocab_size
        self.ids = itertools.count()
        self.waiters: dict[str, tuple[anyio.Event, list[dict[str, Any]]]] = {}
        self.counters = dict.fromkeys(("requests", "completed", "cancelled", "failed", "rejected"), 0)
        self.fatal: str | None = None

    # dispatch
    def expect(self, rid: str) -> tuple[anyio.Event, list[dict[str, Any]]]:
        w = self.waiters[rid] = (anyio.Event(), [])
        return w

    async def answers(self, src: int) -> None:
        """Route everything a worker sends up to whoever waits for it."""
        try:
            while True:
                msg = await inbox(self.comm, src, TAG_UP)
                w = self.waiters.pop(msg["id"], None)
                if w is not None:
                    w[1].append(msg)
                    w[0].set()
        except sc.CommError as e:
            if self.shutdown.is_set():
                return  # the workers are stopping
            self.fatal = f"worker rank {src}: {type(e).__name__}: {e}"
            print(f"[front] {self.fatal}; shutting down", file=sys.stderr, flush=True)
            for ev, slot in list(self.waiters.values()):
                slot.append({"event": "error", "error": self.fatal})
                ev.set()
            self.waiters.clear()
            self.shutdown.set()

    async def ask(self, dst: int, tag: int, msg: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        ev, slot = self.expect(msg["id"])
        await post(self.comm, dst, tag, msg)
        with anyio.move_on_after(timeout):
            await ev.wait()
        self.waiters.pop(msg["id"], None)
        return slot[0] if slot else None

    async def stats(self) -> dict[str, Any]:
        n = next(self.ids)
        c = self.counters
        out: dict[str, Any] = {**c, "in_flight": c["requests"] - c["completed"] - c["cancelled"] - c["failed"]
                               - c["rejected"]}
        for name, rank in (("prefill", PREFILL), ("decode", DECODE)):
            got = await self.ask(rank, TAG_CTRL, {"op": "stats", "id": f"stats-{n}-{rank}"}, 10)
            out[name] = got["stats"] if got else None
        if out["prefill"] and out["decode"]:
            # the receiving side sees every cancelled transfer (TransferCancelled, or cancelled itself mid-receive)
            out["transfers_cancelled"] = out["decode"]["transfers_cancelled"]
            out["free_blocks"] = out["prefill"]["free_blocks"] + out["decode"]["free_blocks"]
            out["total_blocks"] = out["prefill"]["total_blocks"] + out["decode"]["total_blocks"]
        return out

    # HTTP
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == "/generate" and method == "POST":
            await self.generate(receive, send)
        elif path == "/stats" and method == "GET":
            await respond(send, 200, await self.stats())
        elif path == "/health" and method == "GET":
            await respond(send, 503 if self.fatal else 200, {"ok": self.fatal is None, "error": self.fatal})
        else:
            await respond(send, 404, {"error": f"no route {method} {path}"})

    def parse(self, body: bytes) -> tuple[list[int], int, float]:
        req = json.loads(body)
        prompt = req.get("prompt")
        if isinstance(prompt, str):
            prompt = list(prompt.encode())  # a byte-level "tokenizer": ids 0..255
        if (not isinstance(prompt, list) or not prompt or len(prompt) > self.args.max_prompt
                or not all(isinstance(t, int) and 0 <= t < self.vocab for t in prompt)):
            raise ValueError(f"prompt: a string or 1..{self.args.max_prompt} token ids in [0, {self.vocab})")
        n = req.get("max_tokens", 16)
        if not isinstance(n, int) or not 1 <= n <= self.args.max_tokens:
            raise ValueError(f"max_tokens: an int in [1, {self.args.max_tokens}]")
        delay = req.get("layer_delay", 0)
        if not isinstance(delay, int | float) or not 0 <= delay <= 5:
            raise ValueError("layer_delay: seconds in [0, 5]")
        return prompt, n, float(delay)

    async def generate(self, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        self.counters["requests"] += 1
        body = b""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                self.counters["cancelled"] += 1
                return
            body += msg.get("body", b"")
            if len(body) > MAX_BODY:
                self.counters["rejected"] += 1
                await respond(send, 413, {"error": "body too large"})
                return
            if not msg.get("more_body"):
                break
        try:
            prompt, max_tokens, layer_delay = self.parse(body)
        except (ValueError, AttributeError) as e:
            self.counters["rejected"] += 1
            await respond(send, 400, {"error": str(e)})
            return
        if self.fatal:
            self.counters["failed"] += 1
            await respond(send, 503, {"error": self.fatal})
            return
        rid = f"r{next(self.ids)}"
        ev, slot = self.expect(rid)
        await post(self.comm, PREFILL, TAG_CTRL, {"op": "prefill", "id": rid, "prompt": prompt,
                                                  "max_tokens": max_tokens, "layer_delay": layer_delay})
        gone = False
        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                nonlocal gone
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone = True
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await ev.wait()
            tg.cancel_scope.cancel()
        if gone:
            # the client left: cancel the request wherever it is, and wait (bounded) for where it ended
            with anyio.CancelScope(shield=True):
                await post(self.comm, PREFILL, TAG_CTRL, {"op": "cancel", "id": rid})
                with anyio.move_on_after(30):  # a cancel passed on to the decode worker reaches it
                    await ev.wait()
            self.waiters.pop(rid, None)
            end = slot[0] if slot else {"event": "no answer within 30 s"}
            self.counters["cancelled"] += 1
            if not self.args.quiet:
                print(f"[front] request {rid}: client disconnected; {end['event']} in {end.get('stage', '?')}"
                      f"{' (transfer cancelled)' if end.get('transfer_cancelled') else ''}",
                      file=sys.stderr, flush=True)
            return
        ans = slot[0]
        if ans["event"] != "done":
            self.counters["failed"] += 1
            await respond(send, 500, {"id": rid, "error": ans.get("error", ans["event"])})
            return
        self.counters["completed"] += 1
        timings = dict(ans["timings"], total=time.perf_counter() - t0)
        await respond(send, 200, {"id": rid, "tokens": ans["tokens"], "timings": timings})


async def respond(send: Send, status: int, obj: Any) -> None:
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def listen_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)  # connections queue from now on, before hypercorn accepts them
    return sock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_command(args: argparse.Namespace, role: str, rdzv_port: int) -> list[str]:
    return [sys.executable, __file__, "--role", role, "--rdzv-port", str(rdzv_port), "--backend", args.backend,
            "--blocks", str(args.blocks), "--seed", str(args.seed), "--threads", str(args.threads),
            "--transfer-timeout", str(args.transfer_timeout), *(["--quiet"] if args.quiet else [])]


async def serve(app: FrontEnd, sock: socket.socket, shutdown: anyio.Event, backend: str) -> None:
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # already bound (so --port 0 works): hypercorn listens on it
    config.accesslog = None
    config.graceful_timeout = 2.0
    if backend == "trio":
        from hypercorn.trio import serve as hyper_serve
    else:
        from hypercorn.asyncio import serve as hyper_serve  # type: ignore[assignment]
    await hyper_serve(app, config, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]


async def run_front(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    sock = listen_socket(args.host, args.port)  # first, so a taken port fails before anything starts
    port = sock.getsockname()[1]
    rdzv = free_port()
    workers = [subprocess.Popen(worker_command(args, role, rdzv), stdin=subprocess.DEVNULL, start_new_session=True)
               for role in ("prefill", "decode")]
    status = 0
    try:
        async with sc.init_process_group(f"tcp://127.0.0.1:{rdzv}", rank=FRONT, world_size=3, timeout=60) as comm:
            shutdown = anyio.Event()
            app = FrontEnd(args, comm, shutdown)
            async with anyio.create_task_group() as tg:
                tg.start_soon(app.answers, PREFILL)
                tg.start_soon(app.answers, DECODE)
                tg.start_soon(signals, shutdown)
                tg.start_soon(serve, app, sock, shutdown, args.backend)
                url = f"http://{args.host}:{port}"
                print(f"serving on {url} (POST /generate, GET /stats) with {args.backend}; workers: pids "
                      f"{workers[0].pid} {workers[1].pid}", flush=True)
                if args.check:
                    status = await check(args, url)
                    shutdown.set()
                await shutdown.wait()
                for rank in (PREFILL, DECODE):
                    with anyio.move_on_after(5):
                        await post(comm, rank, TAG_CTRL, {"op": "stop"})
                tg.cancel_scope.cancel()
            if app.fatal:
                status = status or 1
    finally:
        for p in workers:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return status


async def signals(shutdown: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
        async for _ in sigs:
            shutdown.set()
            return


# -- check: the service against one process ---------------------------------------------------------
def reference(prompt: list[int], max_tokens: int, seed: int = 0) -> list[int]:
    """The same generation in this one process: prefill and decode on one fresh cache."""
    model = TinyLlama(TinyConfig(seed=seed))
    n = blocks_needed(model.config, len(prompt) + max_tokens)
    return greedy(model, prompt, max_tokens - 1, model.allocate_cache(n), list(range(n)))


async def check(args: argparse.Namespace, url: str) -> int:
    from disagg_load import http_json, make_prompt

    jobs = [(make_prompt(i, 8 + (37 * i) % 90), 1 + (5 * i) % 24) for i in range(args.check)]
    results: list[Any] = [None] * len(jobs)

    async def one(i: int) -> None:
        prompt, n = jobs[i]
        results[i] = await http_json(url, "POST", "/generate", {"prompt": prompt, "max_tokens": n}, timeout=120)

    async with anyio.create_task_group() as tg:
        for i in range(len(jobs)):
            tg.start_soon(one, i)
    bad = 0
    for (prompt, n), (status, body) in zip(jobs, results, strict=True):
        want = await anyio.to_thread.run_sync(reference, prompt, n, args.seed)
        ok = status == 200 and body["tokens"] == want
        bad += not ok
        print(f"check: prompt {len(prompt):3d} tokens, {n:2d} new: {'equal' if ok else 'DIFFERENT'}"
              + ("" if ok else f" (got {status} {body}, want {want})"), flush=True)
    print(f"check: {len(jobs) - bad}/{len(jobs)} answers equal the one-process greedy run", flush=True)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free one, printed)")
    ap.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    ap.add_argument("--blocks", type=int, default=512, help="KV cache blocks (16 tokens each) per worker")
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--transfer-timeout", type=float, default=120.0, help="seconds one KV transfer may take")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    ap.add_argument("--seed", type=int, default=0, help="model weights")
    ap.add_argument("--check", type=int, default=0, metavar="N",
                    help="send N concurrent requests, compare with one process, exit (nonzero if any differ)")
    ap.add_argument("--quiet", action="store_true", help="no log line per cancelled request")
    ap.add_argument("--role", choices=["prefill", "decode"], help=argparse.SUPPRESS)
    ap.add_argument("--rdzv-port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role:
        anyio.run(run_worker, args, backend=args.backend)
        return 0
    try:
        import hypercorn  # noqa: F401
    except ImportError:
        ap.error("the front end runs on hypercorn: pip install hypercorn")
    cfg = TinyConfig()
    if blocks_needed(cfg, args.max_prompt + args.max_tokens) > args.blocks:
        ap.error(f"--blocks {args.blocks} cannot hold one request of --max-prompt + --max-tokens tokens")
    if math.isnan(args.transfer_timeout) or args.transfer_timeout <= 0:
        ap.error("--transfer-timeout must be positive")
    return anyio.run(run_front, args, backend=args.backend)


if __name__ == "__main__":
    sys.exit(main())
