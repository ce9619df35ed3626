"""Batched, differentiable PnP: closed-form EPnP, robust weighted Levenberg-Marquardt, RANSAC.

Every solver works on one instance; batch with `jax.vmap` and compile with `jax.jit`.
"""
from lcpose.pnp.epnp import epnp, procrustes
from lcpose.pnp.ransac import ransac
from lcpose.pnp.solver import PnPResult, gauss_newton_hessian, implicit_jacobian, linearize_at, pnp_cost, solve

__all__ = [
    "PnPResult",
    "epnp",
    "gauss_newton_hessian",
    "implicit_jacobian",
    "linearize_at",
    "pnp_cost",
    "procrustes",
    "ransac",
    "solve",
]
