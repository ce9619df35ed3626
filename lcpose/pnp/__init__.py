"""Batched, differentiable PnP: closed-form EPnP, robust weighted Levenberg-Marquardt, RANSAC.

Every solver works on one instance; batch with `jax.vmap` and compile with `jax.jit`.
`lcpose.pnp.registry` names the test-time solvers evaluation chooses from (`get_solver`).
"""
from lcpose.pnp.epnp import epnp, procrustes
from lcpose.pnp.ransac import ransac
from lcpose.pnp.registry import SOLVERS, get_solver, register_solver
from lcpose.pnp.solver import PnPResult, gauss_newton_hessian, implicit_jacobian, linearize_at, pnp_cost, solve

__all__ = [
    "PnPResult",
    "SOLVERS",
    "epnp",
    "gauss_newton_hessian",
    "get_solver",
    "implicit_jacobian",
    "linearize_at",
    "pnp_cost",
    "procrustes",
    "ransac",
    "register_solver",
    "solve",
]
