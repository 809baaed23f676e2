"""Where ranks listen, and what the token guards.

Listening anywhere but loopback needs a token; a wrong or missing token is
refused in the handshake; and neither the right nor the wrong token shows up in
any error or log line, even at DEBUG.
"""

from __future__ import annotations

import logging

import anyio
import numpy as np
import pytest

import sagellm_comm as sc
from procs import free_port
from sagellm_comm import security

pytestmark = pytest.mark.anyio

RIGHT = "right-secret-7f3a9c"
WRONG = "wrong-secret-11d2e4"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "localhost"])
def test_loopback_needs_no_token(host: str) -> None:
    security.check_listen_address(host, "", rank=0)


@pytest.mark.fault("a rank asked to listen on a non-loopback address with no token",
                   "InvalidArgument naming the address and how to set a token; nothing listens")
@pytest.mark.parametrize("host", ["10.1.2.3", "0.0.0.0", "192.168.7.7", "fd00::5", "node17.cluster"])
def test_any_other_address_needs_a_token(host: str) -> None:
    with pytest.raises(sc.InvalidArgument, match="SAGELLM_COMM_TOKEN") as e:
        security.check_listen_address(host, "", rank=3)
    assert host in str(e.value) and "rank 3" in str(e.value)
    security.check_listen_address(host, "t", rank=3)  # with a token it is allowed


@pytest.mark.fault("init_process_group on a non-loopback master address with no token",
                   "InvalidArgument before any socket is opened")
async def test_init_refuses_to_listen_off_loopback_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAGELLM_COMM_TOKEN", raising=False)
    port = free_port()
    with anyio.fail_after(10), pytest.raises(sc.InvalidArgument, match="without an auth token"):
        async with sc.init_process_group(f"tcp://10.255.255.1:{port}", rank=0, world_size=2, timeout=5):
            pass


async def test_token_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """SAGELLM_COMM_TOKEN on one rank and token= on the other: the same secret, so the world forms."""
    monkeypatch.setenv("SAGELLM_COMM_TOKEN", RIGHT)
    port = free_port()
    sums: dict[int, float] = {}

    async def rank(r: int) -> None:
        token = RIGHT if r == 1 else None
        async with sc.init_process_group(f"tcp://127.0.0.1:{port}", rank=r, world_size=2, token=token,
                                         timeout=20) as comm:
            x = np.full(4, r + 1.0, dtype=np.float32)
            await comm.all_reduce(x)
            sums[r] = float(x[0])

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(rank, 0)
            tg.start_soon(rank, 1)
    assert sums == {0: 3.0, 1: 3.0}


@pytest.mark.fault("a rank joins with a wrong token, then with no token",
                   "AuthError on that rank, the token in no error or log line; the world then forms")
async def test_wrong_and_missing_tokens_are_refused_and_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    errors: list[BaseException] = []
    result: dict[int, float] = {}

    async def rank(r: int, token: str) -> None:
        async with sc.init_process_group(url, rank=r, world_size=2, token=token, timeout=30) as comm:
            x = np.full(8, 2.0 ** r, dtype=np.float64)
            await comm.all_reduce(x)
            result[r] = float(x[0])

    async def impostor(token: str) -> None:
        try:
            await rank(1, token)
        except sc.AuthError as e:
            errors.append(e)

    with anyio.fail_after(40):
        async with anyio.create_task_group() as tg:
            tg.start_soon(rank, 0, RIGHT)
            await impostor(WRONG)
            await impostor("")
            tg.start_soon(rank, 1, RIGHT)
    assert result == {0: 3.0, 1: 3.0}
    assert len(errors) == 2
    shown = caplog.text + "".join(f"{e!s}{e!r}{e.__cause__!r}{e.__context__!r}" for e in errors)
    assert "wrong auth token" in shown
    for secret in (RIGHT, WRONG):
        assert secret not in shown


@pytest.mark.fault("a process squatting on the master's port answers the rendezvous without the token",
                   "AuthError on the joining rank before it uses the table it was handed; the token not shown")
async def test_listener_must_prove_it_knows_the_token() -> None:
    """Authentication is mutual: the joiner checks the Welcome's signature over its own nonce, so an
    impostor cannot hand out an address table (or pose as a peer and be sent our data)."""
    from sagellm_comm import wire
    from sagellm_comm.transports.tcp import bind_listener

    listener = bind_listener("127.0.0.1", 0)
    port = int(listener.address.rsplit(":", 1)[1])
    seen: list[wire.Message] = []

    async def impostor() -> None:
        conn = await listener.accept()
        await conn.send_frame(wire.encode(wire.Challenge(wire.VERSION, wire.new_nonce())))
        prefix = await conn.recv_exactly(wire.PREFIX_SIZE)
        hlen, _ = wire.parse_prefix(prefix, max_header=wire.HANDSHAKE_MAX_HEADER_BYTES, max_payload=0)
        hello = wire.decode(await conn.recv_exactly(hlen))
        seen.append(hello)
        assert isinstance(hello, wire.Hello)
        forged = wire.make_welcome("a guess", hello, 1, "w-fake", ["tcp://127.0.0.1:9", "tcp://127.0.0.1:9"])
        await conn.send_frame(wire.encode(forged))
        await anyio.sleep(5)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(impostor)
            with pytest.raises(sc.AuthError, match="without proving it knows the auth token") as e:
                async with sc.init_process_group(f"tcp://127.0.0.1:{port}", rank=1, world_size=2, token=RIGHT,
                                                 timeout=10):
                    pass
            tg.cancel_scope.cancel()
    await listener.aclose()
    assert RIGHT not in str(e.value)
    hello = seen[0]
    assert isinstance(hello, wire.Hello) and len(hello.nonce) == 16  # the joiner's own challenge
