"""The Linear-Covariance (LC) loss (Liu, Hu & Salzmann, CVPR 2023).

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
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from lcpose import geometry
from lcpose.losses.common import masked_weights
from lcpose.pnp.checks import check_correspondences
from lcpose.smallmat import matmul_small, spd_inverse

__all__ = ["LCTerms", "lc_loss", "robust_weights", "representation_fn", "REPRESENTATIONS", "huber2"]

REPRESENTATIONS = ("bbox3d", "bbox2d", "quaternion", "axis_angle", "two_column")

# Residuals longer than this (pixels of the correspondence grid) are clamped (official code).
RESIDUAL_CLAMP_PX = 32.0


class LCTerms(NamedTuple):
    """LC loss of one instance and its terms (leading batch axis under vmap)."""

    loss: jax.Array
    e_cov: jax.Array
    e_prior: jax.Array
    e_linear: jax.Array


def huber2(a, d):
    """a^2 for a <= d, d (2a - d) beyond: a squared magnitude that grows only linearly past d."""
    return jnp.where(a <= d, a * a, d * (2.0 * a - d))


def _masked_mean(x_t, valid):
    """Mean over points (last axis) of x_t (2, N) restricted to valid points; per axis."""
    return jnp.sum(x_t * valid, axis=-1, keepdims=True) / jnp.maximum(jnp.sum(valid), 1.0)


def robust_weights(r, w2d, valid, robust: bool = True):
    """Clamped residuals r_c, residual variances M and inverse variances W, each (N, 2).

    robust=True (official implementation):
      - clamp each 2D residual to length <= 32 px: r_c = r - sg(f r), f = max(0, (|r| - 32) / (|r| + 1e-6))
        (the value is clamped, the gradient passes unchanged);
      - per axis, m = sg(mean_valid |r_c|), M = huber2(|r_c|, 3 m);
      - w_e = sg(w^2 M), m_w = mean_valid w_e per axis, d_w = sg(sqrt(4 m_w / (M + 1e-6))),
        W = huber2(w, d_w): weights far above what their residuals support are limited.
    robust=False: r_c = r, M = r^2, W = w^2.
    The valid mask enters only the means.
    """
    out = _robust_weights_points_last(jnp.asarray(r).T, jnp.asarray(w2d).T, jnp.asarray(valid), robust)
    return tuple(a.T for a in out)


def _robust_weights_points_last(r_t, w_t, valid, robust: bool = True):
    """`robust_weights` in the points-last layout: r_t, w_t (2, N) -> r_c, M, W (2, N) each.

    The loss works in this layout: the point axis is the contiguous one, which XLA on CPU
    vectorises (an (N, 2) layout makes every element-wise pass strided).
    """
    sg = jax.lax.stop_gradient
    if not robust:
        return r_t, r_t * r_t, w_t * w_t
    norm = jnp.sqrt(r_t[0] * r_t[0] + r_t[1] * r_t[1])
    f = jnp.maximum(0.0, (norm - RESIDUAL_CLAMP_PX) / (norm + 1e-6))
    r_c = r_t - sg(f * r_t)
    a = jnp.abs(r_c)
    m = sg(_masked_mean(a, valid))
    M = huber2(a, 3.0 * m)
    m_w = _masked_mean(sg(w_t * w_t * M), valid)
    # With no residual at all on an axis (m_w = 0) nothing limits the weights: W = w^2 there
    # (the formula would give d_w = 0, W = 0 and a singular Hessian).
    d_w = sg(jnp.where(m_w > 0, jnp.sqrt(4.0 * m_w / (M + 1e-6)), jnp.inf))
    W = huber2(w_t, d_w)
    return r_c, M, W


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


def _weighted_grams(J, weights):
    """sum_p weights[k, p] J[:, p] J[:, p]^T for each k: (k, 6, 6) from J (6, P), weights (k, P)."""
    # (J * w) @ J^T: its gradient w.r.t. w is again one thin product and an element-wise pass.
    return jnp.stack([(J * w) @ J.T for w in weights])


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

    Returns:
      LCTerms(loss, e_cov, e_prior, e_linear). Gradients reach x2d and x3d through the residuals
      (E_cov) and w2d through A and H (E_cov, E_prior, E_linear); none reach A through x3d.
    """
    check_correspondences(x3d, x2d, K, w2d=w2d, valid=valid)
    if nll not in ("laplace", "gaussian"):
        raise ValueError(f"nll must be 'laplace' or 'gaussian', got {nll!r}")
    if tuple(jnp.shape(bbox3d)) != (8, 3):
        raise ValueError(f"bbox3d must have shape (8, 3), got {tuple(jnp.shape(bbox3d))}")
    if not (use_cov or use_linear):
        raise ValueError("at least one of use_cov and use_linear must be True")
    sg = jax.lax.stop_gradient
    dtype = jnp.result_type(x2d, x3d, w2d)
    x2d, x3d = jnp.asarray(x2d, dtype), jnp.asarray(x3d, dtype)
    n = x3d.shape[0]
    w2d = masked_weights(w2d, n, dtype)  # valid enters only the means, not the weights
    K, R_gt, t_gt, bbox3d = (sg(jnp.asarray(a, dtype)) for a in (K, R_gt, t_gt, bbox3d))
    valid_f = jnp.ones((n,), dtype) if valid is None else jnp.asarray(valid).astype(dtype)

    # 1-2. residuals under the ground truth and the robust weighting (points-last layout).
    x3d_t = x3d.T
    r_t = x2d.T - geometry.project_points_last(x3d_t, R_gt, t_gt, K)
    r_c, M, W = _robust_weights_points_last(r_t, w2d.T, valid_f, robust)

    # 3. the solver linearised at the ground truth, x3d held constant (Eqs. 9-11). With J_i the
    # projection Jacobian (2 x 6) of point i and W_i its inverse variances, the stationarity
    # condition has the per-point blocks dg_i = -J_i^T diag(W_i) and the Gauss-Newton Hessian
    # is H = sum_i J_i^T W_i J_i, so A = H^-1 [J_i^T W_i]_i. J depends on (x3d, pose, K) only:
    # no gradient flows into A through x3d.
    _, J = geometry.project_with_jacobian_points_last(sg(x3d_t), R_gt, t_gt, K)  # (2, 6, N)
    Jf = jnp.concatenate([J[0], J[1]], axis=1)  # (6, 2N): columns u of every point, then v
    W_f, M_f, r_f = W.reshape(-1), M.reshape(-1), sg(r_c).reshape(-1)

    # 4. covariances in the 6D update space (Eqs. 12, 14) without forming A (6 x 2N):
    # C = A diag(M) A^T = H^-1 G H^-1 with G = sum_i J_i^T W_i M_i W_i J_i, and e = A r = H^-1 b,
    # b = sum_i J_i^T W_i r_i: O(36 N), two thin (6 x 2N) products. The 6 x 6 algebra after them
    # is unrolled (lcpose.smallmat; under vmap a LAPACK call per op is slower, and can hang).
    W_cov = sg(W_f) if detach_weights_cov else W_f
    M_cov = sg(M_f) if detach_residual_cov else M_f
    H, G = _weighted_grams(Jf, jnp.stack([W_f, W_cov * W_cov * M_cov]))
    b = jnp.sum(Jf * (W_f * r_f), axis=1)
    H = H + jnp.finfo(dtype).eps * jnp.abs(jnp.trace(H)) * jnp.eye(6, dtype=dtype)
    H_inv = spd_inverse(H)
    H_inv_cov = sg(H_inv) if detach_weights_cov else H_inv
    C6 = matmul_small(matmul_small(H_inv_cov, G), H_inv_cov)
    C6 = 0.5 * (C6 + C6.T)
    e6 = jnp.sum(H_inv * b, axis=1)  # linearised pose error (Eq. 13)

    # 5. map to the representation: only the diagonal of J_f C J_f^T is needed.
    f, groups = representation_fn(representation, R_gt, t_gt, K, bbox3d)
    J_f = _bbox3d_jacobian(R_gt, bbox3d) if representation == "bbox3d" else jax.jacfwd(f)(jnp.zeros(6, dtype))
    diag_cov = _quadratic_diag(J_f, C6)
    diag_prior = _quadratic_diag(J_f, H_inv)
    e_lin = jnp.sum(J_f * e6, axis=1)
    cov_g = _group_sums(diag_cov, groups)
    prior_g = _group_sums(diag_prior, groups)
    lin_g = _group_sums(e_lin * e_lin, groups)
    tiny = jnp.finfo(dtype).tiny
    if nll == "laplace":
        # mean over groups of the Euclidean scale: sqrt of the group's summed variances.
        root = lambda v: jnp.sqrt(jnp.maximum(v, tiny))  # noqa: E731
        e_cov, e_prior, e_linear = (jnp.mean(root(v)) for v in (cov_g, prior_g, lin_g))
    else:
        e_cov, e_prior, e_linear = (jnp.mean(v) for v in (cov_g, prior_g, lin_g))

    # 6. Eq. 17 with the Table 4 switches.
    e_cov_used = e_cov if use_cov else jnp.zeros_like(e_cov)
    e_lin_used = e_linear if use_linear else jnp.zeros_like(e_linear)
    if use_prior:
        loss = jnp.log(e_prior) + 0.5 * (e_cov_used + e_lin_used) / e_prior
    else:
        loss = 0.5 * (e_cov_used + e_lin_used)
    return LCTerms(loss=loss, e_cov=e_cov, e_prior=e_prior, e_linear=e_linear)
