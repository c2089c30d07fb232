"""What the server granted a client on one connection, as the client holds it: :class:`Grant` (a
lease's or a read pin's chunks, a reservation's slots, as KVObj handles over the client's mapping) and
:class:`SharedPendingStore` (a reservation being filled).

A grant ends once: committed, aborted or released. Its handles end with it, and so do they when the
connection goes (the server then gives everything back itself).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmcache.errors import NotPicklableError
from lmcache.shared import protocol
from lmcache.shared.channel import Channel, expect_count
from lmcache.shared.link import Link
from lmcache.shared.protocol import Op
from lmcache.storage_backend.mem_pool.base_pool import KVObj


class Grant:
    """Slots the server granted on ``link`` under id ``ident`` (0: nothing to give back), as handles."""

    def __init__(self, channel: Channel, link: Link, ident: int, handles: list[KVObj]) -> None:
        self._channel = channel
        #: The connection it was granted on; None once it ended.
        self.link: Link | None = link
        self.ident = ident
        #: The chunks or slots, in order.
        self.handles = handles
        #: Tokens of the handles.
        self.num_tokens = sum(obj.num_tokens for obj in handles)

    def detach(self) -> Link | None:
        """End the handles; return the link they were granted on if it still stands (else None)."""
        link, self.link = self.link, None
        if link is None:
            return None
        link.slots.drop(self.handles)
        return None if link.closed else link

    def end(self, op: Op) -> None:
        """End the handles and tell the server (``op``: RELEASE or ABORT), if the link still stands."""
        link = self.detach()
        if link is not None and self.ident:
            self._channel.tell(link, op, self.ident)


class SharedPendingStore:
    """Slots reserved on the server for the missing chunks of one prompt: what
    :meth:`SharedChunkCache.begin_store <lmcache.shared.SharedChunkCache.begin_store>` returns (as
    :meth:`ChunkCache.begin_store <lmcache.chunk_cache.ChunkCache.begin_store>`, but :meth:`commit`
    returns the tokens cached).

    Fill each of :attr:`slots` (KVObj handles over the mapping), then :meth:`commit`. A ``with`` block
    left without a commit aborts: nothing half-written is ever visible, and a client that dies holding
    one loses it the same way.
    """

    def __init__(self, channel: Channel, grant: Grant | None, cached: int, tokens: int = 0) -> None:
        self._channel = channel
        self._grant = grant
        #: How many leading chunks were cached already.
        self.cached = cached
        self._tokens = tokens  # the answer, when the server committed at once (nothing to fill)

    @property
    def slots(self) -> list[KVObj]:
        """The slots to fill, in chunk order (empty once committed or aborted)."""
        return list(self._grant.handles) if self._grant is not None else []

    def commit(self, count: int | None = None) -> int:
        """Publish the first ``count`` filled slots (default: all); return the tokens cached now (0 if
        the server could not be reached)."""
        grant, self._grant = self._grant, None
        if grant is None:
            tokens, self._tokens = self._tokens, 0
            return tokens
        keep = len(grant.handles) if count is None else max(0, min(count, len(grant.handles)))
        link = grant.detach()
        if link is None:
            return 0
        tokens = self._channel.call(
            Op.COMMIT, protocol.id_body(grant.ident, keep), expect_count(None), on=link
        )
        return 0 if tokens is None else int(tokens)

    def abort(self) -> None:
        """Give every slot back; calling it again (or after a commit) does nothing."""
        grant, self._grant = self._grant, None
        if grant is not None:
            grant.end(Op.ABORT)

    def fill(self, filler: Callable[[int], Callable[[KVObj], object]]) -> int:
        """Fill every slot with ``filler(chunk_index)(slot)``, then commit; return the tokens cached.

        When a fill raises, the slots filled before it are committed and the error goes on (as in
        :meth:`~lmcache.chunk_cache.ChunkCache.store`). A connection lost meanwhile answers 0.
        """
        grant = self._grant
        if grant is None or grant.link is None:
            return self.commit()
        filled = 0
        try:
            with grant.link.in_use() as usable:
                if not usable:
                    self.abort()
                    return 0
                for index, obj in enumerate(grant.handles, self.cached):
                    filler(index)(obj)
                    filled += 1
        except BaseException:
            self.commit(filled)
            raise
        return self.commit()

    def __enter__(self) -> SharedPendingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise NotPicklableError(
            "a pending store holds slots on the server; it can be neither copied nor pickled"
        )

    def __repr__(self) -> str:
        return f"SharedPendingStore({self.cached} cached, {len(self.slots)} slots)"


__all__ = ["Grant", "SharedPendingStore"]
