"""`sagellm-comm bench soak`: mixed traffic with random cancellations for a bounded time; nothing may grow.

One process per rank joins a world over real sockets or shared memory (with a
token, as a deployment would). Every rank draws the same seeded schedule, round
by round, so collectives match without talking about them:

- collectives (all_reduce, all_gather, reduce_scatter, broadcast, all_to_all,
  barrier) on 1 B to 4 MiB of one of 8 dtypes, every result checked against
  numpy (integer-valued inputs, so sums are exact in every dtype);
- p2p rounds: random pairs exchange 1-3 messages each way, every message checked;
- KV transfers: random pairs move random block ids of a small `KVCache` through
  a `KVChannel`, every layer the receiver is given checked byte for byte.

Cancellations, only where the semantics say what must happen (docs/architecture.md,
docs/kv.md); `--kv-cancel` and `--p2p-cancel` choose which:

- KV transfers, either side, once the transfer is under way (the receiver has
  had layer k): the receiver leaves its `async with` early (recv_break), or a
  deadline cancels it 0-3 ms later (recv_deadline); or the sender's task is
  cancelled while the receiver waits (send_sync) or goes on (send_race). The
  other side must raise `TransferCancelled`, unless the cancel came too late to
  matter (the receiver already had every layer, or the sender had sent every
  chunk): then that side succeeds. Both sides swap what they saw; any other
  combination is a wrong result. A receiver whose transfer ended fills its
  blocks with a sentinel, which must still be there once the sender's last
  frame has been read (nothing of an ended transfer may land in the cache).
  The same request id is then sent again and must arrive intact.
- p2p receives: cancelled after a random 0-3 ms. Cancelling a receive ends that
  receive only; the message must arrive whole in the next receive with that tag,
  and the withdrawn buffer must not be written again (it is filled with a
  sentinel that is checked afterwards). A receive that finished before its
  deadline counts as "late". A re-posted receive that waits `REPOST_TIMEOUT`
  means the message was lost; that rank cancels no more receives (each loss
  would cost the timeout again).
- Not cancelled: p2p sends (cancelled before the first frame, nothing reaches the
  receiver, after it the receiver gets `TransferCancelled`; the receiver cannot
  tell which, so no outcome is defined for it to check), KV transfers before
  their offer has been accepted (the side that was never told would wait for its
  timeout), and collectives (a cancelled collective breaks the group by design).

When this was written the engine broke two of these promises (tests/test_soak.py,
`test_receiver_side_cancels_keep_every_message`, says how): a receive cancelled
as its message completes loses the message, and a cancel while the reader waits
for the rest of a frame lets those bytes land in the withdrawn buffer (p2p) or
in the cache blocks of a KV receive that was cancelled or left early. The first
shows within seconds on tcp and shm, asyncio and trio; the second over shm, in
most p2p receives cancelled while their message streams and in a few KV
receiver-side cancels per thousand. `--p2p-cancel 0 --kv-cancel
send_sync,send_race` soaks what holds.

Every rank measures itself at fixed points, between two barriers so nothing is
in flight, after a `gc.collect()`: RSS (VmRSS, and again after glibc's
`malloc_trim` returned its cached free pages), open fds (/proc/self/fd),
shared-memory segments (distinct memfd and /dev/shm mappings in /proc/self/maps;
the entries of /dev/shm are reported too, but other processes share that
directory) and, to say where growth would come from, threads, Python objects,
the engine's scratch pool and unexpected-message queues. Samples: before init,
after init, after the warm-up ("warm": the largest size of every kind has run,
so the scratch pool and the buffers have their working set), at 25/50/75 % of
the measured time, at the end, and after the communicator was closed and dropped.

Verdict (exit status 1 otherwise): no unexpected error, no wrong result; from
"warm" to "end" not one open fd or segment more or less on any rank; RSS after
trimming grown by at most `Settings.rss_limit_mib` (32 MiB, see there why); after
close no more fds or segments than before init.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import random
import secrets
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from . import bench_allreduce
from .demo import free_port, launch
from .errors import TransferCancelled

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "barrier")
KINDS = (*COLLECTIVES, "p2p", "kv")
WEIGHTS = (1, 1, 1, 1, 1, 1, 3, 4)  # p2p and KV rounds are where the cancellations are
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int8": 1, "int16": 2, "int32": 4, "int64": 8}
REDUCE_OPS = ("sum", "max", "min")
MAX_BYTES = 4 << 20  # the largest message; all_gather's output is world_size times that
PRIME = tuple(k for k in KINDS for _ in range(2))  # the first rounds: every kind twice at the largest size

P2P_CANCEL = 0.3  # share of p2p receives cancelled after a random delay
P2P_CANCEL_S = 0.003
REPOST_TIMEOUT = 5.0  # a re-posted receive that waits longer: the cancelled receive lost the message

KV_MODES = ("none", "recv_break", "recv_deadline", "send_sync", "send_race")
KV_MODE_WEIGHTS = (4, 1, 1, 1, 1)  # half the transfers are cancelled
SENDER_MODES = ("send_sync", "send_race")
KV_LAYERS, KV_HEADS, KV_HEAD_DIM, KV_BLOCK = 6, 2, 64, 16  # float16: 4 KiB per block of K or V
KV_BLOCKS = 64  # per cache
KV_MAX_BLOCKS = 24  # per transfer
KV_CHUNK_BYTES = 16 << 10  # 4 blocks per chunk: several chunks per layer, so cancels land between them
KV_WINDOW = 2
KV_CANCEL_S = 0.003
SCRIBBLE = 0x7E7E  # written into a cancelled receive's blocks; a late chunk would overwrite it

OK, CANCELLED, PEER_CANCELLED, FAILED = 0, 1, 2, 3  # a KV side's outcome (CANCELLED: by its own caller)
RUN, SAMPLE, STOP = 0, 1, 2  # rank 0's word at the start of every round
LABELS = ("warm", "25%", "50%", "75%", "end")
P2P_TAG, KV_TAG, TAG_ROUNDS = 100_000_000, 200_000_000, 1_000_000  # tags per round: never reused in a run
CANCEL_NOW, ACK, OUTCOME = 0, 1, 2
MAX_NOTES = 20
RSS_LIMIT_MIB = 32.0  # why: see Settings.rss_limit_mib
TOKEN_ENV = "SAGELLM_COMM_TOKEN"


# -- the schedule every rank draws -------------------------------------------------------------
@dataclass
class Message:
    src: int
    dst: int
    tag: int
    dtype: str
    count: int
    cancel: float | None  # the receiver withdraws its receive after this many seconds


@dataclass
class Transfer:
    pair: int
    sender: int
    receiver: int
    request: str
    src_ids: list[int]
    dst_ids: list[int]
    mode: str
    layer: int  # the receiver's layer after which the cancel is set off
    delay: float  # recv_deadline: seconds from that layer to the cancel
    tag_base: int

    def tag(self, attempt: int, what: int) -> int:
        return self.tag_base + attempt * 4 + what


@dataclass
class Round:
    index: int
    kind: str
    dtype: str = "float32"
    count: int = 0
    op: str = "sum"
    root: int = 0
    messages: list[Message] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)

    def describe(self) -> str:
        if self.kind in COLLECTIVES:
            return f"round {self.index} {self.kind}({self.op}, root {self.root}) {self.dtype} x{self.count}"
        return f"round {self.index} {self.kind}"


def _count(rng: random.Random, itemsize: int, multiple: int, largest: bool) -> int:
    """Elements for a message of log-uniform size in [1 B, MAX_BYTES], a multiple of `multiple`."""
    nbytes = MAX_BYTES if largest else int(2 ** rng.uniform(0, MAX_BYTES.bit_length() - 1))
    return max(1, nbytes // itemsize // multiple) * multiple


def _pairs(rng: random.Random, world: int) -> list[tuple[int, int]]:
    ranks = list(range(world))
    rng.shuffle(ranks)
    return [(ranks[i], ranks[i + 1]) for i in range(0, world - 1, 2)]


def plan_round(seed: int, index: int, world: int, p2p_cancel: float = P2P_CANCEL,
               kv_cancel: tuple[str, ...] = KV_MODES[1:]) -> Round:
    """Round `index` of the schedule: the same on every rank (a string seed is hashed the same everywhere).

    Every draw is made whatever `p2p_cancel` and `kv_cancel` say, so runs that leave some
    cancellations out still move the same data in the same rounds.
    """
    rng = random.Random(f"soak/{seed}/{index}")
    prime = index < len(PRIME)
    kind = PRIME[index] if prime else rng.choices(KINDS, WEIGHTS)[0]
    r = Round(index, kind)
    if kind in COLLECTIVES:
        r.dtype, r.op, r.root = rng.choice(list(ITEMSIZE)), rng.choice(REDUCE_OPS), rng.randrange(world)
        split = kind in ("reduce_scatter", "all_to_all")
        r.count = _count(rng, ITEMSIZE[r.dtype], world if split else 1, prime)
    elif kind == "p2p":
        tag = P2P_TAG + (index % TAG_ROUNDS) * 64
        for a, b in _pairs(rng, world):
            for src, dst in ((a, b), (b, a)):
                for _ in range(rng.randint(1, 3)):
                    dtype = rng.choice(list(ITEMSIZE))
                    delay = rng.uniform(0, P2P_CANCEL_S)
                    cancel = delay if rng.random() < p2p_cancel else None
                    r.messages.append(Message(src, dst, tag, dtype, _count(rng, ITEMSIZE[dtype], 1, prime), cancel))
                    tag += 1
    else:
        for pair, (a, b) in enumerate(_pairs(rng, world)):
            sender, receiver = (a, b) if rng.random() < 0.5 else (b, a)
            n = KV_MAX_BLOCKS if prime else rng.randint(1, KV_MAX_BLOCKS)
            r.transfers.append(Transfer(
                pair, sender, receiver, f"soak-{index % 16}-{pair}", rng.sample(range(KV_BLOCKS), n),
                rng.sample(range(KV_BLOCKS), n), _allowed(rng.choices(KV_MODES, KV_MODE_WEIGHTS)[0], kv_cancel),
                rng.randrange(KV_LAYERS - 1), rng.uniform(0, KV_CANCEL_S),
                KV_TAG + (index % TAG_ROUNDS) * 64 + pair * 8))
    return r


def _allowed(mode: str, kv_cancel: tuple[str, ...]) -> str:
    return mode if mode in kv_cancel else "none"


# -- data and checks ---------------------------------------------------------------------------------
def _values(seed: int, index: int, who: int, count: int) -> np.ndarray[Any, Any]:
    """Integers in [-8, 8): exact in every dtype, and sums of up to 15 ranks still fit int8."""
    return np.random.default_rng([seed, index, who]).integers(-8, 8, count, dtype=np.int8)


def _as(values: np.ndarray[Any, Any], dtype: str) -> Any:
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16)
    return values.astype(dtype)


def _empty(dtype: str, count: int, fill: int = 0) -> Any:
    if dtype == "bfloat16":
        import torch

        return torch.full((count,), fill, dtype=torch.bfloat16)
    return np.full(count, fill, dtype=dtype)


def _floats(x: Any) -> np.ndarray[Any, Any]:
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    return np.asarray(x.float().numpy(), dtype=np.float64)


def _same(got: Any, want: np.ndarray[Any, Any]) -> bool:
    g = _floats(got)
    return g.shape == want.shape and bool(np.array_equal(g, want.astype(np.float64)))


def _reduce(xs: list[np.ndarray[Any, Any]], op: str) -> np.ndarray[Any, Any]:
    stacked = np.stack(xs).astype(np.int64)
    out: np.ndarray[Any, Any] = {"sum": stacked.sum(0), "max": stacked.max(0), "min": stacked.min(0)}[op]
    return out


def judge(mode: str, sender: tuple[int, int, int], receiver: tuple[int, int, int], layers: int) -> str:
    """What one KV transfer's pair of outcomes means: ok, effective, late, error or inconsistent.

    sender: (status, chunks sent, -); receiver: (status, layers it was given, chunks of the transfer
    or -1). A cancel "took effect" when the other side raised TransferCancelled; it was "late" when
    the transfer could finish anyway: every layer had reached the receiver, or every chunk had left
    the sender (it waited only for "done"), or the cancel never fired before the end.
    """
    s, sent, _ = sender
    r, got, chunks = receiver
    if FAILED in (s, r):
        return "error"
    if mode == "none":
        return "ok" if s == r == OK else "inconsistent"
    if mode in SENDER_MODES:
        if s == CANCELLED and r == PEER_CANCELLED:
            return "effective"
        if (s == CANCELLED and r == OK and sent == chunks) or (s == r == OK):
            return "late"
        return "inconsistent"
    if r == CANCELLED and s == PEER_CANCELLED:
        return "effective"
    if (r == CANCELLED and s == OK and got == layers) or (mode == "recv_deadline" and s == r == OK):
        return "late"
    return "inconsistent"


# -- measuring a process -------------------------------------------------------------------------------
def _status_field(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return -1


def _fd_kinds() -> dict[str, int]:
    """Open fds by what they point at (socket, pipe, memfd, anon_inode:[eventpoll], a file, ...)."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the directory listing's own fd, closed by now
        if target.startswith(("socket:", "pipe:")):
            target = target.split(":")[0]
        elif target.startswith("/memfd:"):
            target = "memfd"
        elif target.startswith("/dev/shm/"):
            target = "/dev/shm"
        elif target.startswith("/"):
            target = "file"
        kinds[target] += 1
    return dict(kinds)


