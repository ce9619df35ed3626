"""PnP RANSAC: POSIT hypotheses on minimal sets, preemptive MSAC scoring, one robust LM refinement.

Per instance, with no LAPACK call anywhere in the hypothesis stage (only element-wise work and
small reductions, which XLA on CPU fuses across the batch and the hypotheses):

1. One random permutation of the usable points; every hypothesis draws `sample_size` distinct
   positions among them by Floyd's algorithm (a few random integers, not a draw over all N).
2. Each sample gives a pose by POSIT (DeMenthon & Davis, IJCV 1995): the scaled orthographic
   fit of the centred sample is a 3x3 linear solve (closed-form inverse); the perspective is
   corrected by re-weighting the image coordinates with the estimated depths, a fixed number of
   times. Non-coplanar samples only; near-coplanar ones are rejected by a scale-free test.
3. Preemptive scoring: every hypothesis gets an MSAC score (sum of truncated squared
   reprojection errors) on the same random subset of `score_points` usable points; the best one
   is kept. The subset is large enough that the winner's score differs from the full-set score
   only by sampling noise.
4. One refinement: `solve` (Levenberg-Marquardt, Huber kernel) on the points within
   `refine_factor * threshold_px` of the hypothesis; the inliers are then re-estimated at the
   refined pose with `threshold_px`.

This is the paper's "PnP RANSAC"; its "PnP weighted" is `solve(..., R0=res.R, t0=res.t)` with the
network's weights.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from lcpose import geometry
from lcpose.pnp import cost
from lcpose.pnp.checks import check_correspondences
from lcpose.pnp.epnp import _inverse3
from lcpose.pnp.solver import PnPResult, solve

__all__ = ["ransac", "posit"]


def _reprojection_sq_t(x3d_t, x2d_t, K, R, t):
    """Squared reprojection error per point (N,), points-last inputs (3, N), (2, N); inf behind
    the camera or when not finite. (Only the residual of pnp.cost is used: XLA drops the
    unused Jacobian.)"""
    r, _ = cost.residuals_and_jacobian_t(x3d_t, x2d_t, R, t, K)
    depth = geometry.lincomb_points_last(R[2:3], x3d_t)[0] + t[2]
    err2 = r[0] * r[0] + r[1] * r[1]
    return jnp.where((depth > 0) & jnp.isfinite(err2), err2, jnp.inf)


def _reprojection_sq(x3d, x2d, K, R, t):
    return _reprojection_sq_t(x3d.T, x2d.T, K, R, t)


def _orthonormal_rows(a, b):
    """The rotation whose first two rows are closest to the directions of a and b (symmetric in
    a and b: both are moved by the same angle towards orthogonality), third row a x b."""
    a = a / jnp.linalg.norm(a)
    b = b / jnp.linalg.norm(b)
    s, d = a + b, a - b
    s = s / jnp.linalg.norm(s)
    d = d / jnp.linalg.norm(d)
    r1 = (s + d) * jnp.sqrt(0.5).astype(a.dtype)
    r2 = (s - d) * jnp.sqrt(0.5).astype(a.dtype)
    return jnp.stack([r1, r2, jnp.cross(r1, r2)])


def posit(x3d, xn, w=None, *, iterations: int = 8):
    """POSIT pose of a non-coplanar point set from normalised image coordinates.

    Args:
      x3d: (k, 3) object points, k >= 4 with non-zero weight, not coplanar.
      xn: (k, 2) normalised image coordinates (K^-1 applied: x = X_c / Z_c).
      w: optional (k,) non-negative point weights (0 = ignored); a fit of the scaled orthographic
        model in weighted least squares.
      iterations: perspective corrections (static); the error shrinks by about the ratio of the
        object's depth extent to its distance per iteration.

    Returns:
      (R (3, 3), t (3,), ok): ok is False for (near-)coplanar sets and non-finite results.
    """
    dtype = x3d.dtype
    k = x3d.shape[0]
    w = jnp.ones((k,), dtype) if w is None else jnp.asarray(w, dtype)
    wsum = jnp.maximum(jnp.sum(w), jnp.finfo(dtype).tiny)
    wn = w / wsum
    mean = wn @ x3d
    xc = x3d - mean
    scale = jnp.sqrt(wn @ jnp.sum(xc * xc, axis=1))
    xs = xc / jnp.where(scale > 0, scale, 1.0)
    # Scaled orthographic fit x_i (1 + eps_i) = I . xs_i + x0 (same for y with J, y0): with
    # centred points the normal equations split into the 3x3 scatter and the means.
    xs_w = xs * wn[:, None]
    scatter = xs_w.T @ xs  # trace 1: the determinant test below is unit-free
    scatter_inv, det = _inverse3(scatter)
    ok = det > 1e-4  # isotropic sets have det 1/27; coplanar ones 0
    pinv = scatter_inv @ xs_w.T  # (3, k)

    def step(carry, _):
        eps = carry[0]
        rhs = xn * (1.0 + eps)[:, None]  # (k, 2)
        IJ = pinv @ rhs  # (3, 2): I = r1 * scale / Tz, J = r2 * scale / Tz
        x0 = wn @ rhs
        nI, nJ = jnp.linalg.norm(IJ[:, 0]), jnp.linalg.norm(IJ[:, 1])
        R = _orthonormal_rows(IJ[:, 0], IJ[:, 1])
        tz = scale / jnp.sqrt(nI * nJ)
        eps = (xs @ R[2]) * scale / tz
        return (eps, R, tz, x0), None

    init = (jnp.zeros((k,), dtype), jnp.eye(3, dtype=dtype), jnp.ones((), dtype), jnp.zeros((2,), dtype))
    (_, R, tz, x0), _ = jax.lax.scan(step, init, None, length=iterations)
    T = jnp.concatenate([x0 * tz, tz[None]])  # camera-frame position of the centroid
    t = T - R @ mean
    ok = ok & jnp.all(jnp.isfinite(R)) & jnp.all(jnp.isfinite(t)) & (tz > 0)
    return R, t, ok


def _floyd_sample(key, m, k, count):
    """`count` samples of k distinct integers in [0, m) (Floyd's algorithm, unrolled over k)."""
    keys = jax.random.split(key, k)
    chosen = []
    for j in range(k):
        hi = m - k + j  # draw in [0, hi]; if taken, take hi itself (which cannot be taken yet)
        r = jax.random.randint(keys[j], (count,), 0, jnp.maximum(hi, 0) + 1)
        taken = jnp.zeros((count,), bool)
        for c in chosen:
            taken = taken | (c == r)
        chosen.append(jnp.where(taken, hi, r))
    return jnp.stack(chosen, axis=1)  # (count, k)


def ransac(
    key,
    x3d,
    x2d,
    K,
    *,
    valid=None,
    w2d=None,
    hypotheses: int = 64,
    sample_size: int = 5,
    threshold_px: float = 4.0,
    score_points: int = 256,
    refine_factor: float = 2.0,
    huber: Optional[float] = None,
    iters: int = 30,
    posit_iterations: int = 8,
) -> tuple[PnPResult, jax.Array]:
    """Robust PnP of one instance (vmap for batches; split the key per instance).

    Args:
      key: a JAX PRNG key.
      x3d, x2d, K: (N, 3), (N, 2), (3, 3) as in `solve`.
      valid: optional (N,) mask of usable points.
      w2d: optional (N, 2) weights used by the refinement (inlier selection is unweighted).
      hypotheses: number of minimal-set hypotheses, all solved in parallel (static).
      sample_size: points per hypothesis (>= 4, non-coplanar for POSIT).
      threshold_px: inlier threshold on the reprojection error, in pixels (of the image K maps to).
      score_points: size of the random subset of points every hypothesis is scored on (static;
        min(N, score_points) are used).
      refine_factor: the refinement uses the points within refine_factor * threshold_px of the
        best hypothesis (a hypothesis from a few noisy points is less precise than the final pose).
      huber: Huber threshold of the refinement on ||w_i r_i||; default threshold_px (with
        unit weights).
      iters: maximum LM iterations of the refinement.
      posit_iterations: perspective corrections of each POSIT hypothesis.

    Returns:
      (PnPResult of the refined pose, inliers (N,) bool at that pose within threshold_px).
    """
    n = check_correspondences(x3d, x2d, K, w2d=w2d, valid=valid)
    if sample_size < 4 or sample_size > n:
        raise ValueError(f"sample_size must be in [4, N={n}], got {sample_size}")
    if hypotheses < 1:
        raise ValueError(f"hypotheses must be >= 1, got {hypotheses}")
    if not threshold_px > 0:
        raise ValueError(f"threshold_px must be positive, got {threshold_px}")
    if score_points < 1:
        raise ValueError(f"score_points must be >= 1, got {score_points}")
    if not refine_factor >= 1:
        raise ValueError(f"refine_factor must be >= 1, got {refine_factor}")
    dtype = jnp.result_type(x3d, x2d, K)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    x3d, x2d, K = (jax.lax.stop_gradient(jnp.asarray(a, dtype)) for a in (x3d, x2d, K))
    finite = jnp.all(jnp.isfinite(x3d), axis=1) & jnp.all(jnp.isfinite(x2d), axis=1)
    use = finite if valid is None else finite & (jnp.asarray(valid) > 0)
    x3d_s = jnp.where(use[:, None], x3d, 0.0)
    x2d_s = jnp.where(use[:, None], x2d, 0.0)
    m = jnp.sum(use.astype(jnp.int32))
    thr2 = jnp.asarray(threshold_px, dtype) ** 2

    key_subset, key_sample = jax.random.split(key)
    # Rank r of the usable points -> point index, by binary search in their running count: no sort.
    count = jnp.cumsum(use.astype(jnp.int32))

    def point_index(rank):
        return jnp.minimum(jnp.searchsorted(count, rank, side="right"), n - 1)

    xh = geometry.lincomb_points_last(_inverse3(K)[0], jnp.concatenate([x2d_s.T, jnp.ones((1, n), dtype)]))
    xn = (xh[:2] / xh[2:3]).T  # (N, 2) normalised coordinates

    idx = point_index(_floyd_sample(key_sample, m, sample_size, hypotheses))  # (H, k)
    Rs, ts, oks = jax.vmap(lambda i: posit(x3d_s[i], xn[i], iterations=posit_iterations))(idx)

    # Preemptive scoring on one random subset (drawn with replacement) shared by all hypotheses.
    sub = point_index(jax.random.randint(key_subset, (min(n, score_points),), 0, jnp.maximum(m, 1)))
    X_sub_t, x_sub_t = x3d_s[sub].T, x2d_s[sub].T
    scores = jax.vmap(lambda R, t: jnp.sum(jnp.minimum(_reprojection_sq_t(X_sub_t, x_sub_t, K, R, t), thr2)))(Rs, ts)
    scores = jnp.where(oks & jnp.isfinite(scores) & (m >= sample_size), scores, jnp.inf)
    best = jnp.argmin(scores)
    R, t = Rs[best], ts[best]

    w_ref = jnp.ones((n, 2), dtype) if w2d is None else cost.point_weights(w2d, n, dtype)
    huber_ref = threshold_px if huber is None else huber
    # Local optimisation: POSIT on every point near the best hypothesis (an all-inlier fit,
    # far more precise than the minimal set's), so that the LM starts next to its minimum.
    near = use & (_reprojection_sq(x3d_s, x2d_s, K, R, t) < (refine_factor**2) * thr2)
    R_lo, t_lo, ok_lo = posit(x3d_s, xn, near.astype(dtype), iterations=posit_iterations)
    R, t = jnp.where(ok_lo, R_lo, R), jnp.where(ok_lo, t_lo, t)
    near = use & (_reprojection_sq(x3d_s, x2d_s, K, R, t) < (refine_factor**2) * thr2)
    res = solve(x3d_s, x2d_s, w_ref, K, R0=R, t0=t, valid=near, huber=huber_ref, iters=iters)
    inliers = use & (_reprojection_sq(x3d_s, x2d_s, K, res.R, res.t) < thr2)
    found = jnp.isfinite(scores[best]) & (jnp.sum(inliers) >= max(4, sample_size))
    return res._replace(converged=res.converged & found), inliers
