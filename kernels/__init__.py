"""Numeric kernels (installed as ``streamprune.kernels``): torch ops only, same code on CPU and CUDA.

Pure functions (plus the small ``Moments`` accumulator); device and dtype come from the
tensors passed in. Statistics are accumulated in fp32 whatever the input dtype. Float64
references for the tests live in ``streamprune.kernels.reference``.
"""

from streamprune.kernels.moments import Moments, colsum, cross, energy, gram
from streamprune.kernels.obs import obs_cost_curve, obs_remove_columns
from streamprune.kernels.pearson import linear_fit_pearson, pearson_from_moments
from streamprune.kernels.ridge import ridge_lambda, ridge_solve
from streamprune.kernels.svd import SOLVERS, choose_solver, truncated_svd, weighted_svd

__all__ = [
    "Moments",
    "SOLVERS",
    "choose_solver",
    "colsum",
    "cross",
    "energy",
    "gram",
    "linear_fit_pearson",
    "obs_cost_curve",
    "obs_remove_columns",
    "pearson_from_moments",
    "ridge_lambda",
    "ridge_solve",
    "truncated_svd",
    "weighted_svd",
]
