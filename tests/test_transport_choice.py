"""The per-peer transport choice: settings, address sets and what each peer gets."""

from __future__ import annotations

import pytest

from sagellm_comm.errors import InvalidArgument
from sagellm_comm.transports import choice
from sagellm_comm.transports.shm import host_key, shm_supported

LOCAL = f"tcp://127.0.0.1:5000,shm://{host_key()}/sagellm-comm-1-aa"
REMOTE = "tcp://10.0.0.2:5000,shm://ffffffffffffffff/sagellm-comm-2-bb"


@pytest.mark.fault("unknown transport name in SAGELLM_COMM_TRANSPORT",
                   "InvalidArgument naming SAGELLM_COMM_TRANSPORT")
def test_setting_comes_from_the_argument_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(choice.ENV, raising=False)
    assert choice.setting(None) == "auto"
    monkeypatch.setenv(choice.ENV, "TCP")
    assert choice.setting(None) == "tcp"
    assert choice.setting("shm") == "shm"
    monkeypatch.setenv(choice.ENV, "carrier-pigeon")
    with pytest.raises(InvalidArgument, match="SAGELLM_COMM_TRANSPORT="):
        choice.setting(None)


@pytest.mark.skipif(not shm_supported()[0], reason=shm_supported()[1])
def test_auto_uses_shm_on_this_host_and_tcp_elsewhere() -> None:
    assert choice.choose("auto", choice.parse_address_set(LOCAL), 1)[:2] == ("shm", LOCAL.split(",")[1])
    scheme, address, reason = choice.choose("auto", choice.parse_address_set(REMOTE), 2)
    assert (scheme, address, reason) == ("tcp", "tcp://10.0.0.2:5000", "other host")


@pytest.mark.fault("transport forced to shm for a rank on another host, or to ucx for a rank offering only shm "
                   "and tcp; peer address without a scheme",
                   "InvalidArgument naming the problem ('another host', 'offers shm, tcp', 'no scheme')")
def test_forced_transports_and_their_errors() -> None:
    assert choice.choose("tcp", choice.parse_address_set(LOCAL), 1)[0] == "tcp"
    with pytest.raises(InvalidArgument, match="rank 2 is on another host"):
        choice.choose("shm", choice.parse_address_set(REMOTE), 2)
    with pytest.raises(InvalidArgument, match="offers shm, tcp"):
        choice.choose("ucx", choice.parse_address_set(REMOTE), 2)
    with pytest.raises(InvalidArgument, match="no scheme"):
        choice.parse_address_set("127.0.0.1:5000")
