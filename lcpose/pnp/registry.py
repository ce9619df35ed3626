"""Test-time PnP solvers by name: ``fn(key, corr: Correspondences, K, **kwargs) -> (PnPResult, metrics)``.

    from lcpose.pnp import get_solver
    res, metrics = get_solver("weighted")(key, corr, K_out, threshold_px=2.0)

One instance per call (vmap a batch, one key per instance). Evaluation
(``lcpose.evaluate.make_predict_fn``) picks the solver by the name in ``PnPConfig.solver``.
Every solver takes the same keywords (``hypotheses``, ``sample_size``, ``threshold_px``,
``iters``, ``huber``; a solver that has no use for one says so) and returns the metrics
``R_ransac``, ``t_ransac`` (the initial, unweighted pose) and ``inliers`` (its inlier count), so
that an evaluation can score both poses. A new solver is one ``@register_solver("name")``
function (here or in a new module imported by ``lcpose/pnp/__init__.py``).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import jax.numpy as jnp

from lcpose.correspondences import Correspondences
from lcpose.pnp.ransac import ransac
from lcpose.pnp.solver import solve

__all__ = ["SOLVERS", "register_solver", "get_solver"]

SolverFn = Callable[..., tuple]
SOLVERS: Dict[str, SolverFn] = {}


def register_solver(name: str):
    """Decorator: register ``fn(key, corr, K, **kwargs) -> (PnPResult, metrics dict)`` as ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")

    def deco(fn: SolverFn) -> SolverFn:
        if name in SOLVERS and SOLVERS[name] is not fn:
            raise ValueError(f"solver {name!r} is already registered ({SOLVERS[name]!r})")
        SOLVERS[name] = fn
        return fn

    return deco


def get_solver(name: str) -> SolverFn:
    """The registered solver ``name``; ValueError listing the registered names otherwise."""
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; registered: {', '.join(sorted(SOLVERS))}") from None


@register_solver("ransac")
def _ransac(key, corr: Correspondences, K, *, hypotheses: int = 128, sample_size: int = 6,
            threshold_px: float = 2.0, iters: int = 30, huber: Optional[float] = None):
    """The paper's "PnP RANSAC": EPnP hypotheses, MSAC, LM on the inliers (unweighted; huber
    is not used)."""
    del huber
    res, inl = ransac(key, corr.x3d, corr.x2d, K, valid=corr.valid, hypotheses=hypotheses,
                      sample_size=sample_size, threshold_px=threshold_px, iters=iters)
    return res, {"R_ransac": res.R, "t_ransac": res.t, "inliers": jnp.sum(inl)}


@register_solver("weighted")
def _weighted(key, corr: Correspondences, K, *, hypotheses: int = 128, sample_size: int = 6,
              threshold_px: float = 2.0, iters: int = 30, huber: Optional[float] = None):
    """The paper's "PnP weighted": weighted LM (cost 0.5 sum ||w_i r_i||^2, Huber on ||w_i r_i||
    when given) from RANSAC's pose. The evaluation default."""
    r0, inl = ransac(key, corr.x3d, corr.x2d, K, valid=corr.valid, hypotheses=hypotheses,
                     sample_size=sample_size, threshold_px=threshold_px, iters=iters)
    res = solve(corr.x3d, corr.x2d, corr.w2d, K, R0=r0.R, t0=r0.t, valid=corr.valid, huber=huber,
                iters=iters)
    return res, {"R_ransac": r0.R, "t_ransac": r0.t, "inliers": jnp.sum(inl)}


register_solver("ransac_weighted")(_weighted)


@register_solver("weighted_epnp")
def _weighted_epnp(key, corr: Correspondences, K, *, hypotheses: int = 128, sample_size: int = 6,
                   threshold_px: float = 2.0, iters: int = 30, huber: Optional[float] = None):
    """Weighted LM from weighted EPnP, no RANSAC (``PnPConfig(ransac=False)``); the RANSAC
    pose is the weighted one and every valid point counts as an inlier."""
    del key, hypotheses, sample_size, threshold_px
    res = solve(corr.x3d, corr.x2d, corr.w2d, K, valid=corr.valid, huber=huber, iters=iters)
    return res, {"R_ransac": res.R, "t_ransac": res.t, "inliers": jnp.sum(corr.valid)}
