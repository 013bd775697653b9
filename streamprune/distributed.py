"""Data parallelism over calibration samples: the same prune (or eval) under ``torchrun``.

``torchrun --nproc-per-node N -m streamprune prune ...`` (or :func:`streamprune.prune`
inside an initialised process group) splits the work like this:

- each rank owns a contiguous, balanced shard of the calibration (or evaluation)
  windows, :meth:`Ranks.shard`, and its own activation cache (``acts/rank{r}``);
- after every observe pass (survey, pass A, pass B) each observer's accumulated sums are
  all-reduced (SUM) in place, one collective per tensor in a fixed order (the observer's
  ``summed`` fields sorted by name, dict keys sorted): :meth:`Ranks.reduce_observer`;
- every rank then computes the decision itself from the identical sums (an all-reduce
  leaves the same bits on every rank, for gloo and NCCL alike), so methods that keep
  state between ``decide`` and pass B work unchanged; :meth:`Ranks.agree_decision`
  checks that the ranks' final tensors are bitwise equal (a checksum, one collective) and
  falls back to rank 0's tensors (broadcast) should a nondeterministic kernel disagree;
- every rank propagates its own shard through the pruned layer; rank 0 alone writes the
  layer, the journal, the profile and the output, between two barriers (all boundaries
  ``i+1`` durable before layer ``i`` is committed; the commit durable before any rank drops
  boundary ``i``), so a kill of any rank at any point resumes cleanly.

Observers declare what they sum: a class attribute ``summed`` naming the attributes that
are sums over tokens (tensors, ints, floats, dicts of them, or nested objects that
declare ``summed`` themselves, like :class:`streamprune.kernels.Moments`). Everything
else (weights an observer keeps, indices, dims) is left alone. A method that needs its
own collective (e.g. a gradient all-reduce) calls :func:`reduce_`, a no-op in one process.

With one process every function here is a no-op, so single-process runs (their
fingerprints and output bytes) are what they were. No state of our own is kept at
module level: the process group is ``torch.distributed``'s (joined through
``accelerate.PartialState`` under torchrun).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError, StreamPruneError

_CHECKSUM_BLOCK = 1 << 22  # elements viewed as integers at a time (bounds the int64 temporary)


class PeerFailed(StreamPruneError):
    """A collective failed because another rank stopped; that rank printed the reason."""

    quiet = True  # the CLI does not print it: the failing rank already did


class RankDisagreement(StreamPruneError):
    """The ranks hold differently shaped statistics or decisions (a bug, not a user error)."""


class FollowerError(StreamPruneError):
    """Rank 0's error, raised on the other ranks too so that every rank stops (printed once)."""

    quiet = True


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job. ``Ranks()`` is the single-process job."""

    rank: int = 0
    world_size: int = 1
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ---- work split -----------------------------------------------------------------------
    def shard(self, n: int, what: str = "calibration windows", flag: str = "--nsamples") -> slice:
        """Rows ``[r·n/W, (r+1)·n/W)`` of ``n``: contiguous, sizes differ by at most one."""
        if n < self.world_size:
            raise ConfigError(
                f"{n} {what} cannot be split across {self.world_size} ranks; raise {flag} to at least "
                f"{self.world_size} or lower --nproc-per-node"
            )
        return slice(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def acts_dir(self, root: Path) -> Path:
        """This rank's activation cache: ``root`` itself in one process, ``root/rank{r}`` otherwise."""
        return Path(root) / f"rank{self.rank}" if self.distributed else Path(root)

    def finished(self, acts_root: Path, keep: bool) -> None:
        """End of a run: wait for every rank, then rank 0 removes the emptied per-rank cache root."""
        if not self.distributed:
            return
        self.barrier()
        if self.is_main and not keep:
            with suppress(OSError):
                Path(acts_root).rmdir()

    # ---- collectives ------------------------------------------------------------------------
    def reduce_(self, tensors: Iterable[Tensor], op=None) -> None:
        """All-reduce ``tensors`` in place (SUM unless ``op``), one collective each, in the given order."""
        if not self.distributed:
            return
        op = dist.ReduceOp.SUM if op is None else op
        for t in tensors:
            if t.device == self.comm_device and t.is_contiguous():
                _collective(dist.all_reduce, t, op=op)
            else:  # e.g. gloo with CUDA statistics: reduce a copy on the communication device
                buf = t.detach().to(self.comm_device).contiguous()
                _collective(dist.all_reduce, buf, op=op)
                t.copy_(buf)

    def sum_floats(self, *values: float) -> list[float]:
        """Σ over ranks of each value, in float64 (token counts stay exact up to 2⁵³)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        self.reduce_([t])
        return t.tolist()

    def max_int(self, value: int) -> int:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.comm_device)
        self.reduce_([t], op=dist.ReduceOp.MAX)
        return int(t.item())

    def all_true(self, ok: bool) -> bool:
        return self.max_int(0 if ok else 1) == 0

    def same_everywhere(self, digest: bytes) -> bool:
        """Whether every rank passed the same digest (one MAX all-reduce of (x, -x))."""
        if not self.distributed:
            return True
        x = int.from_bytes(digest[:8], "little") >> 2  # 62 bits: -x never overflows int64
        t = torch.tensor([x, -x], dtype=torch.int64, device=self.comm_device)
        self.reduce_([t], op=dist.ReduceOp.MAX)
        return int(t[0]) == -int(t[1])

    def barrier(self) -> None:
        if self.distributed:
            self.max_int(0)  # an all-reduce: works on every backend, errors like the others

    def broadcast_(self, tensors: Iterable[Tensor]) -> None:
        if not self.distributed:
            return
        for t in tensors:
            buf = t if t.device == self.comm_device and t.is_contiguous() else t.detach().to(self.comm_device).contiguous()
            _collective(dist.broadcast, buf, src=0)
            if buf is not t:
                t.copy_(buf)

    def on_main(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on rank 0 only (e.g. writing the manifest); its error stops every rank.

        Returns ``fn()``'s result on rank 0 and None elsewhere, after every rank knows that
        it succeeded."""
        if not self.distributed:
            return fn()
        result, err = None, None
        if self.is_main:
            try:
                result = fn()
            except StreamPruneError as e:
                err = e
        raw = b"" if err is None else str(err).encode()
        size = self.max_int(0 if err is None else len(raw) + 1)  # 0: success; else 1 + message bytes
        if size:
            data = torch.zeros(size, dtype=torch.uint8, device=self.comm_device)
            if self.is_main and raw:
                data[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(self.comm_device)
            self.broadcast_([data])
            if self.is_main:
                raise err
            raise FollowerError(bytes(data[: size - 1].cpu().tolist()).decode())
        return result

    # ---- observers and decisions ----------------------------------------------------------------
    def reduce_observer(self, observer) -> None:
        """Sum ``observer``'s accumulated statistics over the ranks, in place (see the module doc)."""
        if observer is None or not self.distributed:
            return
        leaves = summed_leaves(observer, type(observer).__name__)
        shape = [(path, _describe(v)) for path, _, _, v in leaves]
        if not self.same_everywhere(_digest(shape)):
            raise RankDisagreement(
                f"the ranks hold differently shaped {type(observer).__name__} statistics ({shape} here); "
                "every rank needs at least one calibration chunk: raise --nsamples"
            )
        self.reduce_(v for _, _, _, v in leaves if isinstance(v, Tensor))
        scalars = [(owner, key, v) for _, owner, key, v in leaves if isinstance(v, (int, float))]
        if scalars:
            sums = self.sum_floats(*(float(v) for _, _, v in scalars))
            for (owner, key, v), s in zip(scalars, sums):
                _set(owner, key, int(round(s)) if isinstance(v, int) else s)

    def agree_decision(self, layer_idx: int, decision) -> bool:
        """Check that every rank holds bitwise the same pruned layer; if not, adopt rank 0's.

        Returns True when rank 0's tensors had to be broadcast."""
        if not self.distributed:
            return False
        names = sorted(decision.tensors)
        structure = [json.dumps(decision.spec.to_dict(), sort_keys=True)] + [
            (n, tuple(decision.tensors[n].shape), str(decision.tensors[n].dtype)) for n in names
        ]
        if not self.same_everywhere(_digest(structure)):
            raise RankDisagreement(
                f"layer {layer_idx}: the ranks computed different layer specs from the same statistics; "
                "run it in one process (without torchrun) and report this"
            )
        if self.same_everywhere(_digest([tensor_checksum(decision.tensors[n]) for n in names])):
            return False
        decision.tensors = {n: decision.tensors[n].contiguous() for n in names}
        self.broadcast_(decision.tensors[n] for n in names)
        return True


def _collective(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except RuntimeError as e:  # DistBackendError / gloo "Connection closed by peer" and the like
        raise PeerFailed(
            f"another rank of this job stopped ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "see its message, then run the same command again to resume"
        ) from e


def _digest(obj) -> bytes:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).digest()


def _describe(v) -> str:
    if isinstance(v, Tensor):
        return f"{v.dtype}{tuple(v.shape)}"
    return type(v).__name__


def _set(owner, key, value) -> None:
    if isinstance(owner, dict):
        owner[key] = value
    else:
        setattr(owner, key, value)


def summed_leaves(obj, path: str) -> list[tuple[str, object, str, object]]:
    """(path, owner, key, value) of every summed value of ``obj``, in the fixed reduction order."""
    fields = getattr(type(obj), "summed", None)
    if fields is None:
        raise TypeError(
            f"{path}: {type(obj).__name__} does not declare its summed statistics (a class attribute "
            "`summed`), so it cannot be reduced across ranks"
        )
    out: list = []
    for name in sorted(fields):
        out += _walk(f"{path}.{name}", obj, name, getattr(obj, name))
    return out


def _walk(path: str, owner, key, value) -> list:
    if value is None or isinstance(value, Tensor):
        return [(path, owner, key, value)]
    if isinstance(value, bool):
        raise TypeError(f"{path}: a bool is not a sum")
    if isinstance(value, (int, float)):
        return [(path, owner, key, value)]
    if isinstance(value, dict):
        return [leaf for k in sorted(value) for leaf in _walk(f"{path}[{k}]", value, k, value[k])]
    return summed_leaves(value, path)


def tensor_checksum(t: Tensor) -> list[int]:
    """Exact integer sums of ``t``'s bit patterns, one per block of elements (order-sensitive
    across blocks): equal lists mean equal tensors up to a permutation within a block."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return []
    size = flat.element_size()
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    ints = flat.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int32}[size])
    return [int(ints[i:i + _CHECKSUM_BLOCK].to(torch.int64).sum()) for i in range(0, ints.numel(), _CHECKSUM_BLOCK)]


def current() -> Ranks:
    """The ranks of the initialised default process group, or the single-process job."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    backend = dist.get_backend()
    comm = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(backend) else torch.device("cpu")
    return Ranks(dist.get_rank(), dist.get_world_size(), comm)


def reduce_(tensors: Iterable[Tensor], op=None) -> None:
    """For methods: all-reduce ``tensors`` in place (SUM) over the job's ranks; no-op in one process."""
    current().reduce_(tensors, op)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def joined(device: str) -> Iterator[tuple[Ranks, str]]:
    """This process's ranks and the device it computes on.

    Inside an initialised process group: that group, ``device`` as given. Started by
    torchrun (``WORLD_SIZE`` > 1) without one: the group is joined through
    ``accelerate.PartialState`` (gloo for ``--device cpu``, NCCL for CUDA) and a bare
    ``cuda`` becomes ``cuda:LOCAL_RANK``. Otherwise the single-process job."""
    if (dist.is_available() and dist.is_initialized()) or not launched_by_torchrun():
        yield current(), device
        return
    from accelerate import PartialState

    cpu = not device.startswith("cuda")
    if not cpu and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} requested but CUDA is not available (torch {torch.__version__}); use --device cpu")
    # Rank 0 alone verifies committed layers on resume and writes the output while the others
    # wait: allow an hour (NCCL's default is 10 minutes). A dead rank is torchrun's to reap.
    state = PartialState(cpu=cpu, timeout=timedelta(hours=1))
    if device == "cuda":
        device = str(state.device)  # cuda:LOCAL_RANK, already made current by PartialState
    yield current(), device


def leave() -> None:
    """Destroy the default process group if there is one (the CLI calls this before exiting)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class SharedStop:
    """A stop flag the ranks agree on: SIGINT/SIGTERM seen by any rank stops every rank at
    the same safe point (one MAX all-reduce per check)."""

    def __init__(self, flag, ranks: Ranks):
        self.flag, self.ranks = flag, ranks

    def check(self, where: str) -> None:
        signum = self.ranks.max_int(self.flag.signum or 0)
        if signum and self.flag.signum is None:
            self.flag.signum = signum
        self.flag.check(where)
