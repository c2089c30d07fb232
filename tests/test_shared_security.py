"""Who may use a shared cache: modes 0600 (0660 for one group), peer credentials, the socket's path.

The socket file and the shared memory are the server's user's alone (or its group's with ``group=``);
the memory's size is sealed, so no client can shrink it under the others; each peer's uid is checked
(``SO_PEERCRED``); a stale socket is replaced, a live server's path is refused, and a stopping server
removes only its own socket file.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import time

import pytest

from kvtest import wait_until
from lmcache.errors import ConfigError, ServerUnavailableError
from lmcache.shared import CacheServer, connect
from lmcache.shared.access import MAX_PATH_BYTES, peer_allowed, resolve_group, supplementary_groups
from lmcache.shared.protocol import FrameReader, Reply, Welcome
from sharedtest import metadata


def _welcome_fd(path: str) -> tuple[Welcome, int]:
    """Connect as a raw client; return the welcome and the arena's descriptor (the caller closes it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        reader = FrameReader(sock, accept_fds=True)
        _, op, body = reader.read(time.monotonic() + 5)
        (fd,) = reader.take_fds()
    assert op == Reply.WELCOME
    return Welcome.decode(body), fd


def test_socket_and_memory_are_the_owners_alone(socket_path: str) -> None:
    with CacheServer(socket_path, metadata(4)):
        info = os.stat(socket_path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.geteuid()
        welcome, fd = _welcome_fd(socket_path)
        try:
            memory = os.fstat(fd)
            assert stat.S_IMODE(memory.st_mode) == 0o600
            assert memory.st_size == welcome.num_slots * welcome.slot_bytes
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_SHRINK
            assert seals & fcntl.F_SEAL_GROW
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)  # a client cannot pull the memory from under the others
        finally:
            os.close(fd)
        assert os.listdir(os.path.dirname(socket_path)) == ["cache.sock"]  # no temporary name left


def test_a_group_opens_socket_and_memory_to_its_members(socket_path: str) -> None:
    gid = os.getegid()
    with CacheServer(socket_path, metadata(4), group=gid):
        info = os.stat(socket_path)
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, gid)
        _, fd = _welcome_fd(socket_path)
        try:
            memory = os.fstat(fd)
            assert (stat.S_IMODE(memory.st_mode), memory.st_gid) == (0o660, gid)
        finally:
            os.close(fd)
        with connect(socket_path) as client:
            assert client.lookup([1, 2, 3]) == 0


def test_groups_are_checked() -> None:
    with pytest.raises(ConfigError, match="no group"):
        resolve_group("no-such-group-for-lmcache")
    with pytest.raises(ConfigError, match="no group"):
        resolve_group(True)  # type: ignore[arg-type]
    assert resolve_group(None) is None
    assert resolve_group(str(os.getegid())) == os.getegid()


def test_peer_credentials_decide_who_is_served() -> None:
    me, my_group = os.geteuid(), os.getegid()
    pid = os.getpid()
    assert peer_allowed(pid, me, my_group, owner_uid=me, group=None)
    assert not peer_allowed(pid, me + 1, my_group, owner_uid=me, group=None)
    assert peer_allowed(pid, me + 1, my_group, owner_uid=me, group=my_group)  # primary group
    assert not peer_allowed(pid, me + 1, my_group + 1, owner_uid=me, group=my_group + 12345)
    extra = supplementary_groups(pid)
    assert extra == set(os.getgroups())
    for group in extra:
        assert peer_allowed(pid, me + 1, group + 1, owner_uid=me, group=group)  # supplementary


def test_a_client_refuses_a_server_of_another_user(socket_path: str) -> None:
    with (
        CacheServer(socket_path, metadata(4)),
        pytest.raises(ServerUnavailableError, match="runs as uid"),
    ):
        connect(socket_path, server_uid=os.geteuid() + 4242)


def test_stale_sockets_are_replaced_and_live_ones_refused(socket_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(socket_path)  # a socket file nobody listens on: what a killed server leaves
    stale.close()
    with CacheServer(socket_path, metadata(4)):
        with connect(socket_path) as client:
            assert client.lookup([1]) == 0
        with pytest.raises(ConfigError, match="already listens"):
            CacheServer(socket_path, metadata(4)).start()
    assert not os.path.exists(socket_path)


def test_other_files_and_long_paths_are_refused(socket_path: str) -> None:
    with open(socket_path, "w") as regular:
        regular.write("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        CacheServer(socket_path, metadata(4)).start()
    with pytest.raises(ConfigError, match="at most 107"):
        CacheServer("/tmp/" + "x" * MAX_PATH_BYTES, metadata(4))
    with pytest.raises(ConfigError, match=r"str or os\.PathLike"):
        CacheServer(42, metadata(4))  # type: ignore[arg-type]


def test_a_stopping_server_leaves_a_newer_servers_socket(socket_path: str) -> None:
    old = CacheServer(socket_path, metadata(4)).start()
    os.unlink(socket_path)  # someone removed it; a new server took the path
    with CacheServer(socket_path, metadata(4)) as new:
        old.stop()
        assert os.path.exists(socket_path)
        with connect(socket_path) as client:
            assert client.server_id == new.server_id
            assert wait_until(lambda: new.clients == 1)
