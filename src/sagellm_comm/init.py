"""`init_process_group`: from a URL to a connected, running world communicator.

Steps: resolve rank/size/master (URL, arguments, environment), open this rank's
data listener, rendezvous to learn every rank's address, connect the full mesh
(rank i dials every j < i and accepts every j > i, each link authenticated), and
start the progress engine in a task group that lives as long as the `async with`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from urllib.parse import parse_qs, urlparse

import anyio
import anyio.abc

from . import handshake, rendezvous, security, topology, wire
from .errors import AuthError, CommError, CommTimeout, InvalidArgument, unwrap_group_errors
from .group import DEFAULT_CHUNK_BYTES, Communicator
from .scheduler.engine import Engine, EngineConfig
from .scheduler.ordering import GroupState
from .topology import Topology, calibrate, cluster
from .transports import choice, get_transport, vendor
from .transports.base import Connection, Listener
from .transports.shm import connect_shm
from .transports.tcp import bind_listener, connect_tcp, parse_host_port

log = logging.getLogger("sagellm_comm.init")

DEFAULT_INIT_TIMEOUT = 300.0


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def resolve(url: str, rank: int | None, world_size: int | None) -> tuple[str, int, int, int]:
    """(master host, master port, rank, world_size) from the URL, arguments and environment."""
    parsed = urlparse(url)
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    if parsed.scheme == "env":
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port_s = os.environ.get("MASTER_PORT")
        if port_s is None:
            raise InvalidArgument("env:// needs MASTER_PORT (and MASTER_ADDR, RANK, WORLD_SIZE) in the environment")
        port = int(port_s)
    elif parsed.scheme == "tcp":
        host, port = parse_host_port(parsed.netloc)
    else:
        raise InvalidArgument(f"unsupported init URL {url!r}: use tcp://host:port or env://")

    def pick(arg: int | None, key: str, env: str) -> int:
        if arg is not None:
            return int(arg)
        if key in query:
            return int(query[key])
        if env in os.environ:
            return int(os.environ[env])
        raise InvalidArgument(f"{key} is not given: pass {key}=, add ?{key}= to the URL or set {env}")

    r = pick(rank, "rank", "RANK")
    n = pick(world_size, "world_size", "WORLD_SIZE")
    if n < 1 or not 0 <= r < n:
        raise InvalidArgument(f"rank {r} is out of range for world_size {n}")
    return host, port, r, n


def _local_ip_towards(target: str) -> str:
    """The address of this host on the route to IP `target` (loopback stays loopback)."""
    try:
        if ipaddress.ip_address(target).is_loopback:
            return "127.0.0.1"
    except ValueError:  # a name that did not resolve
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((target, 9))  # no packet is sent: this only picks the route
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


@asynccontextmanager
async def init_process_group(
    url: str = "env://",
    rank: int | None = None,
    world_size: int | None = None,
    *,
    token: str | None = None,
    timeout: float | None = None,
    heartbeat_interval: float | None = None,
    heartbeat_timeout: float | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    frame_bytes: int | None = None,
    transport: str | None = None,
    backend: str = "auto",
) -> AsyncIterator[Communicator]:
    """Join a world of `world_size` processes and yield its communicator.

    url: ``tcp://host:port`` (rank 0 listens there) or ``env://`` (torchrun's
    RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
    token: shared secret every rank must present (default: SAGELLM_COMM_TOKEN, else empty).
    Required when this rank would listen on an address other than loopback
    (InvalidArgument otherwise); never logged or shown in errors.
    timeout: seconds for the whole init, and every op's default limit (CommTimeout);
    None waits up to 300 s for init and forever for ops.
    heartbeat_*: seconds (SAGELLM_COMM_HEARTBEAT_INTERVAL / _TIMEOUT); a peer silent for
    heartbeat_timeout is lost.
    transport: ``auto`` (default; SAGELLM_COMM_TRANSPORT): shared memory to peers on this
    host, TCP to others; or ``tcp``, ``shm``, ``ucx`` for every peer.
    backend: how device tensors travel (SAGELLM_COMM_BACKEND; `sagellm_comm.backend_for`
    says, for a tensor or device type, without creating anything): ``auto`` (each
    tensor's device picks: CUDA tensors take NCCL, RCCL on ROCm, where every rank of a
    group has its own GPU, else are staged through pinned host memory over the
    transports above; Ascend ``npu`` tensors take HCCL (torch_npu), Cambricon ``mlu``
    tensors CNCL (torch_mlu); CPU tensors the transports above), ``nccl`` or ``rccl``
    (CUDA tensors take that lane or raise), ``hccl`` or ``cncl`` (its package must be
    installed: BackendUnavailable saying what to install, here), or ``host`` (CUDA
    tensors always staged). Tensors of a device the chosen backend does not move raise
    UnsupportedBuffer.
    """
    backend = vendor.resolve(backend)
    host, port, r, n = resolve(url, rank, world_size)
    secret = token if token is not None else os.environ.get(security.TOKEN_ENV, "")
    config = EngineConfig(
        heartbeat_interval=heartbeat_interval or _env_float("SAGELLM_COMM_HEARTBEAT_INTERVAL", 1.0),
        heartbeat_timeout=heartbeat_timeout or _env_float("SAGELLM_COMM_HEARTBEAT_TIMEOUT", 10.0),
    )
    if frame_bytes:
        config.frame_bytes = frame_bytes
    deadline = anyio.current_time() + (timeout if timeout is not None else DEFAULT_INIT_TIMEOUT)

    local_view = _discover_in_background()  # overlaps with the rendezvous and the mesh
    master_ip = _resolve_host(host)
    listen_host = master_ip if r == 0 else _local_ip_towards(master_ip)
    security.check_listen_address(listen_host, secret, r)
    mode = choice.setting(transport)
    listeners: dict[str, Listener] = {}
    conns: dict[int, Connection] = {}
    try:
        listeners = await _open_listeners(mode, listen_host)
        my_address = ",".join(lst.address for lst in listeners.values())
        if n == 1:
            table = rendezvous.RendezvousResult("solo", [my_address])
        elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and url.startswith("env"):
            table = await rendezvous.via_torch_store(host, port, rank=r, world_size=n,
                                                     my_address=my_address,
                                                     timeout=max(1.0, deadline - anyio.current_time()))
        elif r == 0:
            table = await rendezvous.serve(master_ip, port, world_size=n, token=secret,
                                           my_address=my_address, deadline=deadline)
        else:
            table = await rendezvous.join(host, port, rank=r, world_size=n, token=secret,
                                          my_address=my_address, deadline=deadline)
        conns = await _connect_mesh(listeners, mode, table, r, n, secret, deadline)
    except BaseException:
        for c in conns.values():
            c.abort()
        raise
    finally:
        for lst in listeners.values():
            await lst.aclose()

    engine = Engine(r, n, conns, config)
    engine.local_host = listen_host
    async with anyio.create_task_group() as tg:
        engine.start(tg)
        comm = Communicator(engine, GroupState("world", list(range(n)), r), timeout=timeout,
                            chunk_bytes=chunk_bytes, owns_engine=True, backend=backend)
        try:
            comm.topology = await _gather_topology(comm, local_view)
            yield comm
        finally:
            with anyio.CancelScope(shield=True):
                await comm.aclose()
            tg.cancel_scope.cancel()


def _discover_in_background() -> Callable[[], Topology]:
    """Start this host's topology discovery in a thread; the returned call waits for it."""
    found: list[Topology] = []

    def work() -> None:
        found.append(topology.discover())

    thread = threading.Thread(target=work, name="sagellm-comm-topology", daemon=True)
    thread.start()

    def result() -> Topology:
        thread.join()
        return found[0]
    return result


