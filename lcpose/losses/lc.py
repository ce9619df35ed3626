"""The Linear-Covariance (LC) loss (Liu, Hu & Salzmann, ICCV 2023).

Instead of solving PnP and comparing the solved pose with the ground truth, the LC loss
linearises the PnP solver at the ground-truth pose y_gt (Eqs. 9-11): a perturbation dx2d of the
image points moves the solution by dy = A dx2d, A = H^-1 [J_i^T W_i]_i. The correspondence
residuals r (of the prediction under the ground-truth pose) then induce a pose covariance
C = A diag(M) A^T (Eq. 12) with M the residual variances, and a pose error e = A r (Eq. 13); the
weights alone give the prior covariance H^-1 (Eq. 14). In a pose representation y^K = f(y^6)
(3D box corners by default), the loss is the negative log-likelihood of a Laplace (or Gaussian)
distribution whose scale is the prior and whose observed spread is the covariance plus the
linearised error (Eqs. 15-17):

    L_LC = log(E_prior) + 0.5 (E_cov + E_linear) / E_prior.

The robust weighting follows the official implementation (clamped residuals, Huber-limited
residual variances and weights); see `robust_weights`. Everything is per instance (vmap for
batches) and costs O(N) (Sec. "Efficient Loss Computation"): covariances are formed in the 6D
update space and only the diagonal of J_f C J_f^T is evaluated.

Both halves have hand-written backward passes (`jax.custom_vjp`): the per-point part (residuals,
robust weights, Jacobians and the three sums over points) and the 6 x 6 algebra after it. Autodiff
gives the same gradients through a long chain of small ops; the closed forms are one element-wise
pass over the points and a few 6 x 6 products (tests compare both with finite differences).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from lcpose import geometry
from lcpose.pnp import cost
from lcpose.pnp.checks import check_correspondences
from lcpose.smallmat import matmul_small

__all__ = ["LCTerms", "lc_loss", "robust_weights", "representation_fn", "REPRESENTATIONS", "huber2"]

REPRESENTATIONS = ("bbox3d", "bbox2d", "quaternion", "axis_angle", "two_column")

# Residuals longer than this (pixels of the correspondence grid) are clamped: the official code's
# 32 px on its 64x64 grid, i.e. half the map. `lc_loss(residual_clamp=)` sets it for other grids
# (experiments.config.objective_for passes half the output map's side).
RESIDUAL_CLAMP_PX = 32.0


class LCTerms(NamedTuple):
    """LC loss of one instance and its terms (leading batch axis under vmap).

    valid: False for an instance the loss cannot be evaluated on (a non-finite valid point, or a
      Gauss-Newton Hessian at the ground truth that is singular: all-zero weights, collinear
      points); its loss and terms are then 0 and its gradient is zero.
    """

    loss: jax.Array
    e_cov: jax.Array
    e_prior: jax.Array
    e_linear: jax.Array
    valid: jax.Array


def huber2(a, d):
    """a^2 for a <= d, d (2a - d) beyond: a squared magnitude that grows only linearly past d."""
    return jnp.where(a <= d, a * a, d * (2.0 * a - d))


def _masked_mean(x_t, valid):
    """Mean over points (last axis) of x_t (2, N) restricted to valid points; per axis."""
    return jnp.sum(x_t * valid, axis=-1, keepdims=True) / jnp.maximum(jnp.sum(valid), 1.0)


def robust_weights(r, w2d, valid, robust: bool = True, residual_clamp: float = RESIDUAL_CLAMP_PX):
    """Clamped residuals r_c, residual variances M and inverse variances W, each (N, 2).

    robust=True (official implementation):
      - clamp each 2D residual to length <= c = residual_clamp (32 px of a 64x64 grid):
        r_c = r - sg(f r), f = max(0, (|r| - c) / (|r| + 1e-6))
        (the value is clamped, the gradient passes unchanged);
      - per axis, m = sg(mean_valid |r_c|), M = huber2(|r_c|, 3 m);
      - w_e = sg(w^2 M), m_w = mean_valid w_e per axis, d_w = sg(sqrt(4 m_w / (M + 1e-6))),
        W = huber2(w, d_w): weights far above what their residuals support are limited.
    robust=False: r_c = r, M = r^2, W = w^2.
    The valid mask enters only the means.
    """
    out = _robust_weights_points_last(jnp.asarray(r).T, jnp.asarray(w2d).T, jnp.asarray(valid), robust,
                                      residual_clamp)
    return tuple(a.T for a in out)


def _robust_weights_points_last(r_t, w_t, valid, robust: bool = True, clamp: float = RESIDUAL_CLAMP_PX):
    """`robust_weights` in the points-last layout: r_t, w_t (2, N) -> r_c, M, W (2, N) each.

    The loss works in this layout: the point axis is the contiguous one, which XLA on CPU
    vectorises (an (N, 2) layout makes every element-wise pass strided).
    """
    return _robust_weights_and_slopes(r_t, w_t, valid, robust, clamp)[:3]


def _robust_weights_and_slopes(r_t, w_t, valid, robust: bool = True, clamp: float = RESIDUAL_CLAMP_PX):
    """r_c, M, W of `_robust_weights_points_last` and the slopes dM/dr, dW/dw (2, N each) that
    its stop-gradients leave, for the loss's hand-written backward."""
    sg = jax.lax.stop_gradient
    if not robust:
        return r_t, r_t * r_t, w_t * w_t, 2.0 * r_t, 2.0 * w_t
    norm = jnp.sqrt(r_t[0] * r_t[0] + r_t[1] * r_t[1])
    f = jnp.maximum(0.0, (norm - clamp) / (norm + 1e-6))
    r_c = r_t - sg(f * r_t)
    a = jnp.abs(r_c)
    m = sg(_masked_mean(a, valid))
    M = huber2(a, 3.0 * m)
    m_w = _masked_mean(sg(w_t * w_t * M), valid)
    # With no residual at all on an axis (m_w = 0) nothing limits the weights: W = w^2 there
    # (the formula would give d_w = 0, W = 0 and a singular Hessian).
    d_w = sg(jnp.where(m_w > 0, jnp.sqrt(4.0 * m_w / (M + 1e-6)), jnp.inf))
    W = huber2(w_t, d_w)
    # r_c moves one-to-one with r (the clamp is constant) and huber2'(a, d) = 2 min(a, d), a >= 0.
    return r_c, M, W, 2.0 * jnp.clip(r_c, -3.0 * m, 3.0 * m), 2.0 * jnp.minimum(w_t, d_w)