def _shm_mapped() -> int:
    """Distinct shared-memory segments this process maps: memfds and /dev/shm files (by inode)."""
    seen = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(("/memfd:", "/dev/shm/")):
            seen.add((parts[3], parts[4]))
    return len(seen)


def _trim() -> None:
    """Hand glibc's cached free pages back, so RSS shows what is live rather than the allocator's high water."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(engine: Any = None) -> dict[str, int]:
    """This process, now: memory, fds, segments, and where growth would come from."""
    gc.collect()
    rss = _status_field("VmRSS") * 1024
    _trim()
    kinds = _fd_kinds()
    out = {"rss": rss, "rss_trimmed": _status_field("VmRSS") * 1024, "fds": sum(kinds.values()),
           "shm_segments": _shm_mapped(), "dev_shm_entries": len(os.listdir("/dev/shm")),
           "threads": _status_field("Threads"), "py_objects": len(gc.get_objects()),
           "py_blocks": sys.getallocatedblocks()}
    out.update({f"fd_{k}": v for k, v in sorted(kinds.items())})
    if engine is not None:  # private state, read for diagnosis only
        out["pool_bytes"] = int(getattr(engine.pool, "_cached", -1))
        out["unexpected_msgs"] = sum(len(q) for q in engine.matcher.unexpected.values())
        out["posted_recvs"] = sum(len(q) for q in engine.matcher.posted.values())
        out["discarded_channels"] = len(getattr(engine, "_discarded", ()))
    return out


# -- one rank ------------------------------------------------------------------------------------------
@dataclass
class Tally:
    """What one rank saw: ops done, errors by type (asked for or not), wrong results, cancellations."""

    ops: Counter[str] = field(default_factory=Counter)
    expected: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    wrong: int = 0
    notes: list[str] = field(default_factory=list)
    cancels: Counter[str] = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))  # per kind of round

    def error(self, where: str, e: BaseException) -> None:
        self.unexpected[type(e).__name__] += 1
        self._note(f"{where}: {type(e).__name__}: {e}")

    def bad(self, where: str, what: str) -> None:
        self.wrong += 1
        self._note(f"{where}: WRONG: {what}")

    def _note(self, text: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text[:500])


@dataclass
class Outcome:
    """One side of one KV transfer: what its call did, how far it got, and the error it raised."""

    status: int = FAILED
    progress: int = 0  # sender: chunks sent; receiver: layers it was given
    chunks: int = -1  # receiver: chunks of the whole transfer, once it succeeded
    error: BaseException | None = None

    def wire(self) -> np.ndarray[Any, Any]:
        return np.array([self.status, self.progress, self.chunks], dtype=np.int64)


class _Stop(Exception):
    """The schedule cannot go on on this rank (a collective failed: the group is broken by design)."""


class _Clock:
    """Rank 0's: when to sample and when to stop; the others hear it in each round's first broadcast."""

    def __init__(self, seconds: float, warmup: float) -> None:
        t0 = time.monotonic()
        self.marks = [t0 + warmup + f * (seconds - warmup) for f in (0.0, 0.25, 0.5, 0.75)]
        self.stop = t0 + seconds
        self.taken = 0

    def word(self, index: int) -> tuple[int, int]:
        now = time.monotonic()
        if now >= self.stop and index >= len(PRIME):
            return STOP, len(LABELS) - 1
        if self.taken < len(self.marks) and index >= len(PRIME) and now >= self.marks[self.taken]:
            self.taken += 1
            return SAMPLE, self.taken - 1
        return RUN, 0


class _Soak:
    """One rank: its communicator, its KV cache and channel, and the tally and samples it reports."""

    def __init__(self, comm: Any, spec: dict[str, Any]) -> None:
        import torch

        from . import kv

        self.torch = torch
        self.comm = comm
        self.rank = int(comm.rank)
        self.world = int(comm.world_size)
        self.seed = int(spec["seed"])
        self.spec = spec
        self.tally = Tally()
        self.samples: dict[str, dict[str, Any]] = {}
        self.rounds = 0
        self.aborted = ""
        self.p2p_cancels = True  # off after a lost message: each further loss would cost REPOST_TIMEOUT
        self.t0 = time.monotonic()
        layout = kv.KVLayout(num_layers=KV_LAYERS, num_kv_heads=KV_HEADS, head_dim=KV_HEAD_DIM,
                             block_size=KV_BLOCK, dtype="float16")
        self.block_shape = tuple(layout.block_shape)
        self.cache = kv.KVCache.allocate(layout, KV_BLOCKS)
        self.chan = kv.KVChannel(comm, self.cache, name="soak", window=KV_WINDOW, chunk_bytes=KV_CHUNK_BYTES)

    # -- the loop ------------------------------------------------------------------------------------
    async def run(self) -> None:
        clock = _Clock(float(self.spec["seconds"]), float(self.spec["warmup"])) if self.rank == 0 else None
        index = 0
        try:
            while True:
                action, label = await self._word(clock, index)
                if action in (SAMPLE, STOP):
                    await self._sample(LABELS[label])
                if action == STOP:
                    return
                t = time.perf_counter()
                r = plan_round(self.seed, index, self.world, float(self.spec["p2p_cancel"]),
                               tuple(self.spec["kv_cancel"]))
                await self._round(r)
                self.tally.seconds[r.kind] += time.perf_counter() - t
                index += 1
                self.rounds = index
        except _Stop as e:
            self.aborted = str(e)
        except Exception as e:  # a lost peer, a broken control broadcast: reported, not a crash
            self.tally.error(f"round {index}", e)
            self.aborted = f"{type(e).__name__}: {e}"
        if "end" not in self.samples:
            self.samples["end"] = self._now("end")

    async def _word(self, clock: _Clock | None, index: int) -> tuple[int, int]:
        """Rank 0's decision for this round, broadcast: every rank samples and stops at the same round."""
        word = np.zeros(2, dtype=np.int64)
        if clock is not None:
            word[:] = clock.word(index)
        await self.comm.broadcast(word, 0)
        return int(word[0]), int(word[1])

    async def _sample(self, label: str) -> None:
        await self.comm.barrier()
        self.samples[label] = self._now(label)
        await self.comm.barrier()

    def _now(self, label: str) -> dict[str, Any]:
        return {**measure(self.comm._engine), "label": label, "seconds": time.monotonic() - self.t0,
                "round": self.rounds, "ops": dict(self.tally.ops)}

    async def _round(self, r: Round) -> None:
        if r.kind in COLLECTIVES:
            await self._collective(r)
        elif r.kind == "p2p":
            await self._p2p(r)
        else:
            for t in r.transfers:
                if self.rank in (t.sender, t.receiver):
                    await self._kv(t)

    # -- collectives --------------------------------------------------------------------------------
    async def _collective(self, r: Round) -> None:
        try:
            ok = await self._run_collective(r)
        except Exception as e:
            self.tally.error(r.describe(), e)
            raise _Stop(f"{r.describe()} failed ({type(e).__name__}: {e}); the group is broken") from e
        self.tally.ops[r.kind] += 1
        if not ok:
            self.tally.bad(r.describe(), "result differs from numpy")

    async def _run_collective(self, r: Round) -> bool:
        c, me, n = self.comm, self.rank, self.world
        if r.kind == "barrier":
            await c.barrier()
            return True
        if r.kind == "broadcast":
            want = _values(self.seed, r.index, r.root, r.count)
            x = _as(want if me == r.root else np.zeros_like(want), r.dtype)
            await c.broadcast(x, r.root)
            return _same(x, want)
        xs = [_values(self.seed, r.index, i, r.count) for i in range(n)]
        mine = _as(xs[me], r.dtype)
        k = r.count // n
        if r.kind == "all_reduce":
            await c.all_reduce(mine, op=r.op)
            return _same(mine, _reduce(xs, r.op))
        if r.kind == "all_gather":
            return _same(await c.all_gather(mine), np.stack(xs))
        if r.kind == "reduce_scatter":
            return _same(await c.reduce_scatter(mine, op=r.op), _reduce(xs, r.op)[me * k : (me + 1) * k])
        return _same(await c.all_to_all(mine), np.concatenate([x[me * k : (me + 1) * k] for x in xs]))

    # -- p2p ----------------------------------------------------------------------------------------------
    async def _p2p(self, r: Round) -> None:
        async with anyio.create_task_group() as tg:
            for m in r.messages:
                if m.src == self.rank:
                    tg.start_soon(self._p2p_send, r, m)
                elif m.dst == self.rank:
                    tg.start_soon(self._p2p_recv, r, m)

    async def _p2p_send(self, r: Round, m: Message) -> None:
        try:
            await self.comm.send(_as(_values(self.seed, r.index, m.tag, m.count), m.dtype), m.dst, tag=m.tag)
        except Exception as e:
            self.tally.error(f"{r.describe()} send tag {m.tag}", e)
        self.tally.ops["p2p_send"] += 1

    async def _p2p_recv(self, r: Round, m: Message) -> None:
        where = f"{r.describe()} recv tag {m.tag} ({m.dtype} x{m.count})"
        want = _values(self.seed, r.index, m.tag, m.count)
        self.tally.ops["p2p_recv"] += 1
        buf = _empty(m.dtype, m.count)
        try:
            if m.cancel is None or not self.p2p_cancels:
                await self.comm.recv(buf, m.src, tag=m.tag)
            else:
                with anyio.move_on_after(m.cancel) as scope:
                    await self.comm.recv(buf, m.src, tag=m.tag)
                if scope.cancelled_caught:
                    await self._p2p_again(where, buf, want, m)
                    return
                self.tally.cancels["p2p_late"] += 1
        except Exception as e:
            self.tally.error(where, e)
            return
        if not _same(buf, want):
            self.tally.bad(where, "message differs from what was sent")

    async def _p2p_again(self, where: str, withdrawn: Any, want: np.ndarray[Any, Any], m: Message) -> None:
        """After a cancelled receive: the message must come whole to the next one, and the old buffer stay as is."""
        self.tally.cancels["p2p_cancelled"] += 1
        had_it = _same(withdrawn, want)
        withdrawn[:] = 100  # out of the data's range: any later write shows
        again = _empty(m.dtype, m.count)
        try:
            await self.comm.recv(again, m.src, tag=m.tag, timeout=REPOST_TIMEOUT)
        except Exception as e:
            self.tally.error(where, e)
            if had_it:
                self.tally.bad(where, "the cancelled receive had the whole message: it was lost to the next receive")
            self.p2p_cancels = False
            self.tally.cancels["p2p_stopped_after_a_loss"] = 1
            return
        if not _same(again, want):
            self.tally.bad(where, "the message re-received after a cancelled receive differs")
        if not bool((_floats(withdrawn) == 100).all()):
            self.tally.bad(where, "the withdrawn buffer was written after its receive was cancelled")

    # -- KV --------------------------------------------------------------------------------------------------
    async def _kv(self, t: Transfer) -> None:
        """One transfer, cancelled as the schedule says; after a cancel, the same request once more, whole."""
        for attempt in range(1 if t.mode == "none" else 2):
            mode = t.mode if attempt == 0 else "none"
            sending = self.rank == t.sender
            mine = await (self._kv_send(t, attempt, mode) if sending else self._kv_recv(t, attempt, mode))
            ended = not sending and mine.status != OK
            if ended:  # from now on the blocks are the caller's again: nothing of this transfer may land
                self._scribble(t)
            theirs = await self._swap(t, attempt, mine)  # after the sender's last chunk, on the same link
            if ended and not self._untouched(t):
                self.tally.bad(f"kv {t.request} attempt {attempt} ({mode})",
                               "the cache blocks were written after the receive had ended")
            s, r = (mine.wire(), theirs) if sending else (theirs, mine.wire())
            verdict = judge(mode, (int(s[0]), int(s[1]), int(s[2])), (int(r[0]), int(r[1]), int(r[2])), KV_LAYERS)
            self._account(t, attempt, mode, mine, verdict, sending)

    def _account(self, t: Transfer, attempt: int, mode: str, mine: Outcome, verdict: str, sending: bool) -> None:
        where = f"kv {t.request} attempt {attempt} ({mode}) {'to' if sending else 'from'} rank " \
                f"{t.receiver if sending else t.sender}"
        self.tally.ops["kv_send" if sending else "kv_recv"] += 1
        if mine.error is not None:
            if verdict == "effective" and isinstance(mine.error, TransferCancelled):
                self.tally.expected["TransferCancelled"] += 1
            else:
                self.tally.error(where, mine.error)
        if sending:
            return
        if mode != "none":
            self.tally.cancels[f"kv_{mode}"] += 1
            self.tally.cancels[f"kv_{verdict}"] += 1
        elif attempt:
            self.tally.cancels["kv_resent_ok" if verdict == "ok" else "kv_resent_failed"] += 1
        if verdict == "inconsistent":
            self.tally.bad(where, f"the two sides' outcomes do not fit a {mode} cancel")

    async def _swap(self, t: Transfer, attempt: int, mine: Outcome) -> np.ndarray[Any, Any]:
        peer = t.receiver if self.rank == t.sender else t.sender
        theirs = np.empty(3, dtype=np.int64)
        ours = mine.wire()

        async def tell() -> None:
            await self.comm.send(ours, peer, tag=t.tag(attempt, OUTCOME))

        async with anyio.create_task_group() as tg:
            tg.start_soon(tell)
            await self.comm.recv(theirs, peer, tag=t.tag(attempt, OUTCOME))
        return theirs

    def _pattern(self, t: Transfer, attempt: int) -> Any:
        """The bytes of this attempt, [layer, K/V, block, ...] as int16: random, known to both sides."""
        torch = self.torch
        g = torch.Generator().manual_seed(random.Random(f"kv/{self.seed}/{t.tag_base}/{attempt}").getrandbits(62))
        return torch.randint(-32768, 32768, (KV_LAYERS, 2, len(t.src_ids), *self.block_shape), dtype=torch.int16,
                             generator=g)

    async def _kv_send(self, t: Transfer, attempt: int, mode: str) -> Outcome:
        torch = self.torch
        pattern = self._pattern(t, attempt)
        idx = torch.tensor(t.src_ids)
        for layer in range(KV_LAYERS):
            self.cache.key(layer).view(torch.int16)[idx] = pattern[layer, 0]
            self.cache.value(layer).view(torch.int16)[idx] = pattern[layer, 1]
        out = Outcome()
        before = self.chan.counters["chunks_sent"]
        scope = anyio.CancelScope()

        async def send() -> None:
            with scope:
                try:
                    await self.chan.send(t.request, t.receiver, t.src_ids)
                    out.status = OK
                except TransferCancelled as e:
                    out.status, out.error = PEER_CANCELLED, e
                except Exception as e:
                    out.status, out.error = FAILED, e
            if scope.cancelled_caught:
                out.status = CANCELLED

        if mode in SENDER_MODES:  # the receiver says when (it has had layer k); we cancel, then say so
            word = np.zeros(1, dtype=np.int64)
            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                await self.comm.recv(word, t.receiver, tag=t.tag(attempt, CANCEL_NOW))
                scope.cancel()
            await self.comm.send(word, t.receiver, tag=t.tag(attempt, ACK))
        else:
            await send()
        out.progress = self.chan.counters["chunks_sent"] - before
        return out

    async def _kv_recv(self, t: Transfer, attempt: int, mode: str) -> Outcome:
        out = Outcome()
        want = self._pattern(t, attempt)
        scope = anyio.CancelScope()
        word = np.ones(1, dtype=np.int64)
        told = acked = broke = False
        with scope:
            try:
                async with self.chan.receive(t.request, t.sender, t.dst_ids) as layers:
                    async for layer in layers:
                        out.progress = layer + 1
                        self._check_layer(t, attempt, want, layer)
                        if mode == "none" or layer != t.layer:
                            continue
                        if mode == "recv_break":
                            broke = True
                            break
                        if mode == "recv_deadline":
                            scope.deadline = anyio.current_time() + t.delay
                            continue
                        await self.comm.send(word, t.sender, tag=t.tag(attempt, CANCEL_NOW))
                        told = True
                        if mode == "send_sync":  # wait until the sender has cancelled: it stops mid-way
                            await self.comm.recv(word, t.sender, tag=t.tag(attempt, ACK))
                            acked = True
                if broke:
                    out.status = CANCELLED
                else:
                    out.status, out.chunks = OK, int(layers.stats.chunks) if layers.stats else -1
            except TransferCancelled as e:
                out.status, out.error = PEER_CANCELLED, e
            except Exception as e:
                out.status, out.error = FAILED, e
        if scope.cancelled_caught:
            out.status = CANCELLED
        if mode in SENDER_MODES:  # the sender waits for both words whatever happened here
            if not told:
                await self.comm.send(word, t.sender, tag=t.tag(attempt, CANCEL_NOW))
            if not acked:
                await self.comm.recv(word, t.sender, tag=t.tag(attempt, ACK))
        return out

    def _scribble(self, t: Transfer) -> None:
        torch = self.torch
        idx = torch.tensor(t.dst_ids)
        for layer in range(KV_LAYERS):
            self.cache.key(layer).view(torch.int16)[idx] = SCRIBBLE
            self.cache.value(layer).view(torch.int16)[idx] = SCRIBBLE

    def _untouched(self, t: Transfer) -> bool:
        torch = self.torch
        idx = torch.tensor(t.dst_ids)
        return all(bool((x.view(torch.int16).index_select(0, idx) == SCRIBBLE).all())
                   for layer in range(KV_LAYERS) for x in (self.cache.key(layer), self.cache.value(layer)))

    def _check_layer(self, t: Transfer, attempt: int, want: Any, layer: int) -> None:
        """A layer the channel reported is written and verified: its bytes must be the sender's."""
        torch = self.torch
        idx = torch.tensor(t.dst_ids)
        k = self.cache.key(layer).view(torch.int16).index_select(0, idx)
        v = self.cache.value(layer).view(torch.int16).index_select(0, idx)
        if not (torch.equal(k, want[layer, 0]) and torch.equal(v, want[layer, 1])):
            self.tally.bad(f"kv {t.request} attempt {attempt} layer {layer}", "blocks differ from the sender's")

    def report(self) -> dict[str, Any]:
        t = self.tally
        return {"rank": self.rank, "rounds": self.rounds, "seconds": time.monotonic() - self.t0,
                "ops": dict(t.ops), "expected_errors": dict(t.expected), "unexpected_errors": dict(t.unexpected),
                "wrong": t.wrong, "notes": t.notes, "cancels": dict(t.cancels), "aborted": self.aborted,
                "seconds_by_kind": {k: round(v, 3) for k, v in t.seconds.items()},
                "samples": self.samples, "channel_counters": dict(self.chan.counters)}


