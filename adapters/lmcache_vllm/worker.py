"""vLLM's worker-side ``OffloadingWorker`` over the pool's slots: device KV blocks <-> host chunks.

The host side is the pool's arena (:class:`~lmcache_vllm.host_region.HostRegion`): slot ``c`` holds
offload chunk ``c``, and inside a slot each worker (tensor-parallel rank) owns
``blocks_per_chunk * worker_kv_bytes_per_block`` bytes at ``rank`` times that offset, in which its KV
tensors follow one another, each ``blocks_per_chunk`` pages of that tensor's page size: the layout of
vLLM's own shared CPU region (``SharedOffloadRegion.create_next_worker_view``), so a chunk is one
contiguous slot of the cache. Per tensor the worker sees the host side as vLLM's CPU worker does, a
``(num_slots, blocks_per_chunk * page_size)`` int8 tensor (rows strided by the slot size).

What moves is what vLLM's ``SingleDirectionOffloadingHandler`` moves: for each KV cache group, its
blocks (``GPULoadStoreSpec.group_sizes``) against consecutive chunks, the first chunk entered
``block_indices[g] % blocks_per_chunk`` pages in, ``page_size_bytes`` of each layer reference per block.

* Device tensors on CPU (vLLM's CPU platform; tests): :class:`HostCopyHandler`, one thread per
  direction (and one for expedited loads) running the gathers and scatters in submission order; torch
  releases the GIL while it copies, so the engine's thread is not held.
* Device tensors on CUDA (or XPU): vLLM's own ``SingleDirectionOffloadingHandler`` (its streams, events
  and batched copy kernel) over the arena's views, the arena page-locked with vLLM's ``host_register``.
  Imported only then: this module imports without CUDA.

The worker never decides what a slot holds: the manager (scheduler side) reserved a store's slots (not
visible until ``complete_store``, which vLLM calls after this worker reported the job finished) and
pinned a load's slots (until ``complete_load``); the worker copies into and out of exactly the slots the
spec names.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    CanonicalKVCacheRef,
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)

from lmcache.errors import CacheInvariantError, ConfigError

logger = logging.getLogger(__name__)


class TransferHandler(Protocol):
    """One direction of transfers, as vLLM's ``SingleDirectionOffloadingHandler`` offers it."""

    def transfer_async(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: LoadStoreSpec) -> bool: ...

    def get_finished(self) -> list[TransferResult]: ...

    def wait(self, job_ids: set[int]) -> None: ...

    def shutdown(self) -> None: ...


@dataclass
class HostTransfer:
    """One submitted job of a :class:`HostCopyHandler`: its copies, then its outcome.

    ``copies`` is filled at submission and read by the handler's thread only; ``done`` is set by that
    thread when the job ran (``success``, ``transfer_time`` and ``error`` are final from then on).
    """

    job_id: int
    copies: list[Callable[[], None]]
    num_bytes: int
    done: threading.Event = field(default_factory=threading.Event)
    success: bool = False
    transfer_time: float = 0.0
    error: BaseException | None = None