def representation_fn(name, R_gt, t_gt, K, bbox3d):
    """f(y6) for a pose representation around (R_gt, t_gt), and its group sizes.

    The Laplace/Gaussian terms are averaged over groups: the 8 corners for the boxes, and
    (rotation parameters, translation) for the rotation representations of Table 6.
    """
    if name == "bbox3d":
        def f(y):
            R, t = geometry.retract(R_gt, t_gt, y)
            return geometry.transform(bbox3d, R, t).reshape(-1)

        return f, (3,) * 8
    if name == "bbox2d":
        def f(y):
            R, t = geometry.retract(R_gt, t_gt, y)
            return geometry.project(bbox3d, R, t, K).reshape(-1)

        return f, (2,) * 8
    rot = {
        "quaternion": (geometry.matrix_to_quat, 4),
        "axis_angle": (geometry.matrix_to_axis_angle, 3),
        "two_column": (geometry.matrix_to_sixd, 6),
    }
    if name in rot:
        to_params, k = rot[name]

        def f(y):
            R, t = geometry.retract(R_gt, t_gt, y)
            return jnp.concatenate([to_params(R), t])

        return f, (k, 3)
    raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {name!r}")


def _bbox3d_jacobian(R, bbox3d):
    """d f / d(omega, dt) (24, 6) of the bbox3d representation at 0 (what jax.jacfwd gives):
    d(R exp(omega) X + t) = R (e_c x X) d omega_c + dt per corner X."""
    zero = jnp.zeros(3, bbox3d.dtype)
    eye = jnp.eye(3, dtype=bbox3d.dtype)
    J_w = jnp.stack([geometry.transform(jnp.cross(eye[c], bbox3d), R, zero) for c in range(3)], axis=-1)
    J_t = jnp.broadcast_to(eye, J_w.shape)
    return jnp.concatenate([J_w, J_t], axis=-1).reshape(-1, 6)


def _quadratic_diag(J, C):
    """diag(J C J^T) (K,) for J (K, 6) and C (6, 6), element-wise."""
    return jnp.sum(J[:, :, None] * C[None, :, :] * J[:, None, :], axis=(1, 2))


