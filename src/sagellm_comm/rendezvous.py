"""Rendezvous: every rank learns every other rank's data address.

Two ways, chosen by `init_process_group`:
- our own: rank 0 listens on the master address; the others connect (retrying
  until it is up), authenticate, and send their data address; once all have
  joined, rank 0 answers each with the world id and the full address table.
- torchrun's agent store: under torchrun, MASTER_PORT is already held by the
  agent's TCPStore, so the addresses are exchanged through that store.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from typing import Any

import anyio

from . import handshake, wire
from .errors import AuthError, CommError, CommTimeout, InvalidArgument
from .transports.tcp import TcpConnection, bind_listener, connect_tcp
from .wire import Hello

log = logging.getLogger("sagellm_comm.rendezvous")


@dataclass
class RendezvousResult:
    world_id: str
    addresses: list[str]


async def serve(host: str, port: int, *, world_size: int, token: str, my_address: str,
                deadline: float) -> RendezvousResult:
    """Rank 0's side: collect every rank's address, then hand out the table."""
    try:
        listener = bind_listener(host, port)
    except OSError as e:
        raise InvalidArgument(f"rank 0 cannot listen on {host}:{port} for the rendezvous: {e.strerror or e}") from None
    world_id = secrets.token_hex(8)
    addresses: list[str | None] = [None] * world_size
    addresses[0] = my_address
    joined: dict[int, TcpConnection] = {}
    hellos: dict[int, Hello] = {}
    all_joined = anyio.Event()

    async def admit(conn: TcpConnection) -> None:
        try:
            with anyio.fail_after(handshake.TIMEOUT):
                hello = await handshake.accept(conn, token=token, world_id=None, world_size=world_size)
        except TimeoutError:
            log.warning("rendezvous dropped a peer that did not authenticate in %.0f s (%s)",
                        handshake.TIMEOUT, conn.describe())
            conn.abort()
            return
        except CommError as e:
            log.warning("rendezvous refused a peer (%s): %s", conn.describe(), e)
            return
        except BaseException:
            conn.abort()
            raise
        if hello.rank == 0 or hello.rank in joined:
            await handshake.reject(conn, f"rank {hello.rank} has already joined this rendezvous")
            return
        joined[hello.rank] = conn
        hellos[hello.rank] = hello
        addresses[hello.rank] = hello.address
        if len(joined) == world_size - 1:
            all_joined.set()

    try:
        with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
            async with anyio.create_task_group() as tg:
                async def accept_loop() -> None:
                    while True:
                        conn = await listener.accept()
                        tg.start_soon(admit, conn)  # type: ignore[arg-type]

                tg.start_soon(accept_loop)
                await all_joined.wait()
                tg.cancel_scope.cancel()
    except TimeoutError:
        missing = [r for r in range(1, world_size) if r not in joined]
        for conn in joined.values():
            conn.abort()
        raise CommTimeout(f"rendezvous at {host}:{port} timed out waiting for ranks {missing}") from None
    finally:
        await listener.aclose()
    table = [a or "" for a in addresses]
    for r, conn in joined.items():
        try:
            await conn.send_frame(wire.encode(wire.make_welcome(token, hellos[r], r, world_id, table)))
        finally:
            await conn.aclose()
    return RendezvousResult(world_id, table)


async def join(host: str, port: int, *, rank: int, world_size: int, token: str,
               my_address: str, deadline: float) -> RendezvousResult:
    """A non-zero rank's side: connect to rank 0, register, wait for the table."""
    conn = await connect_tcp(f"{host}:{port}", deadline=deadline)
    try:
        with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
            # rank 0 answers once every rank has joined, with the whole table
            welcome = await handshake.connect(conn, token=token, world_id="", rank=rank,
                                              world_size=world_size, address=my_address)
    except TimeoutError:
        raise CommTimeout(f"rank {rank}: rendezvous with {host}:{port} did not complete in time") from None
    finally:
        conn.abort()
    if len(welcome.addresses) != world_size:
        raise AuthError(f"rendezvous answered with {len(welcome.addresses)} addresses for world_size={world_size}")
    return RendezvousResult(welcome.world_id, list(welcome.addresses))


_store_inits = 0


async def via_torch_store(host: str, port: int, *, rank: int, world_size: int, my_address: str,
                          timeout: float) -> RendezvousResult:
    """Exchange addresses through torchrun's agent TCPStore (which holds MASTER_PORT)."""
    global _store_inits
    import datetime

    import torch.distributed as dist

    _store_inits += 1
    prefix = "sagellm_comm/{}/{}/{}".format(
        os.environ.get("TORCHELASTIC_RUN_ID", "run"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"),
        _store_inits)

    def exchange() -> RendezvousResult:
        tcp_store: Any = dist.TCPStore  # type: ignore[attr-defined]
        store = tcp_store(host, port, world_size, is_master=False,
                          timeout=datetime.timedelta(seconds=timeout), use_libuv=True)
        if rank == 0:
            store.set(f"{prefix}/world_id", secrets.token_hex(8))
        store.set(f"{prefix}/addr/{rank}", my_address)
        world_id = store.get(f"{prefix}/world_id").decode()
        table = [store.get(f"{prefix}/addr/{r}").decode() for r in range(world_size)]
        return RendezvousResult(world_id, table)

    try:
        return await anyio.to_thread.run_sync(exchange, abandon_on_cancel=True)
    except RuntimeError as e:  # torch raises DistStoreError (a RuntimeError) on timeout
        raise CommTimeout(f"rank {rank}: rendezvous through torchrun's store at {host}:{port} failed: {e}") from None
