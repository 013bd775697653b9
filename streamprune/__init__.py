"""streamprune: prune a decoder LLM one layer at a time, out of core."""

__version__ = "0.1.0"
