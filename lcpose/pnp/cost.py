"""The weighted, Huber-robust PnP cost and its local models: the one home of their pieces.

    c(R, t) = sum_i rho(||w_i * r_i||),   r_i = x2d_i - project(x3d_i, R, t, K)        (Eq. 4)

with rho(s) = s^2 / 2 (least squares) or Huber's function with threshold `huber` on the weighted
residual norm. The solvers (`solve`, `ransac`), the linearisation (`linearize_at`, the implicit
backward pass) and the losses (LC, BPnP, EPro-PnP) all build on these functions:

  point_weights            (N, 2) weights with `valid` and the (N,) broadcast applied
  residuals_and_jacobian_t r = x2d - project and J = d project / d(omega, dt) (right perturbation)
  huber_terms              rho, ||e|| and the inside-threshold mask from ||e||^2
  robust_point_costs_t     rho(||e_i||) per point;  robust_cost_t / robust_cost the total
  irls_weights_t           rho'(s) / s per point (the IRLS weights of Gauss-Newton)
  weighted_gram            sum_i J_i^T diag(W_i) J_i from stacked Jacobian rows
  gauss_newton_t           (H, gradient, per-point costs) at a pose in one pass
  jacobi_scaling, spd_cholesky, spd_solve, spd_inverse, spd_inverse_and_conditioning,
  min_eigenvalue_estimate, well_conditioned, tolerances
                           the conditioned 6x6 algebra (below)

Layout: the per-point functions take points-last arrays (x3d_t (3, N), x2d_t (2, N), w_t (2, N)):
the point axis is the contiguous one, which XLA on CPU vectorises.

Conditioning without units. H mixes rotation curvatures (~1e4-1e5 px^2/rad^2) with depth ones
(~1e-1 px^2/mm^2), so a ridge like eps * trace(H) is not unit-free: in float32 it moves the
depth curvature by ~10 %. Every 6x6 solve here works on the Jacobi-scaled matrix
Hn = D^-1/2 H D^-1/2, D = diag(H) (unit diagonal, invariant to the units of each coordinate), with
at most a ridge relative to that unit diagonal, and reports degeneracy as a flag. The algebra is
unrolled (`lcpose.smallmat`): no LAPACK call, which under vmap is slower on CPU and, run
concurrently, can exhaust XLA's thread pool.
"""
from __future__ import annotations

import jax.numpy as jnp

from lcpose import geometry
from lcpose.smallmat import cho_solve_small, cholesky_small, matmul_small, solve_lower_small

__all__ = [
    "point_weights",
    "residuals_and_jacobian_t",
    "huber_terms",
    "robust_point_costs_t",
    "irls_weights_t",
    "robust_cost_t",
    "robust_cost",
    "stack_axes",
    "weighted_gram",
    "gauss_newton_t",
    "jacobi_scaling",
    "spd_cholesky",
    "spd_solve",
    "spd_inverse",
    "spd_inverse_and_conditioning",
    "min_eigenvalue_estimate",
    "well_conditioned",
    "tolerances",
]


# ----------------------------------------------------------------------------------------------
# Weights, residuals, Jacobians
# ----------------------------------------------------------------------------------------------


def point_weights(w2d, n, dtype, valid=None):
    """(N, 2) weights: w2d of shape (N,) or (N, 2) broadcast to both axes, invalid points zeroed."""
    w2 = jnp.broadcast_to(jnp.asarray(w2d, dtype).reshape(n, -1), (n, 2))
    if valid is not None:
        w2 = w2 * (jnp.asarray(valid) > 0).astype(dtype)[:, None]
    return w2


def residuals_and_jacobian_t(x3d_t, x2d_t, R, t, K):
    """r = x2d - project(x3d; R, t) (2, N) and J = d project / d(omega, dt) (2, 6, N), points last.

    (omega, dt) is the right perturbation R' = R exp(omega), t' = t + dt; d r / d delta = -J.
    """
    uv, J = geometry.project_with_jacobian_points_last(x3d_t, R, t, K)
    return x2d_t - uv, J


def stack_axes(J):
    """(2, 6, N) Jacobian -> (6, 2N) rows: the u rows of every point, then the v rows."""
    return jnp.concatenate([J[0], J[1]], axis=1)