def _group_ops(
    device_spec: GPULoadStoreSpec,
    host_chunks: np.ndarray,
    blocks_per_chunk: int,
    num_groups: int,
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Match each group's device blocks with host sub-blocks (``chunk * blocks_per_chunk + page``).

    Returns:
        ``(group index, device block ids, host sub-block ids)`` for each non-empty group.

    Raises:
        CacheInvariantError: the specs do not describe the same blocks (vLLM asserts the same).
    """
    group_sizes, block_indices = device_spec.group_sizes, device_spec.block_indices
    if len(group_sizes) != num_groups or len(block_indices) != num_groups:
        raise CacheInvariantError(
            f"the device spec has {len(group_sizes)} group sizes and {len(block_indices)} block indices for "
            f"{num_groups} KV cache groups"
        )
    device_blocks = device_spec.block_ids.astype(np.int64)
    host_chunks = host_chunks.astype(np.int64)
    ops = []
    device_offset = host_offset = 0
    for group, (size, first) in enumerate(zip(group_sizes, block_indices, strict=True)):
        if size == 0:
            continue
        skip = first % blocks_per_chunk
        num_chunks = -(-(size + skip) // blocks_per_chunk)
        chunks = host_chunks[host_offset : host_offset + num_chunks]
        blocks = device_blocks[device_offset : device_offset + size]
        if len(chunks) != num_chunks or len(blocks) != size:
            raise CacheInvariantError(
                f"group {group} needs {size} device blocks and {num_chunks} host chunks; the specs hold "
                f"{len(device_blocks)} blocks and {len(host_chunks)} chunks in all"
            )
        sub = (chunks[:, None] * blocks_per_chunk + np.arange(blocks_per_chunk)).ravel()[skip : skip + size]
        ops.append((group, blocks, sub))
        device_offset += size
        host_offset += num_chunks
    if device_offset != len(device_blocks) or host_offset != len(host_chunks):
        raise CacheInvariantError(
            f"the specs hold {len(device_blocks)} device blocks and {len(host_chunks)} host chunks, the "
            f"groups use {device_offset} and {host_offset}"
        )
    return ops


class HostCopyHandler:
    """Transfers in one direction between CPU device tensors and the arena, on one thread, in order.

    Mirrors vLLM's ``SingleDirectionOffloadingHandler`` (same arguments, same ``src_tensors`` /
    ``dst_tensors`` / ``layer_refs_per_group`` / ``_transfers``, same results) for device tensors that
    live in host memory, where there is no stream to run a copy on: a thread is the stream. A job stays
    in ``_transfers`` from submission until :meth:`get_finished` reports it.

    Args:
        device_tensors: per KV tensor, ``(num_blocks, page_size)`` int8 on the CPU.
        host_tensors: per KV tensor, ``(num_slots, blocks_per_chunk * page_size)`` int8 views of the arena.
        blocks_per_chunk: device blocks per host chunk.
        layer_refs_per_group: per KV cache group, its layers' tensor index and un-padded page size.
        to_host: True for stores (device -> host), False for loads.
    """

    def __init__(
        self,
        device_tensors: list[torch.Tensor],
        host_tensors: list[torch.Tensor],
        blocks_per_chunk: int,
        layer_refs_per_group: list[list[CanonicalKVCacheRef]],
        to_host: bool,
    ) -> None:
        self.src_tensors = device_tensors if to_host else host_tensors
        self.dst_tensors = host_tensors if to_host else device_tensors
        self.layer_refs_per_group = layer_refs_per_group
        self.gpu_to_cpu = to_host
        self._blocks_per_chunk = blocks_per_chunk
        self._num_blocks = [int(tensor.shape[0]) for tensor in device_tensors]
        self._num_slots = int(host_tensors[0].shape[0])
        # per tensor, per page of a chunk: that page of every slot, a (num_slots, page_size) view with
        # one row stride (the slot's), so one index_copy / index_select moves a job's pages
        self._host_pages = [
            [
                host.as_strided(
                    (host.shape[0], host.shape[1] // blocks_per_chunk),
                    (host.stride(0), 1),
                    host.storage_offset() + page * (host.shape[1] // blocks_per_chunk),
                )
                for page in range(blocks_per_chunk)
            ]
            for host in host_tensors
        ]
        self._device = device_tensors
        #: Submitted jobs, oldest first, until get_finished reports them. The engine's thread only.
        self._transfers: deque[HostTransfer] = deque()
        self._jobs: queue.SimpleQueue[HostTransfer | None] = queue.SimpleQueue()
        direction = "store" if to_host else "load"
        self._thread = threading.Thread(target=self._run, name=f"lmcache-vllm-{direction}", daemon=True)
        self._thread.start()

    def transfer_async(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: LoadStoreSpec) -> bool:
        """Queue the copies of job ``job_id`` and return True; they run after the jobs before it.

        Raises:
            CacheInvariantError: a spec is not of vLLM's block-id kind, names a block or chunk out of
                range, or the specs disagree; nothing is queued.
        """
        device_spec, host_spec = (src_spec, dst_spec) if self.gpu_to_cpu else (dst_spec, src_spec)
        if not isinstance(device_spec, GPULoadStoreSpec) or not isinstance(host_spec, BlockIDsLoadStoreSpec):
            raise CacheInvariantError(
                f"job {job_id}: expected a GPULoadStoreSpec and a CPU chunk spec, got "
                f"{type(device_spec).__name__} and {type(host_spec).__name__}"
            )
        host_chunks = host_spec.block_ids
        if len(host_chunks) and (host_chunks.min() < 0 or host_chunks.max() >= self._num_slots):
            raise CacheInvariantError(
                f"job {job_id}: host chunks {host_chunks} not all in [0, {self._num_slots})"
            )
        copies: list[Callable[[], None]] = []
        num_bytes = 0
        for group, blocks, sub in _group_ops(
            device_spec, host_chunks, self._blocks_per_chunk, len(self.layer_refs_per_group)
        ):
            pages = sub % self._blocks_per_chunk
            by_page = [
                (
                    page,
                    torch.from_numpy(blocks[pages == page]),
                    torch.from_numpy(sub[pages == page] // self._blocks_per_chunk),
                )
                for page in range(self._blocks_per_chunk)
                if (pages == page).any()
            ]
            lowest, highest = int(blocks.min()), int(blocks.max())
            for ref in self.layer_refs_per_group[group]:
                t = ref.tensor_idx
                if lowest < 0 or highest >= self._num_blocks[t]:
                    raise CacheInvariantError(
                        f"job {job_id}: device blocks {blocks} not all in [0, {self._num_blocks[t]})"
                    )
                for page, block_index, slots in by_page:
                    copies.append(self._copy(t, page, block_index, slots, ref.page_size_bytes))
                num_bytes += len(blocks) * ref.page_size_bytes
        transfer = HostTransfer(job_id, copies, num_bytes)
        self._transfers.append(transfer)
        self._jobs.put(transfer)
        return True

    def _copy(
        self, t: int, page: int, blocks: torch.Tensor, slots: torch.Tensor, nbytes: int
    ) -> Callable[[], None]:
        """The copy of ``nbytes`` of tensor ``t``'s ``blocks`` to or from page ``page`` of ``slots``."""
        device, host = _widest(self._device[t][:, :nbytes], self._host_pages[t][page][:, :nbytes])
        if self.gpu_to_cpu:

            def store() -> None:
                host.index_copy_(0, slots, device.index_select(0, blocks))

            return store

        def load() -> None:
            device.index_copy_(0, blocks, host.index_select(0, slots))

        return load

    def _run(self) -> None:
        # vLLM makes its KV tensors under inference mode, which is per thread: without it here an
        # in-place copy into such a tensor is refused. Copies need no autograd either way.
        with torch.inference_mode():
            while (transfer := self._jobs.get()) is not None:
                start = time.perf_counter()
                try:
                    for copy in transfer.copies:
                        copy()
                    transfer.success = True
                except BaseException as exc:  # reported as a failed job, never lost with the thread
                    logger.exception("KV transfer job %d failed", transfer.job_id)
                    transfer.error = exc
                transfer.transfer_time = max(time.perf_counter() - start, 1e-9)
                transfer.copies = []
                transfer.done.set()

    def get_finished(self) -> list[TransferResult]:
        """Report the jobs that ran, in submission order (a job waits for the ones before it)."""
        results = []
        while self._transfers and self._transfers[0].done.is_set():
            transfer = self._transfers.popleft()
            results.append(
                TransferResult(
                    job_id=transfer.job_id,
                    success=transfer.success,
                    transfer_size=transfer.num_bytes,
                    transfer_time=transfer.transfer_time,
                )
            )
        return results

    def wait(self, job_ids: set[int]) -> None:
        """Block until the jobs of ``job_ids`` that this handler runs have run."""
        for transfer in list(self._transfers):
            if transfer.job_id in job_ids:
                transfer.done.wait()

    def shutdown(self) -> None:
        """Run the queued jobs, stop the thread and drop the tensors. Calling it again does nothing."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._transfers.clear()
        self.src_tensors = []
        self.dst_tensors = []
        self._device = []
        self._host_pages = []


def _widest(device: torch.Tensor, host: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both byte views as the widest integers their offsets, strides and row length allow.

    torch's indexed copies move one element at a time: 8-byte words copy a page about 5x faster than
    bytes (measured: 64 KiB pages, 10 ms instead of 50 ms for 64 MiB). ``Tensor.view(dtype)`` refuses a
    view whose offset or strides the width does not divide; then the next narrower width is tried.
    """
    for dtype in (torch.int64, torch.int32, torch.int16):
        try:
            return device.view(dtype), host.view(dtype)
        except RuntimeError:
            continue
    return device, host


