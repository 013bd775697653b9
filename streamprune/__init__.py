"""streamprune: prune a decoder LLM one layer at a time, out of core.

Python API (the CLI is a thin shell over it)::

    from streamprune import PruneConfig, prune, EvalConfig, perplexity, load_pruned
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["PruneConfig", "prune", "EvalConfig", "perplexity", "perplexity_in_memory", "load_pruned", "__version__"]


def __getattr__(name):  # lazy: importing the package stays cheap (no transformers import)
    if name == "PruneConfig":
        from .config import PruneConfig

        return PruneConfig
    if name == "prune":
        from .engine import prune

        return prune
    if name in ("EvalConfig", "perplexity", "perplexity_in_memory"):
        from . import evaluate

        return getattr(evaluate, name)
    if name == "load_pruned":
        return load_pruned
    raise AttributeError(name)


def load_pruned(folder, **kwargs):
    """Load a streamprune output folder with transformers, without remote code."""
    from transformers import AutoModelForCausalLM

    from .modeling import register

    register()
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
