"""Prefetcher: order, lookahead bound, exceptions, shutdown, real overlap; pinning helpers.

Run: ``.venv/bin/pytest -q tests/test_prefetch.py`` (a few seconds, CPU only).
"""

from __future__ import annotations

import gc
import threading
import time
import traceback

import pytest
import torch

from streamprune.storage.prefetch import Prefetcher, pin_if_cuda, stage_on_host, to_device


def test_order_preserved():
    with Prefetcher(lambda k: k * k, range(20)) as p:
        assert list(p) == [k * k for k in range(20)]


def test_empty_keys_and_exhaustion():
    p = Prefetcher(lambda k: k, [])
    assert list(p) == []
    assert list(p) == []  # exhausted stays exhausted
    p.close()


@pytest.mark.parametrize("depth", [1, 3])
def test_lookahead_is_bounded_by_depth(depth):
    """While the consumer holds item i, the worker has started at most items i+1 .. i+depth."""
    started = []
    lock = threading.Lock()

    def fn(k):
        with lock:
            started.append(k)
        return k

    with Prefetcher(fn, range(10), depth=depth) as p:
        for i, item in enumerate(p):
            assert item == i
            time.sleep(0.02)  # give the worker every chance to run ahead
            with lock:
                assert max(started) <= i + depth, (i, started)


def test_exception_propagates_with_original_traceback():
    def failing_read(k):
        if k == 3:
            raise KeyError(f"tensor for layer {k} missing")
        return k

    got = []
    with pytest.raises(KeyError, match="layer 3") as info:
        with Prefetcher(failing_read, range(10)) as p:
            for item in p:
                got.append(item)
    assert got == [0, 1, 2]  # results before the failure are delivered first
    text = "".join(traceback.format_exception(info.value))
    assert "failing_read" in text  # the worker's frame is in the traceback


def test_exception_from_keys_iterable_propagates():
    def keys():
        yield 0
        raise RuntimeError("index broken")

    with Prefetcher(lambda k: k, keys()) as p:
        assert next(p) == 0
        with pytest.raises(RuntimeError, match="index broken"):
            next(p)
        with pytest.raises(StopIteration):
            next(p)


def test_early_close_does_not_hang_and_stops_the_worker():
    calls = []

    def slow(k):
        calls.append(k)
        time.sleep(0.05)
        return k

    t0 = time.perf_counter()
    with Prefetcher(slow, range(1000)) as p:
        for item in p:
            if item == 2:
                break
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0
    assert not p._thread.is_alive()
    assert len(calls) <= 4  # 0, 1, 2 and at most the one in flight
    with pytest.raises(StopIteration):
        next(p)


def test_close_is_idempotent_and_abandoned_prefetcher_is_collected():
    p = Prefetcher(lambda k: k, range(100))
    next(p)
    p.close()
    p.close()
    q = Prefetcher(lambda k: torch.zeros(4), range(100))
    next(q)
    thread = q._thread
    del q
    gc.collect()
    thread.join(timeout=2.0)
    assert not thread.is_alive()  # __del__ told the worker to stop


def test_overlap_actually_happens():
    """fn 0.05 s + consumer 0.05 s per item: serial 1.0 s for 10 items, overlapped ~0.55 s."""

    def read(k):
        time.sleep(0.05)
        return k

    t0 = time.perf_counter()
    with Prefetcher(read, range(10)) as p:
        for _ in p:
            time.sleep(0.05)  # the "compute"
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.8, f"no overlap: {elapsed:.2f} s for 10 items (serial would be 1.0 s)"


def test_invalid_depth():
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(lambda k: k, range(3), depth=0)


def test_pin_if_cuda_is_identity_on_cpu():
    tensors = {"a": torch.ones(3), "b": [torch.zeros(2), torch.arange(4)]}
    out = pin_if_cuda(tensors, "cpu")
    assert out is tensors
    moved = to_device(tensors, "cpu", torch.float64)
    assert moved["a"].dtype == torch.float64 and moved["b"][1].dtype == torch.float64
    assert torch.equal(moved["b"][1], torch.arange(4, dtype=torch.float64))


def test_stage_on_host_makes_private_resident_copies_on_cpu(tmp_path):
    """Memory-mapped safetensors tensors are read by staging, not at first use."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file({"w": torch.randn(8, 8).to(torch.bfloat16), "n": torch.ones(8)}, tmp_path / "s.safetensors")
    with safe_open(tmp_path / "s.safetensors", framework="pt") as f:
        mapped = {k: f.get_tensor(k) for k in f.keys()}
    staged = stage_on_host(mapped, "cpu", torch.float32)
    assert all(t.dtype == torch.float32 for t in staged.values())
    assert torch.equal(staged["w"], mapped["w"].float())
    same = stage_on_host(mapped, "cpu", None)  # dtype kept: still a private copy
    assert same["n"].data_ptr() != mapped["n"].data_ptr() and torch.equal(same["n"], mapped["n"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pin_if_cuda_pins_and_copies_asynchronously():
    tensors = {"w": torch.randn(64, 64), "n": torch.ones(64)}
    pinned = pin_if_cuda(tensors, "cuda")
    assert all(t.is_pinned() for t in pinned.values())
    on_gpu = to_device(pinned, "cuda", torch.bfloat16)
    torch.cuda.synchronize()
    assert on_gpu["w"].device.type == "cuda" and on_gpu["w"].dtype == torch.bfloat16
    assert torch.equal(on_gpu["w"].cpu(), tensors["w"].to(torch.bfloat16))
