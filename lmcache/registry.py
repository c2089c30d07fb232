"""Which backend a pool uses, and the lazy import of its adapter.

The registry never imports a framework on its own: a framework's adapter is imported only when a pool
(or a view conversion) asks for that backend, and backend selection looks at ``sys.modules`` and at the
type of ``kv_dtype``, not at what happens to be installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import TYPE_CHECKING, Any, Protocol

from lmcache.errors import BackendUnavailableError, ConfigError

if TYPE_CHECKING:
    import numpy as np

    from lmcache.arena import Arena
    from lmcache.config import LMCacheMemPoolMetadata
    from lmcache.dtypes import DTypeSpec
    from lmcache.layout import SlotLayout
    from lmcache.memory import MemoryExtent

#: Backend name -> module that defines ``ADAPTER``.
ADAPTER_MODULES: dict[str, str] = {
    "numpy": "lmcache.numpy_backend",
    "torch": "lmcache_torch",
    "jax": "lmcache_jax",
}
#: Backend name -> the framework's import name (what must be installed).
FRAMEWORKS: dict[str, str] = {"numpy": "numpy", "torch": "torch", "jax": "jax"}

ENV_VAR = "LMCACHE_BACKEND"


class FrameworkAdapter(Protocol):
    """What a backend provides: arenas, and zero-copy conversions into its framework.

    Adapters are thin: they allocate an arena, make a native view of host or DLPack memory, and copy
    bytes. Everything else (slots, handles, checks) is the core's.
    """

    name: str

    def create_arena(
        self,
        layout: SlotLayout,
        num_slots: int,
        *,
        device: str,
        pin_memory: bool | None,
        memory: np.ndarray | None = None,
    ) -> Arena:
        """Materialize an arena of ``num_slots`` slots on ``device`` (``"cpu"``, ``"gpu"``, ``"cuda:1"``).

        ``memory``: host memory to adopt instead of allocating (a CPU arena only; see
        :func:`lmcache.arena.adopted_memory`), such as a mapping shared between processes.
        """
        ...

    def from_host(self, bits: np.ndarray, spec: DTypeSpec) -> Any:
        """Return a native array of ``spec`` aliasing the host memory of ``bits`` (unsigned ints)."""
        ...

    def from_dlpack(self, producer: Any) -> Any:
        """Import a DLPack producer without a copy."""
        ...

    def check_source(self, array: Any) -> None:
        """Raise :class:`~lmcache.errors.ChunkTypeError` if ``array`` cannot be read as plain memory.

        Called before a pool takes a slot for a copy, so that a copy never fails half-way (torch meta
        and sparse tensors, JAX tracers and deleted arrays).
        """
        ...

    def copy_to_host(self, dst: np.ndarray, src: Any) -> None:
        """Copy one of this framework's arrays (any device) into host bits ``dst`` (unsigned ints of the
        same item size); exact even where ``src`` overlaps ``dst``; return when the bytes are there."""
        ...

    def copy_from_host(self, dst: Any, src: np.ndarray) -> None:
        """Copy host bits ``src`` into one of this framework's (writable) arrays."""
        ...

    def wait(self, array: Any) -> None:
        """Block until pending work that computes ``array`` has finished."""
        ...

    def concat_tokens(self, arrays: list[Any]) -> Any:
        """Concatenate ``(L, 2, n_i, H, D)`` arrays on the token axis into a new array, computed on return."""
        ...

    def to_host(self, array: Any) -> np.ndarray:
        """Return the array's values as numpy: a view of host memory, else a host copy (waits first)."""
        ...

    def memory_extent(self, array: Any) -> MemoryExtent | None:
        """Return the bytes ``array``'s elements occupy, or None where the framework does not say."""
        ...

    def clone(self, array: Any) -> Any:
        """Return an owning copy of ``array`` whose bytes are ready (no pending work)."""
        ...

    def accelerators(self) -> list[str]:
        """Names of the accelerators this framework sees (``["cuda:0"]``), empty on a CPU-only host."""
        ...


