"""Numeric kernels (installed as ``streamprune.kernels``): torch ops only, same code on CPU and CUDA."""