def weighted_gram(J6, weights):
    """sum_k weights_k j_k j_k^T (6, 6) for stacked Jacobian columns J6 (6, M) and weights (M,).

    With J6 = stack_axes(J) and weights the stacked (2, N) inverse variances, this is the
    Gauss-Newton Hessian sum_i J_i^T diag(W_i) J_i: one thin matrix product.
    """
    return (J6 * weights) @ J6.T


# ----------------------------------------------------------------------------------------------
# The robust kernel
# ----------------------------------------------------------------------------------------------


def huber_terms(s2, huber):
    """(rho, s, inside) for squared weighted residual norms s2 (any shape), element-wise.

    rho = s2 / 2 inside the threshold, huber (s - huber / 2) beyond; s = sqrt(s2) beyond the
    threshold and 1 inside (double where: no sqrt at 0, whose gradient is NaN). huber may be
    traced; None is least squares (inside everywhere).
    """
    if huber is None:
        return 0.5 * s2, jnp.ones_like(s2), jnp.ones(s2.shape, bool)
    inside = s2 <= huber * huber
    s = jnp.sqrt(jnp.where(inside, jnp.ones_like(s2), s2))
    return jnp.where(inside, 0.5 * s2, huber * (s - 0.5 * huber)), s, inside


def robust_point_costs_t(e_t, huber):
    """rho(||e_i||) (N,) of weighted residuals e_t (2, N)."""
    return huber_terms(e_t[0] * e_t[0] + e_t[1] * e_t[1], huber)[0]


def irls_weights_t(e_t, huber):
    """rho'(s) / s (N,) of weighted residuals e_t (2, N): 1 inside the threshold, huber / s beyond."""
    if huber is None:
        return jnp.ones(e_t.shape[1:], e_t.dtype)
    _, s, inside = huber_terms(e_t[0] * e_t[0] + e_t[1] * e_t[1], huber)
    return jnp.where(inside, 1.0, huber / s)


def robust_cost_t(R, t, x3d_t, x2d_t, w_t, K, huber=None):
    """The cost sum_i rho(||w_i * r_i||) at (R, t), points last ((3, N), (2, N), (2, N))."""
    e = w_t * (x2d_t - geometry.project_points_last(x3d_t, R, t, K))
    return jnp.sum(robust_point_costs_t(e, huber))


def robust_cost(R, t, x3d, x2d, w2, K, huber=None):
    """`robust_cost_t` for points-first arrays x3d (N, 3), x2d (N, 2), w2 (N, 2)."""
    return robust_cost_t(R, t, x3d.T, x2d.T, w2.T, K, huber)


def gauss_newton_t(R, t, x3d_t, x2d_t, w_t, K, huber=None):
    """(H, gradient, per-point costs) of the cost at (R, t) from one pass over the points.

    H = sum_i rho_i J_i^T diag(w_i^2) J_i with rho_i the IRLS weight, gradient = d c / d delta
    = -sum_i rho_i J_i^T diag(w_i^2) r_i.
    """
    r, J = residuals_and_jacobian_t(x3d_t, x2d_t, R, t, K)
    e = w_t * r
    rho = irls_weights_t(e, huber)
    Jw = stack_axes(J * w_t[:, None, :])  # (6, 2N)
    rho2 = jnp.concatenate([rho, rho])
    H = weighted_gram(Jw, rho2)
    grad = -(Jw @ (rho2 * e.reshape(-1)))
    return H, grad, robust_point_costs_t(e, huber)


# ----------------------------------------------------------------------------------------------
# Conditioned 6x6 algebra
# ----------------------------------------------------------------------------------------------


def tolerances(dtype):
    """(relative predicted decrease, step size, smallest Jacobi-scaled eigenvalue) for the dtype."""
    if jnp.finfo(dtype).bits <= 32:
        return 1e-6, 1e-6, 1e-5
    return 1e-13, 1e-11, 1e-10


def jacobi_scaling(H):
    """s = diag(H)^-1/2 (n,) and whether every diagonal entry is positive and finite.

    Where a diagonal entry is not usable its scale is 1 (finite); the flag then says so.
    """
    d = jnp.diagonal(H)
    ok = jnp.all(jnp.isfinite(H)) & jnp.all(d > 0)
    s = jnp.where((d > 0) & jnp.isfinite(d), 1.0 / jnp.sqrt(jnp.where(d > 0, d, 1.0)), 1.0)
    return s, ok


