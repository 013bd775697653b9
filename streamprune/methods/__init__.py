"""Method registry: ``--method NAME`` -> (method class, config dataclass)."""

from __future__ import annotations

import dataclasses
import importlib

from ..errors import ConfigError

# name -> (module, method class, config class); imported lazily.
METHODS = {
    "magnitude": ("streamprune.methods.magnitude", "Magnitude", "MagnitudeConfig"),
    "olica": ("streamprune.methods.olica", "Olica", "OlicaConfig"),
    "slimllm": ("streamprune.methods.slimllm", "SlimLLM", "SlimLLMConfig"),
    "lorap": ("streamprune.methods.lorap", "LoRAP", "LoRAPConfig"),
    "cascade": ("streamprune.methods.cascade", "Cascade", "CascadeConfig"),
}


def available() -> list[str]:
    return sorted(METHODS)


def build_method(name: str, ratio: float, options: dict | None = None):
    """Instantiate method ``name`` with its config built from ``options`` (validated)."""
    if name not in METHODS:
        raise ConfigError(f"unknown --method {name!r}; available: {', '.join(available())}")
    module_name, cls_name, cfg_name = METHODS[name]
    module = importlib.import_module(module_name)
    cfg_cls = getattr(module, cfg_name)
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"method {name!r} has no option(s) {unknown}; known: {sorted(known)}")
    try:
        config = cfg_cls(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad option for method {name!r}: {e}") from e
    return getattr(module, cls_name)(config, ratio)
