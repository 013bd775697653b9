"""Output formats other than streamprune's own: converters from a streamprune output
folder (or a dense Llama-family checkpoint) into layouts that serving engines load natively.

- :mod:`.nemotron_nas`: NVIDIA Nemotron-NAS / DeciLM (vLLM, SGLang, TensorRT-LLM, mlx-lm;
  llama.cpp's GGUF converter).

Each format module has pure functions (the config, the fit check, per-layer tensors) and
one ``export(in_dir, out_dir) -> dict``.
"""

FORMATS = ("streamprune", "nemotron-nas")  # output formats: the native one (every structure), then the exports
