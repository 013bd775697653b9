"""Owned forward hooks: feed a method's :class:`Observer` from a layer's tap modules."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .errors import NumericalError
from .methods.base import Observer


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])  # (tokens, features)


@contextmanager
def observing(layer, observer: Observer | None):
    """Register hooks for ``observer.taps`` on ``layer`` (a ``DecoderLayer``); always removed."""
    handles = []
    try:
        if observer is not None:
            for tap in sorted(observer.taps):
                module = layer.tap(tap)

                def hook(module, args, kwargs, output, tap=tap):
                    x = args[0] if args else kwargs["hidden_states"]
                    y = output[0] if isinstance(output, tuple) else output
                    if not torch.isfinite(x).all():
                        raise NumericalError(
                            f"NaN/Inf in the input of module {tap} (layer {layer.index}); use --dtype float32 "
                            "or check the checkpoint's weights"
                        )
                    observer.update(tap, _flat(x), _flat(y))

                handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