def spd_cholesky(H, ridge=0.0):
    """Cholesky factor L of the Jacobi-scaled Hn + ridge I (unit diagonal), its scale s, and ok.

    H = S^-1 (L L^T - ridge I) S^-1 with S = diag(s). ok is False when diag(H) has a non-positive
    or non-finite entry or Hn + ridge I is not numerically positive definite; L is then the
    identity (finite). `ridge` is relative to the unit diagonal, hence unit-free.
    """
    n = H.shape[-1]
    eye = jnp.eye(n, dtype=H.dtype)
    s, ok_d = jacobi_scaling(H)
    Hn = jnp.where(ok_d, H * s[:, None] * s[None, :], eye)
    Hn = 0.5 * (Hn + Hn.T) + ridge * eye
    L = cholesky_small(Hn)
    ok = ok_d & jnp.all(jnp.isfinite(L)) & jnp.all(jnp.diagonal(L) > 0)
    return jnp.where(ok, L, eye), s, ok


def spd_solve(H, b, ridge=0.0):
    """(H + ridge D)^-1 b for a symmetric positive definite H (n, n), b (n,) or (n, k); and ok.

    Solved as S (Hn + ridge I)^-1 S b with Hn the Jacobi-scaled matrix. Where not ok the result
    is 0 (finite).
    """
    L, s, ok = spd_cholesky(H, ridge)
    sb = s[:, None] * b if b.ndim == 2 else s * b
    x = cho_solve_small(L, sb)
    x = s[:, None] * x if b.ndim == 2 else s * x
    ok = ok & jnp.all(jnp.isfinite(x))
    return jnp.where(ok, x, jnp.zeros_like(x)), ok


def _scaled_inverse(H, ridge):
    """(Hn + ridge I)^-1, the scale s and ok; Hn^-1 = L^-T L^-1 is exactly symmetric."""
    L, s, ok = spd_cholesky(H, ridge)
    L_inv = solve_lower_small(L, jnp.eye(H.shape[-1], dtype=H.dtype))
    Pn = matmul_small(L_inv.T, L_inv)
    return 0.5 * (Pn + Pn.T), s, ok


def spd_inverse(H, ridge=0.0):
    """(H + ridge D)^-1 of a symmetric positive definite H (n, n), exactly symmetric; and ok.

    S (Hn + ridge I)^-1 S with S = diag(H)^-1/2. Where not ok the result is 0 (finite). In exact
    arithmetic this is H^-1 for ridge = 0, whatever the units of the coordinates.
    """
    Pn, s, ok = _scaled_inverse(H, ridge)
    P = Pn * s[:, None] * s[None, :]
    ok = ok & jnp.all(jnp.isfinite(P))
    return jnp.where(ok, P, jnp.zeros_like(P)), ok


def min_eigenvalue_estimate(H):
    """1 / trace(Hn^-1) for the Jacobi-scaled Hn, within a factor n of its smallest eigenvalue.

    lambda_min(Hn) / n <= 1 / trace(Hn^-1) <= lambda_min(Hn): a unit-free measure of how far H
    is from singular, from one unrolled Cholesky factorisation (no eigensolver). 0 where H is
    not positive definite.
    """
    return spd_inverse_and_conditioning(H)[2]


def well_conditioned(H, tol):
    """Whether H is positive definite with min_eigenvalue_estimate(H) > tol (unit-free)."""
    return min_eigenvalue_estimate(H) > tol


def spd_inverse_and_conditioning(H):
    """(H^-1 or 0, ok, min_eigenvalue_estimate(H)) from one factorisation."""
    Pn, s, ok = _scaled_inverse(H, 0.0)
    trace_inv = jnp.trace(Pn)
    P = Pn * s[:, None] * s[None, :]
    ok = ok & jnp.all(jnp.isfinite(P)) & (trace_inv > 0)
    lam = jnp.where(ok, 1.0 / jnp.where(ok, trace_inv, 1.0), 0.0)
    return jnp.where(ok, P, jnp.zeros_like(P)), ok, lam

