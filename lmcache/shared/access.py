"""Who may use a shared cache: the server's socket file, its mode, and the credentials of each peer.

* The socket is created mode 0600 (0660 and one group with ``group=``) before anyone can connect: it is
  bound under a temporary name in the same directory, given its mode, put to listening, and only then
  renamed to its path (atomic; no process-wide ``umask`` change, which would race with other threads
  of a process that embeds the server). A stale socket left by a server that died is replaced; a path
  where a server still answers is refused.
* Each connection's peer is checked with ``SO_PEERCRED``: the server's own user, or (with a group) a
  member of that group; the client checks in turn that the server runs as its own user or root.
"""

from __future__ import annotations

import grp
import os
import secrets
import socket
import stat
import struct

from lmcache.errors import ConfigError

#: The longest socket path the kernel takes (``sun_path`` holds 108 bytes, with a NUL).
MAX_PATH_BYTES = 107
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def socket_path(path: object) -> str:
    """Return ``path`` as a str after checking that a Unix socket can live there.

    Raises:
        ConfigError: not a path, or longer than the kernel allows.
    """
    try:
        text = os.fspath(path)  # type: ignore[call-overload]
    except TypeError:
        raise ConfigError(
            f"the socket path must be a str or os.PathLike, got {type(path).__name__}"
        ) from None
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text:
        raise ConfigError("the socket path is empty; pass a path such as /run/user/1000/lmcache.sock")
    if len(os.fsencode(text)) > MAX_PATH_BYTES:
        raise ConfigError(
            f"the socket path {text!r} is {len(os.fsencode(text))} bytes; Unix sockets take at most "
            f"{MAX_PATH_BYTES}: use a shorter directory (for example under /tmp or $XDG_RUNTIME_DIR)"
        )
    return str(text)


def resolve_group(group: str | int | None) -> int | None:
    """Return the id of the group that may share the cache (None: the owner only).

    Raises:
        ConfigError: no such group, or this process is not a member (it could not give the socket to
            the group).
    """
    if group is None:
        return None
    if isinstance(group, str) and group.isdigit():  # a numeric id from the command line
        group = int(group)
    try:
        if isinstance(group, bool):
            raise KeyError(group)
        entry = grp.getgrgid(group) if isinstance(group, int) else grp.getgrnam(group)
    except (KeyError, TypeError, OverflowError):
        raise ConfigError(
            f"no group {group!r} on this machine; pass a group name or id that exists"
        ) from None
    gid = entry.gr_gid
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise ConfigError(
            f"this process is not a member of group {entry.gr_name!r} ({gid}), so it cannot open the "
            "cache to it; add the user to the group or pick one of its groups"
        )
    return int(gid)


def listen(path: str, *, gid: int | None, backlog: int = 128) -> tuple[socket.socket, tuple[int, int]]:
    """Create the listening socket at ``path``, mode 0600 (0660 for group ``gid``).

    Returns:
        The socket, and the ``(st_dev, st_ino)`` of its file (so that only this server removes it).

    Raises:
        ConfigError: a server answers at ``path``, or ``path`` is something other than a socket.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ConfigError(f"{path} exists and is not a socket; remove it or pick another path")
        if server_answers(path):
            raise ConfigError(f"a cache server already listens at {path}; stop it or pick another path")
    temporary = os.path.join(directory, f".lmc{secrets.token_hex(4)}")
    socket_path(temporary)  # the kernel's length limit, with a clear message
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(temporary)
        try:
            os.chmod(temporary, 0o600 if gid is None else 0o660)
            if gid is not None:
                os.chown(temporary, -1, gid)
            listener.listen(backlog)
            os.rename(temporary, path)  # only now can anyone connect, and the mode is right already
        except BaseException:
            os.unlink(temporary)
            raise
        info = os.stat(path)
    except BaseException:
        listener.close()
        raise
    return listener, (info.st_dev, info.st_ino)


def server_answers(path: str, timeout: float = 1.0) -> bool:
    """Whether something accepts connections at the socket ``path`` (a stale socket refuses them)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # not ours to judge (another user's socket, a full backlog): leave it alone
    finally:
        probe.close()
    return True


def remove_socket(path: str, identity: tuple[int, int]) -> None:
    """Remove the socket file at ``path`` if it is still the one ``identity`` names (a newer server
    on the same path keeps its own)."""
    try:
        info = os.lstat(path)
        if (info.st_dev, info.st_ino) == identity:
            os.unlink(path)
    except FileNotFoundError:
        pass


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """The ``(pid, uid, gid)`` of the process at the other end of a Unix socket (``SO_PEERCRED``)."""
    pid, uid, gid = _CREDENTIALS.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
    )
    return pid, uid, gid


def peer_allowed(pid: int, uid: int, gid: int, *, owner_uid: int, group: int | None) -> bool:
    """Whether a client may use the cache: it runs as ``owner_uid``, or (with ``group``) as a member of
    that group (its primary group, or a supplementary one read from ``/proc/<pid>/status``)."""
    if uid == owner_uid:
        return True
    if group is None:
        return False
    return gid == group or group in supplementary_groups(pid)


def supplementary_groups(pid: int) -> set[int]:
    """The supplementary group ids of process ``pid`` (empty if they cannot be read)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(field) for field in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


__all__ = [
    "MAX_PATH_BYTES",
    "listen",
    "peer_allowed",
    "peer_credentials",
    "remove_socket",
    "resolve_group",
    "server_answers",
    "socket_path",
    "supplementary_groups",
]
