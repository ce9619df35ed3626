"""PnP RANSAC: minimal-set EPnP hypotheses solved in parallel, MSAC scoring, LM refinement.

All hypotheses of one instance are solved at once with `vmap` (no Python loop); the best one
(MSAC score: sum of truncated squared reprojection errors) is refined by `solve` on its inliers,
then the inliers are re-estimated at the refined pose and the pose refined once more (a local
optimisation step in the spirit of LO-RANSAC). This is the paper's "PnP RANSAC"; its "PnP weighted"
is `solve(..., R0=res.R, t0=res.t)` with the network's weights.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from lcpose import geometry
from lcpose.pnp.checks import check_correspondences
from lcpose.pnp.epnp import _epnp_impl
from lcpose.pnp.solver import PnPResult, solve

__all__ = ["ransac"]


def _reprojection_sq(x3d, x2d, K, R, t):
    xc = geometry.transform(x3d, R, t)
    uvw = xc @ K.T
    z = uvw[:, 2]
    uv = uvw[:, :2] / jnp.where(jnp.abs(z) > 0, z, 1.0)[:, None]
    err2 = jnp.sum((uv - x2d) ** 2, axis=1)
    return jnp.where((xc[:, 2] > 0) & jnp.isfinite(err2), err2, jnp.inf)


def ransac(
    key,
    x3d,
    x2d,
    K,
    *,
    valid=None,
    w2d=None,
    hypotheses: int = 128,
    sample_size: int = 6,
    threshold_px: float = 3.0,
    huber: Optional[float] = None,
    iters: int = 30,
) -> tuple[PnPResult, jax.Array]:
    """Robust PnP of one instance (vmap for batches; split the key per instance).

    Args:
      key: a JAX PRNG key.
      x3d, x2d, K: (N, 3), (N, 2), (3, 3) as in `solve`.
      valid: optional (N,) mask of usable points.
      w2d: optional (N, 2) weights used by the final refinement (inlier selection is unweighted).
      hypotheses: number of minimal-set hypotheses, all solved in parallel (static).
      sample_size: points per hypothesis (>= 4; 6 gives EPnP a well-posed minimal system).
      threshold_px: inlier threshold on the reprojection error, in pixels.
      huber, iters: passed to the refinement `solve`.

    Returns:
      (PnPResult of the refined pose, inliers (N,) bool at that pose).
    """
    n = check_correspondences(x3d, x2d, K, w2d=w2d, valid=valid)
    if sample_size < 4 or sample_size > n:
        raise ValueError(f"sample_size must be in [4, N={n}], got {sample_size}")
    if hypotheses < 1:
        raise ValueError(f"hypotheses must be >= 1, got {hypotheses}")
    if not threshold_px > 0:
        raise ValueError(f"threshold_px must be positive, got {threshold_px}")
    dtype = jnp.result_type(x3d, x2d, K)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    x3d, x2d, K = (jax.lax.stop_gradient(jnp.asarray(a, dtype)) for a in (x3d, x2d, K))
    finite = jnp.all(jnp.isfinite(x3d), axis=1) & jnp.all(jnp.isfinite(x2d), axis=1)
    use = finite if valid is None else finite & (jnp.asarray(valid) > 0)
    x3d_s = jnp.where(use[:, None], x3d, 0.0)
    x2d_s = jnp.where(use[:, None], x2d, 0.0)
    p = use.astype(dtype)
    p = jnp.where(jnp.sum(p) > 0, p / jnp.maximum(jnp.sum(p), 1.0), jnp.full_like(p, 1.0 / n))
    thr2 = jnp.asarray(threshold_px, dtype) ** 2
    ones_w = jnp.ones((sample_size, 2), dtype)
    ones_v = jnp.ones((sample_size,), dtype)

    def hypothesis(k):
        idx = jax.random.choice(k, n, (sample_size,), replace=False, p=p)
        R, t = _epnp_impl(x3d_s[idx], x2d_s[idx], K, ones_w, ones_v)
        err2 = _reprojection_sq(x3d_s, x2d_s, K, R, t)
        score = jnp.sum(jnp.where(use, jnp.minimum(err2, thr2), 0.0))  # MSAC
        return R, t, score

    Rs, ts, scores = jax.vmap(hypothesis)(jax.random.split(key, hypotheses))
    scores = jnp.where(jnp.isfinite(scores), scores, jnp.inf)
    best = jnp.argmin(scores)
    R, t = Rs[best], ts[best]
    w_ref = jnp.ones((n, 2), dtype) if w2d is None else jnp.asarray(w2d, dtype).reshape(n, -1) * jnp.ones((1, 2), dtype)

    res = None
    for _ in range(2):  # refine on inliers, re-estimate inliers, refine again (static unroll)
        inliers = use & (_reprojection_sq(x3d_s, x2d_s, K, R, t) < thr2)
        res = solve(x3d_s, x2d_s, w_ref, K, R0=R, t0=t, valid=inliers, huber=huber, iters=iters)
        R, t = res.R, res.t
    inliers = use & (_reprojection_sq(x3d_s, x2d_s, K, R, t) < thr2)
    return res._replace(converged=res.converged & (jnp.sum(inliers) >= 4)), inliers
