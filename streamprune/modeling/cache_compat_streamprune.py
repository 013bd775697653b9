"""What differs between the transformers versions the pruned model runs on (5.17 to 5.25+).

SELF-CONTAINED (torch and transformers only): copied into every output folder next to
``modeling_streamprune.py``, which imports it; never import ``streamprune`` here.
"""

import inspect

import torch
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

# transformers renamed the outputs' / forwards' ``past_key_values`` to ``cache`` in 5.x.
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

try:
    from transformers.cache_utils import DummyLayer as _NoCacheLayer  # transformers >= 5.23
except ImportError:  # older 5.x: the same placeholder, here

    class _NoCacheLayer:
        """A cache slot that stores nothing (a layer without attention heads). Not a
        ``CacheLayerMixin``, so ``Cache.get_seq_length()`` of transformers < 5.23 skips it
        and reads the first layer that caches keys, as ``DummyLayer`` does in 5.23+."""

        supports_early_init = False
        is_compileable = True
        is_croppable = True
        is_sliding = False

        def __init__(self, **kwargs):
            self.is_initialized = True
            self.keys = None
            self.values = None

        def update(self, key_states, value_states, *args, **kwargs):
            if key_states is None and value_states is None:
                return None, None
            raise NotImplementedError("a layer without attention heads caches nothing")

        def offload(self): ...
        def prefetch(self): ...
        def reset(self): ...
        def crop(self, tokens_to_remove: int): ...
        def reorder_cache(self, beam_idx: torch.LongTensor): ...
        def batch_repeat_interleave(self, repeats: int): ...
        def batch_select_indices(self, indices: torch.Tensor): ...

        def get_max_length(self):
            return -1



class DummyLayer(_NoCacheLayer):
    """The cache slot of a layer without attention: stores nothing, and reports the sequence
    length of the cache's first layer that stores keys (``length_of``, set by the model's
    ``fit_cache``). transformers 5.25's ``Cache.get_seq_length()`` asks layer 0 directly,
    which in a pruned model may be such a slot."""

    length_of = None

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.length_of.get_seq_length() if self.length_of is not None else 0


def link_lengths(cache: Cache) -> None:
    """Point every ``DummyLayer`` of ``cache`` at its first layer that stores keys."""
    keyed = next((layer for layer in cache.layers if not isinstance(layer, _NoCacheLayer)), None)
    for layer in cache.layers:
        if isinstance(layer, DummyLayer):
            layer.length_of = keyed


def _cache_argument(cache: Cache | None, kwargs: dict) -> Cache | None:
    """``cache=`` or the deprecated ``past_key_values=`` (popped from ``kwargs``)."""
    past = kwargs.pop("past_key_values", None)
    return cache if cache is not None else past