def _group_sums(values, groups):
    """Sum `values` (K,) within consecutive groups of the given sizes -> (G,)."""
    if len(set(groups)) == 1:
        return jnp.sum(values.reshape(len(groups), groups[0]), axis=1)
    out, i = [], 0
    for g in groups:
        out.append(jnp.sum(values[i : i + g]))
        i += g
    return jnp.stack(out)


def _group_expand(values, groups):
    """The transpose of `_group_sums`: each group's value repeated over its members -> (K,)."""
    if len(set(groups)) == 1:
        return jnp.broadcast_to(values[:, None], (len(groups), groups[0])).reshape(-1)
    return jnp.concatenate([jnp.broadcast_to(v, (g,)) for v, g in zip(values, groups)])


def _quad_forms(S, J):
    """j^T S j for every column j of J (6, P) and a (6, 6) matrix S, unrolled over the 21 pairs
    into one element-wise pass over the contiguous column axis."""
    out = 0.0
    for i in range(6):
        out = out + S[i, i] * (J[i] * J[i])
        for j in range(i + 1, 6):
            out = out + (S[i, j] + S[j, i]) * (J[i] * J[j])
    return out


# ----------------------------------------------------------------------------------------------
# Steps 1-4 per point: residuals, robust weights, the solver's Jacobians and the three sums over
# points that the rest needs. Backward: the cotangents of the sums reach every point in one
# element-wise pass (autodiff takes a long chain of passes).
# ----------------------------------------------------------------------------------------------


def _point_sums_fwd(x2d, x3d, w2d, valid, K, R, t, robust, clamp):
    n = x3d.shape[0]
    # The solver's residuals and Jacobians at the ground truth (lcpose.pnp.cost, as linearize_at).
    r, J = cost.residuals_and_jacobian_t(x3d.T, x2d.T, R, t, K)  # (2, N), (2, 6, N)
    r_c, M, W, dM, dW = _robust_weights_and_slopes(r, w2d.T, valid, robust, clamp)
    # All 2N point-axes side by side (u of every point, then v): every per-point quantity is one
    # contiguous row and the sums are thin (6 x 2N) products.
    J = cost.stack_axes(J)
    r_c, M, W, dM, dW = (a.reshape(2 * n) for a in (r_c, M, W, dM, dW))
    H = cost.weighted_gram(J, W)  # the Gauss-Newton Hessian of linearize_at
    G = cost.weighted_gram(J, W * W * M)
    b = J @ (W * r_c)
    return (H, G, b), (J, r_c, M, W, dM, dW, R)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _point_sums(x2d, x3d, w2d, valid, K, R, t, robust, clamp, detach_weights, detach_residuals):
    """H = sum_i J_i^T W_i J_i, G = sum_i J_i^T W_i M_i W_i J_i, b = sum_i J_i^T W_i sg(r_c,i).

    Gradients reach x2d and x3d through the residual variances M (r_c's only differentiable
    use), w2d through W; none reach J (x3d is held constant in the linearisation), K, R, t or
    valid. G passes none to the weights with `detach_weights`, none to the residuals with
    `detach_residuals` (Table 4, C1 and C0).
    """
    return _point_sums_fwd(x2d, x3d, w2d, valid, K, R, t, robust, clamp)[0]


def _point_sums_vjp_fwd(x2d, x3d, w2d, valid, K, R, t, robust, clamp, detach_weights, detach_residuals):
    return _point_sums_fwd(x2d, x3d, w2d, valid, K, R, t, robust, clamp)


def _point_sums_vjp_bwd(robust, clamp, detach_weights, detach_residuals, res, cts):
    J, r_c, M, W, dM, dW, R = res
    H_bar, G_bar, b_bar = cts
    n = J.shape[1] // 2
    # d/dW_i and d/dM_i of the three sums, per point-axis: quadratic forms of its J_i.
    q_G = _quad_forms(G_bar, J)
    W_bar = _quad_forms(H_bar, J) + r_c * sum(b_bar[k] * J[k] for k in range(6))
    if not detach_weights:
        W_bar = W_bar + 2.0 * W * M * q_G
    M_bar = jnp.zeros_like(M) if detach_residuals else W * W * q_G
    # Both gradients in one array: XLA then evaluates each once instead of in every consumer.
    g = jnp.concatenate([M_bar * dM, W_bar * dW]).reshape(4, n)
    r_bar, w_bar = g[:2], g[2:]
    # r = x2d - project(x3d): d project_k / d x3d = (d uv_k / d X_c) R, rows 3..5 of J_k.
    x3d_bar = J[3:, :n].T * r_bar[0][:, None] + J[3:, n:].T * r_bar[1][:, None]  # (N, 3)
    x3d_bar = -(x3d_bar[:, 0:1] * R[0] + x3d_bar[:, 1:2] * R[1] + x3d_bar[:, 2:3] * R[2])
    return r_bar.T, x3d_bar, w_bar.T, None, None, None, None


