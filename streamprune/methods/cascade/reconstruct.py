"""Block-wise reconstruction by gradient: fit a pruned layer's kept weights to the dense layer.

Per layer, on the calibration hidden states ``X`` that enter it (the *pruned* stream), every
floating-point parameter of the pruned layer (Q/K factors, V/O, gate/up/down, norms, biases,
bypass) is optimised with Adam to minimise

    mean over tokens of ‖(P(X) − D(X)) / rms(D(X))‖²

where ``D`` is the dense source layer and ``rms`` the per-token root mean square of the dense
output: the error as the next RMSNorm sees it, so high-magnitude residual channels and
high-norm tokens do not dominate (``loss="mse"`` is the plain squared error). It is the
non-linear version of a least-squares refit: gate and up move too.

Guards: the last ``val_rows`` sequences are held out; their loss is measured before the first
step and after every epoch, and the weights with the lowest held-out loss are returned (the
method's own decision if no epoch beats it), so reconstruction never makes a layer worse on
unseen calibration text. With ``min_gain`` > 0, a layer stops after the first epoch that
lowers its held-out loss by less than ``min_gain`` × its starting loss (layers that barely
move stop early; the ones still improving use every epoch).

Precision (``precision``): the weights, Adam's state, the loss and every held-out measurement
are float32; the training steps' forward and backward run under ``torch.autocast`` in bfloat16
(``"bfloat16"``), in plain float32 (``"float32"``), or (``"auto"``) in bfloat16 where the
device multiplies it natively — a CUDA device with bfloat16, a CPU with AMX tiles — else
float32 (:func:`autocast_dtype`). On the demo model's CPU bfloat16 matmuls run 7.5 × faster
(~890 against ~120 GFLOP/s a core); a 512-token step 1.7 × against float32 with the same fused
Adam (`benchmarks/bench_recon_step.py`).

Deterministic: batch order comes from a ``torch.Generator`` seeded with ``seed`` (the layer
index), the data order is the cache's chunk order, and the arithmetic is plain torch, so
a resumed run reproduces the same weights bit for bit on one device type.

Cost: the dense layer runs once per calibration token (its outputs are kept on the host,
``rows × seqlen × d`` in the layer's dtype, for every epoch and validation; the engine hands
over its pass-A outputs as ``(x, target)`` pairs when pass A ran it on the same input, so then
not even that); the pruned layer runs forward and backward once per training token and epoch.

Data parallel under torchrun (``ranks``, :class:`streamprune.distributed.Ranks`): each rank
holds its own shard of the calibration rows (global rows ``row_offset…``; the held-out rows
are the last ``val_rows`` of the whole set, wherever they live). Step ``s`` of an epoch is
every rank's ``s``-th local batch together: the gradient of the summed loss is all-reduced
and divided by the step's total row count (a rank whose batches ran out adds zero), so every
rank takes the same Adam step on the same bits and the weights stay identical across ranks;
the held-out loss is summed the same way, so every rank keeps the same best epoch. In one
process nothing changes (no collective, the batch-mean loss as before).

Pure with respect to files: the caller passes ``chunks`` (a function returning an iterator over
the cached hidden-state chunks, ``(rows, T, d)`` each, or ``(x, target)`` pairs when the target
is not the dense layer's output on ``x`` — e.g. the dense model's own stream) and the two layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...distributed import Ranks


@dataclass(frozen=True)
class ReconSettings:
    epochs: int = 2
    lr: float = 2e-5
    batch_tokens: int = 512  # tokens per Adam step, as whole sequences (at least one)
    val_rows: int = 32  # held-out sequences (the last ones of the calibration set)
    loss: str = "rms"  # "rms" (error after the next RMSNorm) or "mse"
    schedule: str = "cosine"  # learning rate: "cosine" (lr → 0 over all epochs' training rows) or "constant"
    min_gain: float = 0.0  # stop when an epoch lowers the held-out loss by less than this fraction of the start
    precision: str = "auto"  # the training steps' matmuls: "auto", "bfloat16" or "float32" (module doc)


@dataclass
class ReconResult:
    state: dict[str, Tensor]  # best weights under the layer's tensor names (fp32, on its device)
    val_before: float
    val_after: float
    best_epoch: int  # 0 = the method's own weights were kept
    steps: int
    history: tuple[float, ...] = ()  # held-out loss before the first epoch and after each
    precision: str = "float32"  # what the training steps ran in ("bfloat16" under autocast, or "float32")


PRECISIONS = ("auto", "bfloat16", "float32")


def _native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively (CUDA: ``is_bf16_supported``; CPU: AMX tiles)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # absent in a torch without the probe: float32
        return bool(probe is not None and probe())
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype the training steps run in under autocast, or None for plain float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"reconstruction precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bfloat16" or (precision == "auto" and _native_bf16(device)):
        return torch.bfloat16
    return None


def recon_loss(y: Tensor, target: Tensor, kind: str) -> Tensor:
    """Mean squared error of ``y`` against ``target`` (``kind="rms"``: per-token RMS-normalised)."""
    diff = (y - target).float()
    if kind == "rms":
        diff = diff * torch.rsqrt(target.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    return diff.pow(2).mean()


def _split(chunk: Tensor, start: int, n_train: int) -> tuple[Tensor, Tensor]:
    """Rows of ``chunk`` (global rows start..) before and after the train/validation cut."""
    cut = min(max(n_train - start, 0), chunk.shape[0])
    return chunk[:cut], chunk[cut:]


def snapshot(layer: nn.Module) -> dict[str, Tensor]:
    """A copy of ``layer.tensors()`` (the engine's layers name their state like the checkpoint)."""
    return {k: v.detach().clone() for k, v in layer.tensors().items()}


def reconstruct_layer(pruned: nn.Module, dense: nn.Module, chunks: Callable[[], Iterator[Tensor]], pe,
                      n_rows: int, settings: ReconSettings, seed: int, *, row_offset: int = 0,
                      ranks: Ranks = Ranks()) -> ReconResult:
    """Optimise ``pruned``'s parameters in place and return the best state (see module doc).

    ``n_rows``: calibration rows of the whole job; ``row_offset``: this rank's first global row."""
    pe32 = tuple(t.float() for t in pe)  # the pruned layer trains in fp32, the dense one runs as built

    def fit(x: Tensor) -> Tensor:
        return pruned(x.float(), pe32)

    device = pe32[0].device
    amp = autocast_dtype(settings.precision, device)

    def backward(x: Tensor, target: Tensor, scale: float = 1.0) -> None:
        """Gradients of ``scale`` × the batch's loss (autograd on even when the caller runs under
        no_grad); the layer runs under autocast when ``amp`` is set, the loss in float32 either way."""
        with torch.enable_grad():
            with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                y = fit(x)
            (recon_loss(y.float(), target, settings.loss) * scale).backward()

    memo: list[Tensor] = []  # the dense layer's output per chunk, computed once (host, as the layer computes it)

    def pairs() -> Iterator[tuple[Tensor, Tensor]]:
        """(input, target) per chunk; a target the caller did not give is the dense layer's
        output on the input, computed on the first pass and kept on the host for the rest."""
        for j, item in enumerate(chunks()):
            if isinstance(item, tuple):
                yield item
                continue
            if j == len(memo):
                with torch.no_grad():
                    memo.append(dense(item, pe).to("cpu"))
            yield item, memo[j].to(item.device)

    n_val = min(settings.val_rows, n_rows // 4)
    n_train = n_rows - n_val
    params = [p for p in pruned.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    # One fused kernel per step (CPU and CUDA): the same update as the per-tensor loop, ~7 × faster
    # on the demo model's layers, where Adam was ~15 % of a 512-token step on the CPU.
    opt = torch.optim.Adam(params, lr=settings.lr, fused=params[0].device.type in ("cpu", "cuda"))
    gen = torch.Generator().manual_seed(seed)

    def validate() -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            start = row_offset
            for x, t in pairs():
                _, xv = _split(x, start, n_train)
                _, tv = _split(t, start, n_train)
                start += x.shape[0]
                if xv.shape[0]:
                    total += float(recon_loss(fit(xv), tv.float(), settings.loss)) * xv.shape[0]
                    count += xv.shape[0]
        total, count = ranks.sum_floats(total, count)
        return total / max(count, 1)

    def lr_at(seen: int) -> float:
        """The learning rate after ``seen`` training rows (cosine: by rows, so exact without
        knowing the chunk layout in advance)."""
        if settings.schedule == "constant":
            return settings.lr
        return settings.lr * 0.5 * (1 + math.cos(math.pi * min(seen / max(settings.epochs * n_train, 1), 1.0)))

    best = validate() if n_val else math.inf
    before, best_epoch, steps, seen = best, 0, 0, 0
    history = [best]
    best_state = snapshot(pruned)
    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's training batches of one epoch, (input, fp32 target), in their fixed order."""
        start = row_offset
        for x, t in pairs():
            xt, _ = _split(x, start, n_train)
            target = _split(t, start, n_train)[0].float()
            start += x.shape[0]
            if not xt.shape[0]:
                continue
            order = torch.randperm(xt.shape[0], generator=gen).to(xt.device)
            rows = max(1, settings.batch_tokens // xt.shape[1])
            for b in range(0, xt.shape[0], rows):
                idx = order[b : b + rows]
                yield xt[idx], target[idx]

    def step(batch: tuple[Tensor, Tensor] | None) -> None:
        """One Adam step; under torchrun on every rank's batch of this step together."""
        nonlocal seen
        for group in opt.param_groups:
            group["lr"] = lr_at(seen)
        opt.zero_grad(set_to_none=True)
        if not ranks.distributed:
            seen += batch[0].shape[0]
            backward(*batch)
        else:
            local = 0 if batch is None else batch[0].shape[0]
            if local:
                backward(*batch, scale=local)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
            ranks.reduce_(grads)
            total = int(ranks.sum_floats(local)[0])
            seen += total
            for g in grads:
                g.div_(total)
        opt.step()

    def local_batches() -> int:
        """How many batches :func:`batches` yields per epoch on this rank (one pass over the chunks)."""
        n, start = 0, row_offset
        for x, _ in pairs():
            cut = _split(x, start, n_train)[0].shape[0]
            start += x.shape[0]
            n += math.ceil(cut / max(1, settings.batch_tokens // x.shape[1])) if cut else 0
        return n

    n_steps = ranks.max_int(local_batches()) if ranks.distributed else 0  # every rank steps as often as the busiest
    for epoch in range(1, settings.epochs + 1):
        if not ranks.distributed:
            for batch in batches():
                step(batch)
                steps += 1
        else:
            it = batches()
            for _ in range(n_steps):
                step(next(it, None))
                steps += 1
        val = validate() if n_val else -float(epoch)
        history.append(val)
        if val < best:
            best, best_epoch = val, epoch
            best_state = snapshot(pruned)
        if settings.min_gain > 0 and n_val and history[-2] - val < settings.min_gain * before:
            break  # this epoch gained too little: the later ones would gain less
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        for k, v in pruned.tensors().items():
            v.copy_(best_state[k])
    return ReconResult(best_state, before, best, best_epoch, steps, tuple(history), "float32" if amp is None else str(amp).removeprefix("torch."))
