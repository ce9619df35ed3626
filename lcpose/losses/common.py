"""Small helpers shared by the pose losses: argument checks, safe norms, box-corner distances; the
masked weights and the Huber-robust PnP cost are lcpose.pnp.cost's, re-exported here.

Every numeric helper works on one instance and follows the dtype of its inputs.
"""
from __future__ import annotations

import jax.numpy as jnp

from lcpose import geometry
from lcpose.pnp.checks import check_correspondences, check_pose

# The PnP cost's pieces live in lcpose.pnp.cost; re-exported under the names the losses use.
from lcpose.pnp.cost import point_weights as masked_weights  # noqa: F401
from lcpose.pnp.cost import robust_cost_t, robust_point_costs_t  # noqa: F401

__all__ = [
    "check_loss_inputs",
    "loss_dtype",
    "masked_weights",
    "safe_norm",
    "smooth_norm",
    "smooth_l1",
    "corner_distance",
    "rotation_cosine_distance",
    "robust_point_costs_t",
    "robust_cost_t",
    "adaptive_huber_delta",
]


def check_loss_inputs(x2d, x3d, w2d, K, R_gt, t_gt, bbox3d=None, valid=None):
    """Shape checks at the Python boundary (they also run at trace time under jit/vmap).

    Raises ValueError naming the offending argument; returns N.
    """
    n = check_correspondences(x3d, x2d, K, w2d=w2d, valid=valid)
    check_pose(R_gt, t_gt, "R_gt", "t_gt")
    if R_gt is None:
        raise ValueError("R_gt and t_gt are required")
    if bbox3d is not None:
        shape = tuple(getattr(bbox3d, "shape", ()))
        if shape != (8, 3):
            raise ValueError(f"bbox3d must have shape (8, 3) (the box corners, mm), got {shape}")
    return n


def loss_dtype(*xs):
    """The common floating dtype of the inputs (float32 when none is floating)."""
    dtype = jnp.result_type(*xs)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    return dtype


def safe_norm(x, axis=-1):
    """Euclidean norm whose gradient is 0 (not NaN) where the vector is exactly 0."""
    s2 = jnp.sum(x * x, axis=axis)
    pos = s2 > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, s2, 1.0)), 0.0)


def smooth_norm(x, eps, axis=-1):
    """sqrt(|x|^2 + eps^2) - eps: the Euclidean norm, smooth at 0 (within eps of |x| everywhere)."""
    return jnp.sqrt(jnp.sum(x * x, axis=axis) + eps * eps) - eps


def smooth_l1(d, beta):
    """Smooth-L1 of a non-negative distance: 0.5 d^2 / beta below beta, d - 0.5 beta above."""
    return jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def corner_distance(R, t, R_gt, t_gt, bbox3d, eps=0.0):
    """Mean over the 8 box corners of || (R c + t) - (R_gt c + t_gt) || (mm).

    eps > 0 uses `smooth_norm` (differentiable at a perfect pose, within eps of the distance).
    """
    d = geometry.transform(bbox3d, R, t) - geometry.transform(bbox3d, R_gt, t_gt)
    dist = smooth_norm(d, eps) if eps > 0 else safe_norm(d)
    return jnp.mean(dist)


def rotation_cosine_distance(R, R_gt):
    """1 - cos(angle of R_gt^T R) = (3 - tr(R_gt^T R)) / 2, in [0, 2].

    Equal to 2 (1 - <q, q_gt>^2), the orientation term of EPro-PnP's derivative regularisation,
    without quaternions (and without their sign ambiguity). Computed as ||R - R_gt||_F^2 / 4, which
    equals it for rotations: 3 - tr(.) cancels in float32 (for 0.3 deg, 1e-5 of 3, i.e. 1 % of
    the value), the squared differences do not. On the rotation manifold (R = R0 exp([w]x)) the
    derivative is that of (3 - tr)/2 as well, since tr(R^T R [w]x) = 0.
    """
    d = R - R_gt
    return 0.25 * jnp.sum(d * d)


def adaptive_huber_delta(x2d, w2, valid_f, relative_delta):
    """EPro-PnP's adaptive Huber threshold (`AdaptiveHuberPnPCost.set_param` of the official code):

        delta = relative_delta * mean(w) * sqrt(var(u) + var(v)),

    means and variances over the valid points (the mean of w over both axes). The product of a
    weight (1/px) and a spread (px) is free of the pixel scale, so delta is the same whether the
    points are in image pixels (as the official code) or in output-grid pixels with K_out (lcpose).
    """
    cnt = jnp.maximum(jnp.sum(valid_f), 1.0)
    w_mean = jnp.sum(w2 * valid_f[:, None]) / (2.0 * cnt)
    mu = jnp.sum(x2d * valid_f[:, None], axis=0) / cnt
    # torch.var is the unbiased estimator.
    var = jnp.sum(((x2d - mu) ** 2) * valid_f[:, None], axis=0) / jnp.maximum(cnt - 1.0, 1.0)
    return relative_delta * w_mean * jnp.sqrt(jnp.sum(var))