_point_sums.defvjp(_point_sums_vjp_fwd, _point_sums_vjp_bwd)


# ----------------------------------------------------------------------------------------------
# Steps 4-5: the 6 x 6 algebra from the sums to the three terms. Backward in closed form: a
# handful of small products (stacked where two can share one op) instead of autodiff's chain.
# ----------------------------------------------------------------------------------------------


def _terms_fwd(H, G, b, J_f, groups, nll):
    dtype = H.dtype
    # C_prior = H^-1 (Eq. 14), Jacobi-conditioned and without a ridge (lcpose.pnp.cost). A
    # singular H (flagged) is replaced by the identity: finite terms, which the caller discards.
    P, ok, lam_min = cost.spd_inverse_and_conditioning(H)
    ok = ok & (lam_min > cost.tolerances(dtype)[2])
    P = jnp.where(ok, P, jnp.eye(6, dtype=dtype))
    # G is symmetric up to rounding; using it twice also keeps XLA from fusing the product below
    # into G's library call (YNNPACK), which made that call slower and wait for P.
    G = 0.5 * (G + G.T)
    PG = matmul_small(P, G)
    C = matmul_small(PG, P)  # C = A diag(M) A^T = H^-1 G H^-1 (Eq. 12)
    C = 0.5 * (C + C.T)
    e6 = jnp.sum(P * b, axis=1)  # linearised pose error e = A sg(r_c) = H^-1 b (Eq. 13)
    # only the diagonal of J_f C J_f^T is needed
    e_lin = jnp.sum(J_f * e6, axis=1)
    sums = [_group_sums(v, groups) for v in (_quadratic_diag(J_f, C), _quadratic_diag(J_f, P), e_lin * e_lin)]
    if nll == "laplace":
        # mean over groups of the Euclidean scale: sqrt of the group's summed variances.
        tiny = jnp.finfo(dtype).tiny
        roots = [jnp.sqrt(jnp.maximum(v, tiny)) for v in sums]
        terms = tuple(jnp.mean(r) for r in roots)
        # d sqrt(max(v, tiny)) / dv, with jnp.maximum's even split of a tie
        slopes = [jnp.where(v > tiny, 0.5, jnp.where(v == tiny, 0.25, 0.0)) / r for v, r in zip(sums, roots)]
    else:
        terms = tuple(jnp.mean(v) for v in sums)
        slopes = [jnp.ones_like(v) for v in sums]
    slopes = [s / len(groups) for s in slopes]  # the mean over groups
    return terms + (ok.astype(dtype),), (P, PG, b, e_lin, J_f, slopes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _lc_terms(H, G, b, J_f, groups, nll, detach_weights):
    """(E_cov, E_prior, E_linear, ok) from the sums of `_point_sums` and the representation's
    Jacobian J_f (K, 6); `detach_weights` stops E_cov's gradient through H (Table 4, C1). ok
    (1.0 or 0.0, no gradient) says whether H was positive definite and not near singular."""
    return _terms_fwd(H, G, b, J_f, groups, nll)[0]


def _lc_terms_vjp_fwd(H, G, b, J_f, groups, nll, detach_weights):
    return _terms_fwd(H, G, b, J_f, groups, nll)


def _lc_terms_vjp_bwd(groups, nll, detach_weights, res, cts):
    P, PG, b, e_lin, J_f, slopes = res
    cov_bar, prior_bar, lin_bar = (_group_expand(c * s, groups) for c, s in zip(cts[:3], slopes))
    # diag(J_f X J_f^T) -> X_bar = J_f^T diag(x_bar) J_f, for X = C and X = P in one op
    w = jnp.stack([cov_bar, prior_bar])  # (2, K)
    C_bar, P_bar = matmul_small(J_f.T * w[:, None, :], J_f)
    e6_bar = jnp.sum(J_f * (2.0 * e_lin * lin_bar)[:, None], axis=0)  # e_lin = J_f e6
    b_bar = jnp.sum(P * e6_bar, axis=1)  # e6 = P b, P symmetric
    P_bar = P_bar + e6_bar[:, None] * b[None, :]
    if not detach_weights:
        T = matmul_small(C_bar, PG)  # C = P G P: P_bar += C_bar P G + G P C_bar, C_bar symmetric
        P_bar = P_bar + T + T.T
    # G_bar = P C_bar P and H_bar = -P P_bar P (d H^-1 = -H^-1 dH H^-1) in one pair of products
    G_bar, H_bar = matmul_small(matmul_small(P, jnp.stack([C_bar, -P_bar])), P)
    return H_bar, G_bar, b_bar, None


_lc_terms.defvjp(_lc_terms_vjp_fwd, _lc_terms_vjp_bwd)


def lc_loss(
    x2d,
    x3d,
    w2d,
    K,
    R_gt,
    t_gt,
    bbox3d,
    valid=None,
    *,
    representation: str = "bbox3d",
    nll: str = "laplace",
    robust: bool = True,
    detach_residual_cov: bool = False,
    detach_weights_cov: bool = False,
    use_cov: bool = True,
    use_linear: bool = True,
    use_prior: bool = True,
    residual_clamp: float = RESIDUAL_CLAMP_PX,
) -> LCTerms:
    """The LC loss of one instance (vmap for batches).

    Args:
      x2d: (N, 2) predicted image points (px of the grid that K describes, e.g. K_out).
      x3d: (N, 3) predicted object points (mm).
      w2d: (N, 2) positive weights = inverse standard deviations of the image coordinates.
      K: (3, 3) intrinsics of x2d; R_gt (3, 3), t_gt (3,) the ground-truth pose (no gradient).
      bbox3d: (8, 3) corners of the model's box (mm), for the box representations.
      valid: optional (N,) mask; it enters only the means of the robust weighting (every point
        enters the Hessian, as in the official implementation).
      representation: "bbox3d" (default), "bbox2d", "quaternion", "axis_angle", "two_column".
      nll: "laplace" (default) or "gaussian" (Table 6).
      robust: the robust weighting of the official implementation (`robust_weights`).
      detach_residual_cov: Table 4 C0, no gradient from E_cov into the residuals.
      detach_weights_cov: Table 4 C1, no gradient from E_cov into the weights.
      use_cov / use_linear / use_prior: Table 4 C2 / C3 / C4 (drop E_cov / E_linear / E_prior;
        without E_prior the loss is 0.5 (E_cov + E_linear), and the weights' global scale is no
        longer constrained: train without the scale branch).
      residual_clamp: residuals longer than this (px of x2d's grid) are clamped in value
        (`robust_weights`); the official 32 px is half its 64x64 grid.

    Returns:
      LCTerms(loss, e_cov, e_prior, e_linear, valid). An instance with a non-finite valid point
      or a singular Hessian at the ground truth (all-zero weights, collinear points) has
      valid=False, loss and terms 0 and zero gradient; the others are unaffected. Gradients
      reach x2d and x3d through the residuals (E_cov) and w2d through A and H (E_cov, E_prior,
      E_linear); none reach A through x3d.
      Reverse mode only (jax.grad, jax.vjp): the backward passes are hand-written
      (`jax.custom_vjp`), so jax.jvp / jax.jacfwd of the loss raise.
    """
    check_correspondences(x3d, x2d, K, w2d=w2d, valid=valid)
    if nll not in ("laplace", "gaussian"):
        raise ValueError(f"nll must be 'laplace' or 'gaussian', got {nll!r}")
    if tuple(jnp.shape(bbox3d)) != (8, 3):
        raise ValueError(f"bbox3d must have shape (8, 3), got {tuple(jnp.shape(bbox3d))}")
    if not (use_cov or use_linear):
        raise ValueError("at least one of use_cov and use_linear must be True")
    residual_clamp = float(residual_clamp)
    if not residual_clamp > 0:   # also rejects NaN
        raise ValueError(f"residual_clamp must be > 0 (px), got {residual_clamp}")
    sg = jax.lax.stop_gradient
    dtype = jnp.result_type(x2d, x3d, w2d)
    x2d, x3d = jnp.asarray(x2d, dtype), jnp.asarray(x3d, dtype)
    n = x3d.shape[0]
    w2d = cost.point_weights(w2d, n, dtype)  # valid enters only the means, not the weights
    K, R_gt, t_gt, bbox3d = (sg(jnp.asarray(a, dtype)) for a in (K, R_gt, t_gt, bbox3d))
    valid_f = jnp.ones((n,), dtype) if valid is None else jnp.asarray(valid).astype(dtype)

    # Bad input is a flag, not a NaN: a non-finite valid point (or pose, K, box) marks the
    # instance invalid, and then every point is zeroed (H = 0, finite terms that are discarded);
    # a non-finite invalid point is dropped (zero weight). Double where: the zeroed copies keep
    # NaN out of the gradient.
    finite = jnp.all(jnp.isfinite(x2d), 1) & jnp.all(jnp.isfinite(x3d), 1) & jnp.all(jnp.isfinite(w2d), 1)
    cam_ok = jnp.all(jnp.isfinite(K)) & jnp.all(jnp.isfinite(R_gt)) & jnp.all(jnp.isfinite(t_gt))
    cam_ok = cam_ok & jnp.all(jnp.isfinite(bbox3d))
    inputs_ok = jnp.all(finite | (valid_f <= 0)) & cam_ok
    keep = (finite & inputs_ok)[:, None]
    x2d, x3d, w2d = (jnp.where(keep, a, 0.0) for a in (x2d, x3d, w2d))
    K = jnp.where(cam_ok, K, jnp.eye(3, dtype=dtype))
    R_gt = jnp.where(cam_ok, R_gt, jnp.eye(3, dtype=dtype))
    t_gt = jnp.where(cam_ok, t_gt, jnp.array([0.0, 0.0, 1.0], dtype))
    bbox3d = jnp.where(cam_ok, bbox3d, jnp.ones_like(bbox3d))

    # 1-4. residuals under the ground truth, the robust weighting (points-last layout) and the
    # solver linearised at the ground truth with x3d held constant (Eqs. 9-11): with J_i the
    # projection Jacobian (2 x 6) of point i and W_i its inverse variances, the Gauss-Newton
    # Hessian is H = sum_i J_i^T W_i J_i and A = H^-1 [J_i^T W_i]_i. A (6 x 2N) is never formed:
    # C = A diag(M) A^T = H^-1 G H^-1 with G = sum_i J_i^T W_i M_i W_i J_i, and e = A r = H^-1 b
    # with b = sum_i J_i^T W_i r_i: O(36 N). The 6 x 6 algebra after them is unrolled
    # (lcpose.smallmat; under vmap a LAPACK call per op is slower, and can hang).
    H, G, b = _point_sums(x2d, x3d, w2d, valid_f, K, R_gt, t_gt, robust, residual_clamp, detach_weights_cov,
                          detach_residual_cov)

    # 5. covariances (Eqs. 12, 14) mapped to the representation: only the diagonal of
    # J_f C J_f^T is needed.
    f, groups = representation_fn(representation, R_gt, t_gt, K, bbox3d)
    J_f = _bbox3d_jacobian(R_gt, bbox3d) if representation == "bbox3d" else jax.jacfwd(f)(jnp.zeros(6, dtype))
    e_cov, e_prior, e_linear, h_ok = _lc_terms(H, G, b, J_f, groups, nll, detach_weights_cov)

    # 6. Eq. 17 with the Table 4 switches.
    e_cov_used = e_cov if use_cov else jnp.zeros_like(e_cov)
    e_lin_used = e_linear if use_linear else jnp.zeros_like(e_linear)
    if use_prior:
        loss = jnp.log(e_prior) + 0.5 * (e_cov_used + e_lin_used) / e_prior
    else:
        loss = 0.5 * (e_cov_used + e_lin_used)
    ok = inputs_ok & (h_ok > 0) & jnp.isfinite(loss)
    zero = jnp.zeros_like(loss)
    return LCTerms(
        loss=jnp.where(ok, loss, zero),
        e_cov=jnp.where(ok, e_cov, zero),
        e_prior=jnp.where(ok, e_prior, zero),
        e_linear=jnp.where(ok, e_linear, zero),
        valid=ok,
    )
