"""Weighted, Huber-robust Levenberg-Marquardt PnP with implicit differentiation.

The cost (Eq. 4 of the LC paper) is

    c(R, t) = sum_i rho(||w_i * r_i||),   r_i = x2d_i - project(x3d_i, R, t, K),

with rho(s) = s^2 / 2 (plain least squares) or Huber's function with threshold `huber` (in units of
the weighted residual). It is minimised on the right perturbation R' = R exp(omega), t' = t + dt by
Levenberg-Marquardt with IRLS weights, a fixed maximum of iterations and per-instance convergence
masking (`lax.while_loop`, which `vmap` turns into a masked loop that ends when every instance of
the batch has converged).

Derivatives: the solution y* satisfies the stationarity condition g(y*, x) = d c / d delta = 0.
By the implicit function theorem dy*/dx = -H^-1 dg/dx with H = dg/d delta the (exact) Hessian,
so the vector-Jacobian product is x_bar = -(dg/dx)^T H^-1 y_bar: one 6x6 solve and one reverse
pass through g, O(N) and independent of the number of LM iterations (`jax.custom_vjp`).
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from lcpose import geometry
from lcpose.pnp import cost
from lcpose.pnp.checks import check_correspondences, check_pose
from lcpose.pnp.epnp import _epnp_impl
from lcpose.smallmat import solve_lower_small, solve_upper_t_small

__all__ = ["PnPResult", "solve", "implicit_jacobian", "linearize_at", "pnp_cost", "gauss_newton_hessian"]


class PnPResult(NamedTuple):
    """Result of `solve` for one instance (fields gain a leading batch axis under vmap).

    R, t: the pose (model -> camera); differentiable w.r.t. x3d, x2d, w2d (and K) by the implicit
      function theorem.
    cov: (6, 6) inverse of the Gauss-Newton Hessian at the solution, in the (omega, dt) right
      perturbation: the Laplace approximation of the pose posterior covariance. Meaningful only
      when `converged`.
    cost: the robust cost at the solution.
    converged: bool; False for degenerate problems (fewer than 4 usable points, zero weights,
      collinear points, non-finite inputs, points behind the camera at the solution, or the
      iteration limit reached while still descending). Outputs stay finite either way.
    iterations: LM iterations used.
    """

    R: jax.Array
    t: jax.Array
    cov: jax.Array
    cost: jax.Array
    converged: jax.Array
    iterations: jax.Array


# ----------------------------------------------------------------------------------------------
# Cost and its local models (the pieces live in lcpose.pnp.cost)
# ----------------------------------------------------------------------------------------------


def pnp_cost(R, t, x3d, x2d, w2, K, huber=None):
    """The robust PnP cost sum_i rho(||w_i * r_i||) of one instance (w2 (N, 2), zero = ignored)."""
    return cost.robust_cost(R, t, x3d, x2d, w2, K, huber)


def gauss_newton_hessian(R, t, x3d, x2d, w2, K, huber=None):
    """Gauss-Newton Hessian sum_i rho_i J_i^T diag(w_i^2) J_i and gradient of the cost at (R, t)."""
    H, grad, _ = cost.gauss_newton_t(R, t, x3d.T, x2d.T, w2.T, K, huber)
    return H, grad


def _exact_hessian(R, t, x3d, x2d, w2, K, huber):
    def c(delta):
        return pnp_cost(*geometry.retract(R, t, delta), x3d, x2d, w2, K, huber)

    return jax.hessian(c)(jnp.zeros(6, R.dtype))


# ----------------------------------------------------------------------------------------------
# Levenberg-Marquardt (no derivatives flow through here)
# ----------------------------------------------------------------------------------------------


class _LMState(NamedTuple):
    R: jax.Array
    t: jax.Array
    costs: jax.Array  # per-point costs at (R, t)
    lam: jax.Array
    it: jax.Array
    done: jax.Array
    stopped_ok: jax.Array
    step: jax.Array  # size of the last accepted step (inf before the first)


def _levenberg_marquardt(x3d, x2d, w2, K, R0, t0, huber, iters):
    dtype = x3d.dtype
    ftol, xtol, _ = cost.tolerances(dtype)
    eps = jnp.finfo(dtype).eps
    stop_on_step = jnp.finfo(dtype).bits <= 32

    # Points-last copies, made once outside the loop.
    x3d_t, x2d_t, w2_t = x3d.T, x2d.T, w2.T

    def point_costs(R, t):
        e = w2_t * (x2d_t - geometry.project_points_last(x3d_t, R, t, K))
        return cost.robust_point_costs_t(e, huber)

    def body(s: _LMState) -> _LMState:
        H, grad, _ = cost.gauss_newton_t(s.R, s.t, x3d_t, x2d_t, w2_t, K, huber)
        total = jnp.sum(s.costs)
        # Jacobi-scaled Cholesky of H (unit diagonal, a ridge of eps relative to it): unit-free.
        L, sc, ok_H = cost.spd_cholesky(H, ridge=eps)
        # Newton decrement of the undamped Gauss-Newton step, 0.5 g^T H^-1 g = 0.5 |L^-1 S g|^2
        # (a sum of squares, no cancellation in float32): the decrease still available.
        y = solve_lower_small(L, sc * grad)
        decrement = 0.5 * jnp.sum(y * y)
        delta_gn = -sc * solve_upper_t_small(L, y)
        # When that decrease is below what the cost can resolve (float32: residuals of ~500 px
        # carry ~3e-5 px of rounding), a measured cost change is noise: take the plain
        # Gauss-Newton step from next to the minimum, and stop.
        at_floor = ok_H & jnp.isfinite(decrement) & (decrement <= ftol * total)
        # Marquardt's damping H + lam diag(H) is the ridge lam on the Jacobi-scaled matrix.
        delta_lm, _ = cost.spd_solve(H, grad, ridge=s.lam + eps)
        delta = jnp.where(at_floor, delta_gn, -delta_lm)
        delta = jnp.where(jnp.all(jnp.isfinite(delta)), delta, jnp.zeros_like(delta))
        R_new, t_new = geometry.retract(s.R, s.t, delta)
        costs_new = point_costs(R_new, t_new)
        # The change of the cost summed per point: far more accurate than the difference of two
        # large totals.
        dc = jnp.sum(costs_new - s.costs)
        accept = jnp.isfinite(dc) & ((dc < 0) | at_floor)
        step = jnp.maximum(jnp.linalg.norm(delta[:3]), jnp.linalg.norm(delta[3:]) / (1.0 + jnp.linalg.norm(s.t)))
        small_step = step < xtol
        if stop_on_step:
            # float64 resolves the decrease down to ~1e-13 of the cost, so reaching the floor means
            # the optimum. float32 reaches it while IRLS (linear convergence) still moves by
            # 0.03-0.4 mm: there it goes on until the distance left, estimated from the rate of
            # linear convergence q = |step_k| / |step_k-1| as |step| q / (1 - q), is small.
            q = jnp.clip(step / s.step, 0.0, 0.99)
            converged_now = accept & small_step & (step * q / (1.0 - q) < xtol)
        else:
            converged_now = at_floor | (accept & small_step)
        converged_now = converged_now | (total == 0)
        stalled = (~accept) & (s.lam > 1e6) & jnp.isfinite(total)
        return _LMState(
            R=jnp.where(accept, R_new, s.R),
            t=jnp.where(accept, t_new, s.t),
            costs=jnp.where(accept, costs_new, s.costs),
            lam=jnp.where(accept, jnp.maximum(s.lam * 0.1, 1e-9), s.lam * 10.0),
            it=s.it + 1,
            # A stall (even a tiny damped gradient step cannot lower the cost) is a stationary
            # point within rounding: converged, unless a degeneracy check below says otherwise.
            done=converged_now | stalled,
            stopped_ok=converged_now | stalled,
            step=jnp.where(accept, step, s.step),
        )

    def cond(s: _LMState):
        return (~s.done) & (s.it < iters)

    costs0 = point_costs(R0, t0)
    init = _LMState(
        R=R0,
        t=t0,
        costs=jnp.where(jnp.isfinite(costs0), costs0, jnp.inf),
        lam=jnp.asarray(1e-3, dtype),
        it=jnp.asarray(0, jnp.int32),
        done=jnp.asarray(False),
        stopped_ok=jnp.asarray(False),
        step=jnp.asarray(jnp.inf, dtype),
    )
    return jax.lax.while_loop(cond, body, init)


# ----------------------------------------------------------------------------------------------
# Implicit differentiation
# ----------------------------------------------------------------------------------------------


def _stationarity(R, t, x3d, x2d, w2, K, huber):
    """g(x) = d c(retract(R, t, delta); x) / d delta at delta = 0 (zero at a solution)."""

    def c(delta):
        return pnp_cost(*geometry.retract(R, t, delta), x3d, x2d, w2, K, huber)

    return jax.grad(c)(jnp.zeros(6, R.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attach_implicit_gradient(R, t, x3d, x2d, w2, K, ok, huber):
    """Identity on (R, t) whose VJP is the implicit-function-theorem derivative of the solver."""
    return R, t


def _attach_fwd(R, t, x3d, x2d, w2, K, ok, huber):
    return (R, t), (R, t, x3d, x2d, w2, K, ok)


def _attach_bwd(huber, res, cotangents):
    R, t, x3d, x2d, w2, K, ok = res
    gR, gt = cotangents
    dtype = R.dtype
    # Cotangent of the pose in the 6D update space: v = (d retract / d delta)^T (gR, gt).
    _, vjp_retract = jax.vjp(lambda d: geometry.retract(R, t, d), jnp.zeros(6, dtype))
    (v,) = vjp_retract((gR, gt))
    H = _exact_hessian(R, t, x3d, x2d, w2, K, huber)
    lam, ok_H = cost.spd_solve(H, v)  # H is symmetric: H^-T v = H^-1 v
    _, vjp_g = jax.vjp(lambda a, b, c, k: _stationarity(R, t, a, b, c, k, huber), x3d, x2d, w2, K)
    bars = vjp_g(-lam)
    good = (ok > 0) & ok_H
    bars = [jnp.where(good & jnp.isfinite(b), b, jnp.zeros_like(b)) for b in bars]
    x3d_bar, x2d_bar, w2_bar, K_bar = bars
    return (jnp.zeros_like(R), jnp.zeros_like(t), x3d_bar, x2d_bar, w2_bar, K_bar, jnp.zeros_like(ok))


_attach_implicit_gradient.defvjp(_attach_fwd, _attach_bwd)


def linearize_at(x3d_t, W_t, K, R, t, *, huber=None, x2d_t=None, hessian="gauss_newton"):
    """The linearised PnP solver at a pose: (dg (6, 2, N), H (6, 6)), points-last layout.

    dg[:, a, i] = d g / d x2d[i, a], g the stationarity condition (gradient of the cost w.r.t.
    the update y = (omega, dt)), and H = d g / d y. By the implicit function theorem the solution
    moves by dy/dx2d = A = -H^-1 dg (`implicit_jacobian` forms it; the LC loss never needs A
    itself: A M A^T = H^-1 (dg M dg^T) H^-1). `W_t` (2, N) are the inverse variances (w^2).

    dg/dx2d is block diagonal: the stationarity term g_i of a point depends on its own x2d_i only.
    Each 6x2 block is `jax.jacfwd` of g_i, vmapped over the points: O(N), never a dense 2N-input
    Jacobian or a 2N x 2N matrix.
    Without Huber this is the closed form A = H^-1 [J_i^T diag(W_i)]_i of Eqs. 9-11.

    x2d_t is needed only with Huber or the exact Hessian (the residuals enter there).
    """
    if x2d_t is None:
        if huber is not None or hessian == "exact":
            raise ValueError("x2d is needed with huber or hessian='exact'")
        uv, J = geometry.project_with_jacobian_points_last(x3d_t, R, t, K)  # (2, N), (2, 6, N)
        x2d_t = uv  # residual-free: only derivatives of g w.r.t. x2d are used
    else:
        r, J = cost.residuals_and_jacobian_t(x3d_t, x2d_t, R, t, K)
        uv = x2d_t - r
    sqrt_free = huber is None

    def g_i(x2d_i, uv_i, J_i, W_i):
        # Stationarity term of one point, g_i = -J_i^T rho_i W_i r_i (6,), written with
        # element-wise products (vmapped over points it stays a fused element-wise pass).
        r_i = x2d_i - uv_i
        wr = W_i * r_i
        if not sqrt_free:
            wr = wr * cost.irls_weights_t((jnp.sqrt(W_i) * r_i)[:, None], huber)[0]
        return -(J_i[0] * wr[0] + J_i[1] * wr[1])

    # dg_i/dx2d_i (6, 2) per point by forward mode, vmapped over the (last) point axis.
    dg = jax.vmap(jax.jacfwd(g_i), in_axes=(-1, -1, -1, -1), out_axes=-1)(x2d_t, uv, J, W_t)

    if hessian == "exact":
        w2 = jnp.sqrt(W_t).T
        H = _exact_hessian(R, t, x3d_t.T, x2d_t.T, w2, K, huber)
    else:
        rho = cost.irls_weights_t(jnp.sqrt(W_t) * (x2d_t - uv), huber)
        H = cost.weighted_gram(cost.stack_axes(J), jnp.concatenate([W_t[0] * rho, W_t[1] * rho]))
    return dg, H


def _apply_inverse(H, dg):
    """A = -H^-1 dg for dg (6, 2, N): a 6x6 inverse applied by 6 fused multiply-adds over the
    points (XLA on CPU runs a solve with 2N right-hand sides, or a vmapped small matmul, slower).
    A singular H gives A = 0."""
    H_inv, _ = cost.spd_inverse(H)
    return -geometry.lincomb_points_last(H_inv, dg.reshape(6, -1)).reshape(dg.shape)


def implicit_jacobian(x3d, x2d, w2d, K, R, t, *, valid=None, huber=None, hessian="gauss_newton"):
    """dy/dx2d (6, 2N) of the PnP solution y = (omega, dt) w.r.t. the image points, at (R, t).

    Per point with forward-mode autodiff of the stationarity condition (see `linearize_at`):
    dy/dx2d_i = -H^-1 dg_i/dx2d_i, O(N). Columns are ordered like `x2d.reshape(-1)`.

    hessian: "gauss_newton" (H = sum_i rho_i J_i^T diag(w_i^2) J_i: the linearisation of the LC
      loss, Eqs. 9-11, which gives A = H^-1 [J_i^T diag(w_i^2)]_i without Huber) or "exact" (the
      true Hessian of the cost; equal to Gauss-Newton at zero residual, and the IFT derivative of
      `solve` at a noisy solution).
    """
    check_correspondences(x3d, x2d, K, w2d=w2d, valid=valid)
    if hessian not in ("gauss_newton", "exact"):
        raise ValueError(f"hessian must be 'gauss_newton' or 'exact', got {hessian!r}")
    dtype = jnp.result_type(x3d, x2d, w2d)
    x3d, x2d = jnp.asarray(x3d, dtype), jnp.asarray(x2d, dtype)
    K = jnp.asarray(K, dtype)
    n = x3d.shape[0]
    w2 = cost.point_weights(w2d, n, dtype, valid)
    dg, H = linearize_at(x3d.T, (w2 * w2).T, K, R, t, huber=huber, x2d_t=x2d.T, hessian=hessian)
    return _apply_inverse(H, dg).transpose(0, 2, 1).reshape(6, 2 * n)


# ----------------------------------------------------------------------------------------------
# The solver
# ----------------------------------------------------------------------------------------------


def _prepare(x3d, x2d, w2d, K, valid):
    """Common dtype, (N, 2) weights with invalid/non-finite points zeroed, and an input-ok flag."""
    dtype = jnp.result_type(x3d, x2d, w2d, K)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    x3d, x2d, K = (jnp.asarray(a, dtype) for a in (x3d, x2d, K))
    n = x3d.shape[0]
    w2 = cost.point_weights(w2d, n, dtype)
    valid_f = jnp.ones((n,), dtype) if valid is None else jnp.asarray(valid).astype(dtype)
    finite_pt = (
        jnp.all(jnp.isfinite(x3d), axis=1) & jnp.all(jnp.isfinite(x2d), axis=1) & jnp.all(jnp.isfinite(w2), axis=1)
    )
    use = (valid_f > 0) & finite_pt
    inputs_ok = jnp.all(finite_pt | (valid_f <= 0)) & jnp.all(jnp.isfinite(K)) & jnp.all(w2 >= 0)
    x3d = jnp.where(use[:, None], x3d, 0.0)
    x2d = jnp.where(use[:, None], x2d, 0.0)
    w2 = jnp.where(use[:, None], jnp.maximum(w2, 0.0), 0.0)
    K = jnp.where(jnp.isfinite(K), K, jnp.eye(3, dtype=dtype))
    return x3d, x2d, w2, K, use, inputs_ok


def solve(
    x3d,
    x2d,
    w2d,
    K,
    *,
    R0=None,
    t0=None,
    valid=None,
    huber: Optional[float] = None,
    iters: int = 30,
) -> PnPResult:
    """Weighted robust PnP of one instance by Levenberg-Marquardt (vmap for batches).

    Args:
      x3d: (N, 3) object points (mm); N >= 4.
      x2d: (N, 2) image points (px).
      w2d: (N, 2) (or (N,)) non-negative weights, the inverse standard deviation of each image
        coordinate: the cost is 0.5 sum ||w_i * r_i||^2 (Huber-robustified when `huber` is set).
      K: (3, 3) intrinsics.
      R0, t0: optional initial pose; EPnP (weighted) when omitted.
      valid: optional (N,) mask; invalid points are ignored.
      huber: Huber threshold on the weighted residual norm ||w_i * r_i||, or None.
      iters: maximum number of LM iterations (static).

    Returns:
      PnPResult(R, t, cov, cost, converged, iterations). R and t are differentiable w.r.t. x3d,
      x2d, w2d and K through the implicit function theorem; cost and cov are differentiable too
      (through the pose and directly).
    """
    check_correspondences(x3d, x2d, K, w2d=w2d, valid=valid)
    check_pose(R0, t0)
    if huber is not None and not isinstance(huber, jax.core.Tracer) and not huber > 0:
        raise ValueError(f"huber must be a positive threshold or None, got {huber}")
    if int(iters) < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    x3d, x2d, w2, K, use, inputs_ok = _prepare(x3d, x2d, w2d, K, valid)
    dtype = x3d.dtype
    sg = jax.lax.stop_gradient
    x3d_c, x2d_c, w2_c, K_c = sg(x3d), sg(x2d), sg(w2), sg(K)
    if R0 is None:
        R0, t0 = _epnp_impl(x3d_c, x2d_c, K_c, w2_c, use.astype(dtype))
    else:
        R0, t0 = sg(jnp.asarray(R0, dtype)), sg(jnp.asarray(t0, dtype))
    R0 = jnp.where(jnp.all(jnp.isfinite(R0)), R0, jnp.eye(3, dtype=dtype))
    t0 = jnp.where(jnp.all(jnp.isfinite(t0)), t0, jnp.array([0.0, 0.0, 1.0], dtype))

    s = _levenberg_marquardt(x3d_c, x2d_c, w2_c, K_c, R0, t0, huber, int(iters))
    _, _, cond_tol = cost.tolerances(dtype)
    H, _ = gauss_newton_hessian(s.R, s.t, x3d_c, x2d_c, w2_c, K_c, huber)
    depth = geometry.transform(x3d_c, s.R, s.t)[:, 2]
    in_front = jnp.all(jnp.where(use, depth > 0, True))
    enough = jnp.sum(use & jnp.any(w2_c > 0, axis=1)) >= 4
    converged = (
        s.stopped_ok
        & inputs_ok
        & enough
        & in_front
        & cost.well_conditioned(H, cond_tol)
        & jnp.all(jnp.isfinite(s.costs))
        & jnp.all(jnp.isfinite(s.R))
        & jnp.all(jnp.isfinite(s.t))
    )
    R_sol = jnp.where(jnp.all(jnp.isfinite(s.R)), s.R, jnp.eye(3, dtype=dtype))
    t_sol = jnp.where(jnp.all(jnp.isfinite(s.t)), s.t, jnp.array([0.0, 0.0, 1.0], dtype))

    R, t = _attach_implicit_gradient(R_sol, t_sol, x3d, x2d, w2, K, converged.astype(dtype), huber)

    # Differentiable quantities at the solution (their derivatives flow through (R, t) and directly).
    H, _ = gauss_newton_hessian(R, t, x3d, x2d, w2, K, huber)
    # Converged implies a well-conditioned H; otherwise the identity is inverted (double where:
    # no NaN reaches the gradient) and cov is 0.
    cov, cov_ok = cost.spd_inverse(jnp.where(converged, H, jnp.eye(6, dtype=dtype)))
    cov = jnp.where(converged & cov_ok, cov, jnp.zeros_like(cov))
    c = pnp_cost(R, t, x3d, x2d, w2, K, huber)
    c = jnp.where(jnp.isfinite(c), c, jnp.finfo(dtype).max)
    return PnPResult(R=R, t=t, cov=cov, cost=c, converged=converged, iterations=s.it)