def device_page_tensor(tensor: torch.Tensor, page_size_bytes: int) -> torch.Tensor:
    """``tensor`` as vLLM's workers address it: ``(num_blocks, page_size_bytes)`` int8 (as it comes
    from vLLM's connector, or reinterpreted as vLLM's CPU worker does)."""
    if tensor.dtype == torch.int8 and tensor.ndim == 2 and tensor.shape[1] == page_size_bytes:
        return tensor
    return tensor.view(torch.int8).view(-1, page_size_bytes)


class LmcacheOffloadingWorker(OffloadingWorker):
    """vLLM's ``OffloadingWorker`` copying KV blocks into and out of the pool's slots.

    Args:
        kv_caches: vLLM's canonical KV caches of this worker.
        arena: the pool's whole arena (``uint8``, ``num_slots * slot_bytes`` bytes), shared with the
            scheduler's manager.
        num_slots: slots in the arena (the pool's ``max_chunk_num``).
        slot_bytes: bytes between two slots (the pool's ``size_per_chunk``).
        worker_offset: where this worker's bytes start in each slot.
        worker_bytes: bytes of each slot this worker owns (its tensors must fit).
        blocks_per_chunk: device blocks per offload chunk.
        on_shutdown: called once by :meth:`shutdown`, after the copies stopped (releases the arena).

    Raises:
        ConfigError: no KV tensor, a page size that is not positive, a layer reference to no tensor or
            to more bytes than its tensor's page, or tensors that do not fit in the worker's part of a slot.
    """

    def __init__(
        self,
        kv_caches: CanonicalKVCaches,
        arena: np.ndarray,
        *,
        num_slots: int,
        slot_bytes: int,
        worker_offset: int,
        worker_bytes: int,
        blocks_per_chunk: int,
        on_shutdown: Callable[[], None] | None = None,
    ) -> None:
        if not kv_caches.tensors:
            raise ConfigError("vLLM registered no KV cache tensor with the offloading worker")
        pages = [kv_tensor.page_size_bytes for kv_tensor in kv_caches.tensors]
        if min(pages) <= 0:
            raise ConfigError(f"KV tensor page sizes must be positive, got {pages}")
        needed = sum(pages) * blocks_per_chunk
        if needed > worker_bytes:
            raise ConfigError(
                f"this worker's KV tensors need {needed} bytes per chunk ({blocks_per_chunk} blocks of pages "
                f"{pages}) but worker_kv_bytes_per_block gives {worker_bytes}: the spec and the registered "
                "KV caches disagree"
            )
        for group, refs in enumerate(kv_caches.group_data_refs):
            for ref in refs:
                if (
                    not 0 <= ref.tensor_idx < len(pages)
                    or not 0 < ref.page_size_bytes <= pages[ref.tensor_idx]
                ):
                    raise ConfigError(
                        f"KV cache group {group} refers to tensor {ref.tensor_idx} with a page of "
                        f"{ref.page_size_bytes} bytes; the tensors' pages are {pages}"
                    )
        self._on_shutdown = on_shutdown
        host = torch.from_numpy(arena).view(torch.int8)
        device_tensors: list[torch.Tensor] = []
        host_tensors: list[torch.Tensor] = []
        offset = worker_offset
        for kv_tensor, page in zip(kv_caches.tensors, pages, strict=True):
            device_tensors.append(device_page_tensor(kv_tensor.tensor, page))
            host_tensors.append(
                host.as_strided((num_slots, page * blocks_per_chunk), (slot_bytes, 1), offset)
            )
            offset += page * blocks_per_chunk
        #: The arena's views, one per KV tensor (vLLM's ``cpu_tensors``).
        self.host_tensors = host_tensors
        self._pinned: list[int] = []
        on_device = {tensor.device.type for tensor in device_tensors}
        if on_device == {"cpu"}:
            make: Callable[..., TransferHandler] = HostCopyHandler
            self.uses_streams = False
        else:
            make = self._stream_handler_factory(arena)
            self.uses_streams = True
        refs = kv_caches.group_data_refs
        self._store_handler = make(device_tensors, host_tensors, blocks_per_chunk, refs, True)
        self._load_handler = make(device_tensors, host_tensors, blocks_per_chunk, refs, False)
        # its own thread (stream), so an expedited load does not queue behind regular loads
        self._expedited_load_handler = make(device_tensors, host_tensors, blocks_per_chunk, refs, False)
        self._handlers: Sequence[TransferHandler] = (
            self._store_handler,
            self._load_handler,
            self._expedited_load_handler,
        )

    def _stream_handler_factory(self, arena: np.ndarray) -> Callable[..., TransferHandler]:
        """vLLM's CUDA/XPU handler over the arena, page-locked first (pageable if that fails)."""
        from vllm.v1.kv_offload.cpu.gpu_worker import SingleDirectionOffloadingHandler
        from vllm.v1.kv_offload.cpu.host_register import host_register

        address = int(arena.ctypes.data)
        pinned = host_register(address, int(arena.nbytes))
        if pinned:
            self._pinned.append(address)

        def make(
            device_tensors: list[torch.Tensor],
            host_tensors: list[torch.Tensor],
            blocks_per_chunk: int,
            refs: list[list[CanonicalKVCacheRef]],
            to_host: bool,
        ) -> TransferHandler:
            handler: Any = SingleDirectionOffloadingHandler(
                gpu_tensors=device_tensors,
                cpu_tensors=host_tensors,
                blocks_per_chunk=blocks_per_chunk,
                layer_refs_per_group=refs,
                gpu_to_cpu=to_host,
                host_memory_is_pinned=pinned,
            )
            return handler  # type: ignore[no-any-return]

        return make

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec) -> bool:
        """Start copying ``src_spec``'s device blocks into ``dst_spec``'s slots (reserved by the manager)."""
        return self._store_handler.transfer_async(job_id, src_spec, dst_spec)

    def submit_load(
        self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec, expedited: bool = False
    ) -> bool:
        """Start copying ``src_spec``'s slots (leased by the manager) into ``dst_spec``'s device blocks."""
        handler = self._expedited_load_handler if expedited else self._load_handler
        return handler.transfer_async(job_id, src_spec, dst_spec)

    def get_finished(self) -> list[TransferResult]:
        """The jobs finished since the last call (each direction in submission order)."""
        return [result for handler in self._handlers for result in handler.get_finished()]

    def wait(self, job_ids: set[int]) -> None:
        """Block until every job of ``job_ids`` finished."""
        for handler in self._handlers:
            handler.wait(job_ids)

    def shutdown(self) -> None:
        """Finish the jobs in flight, stop the handlers, unpin and release the arena. Idempotent."""
        errors = []
        for handler in self._handlers:
            try:
                handler.shutdown()
            except Exception as exc:  # the others must still stop; the first failure is raised
                logger.exception("failed to shut down a KV transfer handler")
                errors.append(exc)
        self._handlers = ()
        self.host_tensors = []
        if self._pinned:
            from vllm.v1.kv_offload.cpu.host_register import host_unregister

            for address in self._pinned:
                host_unregister(address)
            self._pinned = []
        if self._on_shutdown is not None:
            on_shutdown, self._on_shutdown = self._on_shutdown, None
            on_shutdown()
        if errors:
            raise errors[0]


__all__ = [
    "HostCopyHandler",
    "HostTransfer",
    "LmcacheOffloadingWorker",
    "TransferHandler",
    "device_page_tensor",
]
