"""The admin API's socket: a taken port is an error naming the flag, or, where asked (the
demo), any free port in the same bind, so two processes starting at once cannot collide."""

from __future__ import annotations

import socket

import pytest

from xds_server.admin.server import bind_admin


@pytest.fixture
def taken_port():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        yield holder.getsockname()[1]
    finally:
        holder.close()


def test_a_taken_port_is_an_error_naming_the_flag(taken_port: int) -> None:
    with pytest.raises(OSError, match=r"--admin-address.*in use"):
        bind_admin(f"127.0.0.1:{taken_port}")


def test_a_taken_port_falls_back_to_a_free_one_when_asked(taken_port: int) -> None:
    sock = bind_admin(f"127.0.0.1:{taken_port}", any_port_if_taken=True)
    try:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port not in (0, taken_port)
    finally:
        sock.close()
