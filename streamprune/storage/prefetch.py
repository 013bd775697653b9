"""Overlap I/O with compute: compute ``fn(key)`` for the next keys on a background thread.

The engine reads layer ``l+1`` from the source shards while layer ``l`` computes::

    ahead = Prefetcher(lambda j: stage_on_host(adapter.read_layer(j), device, dtype), range(start, n))
    with ahead:
        for i in range(start, n):
            weights = to_device(next(ahead), device, dtype)   # CUDA: async H2D from pinned memory
            ...

``safe_open(...).get_tensor`` returns tensors backed by the file's memory map: nothing is
read until the bytes are touched. A prefetch function must therefore touch them, which is
what :func:`stage_on_host` does (a pinned copy for CUDA, the compute-dtype copy on CPU);
prefetching bare ``read_layer`` results would move the disk reads back into the forward.

Contract:
  - results come out in the order of ``keys``;
  - at most ``depth`` results are computed or waiting beyond the one the consumer holds
    (``depth=1``: the next layer is read while this one computes: two layers of host
    memory, plus any earlier result the consumer still references);
  - an exception raised by ``fn`` (or by iterating ``keys``) is re-raised in the consumer,
    at the position of the failed key, with the worker's traceback (``fn``'s frames) kept;
  - ``close()`` (also on ``with`` exit, early ``break`` + exit, or garbage collection)
    stops the worker: it finishes the call in flight (at most one ``fn`` call), starts no
    other, and drops the results nobody will take. The worker is a daemon thread and holds
    no reference to the ``Prefetcher``, so an abandoned one never keeps the process alive.

The copies that fault the pages in are torch ops, which release the GIL, so one thread is
enough to hide the read behind the layer's forward passes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch

K = TypeVar("K")
R = TypeVar("R")

_OK, _ERR, _END = "ok", "err", "end"


def _worker(fn: Callable, keys: Iterable, results: queue.Queue, slots: threading.Semaphore, stop: threading.Event) -> None:
    """Thread body (a function, not a method: it must not keep the Prefetcher alive)."""
    try:
        for key in keys:
            slots.acquire()  # wait until the consumer has taken enough results
            if stop.is_set():
                return
            results.put((_OK, fn(key)))
            if stop.is_set():
                return
    except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
        results.put((_ERR, e))
        return
    results.put((_END, None))


class Prefetcher(Iterator[R]):
    """Iterate ``fn(key) for key in keys``, computed ``depth`` steps ahead on a daemon thread."""

    def __init__(self, fn: Callable[[K], R], keys: Iterable[K], depth: int = 1, name: str = "streamprune-prefetch"):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"Prefetcher depth must be an int >= 1, got {depth!r}")
        self._results: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=_worker, args=(fn, keys, self._results, self._slots, self._stop), name=name, daemon=True)
        self._thread.start()

    def __iter__(self) -> "Prefetcher[R]":
        return self

    def __next__(self) -> R:
        if self._done:
            raise StopIteration
        kind, value = self._results.get()
        if kind == _OK:
            self._slots.release()  # the worker may start the next key while we use this one
            return value
        self._done = True
        self._thread.join()
        if kind == _ERR:
            raise value  # carries the worker's traceback (fn's frames) + this frame
        raise StopIteration

    def close(self, timeout: float | None = None) -> None:
        """Stop the worker and drop pending results; waits for the ``fn`` call in flight."""
        if self._stop.is_set():
            return
        self._done = True
        self._stop.set()
        self._slots.release()  # wake a worker blocked on a slot: it sees ``stop`` and exits
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        while True:  # drop references to results no one will take (host memory)
            try:
                self._results.get_nowait()
            except queue.Empty:
                break

    def __enter__(self) -> "Prefetcher[R]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # Abandoned without close(): signal the worker, never block the garbage collector.
        stop = getattr(self, "_stop", None)
        if stop is not None and not stop.is_set():
            stop.set()
            self._slots.release()


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor of a tensor, dict, list or tuple (structure kept)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def pin_if_cuda(tensors: Any, device: torch.device | str) -> Any:
    """Page-locked copies of the CPU tensors in ``tensors`` when ``device`` is CUDA; else unchanged.

    Pinned memory makes the host-to-device copy an asynchronous DMA (``non_blocking=True``)
    and faster; on a CPU run it would only cost a copy, so the input is returned as is (the
    same objects). Call it on the prefetch thread, so the pinning copy overlaps compute too.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return tensors
    return _map_tensors(tensors, lambda t: t if t.device.type != "cpu" or t.is_pinned() else t.pin_memory())


def stage_on_host(tensors: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Host tensors whose bytes are resident, ready for ``to_device`` (run it on the prefetch thread).

    CUDA: pinned copies in the stored dtype (the cast happens on the GPU, after the copy:
    bf16 checkpoints move half the bytes of fp32). CPU: private copies in ``dtype`` (a
    cast, or a clone when the dtype already matches), so memory-mapped checkpoint tensors
    are read here and not at their first use in the forward.
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return pin_if_cuda(tensors, device)

    def resident(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.dtype != dtype:
            return t.to(dtype)
        return t.clone(memory_format=torch.contiguous_format)

    return _map_tensors(tensors, resident)


def to_device(tensors: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Move ``tensors`` (tensor / dict / list / tuple) to ``device`` (and ``dtype``).

    On CUDA the copies are ``non_blocking`` (asynchronous from pinned memory; the caching
    host allocator keeps the pinned buffer alive until its copy is done, and kernels on the
    current stream are ordered after it). On CPU they are plain copies / no-ops.
    """
    device = torch.device(device)
    non_blocking = device.type == "cuda"
    return _map_tensors(tensors, lambda t: t.to(device=device, dtype=dtype, non_blocking=non_blocking))
