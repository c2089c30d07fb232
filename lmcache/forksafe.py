"""Locks that must be renewed in a child process created with ``os.fork()``.

A fork copies a lock in the state it had in the parent; if another thread of the parent held it at
that moment, the child (which has no such thread) would deadlock on its first use. Objects that own
locks register here and get fresh ones in the child.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol


class ForkSafe(Protocol):
    """An object that can replace its locks with new, unlocked ones."""

    def reset_locks_after_fork(self) -> None:
        """Replace every lock this object owns (called in a forked child only)."""
        ...


_REGISTERED: weakref.WeakSet[ForkSafe] = weakref.WeakSet()  # type: ignore[type-var]


def register(obj: ForkSafe) -> None:
    """Renew ``obj``'s locks in every child forked while ``obj`` is alive."""
    _REGISTERED.add(obj)


def _reset_in_child() -> None:
    for obj in list(_REGISTERED):
        obj.reset_locks_after_fork()


os.register_at_fork(after_in_child=_reset_in_child)

__all__ = ["ForkSafe", "register"]
