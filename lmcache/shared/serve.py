"""``python -m lmcache serve``: run a :class:`~lmcache.shared.CacheServer` as a process.

It prints exactly one line, ``ready <socket path>``, on stdout once it accepts connections, serves until
SIGTERM or SIGINT, then stops cleanly: every connection closed, the socket file removed, the shared
memory released. Errors in the arguments exit with status 2 and a message on stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from lmcache.config import LMCacheMemPoolMetadata
from lmcache.errors import MemPoolError


def add_parser(commands: Any, shape: Callable[[str], tuple[int, int, int, int, int]]) -> None:
    """Add the ``serve`` command to the command line's subparsers (``shape`` parses ``L,2,T,H,D``)."""
    serve = commands.add_parser(
        "serve",
        help="serve one chunk cache in shared memory to every process of this machine",
        description=(
            "Serve one chunk cache in shared memory to every process of this machine (clients: "
            "lmcache.shared.connect). Prints 'ready <socket path>' once it accepts connections; stops "
            "on SIGTERM or SIGINT, removing its socket and shared memory."
        ),
    )
    serve.add_argument("--socket", required=True, help="path of the Unix socket to listen at")
    serve.add_argument("--kv-shape", type=shape, required=True, help="chunk shape L,2,tokens,H,D")
    serve.add_argument("--dtype", required=True, help="element type, e.g. bfloat16")
    serve.add_argument("--size-gib", type=float, required=True, help="arena size in GiB")
    serve.add_argument("--policy", default=None, help="eviction policy (default: the cache's default)")
    serve.add_argument("--remote", default=None, help="remote tier URL, e.g. redis://127.0.0.1:6379/0")
    serve.add_argument("--disk", default=None, metavar="DIR", help="a disk tier in DIR (survives restarts)")
    serve.add_argument(
        "--disk-size-gib", type=float, default=16.0, help="the disk tier's bound in GiB (default 16)"
    )
    serve.add_argument(
        "--group", default=None, help="a group whose members may use the cache too (mode 0660); default 0600"
    )
    serve.add_argument("--max-clients", type=int, default=256, help="connections served at once")
    # A disk tier (--disk DIR --disk-size-gib N) goes into cache_options() once ChunkCache takes disk=.
    serve.add_argument("--log-level", default="WARNING", help="logging level on stderr (default WARNING)")


def cache_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of the server's :class:`~lmcache.chunk_cache.ChunkCache` from the command line."""
    disk = None
    if args.disk is not None:
        from lmcache.disk import DiskTier

        disk = DiskTier(args.disk, size_gib=args.disk_size_gib)
    return {"policy": args.policy, "remote": args.remote, "disk": disk}


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; return the exit status."""
    from lmcache.shared.server import CacheServer

    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(), format="%(asctime)s %(message)s")
    stop = threading.Event()
    try:
        metadata = LMCacheMemPoolMetadata(args.kv_shape, args.dtype, args.size_gib)
        options = cache_options(args)
        server = CacheServer(args.socket, metadata, group=args.group, max_clients=args.max_clients, **options)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        server.start()
    except MemPoolError as exc:
        print(f"lmcache serve: {exc}", file=sys.stderr)
        return 2
    try:
        print(f"ready {server.socket_path}", flush=True)
        stop.wait()
    finally:
        server.stop()
        if options["disk"] is not None:  # the server's tier: written out (briefly) and closed here
            options["disk"].close()
    return 0


__all__ = ["add_parser", "cache_options", "run"]