#: Top-level module -> framework, for :func:`detect_framework`.
_ROOT_MODULES = {"numpy": "numpy", "torch": "torch", "jax": "jax", "jaxlib": "jax"}
_FRAMEWORK_OF_TYPE: dict[type, str | None] = {}


def detect_framework(obj: object) -> str | None:
    """Name the framework an array, dtype or scalar type belongs to: ``numpy``, ``torch``, ``jax``, or None.

    Looks at the modules along ``type(obj)``'s MRO, so subclasses (``torch.nn.Parameter``, an
    ``ndarray`` subclass, JAX tracers) count as their framework; the answer is cached per type. It never
    imports a framework. ``torch.bfloat16`` is a ``torch.dtype``; ``jax.numpy.bfloat16`` is a scalar type
    whose metaclass lives in a ``jax`` module; strings and ml_dtypes types give None.
    """
    cls = type(obj)
    try:
        return _FRAMEWORK_OF_TYPE[cls]
    except KeyError:
        pass
    found = None
    for klass in cls.__mro__:
        found = _ROOT_MODULES.get((getattr(klass, "__module__", None) or "").partition(".")[0])
        if found is not None:
            break
    _FRAMEWORK_OF_TYPE[cls] = found
    return found


def framework_of(obj: object) -> str:
    """Name the framework of an array: ``numpy``, ``torch``, ``jax`` or ``dlpack`` (any other producer).

    Raises:
        ChunkTypeError: ``obj`` is not an array at all.
    """
    found = detect_framework(obj)
    if found is not None and (found != "numpy" or hasattr(obj, "__array_interface__")):
        return found
    if hasattr(obj, "__dlpack__"):
        return "dlpack"
    from lmcache.errors import ChunkTypeError

    raise ChunkTypeError(
        f"expected an array (numpy, torch, JAX or any object with __dlpack__), got {type(obj).__name__}"
    )


def installed_backends() -> list[str]:
    """Backends whose framework is installed, found without importing it."""
    return [name for name, mod in FRAMEWORKS.items() if importlib.util.find_spec(mod) is not None]


def resolve_backend(backend: str | None, metadata: LMCacheMemPoolMetadata) -> str:
    """Pick a pool's backend: ``backend=``, else ``$LMCACHE_BACKEND``, else ``kv_dtype``'s framework.

    numpy when none of those names one.
    """
    source = "backend="
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        source = f"${ENV_VAR}"
    if backend is None:
        return detect_framework(metadata.kv_dtype) or "numpy"
    if not isinstance(backend, str) or backend.lower() not in ADAPTER_MODULES:
        raise ConfigError(
            f"unknown backend {backend!r} (from {source}); use one of {', '.join(ADAPTER_MODULES)}"
        )
    return backend.lower()


def load_adapter(name: str) -> FrameworkAdapter:
    """Import and return the adapter of backend ``name``.

    Raises:
        BackendUnavailableError: its framework is not installed; the message names the extra.
        ConfigError: ``name`` is not a backend.
    """
    module_name = ADAPTER_MODULES.get(name)
    if module_name is None:
        raise ConfigError(f"unknown backend {name!r}; use one of {', '.join(ADAPTER_MODULES)}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        framework = FRAMEWORKS[name]
        if importlib.util.find_spec(framework) is None:
            raise BackendUnavailableError(
                f"the {name} backend needs {framework}, which is not installed: "
                f"pip install 'lmcache-mempool[{name}]'"
            ) from exc
        raise BackendUnavailableError(
            f"the {name} backend's adapter {module_name!r} failed to import ({exc}); "
            f"reinstall with pip install 'lmcache-mempool[{name}]'"
        ) from exc
    adapter: FrameworkAdapter = module.ADAPTER
    return adapter


__all__ = [
    "ADAPTER_MODULES",
    "ENV_VAR",
    "FrameworkAdapter",
    "detect_framework",
    "framework_of",
    "installed_backends",
    "load_adapter",
    "resolve_backend",
]