async def _gather_topology(comm: Communicator, local_view: Callable[[], Topology]) -> cluster.ClusterView:
    """Every rank's host view, gathered once, on a group of its own (the world's op sequence
    and stats start clean for the caller); and from it the world's cost model."""
    mine = await anyio.to_thread.run_sync(local_view)
    everyone = comm.split(list(range(comm.world_size)))
    assert everyone is not None
    everyone.cost_model = None  # before the gather the ranks' models may differ: the fixed rules agree
    try:
        view = await cluster.gather(everyone, mine, calibrate.load())
    finally:
        await everyone.aclose()
    comm.cost_model = view.cost_model(DEFAULT_CHUNK_BYTES)  # rebound to the comm's chunk size; same on every rank
    return view


def _resolve_host(host: str) -> str:
    try:
        return str(socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
    except OSError:
        return host


async def _open_listeners(mode: str, tcp_host: str) -> dict[str, Listener]:
    listeners: dict[str, Listener] = {}
    try:
        for scheme in choice.listen_schemes(mode):
            if scheme == "tcp":
                listeners[scheme] = bind_listener(tcp_host)
            elif mode == "auto":  # shared memory is an optimisation here: without it, TCP still works
                try:
                    listeners[scheme] = await get_transport(scheme).listen(tcp_host)
                except (OSError, CommError) as e:
                    log.warning("not offering %s (falling back to tcp for local peers): %s", scheme, e)
            else:
                listeners[scheme] = await get_transport(scheme).listen(tcp_host)
    except BaseException:
        for lst in listeners.values():
            await lst.aclose()
        raise
    return listeners


async def _dial(scheme: str, address: str, deadline: float) -> Connection:
    if scheme == "tcp":
        return await connect_tcp(address, deadline=deadline)
    if scheme == "shm":
        return await connect_shm(address, deadline=deadline)
    return await get_transport(scheme).connect(address)


async def _connect_mesh(listeners: dict[str, Listener], mode: str, table: rendezvous.RendezvousResult, rank: int,
                        n: int, token: str, deadline: float) -> dict[int, Connection]:
    """Dial every lower rank, accept every higher one; every link authenticated.

    The dialer picks the transport from the acceptor's address set; the acceptor
    accepts on every listener it opened.
    """
    conns: dict[int, Connection] = {}
    expected = set(range(rank + 1, n))
    all_in = anyio.Event()
    if not expected:
        all_in.set()

    async def dial(peer: int) -> None:
        scheme, address, reason = choice.choose(mode, choice.parse_address_set(table.addresses[peer]), peer)
        conn = await _dial(scheme, address, deadline)
        conn.reason = reason
        welcome = await handshake.connect(conn, token=token, world_id=table.world_id, rank=rank, world_size=n)
        if welcome.rank != peer:
            conn.abort()
            raise AuthError(f"rank {rank} dialed rank {peer} at {address} but reached rank {welcome.rank}")
        conns[peer] = conn

    async def admit(conn: Connection) -> None:
        hello = None
        try:
            with anyio.move_on_after(handshake.TIMEOUT):
                try:
                    hello = await handshake.accept(conn, token=token, world_id=table.world_id, world_size=n)
                except CommError:
                    pass  # rejected (wrong token, other world, garbage): keep serving the real peers
            if hello is None:
                conn.abort()
                return
            if hello.rank not in expected:
                await handshake.reject(conn, f"rank {rank} expects connections from ranks {sorted(expected)}, "
                                             f"not {hello.rank}")
                return
            expected.discard(hello.rank)  # before the next await: a second claim to this rank is refused
            try:
                await conn.send_frame(wire.encode(wire.make_welcome(token, hello, rank)))
            except CommError:
                expected.add(hello.rank)
                conn.abort()
                return
        except BaseException:  # cancelled (every rank is in, or init failed) before this peer was admitted
            conn.abort()
            raise
        conn.reason = "same host" if conn.transport == "shm" else f"chosen by rank {hello.rank}, which dialed"
        conns[hello.rank] = conn
        if not expected:
            all_in.set()

    async def accept_on(listener: Listener, admitting: anyio.abc.TaskGroup) -> None:
        """Each connection authenticates in its own task: a slow or bad peer holds up no one."""
        while expected:
            admitting.start_soon(admit, await listener.accept())

    try:
        with anyio.fail_after(max(0.0, deadline - anyio.current_time())), unwrap_group_errors():
            async with anyio.create_task_group() as tg:
                async def accept_all() -> None:
                    async with anyio.create_task_group() as accepting:
                        for listener in listeners.values():
                            accepting.start_soon(accept_on, listener, accepting)
                        await all_in.wait()
                        accepting.cancel_scope.cancel()

                tg.start_soon(accept_all)
                for peer in range(rank):
                    tg.start_soon(dial, peer)
    except TimeoutError:
        missing = sorted(set(range(n)) - set(conns) - {rank})
        for c in conns.values():
            c.abort()
        raise CommTimeout(f"rank {rank} could not connect to ranks {missing} before the init timeout") from None
    except BaseException:
        for c in conns.values():
            c.abort()
        raise
    return conns
