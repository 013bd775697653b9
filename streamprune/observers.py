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
    """Register hooks for ``observer.taps`` on ``layer`` (a ``DecoderLayer``); always removed.

    A tap is one module (its input and output) or, where the adapter says so, two: the input
    of one and the output of a later one (a post-norm block's sub-block and its norm); the
    input is held until the output arrives, then the observer gets the pair."""
    handles = []
    try:
        if observer is not None:
            for tap in sorted(observer.taps):
                source, sink = layer.tap(tap)
                held: list[torch.Tensor] = []

                def emit(x, y, tap=tap):
                    if not torch.isfinite(x).all():
                        raise NumericalError(
                            f"NaN/Inf in the input of module {tap} (layer {layer.index}); use --dtype float32 "
                            "or check the checkpoint's weights"
                        )
                    observer.update(tap, _flat(x), _flat(y))

                def hook(module, args, kwargs, output, emit=emit):
                    x = args[0] if args else kwargs["hidden_states"]
                    emit(x, output[0] if isinstance(output, tuple) else output)

                def hold(module, args, kwargs, output, held=held):
                    held.append(args[0] if args else kwargs["hidden_states"])

                def release(module, args, kwargs, output, held=held, emit=emit):
                    emit(held.pop(), output[0] if isinstance(output, tuple) else output)

                if source is sink:
                    handles.append(source.register_forward_hook(hook, with_kwargs=True))
                else:
                    handles.append(source.register_forward_hook(hold, with_kwargs=True))
                    handles.append(sink.register_forward_hook(release, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
