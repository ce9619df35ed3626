"""BPnP-style pose loss: a pose loss on the output of a differentiable PnP layer.

The peer of the LC paper's Table 3 ("BPnP", Chen et al., CVPR 2020, as the LC paper re-implements
it on the box-corner representation): solve PnP on the predicted correspondences with
`lcpose.pnp.solve` (weighted robust Levenberg-Marquardt; gradients by the implicit function
theorem, independent of the number of LM iterations) and penalise the mean distance of the 8 model
box corners under the solved pose and under the ground truth,

    L = 1/8 sum_k || (R c_k + t) - (R_gt c_k + t_gt) ||      (mm).

Gradients reach x2d, x3d and w2d through the solver's implicit derivative (dy*/dx = -H^-1 dg/dx).
An instance whose solve does not converge (degenerate points, zero weights, points behind the
camera, the iteration limit) gets loss 0 and zero gradient; count them with `converged`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from lcpose import pnp
from lcpose.losses.common import check_loss_inputs, corner_distance, loss_dtype

__all__ = ["BPnPTerms", "bpnp_loss"]


class BPnPTerms(NamedTuple):
    """Result of `bpnp_loss` for one instance (fields gain a batch axis under vmap).

    loss: mean corner distance (mm) between the solved and the ground-truth pose; 0 when the solve
      did not converge.
    R, t: the solved pose (differentiable by the implicit function theorem).
    converged: the solver's flag.
    """

    loss: jax.Array
    R: jax.Array
    t: jax.Array
    converged: jax.Array


def bpnp_loss(
    x2d,
    x3d,
    w2d,
    K,
    R_gt,
    t_gt,
    bbox3d,
    valid=None,
    *,
    huber: Optional[float] = None,
    R0=None,
    t0=None,
    iters: int = 30,
    smooth_mm: float = 1e-3,
) -> BPnPTerms:
    """BPnP loss of one instance (vmap for a batch).

    Args:
      x2d: (N, 2) predicted image points, in the pixels of the grid that `K` describes (e.g. the
        64x64 output grid with the crop intrinsics K_out).
      x3d: (N, 3) predicted object points (mm).
      w2d: (N, 2) or (N,) weights, the inverse standard deviation of each image coordinate.
      K: (3, 3) intrinsics of x2d.
      R_gt, t_gt: ground-truth pose (model -> camera, mm).
      bbox3d: (8, 3) corners of the model's box (mm).
      valid: optional (N,) mask.
      huber: Huber threshold of the solver on ||w_i r_i|| (None: least squares).
      R0, t0: optional initial pose of the solver (not differentiated); weighted EPnP otherwise.
        BPnP initialises from its solver's own estimate, never from the ground truth.
      iters: maximum LM iterations.
      smooth_mm: the corner distance is sqrt(d^2 + s^2) - s with s = smooth_mm, so that the loss
        is differentiable at a perfect pose (the gradient vanishes there instead of pointing in
        the direction of the rounding error); it differs from the distance by less than s.

    Returns:
      BPnPTerms(loss, R, t, converged).
    """
    check_loss_inputs(x2d, x3d, w2d, K, R_gt, t_gt, bbox3d, valid)
    dtype = loss_dtype(x2d, x3d, w2d)
    x2d, x3d, w2d, K = (jnp.asarray(a, dtype) for a in (x2d, x3d, w2d, K))
    R_gt, t_gt, bbox3d = (jnp.asarray(a, dtype) for a in (R_gt, t_gt, bbox3d))
    res = pnp.solve(x3d, x2d, w2d, K, R0=R0, t0=t0, valid=valid, huber=huber, iters=iters)
    dist = corner_distance(res.R, res.t, R_gt, t_gt, bbox3d, eps=float(smooth_mm))
    # The solver already zeroes the implicit gradient of a failed solve; the where keeps the value
    # (possibly huge for a diverged pose) out of the batch mean.
    ok = res.converged & jnp.isfinite(dist)
    loss = jnp.where(ok, dist, jnp.zeros_like(dist))
    return BPnPTerms(loss=loss, R=res.R, t=res.t, converged=res.converged)