def soak_worker(spec: dict[str, Any]) -> int:
    """One rank of the soak (`sagellm-comm _worker soak SPEC`); the token comes from the environment."""
    import torch

    import sagellm_comm as sc

    torch.set_num_threads(1)  # the ranks share the host's cores; torch only fills a few MiB of blocks

    async def world() -> dict[str, Any]:
        async with sc.init_process_group(f"tcp://127.0.0.1:{spec['port']}", rank=int(spec["rank"]),
                                         world_size=int(spec["world"]), token=os.environ.get(TOKEN_ENV),
                                         timeout=float(spec["op_timeout"]),
                                         transport=spec["transport"]) as comm:
            soak = _Soak(comm, spec)
            soak.samples["start"] = measure(comm._engine)
            await soak.run()
            return soak.report()

    async def main() -> dict[str, Any]:
        before = measure()
        result = await world()  # returned: the communicator, its links and the cache are garbage now
        return {**result, "before_init": before, "after_close": measure()}

    try:
        result = anyio.run(main, backend=spec["backend"])
    except Exception as e:
        traceback.print_exc()
        print(f"rank {spec['rank']} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


# -- the parent: launching, the verdict, the table ---------------------------------------------------------
@dataclass
class Settings:
    """Everything one `bench soak` run was asked for."""

    seconds: float = 60.0
    world: int = 2
    transport: str = "auto"
    backend: str = "asyncio"
    seed: int = 1
    warmup: float = 0.0  # 0: a fifth of `seconds`, at most 10 s
    p2p_cancel: float = P2P_CANCEL  # share of p2p receives cancelled (0: KV cancellations only)
    kv_cancel: tuple[str, ...] = KV_MODES[1:]  # the ways KV transfers are cancelled (empty: none)
    op_timeout: float = 60.0
    # RSS (after malloc_trim) may grow by this much from "warm" to "end". Why 32 MiB: the largest
    # live set one round holds is a few 4 MiB messages (all_gather's output is world x 4 MiB, plus
    # numpy's expected copies), and the scratch pool keeps, by design, a block per size class that
    # was ever in flight at once: a size combination first drawn after warm-up can add a few MiB.
    # A leak of one 64-byte object per op would take half a million ops to show; a leak of the
    # messages themselves (MiB each) shows within seconds.
    rss_limit_mib: float = RSS_LIMIT_MIB

    def warmup_seconds(self) -> float:
        return self.warmup if self.warmup > 0 else min(10.0, self.seconds / 5)

    def budget(self) -> float:
        """Seconds before the workers are killed: the soak, start-up, and an op timeout to spare."""
        return self.seconds + self.op_timeout + 90.0


@contextlib.contextmanager
def _token() -> Iterator[None]:
    """A random shared token for the workers, through the environment (a command line shows in `ps`)."""
    old = os.environ.get(TOKEN_ENV)
    if old is None:
        os.environ[TOKEN_ENV] = secrets.token_hex(16)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(TOKEN_ENV, None)


def soak(s: Settings) -> list[dict[str, Any]]:
    """Run the world; every rank's report, in rank order."""
    base = {**asdict(s), "warmup": s.warmup_seconds(), "port": free_port(),
            "transport": None if s.transport == "auto" else s.transport}
    with _token():
        runs = launch("soak", [{**base, "rank": r} for r in range(s.world)], timeout=s.budget())
    missing = [r.rank for r in runs if not r.result]
    if missing:
        raise bench_allreduce.WorkersFailed(f"soak workers: rank(s) {missing} wrote no result\n"
                                            + "\n".join(r.log for r in runs))
    return [r.result for r in runs if r.result]


def growth(rank: dict[str, Any], key: str, start: str = "warm", end: str = "end") -> int | None:
    a, b = rank["samples"].get(start), rank["samples"].get(end)
    if a is None or b is None or key not in a or key not in b:
        return None
    return int(b[key]) - int(a[key])


def failures(s: Settings, ranks: list[dict[str, Any]]) -> list[str]:
    """Why the run fails, one line per reason; empty: it passed."""
    out = []
    for r in ranks:
        who = f"rank {r['rank']}"
        if r["aborted"]:
            out.append(f"{who}: stopped early: {r['aborted']}")
        if r["unexpected_errors"]:
            out.append(f"{who}: unexpected errors {r['unexpected_errors']}")
        if r["wrong"]:
            out.append(f"{who}: {r['wrong']} wrong results")
        if "warm" not in r["samples"]:
            out.append(f"{who}: no sample after the warm-up (run longer)")
            continue
        fds, shm, rss = growth(r, "fds"), growth(r, "shm_segments"), growth(r, "rss_trimmed")
        if fds:
            out.append(f"{who}: open fds {'grew' if fds > 0 else 'fell'} by {fds} after the warm-up")
        if shm:
            out.append(f"{who}: shared-memory segments changed by {shm} after the warm-up")
        if rss is not None and rss > s.rss_limit_mib * (1 << 20):
            out.append(f"{who}: RSS grew by {rss / (1 << 20):.1f} MiB after the warm-up "
                       f"(limit {s.rss_limit_mib:g} MiB)")
        pre, post = r["before_init"], r["after_close"]
        if post["fds"] > pre["fds"] or post["shm_segments"] > pre["shm_segments"]:
            out.append(f"{who}: after close {post['fds']} fds / {post['shm_segments']} segments, "
                       f"before init {pre['fds']} / {pre['shm_segments']}")
    return out


def totals(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Over all ranks: each collective counted once (every rank ran it), messages and transfers once (receivers)."""
    ops: dict[str, int] = {k: int(ranks[0]["ops"].get(k, 0)) for k in COLLECTIVES}
    ops["p2p_messages"] = sum(int(r["ops"].get("p2p_recv", 0)) for r in ranks)
    ops["kv_transfers"] = sum(int(r["ops"].get("kv_recv", 0)) for r in ranks)

    def add(key: str) -> dict[str, int]:
        c: Counter[str] = Counter()
        for r in ranks:
            c.update(r[key])
        return dict(c)

    return {"ops": ops, "cancels": add("cancels"), "expected_errors": add("expected_errors"),
            "unexpected_errors": add("unexpected_errors"), "wrong": sum(int(r["wrong"]) for r in ranks),
            "rounds": int(ranks[0]["rounds"])}


SHOWN = (("rss", "RSS", True), ("rss_trimmed", "RSS trimmed", True), ("fds", "open fds", False),
         ("shm_segments", "shm segments", False), ("threads", "threads", False), ("py_objects", "py objects", False),
         ("py_blocks", "py blocks", False),
         ("pool_bytes", "scratch pool", True), ("unexpected_msgs", "queued msgs", False))


def format_report(s: Settings, ranks: list[dict[str, Any]], tot: dict[str, Any], why: list[str]) -> str:
    """The readable summary: ops, cancellations, errors, then every rank's samples and growth."""
    ops, c = tot["ops"], tot["cancels"]
    kv_asked = sum(c.get(f"kv_{m}", 0) for m in KV_MODES[1:])
    by_mode = ", ".join(f"{m} {c.get('kv_' + m, 0)}" for m in KV_MODES[1:])
    lines = [
        f"# soak: {s.world} processes over {s.transport}, {s.backend}, {s.seconds:g} s (warm-up "
        f"{s.warmup_seconds():g} s), seed {s.seed}; {tot['rounds']} rounds",
        "# ops: " + "  ".join(f"{k} {v}" for k, v in ops.items()),
        f"# kv cancels: {kv_asked} asked ({by_mode}): "
        f"{c.get('kv_effective', 0)} took effect (TransferCancelled on the other side), {c.get('kv_late', 0)} late "
        f"(the transfer finished first), {c.get('kv_inconsistent', 0)} inconsistent; re-sent after a cancel: "
        f"{c.get('kv_resent_ok', 0)} ok, {c.get('kv_resent_failed', 0)} failed",
        f"# p2p receives cancelled: {c.get('p2p_cancelled', 0)} (the message came whole to the next receive), "
        f"{c.get('p2p_late', 0)} finished before their cancel",
        f"# errors: expected {tot['expected_errors'] or 'none'}; unexpected {tot['unexpected_errors'] or 'none'}; "
        f"wrong results {tot['wrong']}",
        f"{'rank':>4} {'metric':<13}" + "".join(f"{x:>11}" for x in ("init", *LABELS, "growth", "closed")),
    ]
    for r in ranks:
        for key, name, is_bytes in SHOWN:
            row = [r["samples"].get(lab, {}).get(key) for lab in ("start", *LABELS)]
            g = growth(r, key)
            cells = [*row, g, r["after_close"].get(key)]
            lines.append(f"{r['rank']:>4} {name:<13}" + "".join(f"{_cell(v, is_bytes):>11}" for v in cells))
    for r in ranks:
        for note in r["notes"]:
            lines.append(f"# rank {r['rank']}: {note}")
    lines.append("verdict: " + ("PASS: nothing grew, no unexpected error, no wrong result" if not why
                                else "FAIL\n  " + "\n  ".join(why)))
    return "\n".join(lines)


def _cell(v: Any, is_bytes: bool) -> str:
    if v is None:
        return "-"
    return f"{v / (1 << 20):.1f}M" if is_bytes else str(v)


def run(s: Settings, *, json_path: str | None, argv: list[str] | None = None) -> int:
    """The `bench soak` command: exit 0 only if nothing grew and every op did what it must."""
    print(f"# soak: {s.world} ranks over {s.transport}, {s.seconds:g} s ...", file=sys.stderr, flush=True)
    ranks = soak(s)
    tot = totals(ranks)
    why = failures(s, ranks)
    print(format_report(s, ranks, tot, why), flush=True)
    if json_path:
        bench_allreduce.write_report(json_path, {
            "benchmark": "soak", "command": argv, "machine": bench_allreduce.machine_info(),
            "settings": {**asdict(s), "warmup": s.warmup_seconds()},
            "thresholds": {"rss_growth_mib": s.rss_limit_mib, "fd_growth": 0, "shm_segment_growth": 0},
            "totals": tot, "growth": [{k: growth(r, k) for k, _, _ in SHOWN} | {"rank": r["rank"]} for r in ranks],
            "ranks": ranks, "failures": why, "ok": not why})
    return 0 if not why else 1
