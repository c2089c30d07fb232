"""One ``lmcache`` package from two distributions: LMCache's and this project's.

LMCache (``pip install lmcache``) and lmcache-mempool both install a top-level package named
``lmcache``. Their modules do not collide (LMCache's are ``lmcache.v1``, ``lmcache.logging``,
``lmcache.utils``, ... ; ours ``lmcache.chunk_cache``, ``lmcache.storage_backend.mem_pool``, ...; the
one shared name, ``lmcache.storage_backend``, is a namespace directory in LMCache holding ``serde``),
so one package can hold both when LMCache's ``__init__`` runs (its modules import ``torch_dev`` and
``device_ops`` from it; ours import only submodules from theirs).

Two installs give that:

* both in one ``site-packages`` with LMCache installed last: pip writes both file sets into one
  ``lmcache`` directory and LMCache's ``__init__.py`` is the one kept. Nothing is left to join.
* in two directories (this project editable, LMCache in ``site-packages``): ``import lmcache`` finds
  LMCache's; :func:`join_lmcache` appends this project's directory (beside this adapter's) to its
  ``__path__``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from lmcache_mempool_l2.errors import LMCacheMissingError

#: A module only this project's ``lmcache`` has, and one only LMCache's has.
OURS_MARKER = "chunk_cache.py"
LMCACHE_MARKER = "v1"


def _our_directory() -> Path | None:
    """This project's ``lmcache`` directory: beside the adapters (an install) or one level up (a
    checkout, where the adapters live in ``adapters/``)."""
    here = Path(__file__).resolve().parent
    for base in (here.parent, here.parent.parent):
        candidate = base / "lmcache"
        if (candidate / OURS_MARKER).is_file():
            return candidate
    return None


def join_lmcache() -> None:
    """Make ``import lmcache`` give LMCache's package holding this project's modules too.

    Idempotent. Call it before importing either's submodules in a process where LMCache may be
    installed (the adapter module does, on import).

    Raises:
        LMCacheMissingError: ``lmcache`` is this project's package alone (LMCache is not installed, or was
            installed before lmcache-mempool into the same directory, which replaced its
            ``__init__.py``), or this project's modules cannot be found.
    """
    package = importlib.import_module("lmcache")
    paths = [Path(p) for p in getattr(package, "__path__", [])]
    if not any((p / LMCACHE_MARKER).is_dir() for p in paths) or not hasattr(package, "torch_dev"):
        raise LMCacheMissingError(
            f"'lmcache' ({getattr(package, '__file__', None)}) is not LMCache's package: install LMCache "
            "0.5.6 after lmcache-mempool (pip install --no-deps lmcache==0.5.6; both install a package "
            "named lmcache, and LMCache's __init__.py must be the one kept)"
        )
    if any((p / OURS_MARKER).is_file() for p in paths):
        return  # one directory holds both
    ours = _our_directory()
    if ours is None:
        raise LMCacheMissingError(
            "lmcache-mempool's modules (lmcache/chunk_cache.py) are neither in LMCache's package "
            f"directory {[str(p) for p in paths]} nor beside this adapter ({Path(__file__).parent}): "
            "install lmcache-mempool (pip install lmcache-mempool, or pip install -e . in its checkout)"
        )
    package.__path__.append(str(ours))
    storage = sys.modules.get("lmcache.storage_backend")
    if storage is not None and str(ours / "storage_backend") not in list(storage.__path__):
        storage.__path__.append(str(ours / "storage_backend"))  # LMCache's namespace, imported already


__all__ = ["join_lmcache"]
