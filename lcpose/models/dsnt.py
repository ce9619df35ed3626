"""DSNT: differentiable spatial to numerical transform (Nibali et al., 2018), with variances.

One instance per call (vmap for batches). A heatmap of logits (H, W, K) -- one channel per
keypoint -- becomes per channel a probability map p = softmax over the H*W pixels, and

    mean     mu  = sum_uv p(u, v) (u, v)                     (output-grid pixels, u = column)
    variance s^2 = sum_uv p(u, v) ((u - mu_u)^2, (v - mu_v)^2)   (per axis, two-pass)

in the pixel-centre convention of `lcpose.correspondences` (pixel column u, row v has
coordinates (u, v)), so ``mu`` pairs with the crop intrinsics ``K_out`` of the output grid.

Weights (the paper's w = 1 / std, per axis). The DSNT variance of a map that puts all its
mass on one pixel is 0 although such a map only locates the point to within that pixel, so
w = 1 / s would be unbounded. `keypoint_std` adds the variance of a uniform distribution over
one pixel, 1/12 px^2 (Sheppard's correction for a quantised location), before the square root:

    std = sqrt(s^2 + 1/12)  >=  0.289 px,        w2d = 1 / std  <=  3.46 px^-1.

That floor is smooth (no clip that would stop the gradient) and has a meaning: a heatmap cannot
claim a location finer than its pixel unless it spreads its mass over neighbours, where the
sub-pixel mean then shows in s^2 (a map split evenly over two adjacent pixels has s^2 = 1/4).
No ceiling is needed: on an H x W grid s^2 <= ((W - 1)/2)^2 (all mass on the two extreme
columns), so std <= sqrt(((W - 1)/2)^2 + 1/12) and w2d >= ~2 / (W - 1) > 0 (a flat map has
s^2 = (W^2 - 1)/12, i.e. std = W / sqrt(12)). Weights are therefore always finite and positive.

Laplace NLL (the paper's "Laplace MLE" baseline of Table 5), per axis: with scale b, a Laplace
distribution has variance 2 b^2, so b = std / sqrt(2) and

    nll = |x - x_gt| / b + log b        (+ log 2, dropped)

Bad input: logits that are not finite anywhere in a channel give that keypoint ``finite=False``
and the numbers of a flat map (no NaN reaches the mean, the std or the gradient of other
keypoints); checks of shapes raise at the Python boundary.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lcpose.correspondences import pixel_grid

__all__ = ["DSNTOutput", "dsnt", "keypoint_std", "laplace_nll", "PIXEL_VARIANCE", "LAPLACE_B_PER_STD"]

PIXEL_VARIANCE = 1.0 / 12.0                 # variance of a uniform distribution over one pixel
LAPLACE_B_PER_STD = 1.0 / math.sqrt(2.0)     # Laplace: variance = 2 b^2


class DSNTOutput(NamedTuple):
    mean: jax.Array      # (K, 2) expected (u, v), output-grid pixels
    var: jax.Array       # (K, 2) per-axis variance of the normalised heatmap, px^2
    prob: jax.Array      # (H, W, K) the normalised heatmaps (each channel sums to 1)
    finite: jax.Array    # (K,) bool: the channel's logits were all finite


def _check_logits(logits):
    logits = jnp.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(f"heatmap logits must have shape (H, W, K) (one instance; vmap for batches), got {logits.shape}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"heatmap logits must be floating point, got dtype {logits.dtype}")
    if logits.shape[0] < 2 or logits.shape[1] < 2:
        raise ValueError(f"heatmaps need at least 2 x 2 pixels, got {logits.shape[:2]}")
    return logits


def dsnt(logits) -> DSNTOutput:
    """DSNT of one instance's heatmap logits (H, W, K): mean, variance (px, px^2), maps, flags."""
    logits = _check_logits(logits)
    h, w, k = logits.shape
    finite = jnp.all(jnp.isfinite(logits), axis=(0, 1))
    # A channel with a non-finite logit falls back to a flat map (and finite=False); the where
    # also keeps NaN out of the gradient of the other channels.
    safe = jnp.where(finite[None, None, :], logits, 0.0)
    p = jax.nn.softmax(safe.reshape(h * w, k), axis=0)                      # (HW, K)
    uv = pixel_grid(h, w, logits.dtype).reshape(h * w, 2)                   # (HW, 2)
    mean = p.T @ uv                                                         # (K, 2)
    d = uv[None, :, :] - mean[:, None, :]                                   # (K, HW, 2)
    var = jnp.einsum("nk,kna->ka", p, d * d)                                # two-pass: no cancellation
    return DSNTOutput(mean=mean, var=var, prob=p.reshape(h, w, k), finite=finite)


def keypoint_std(var):
    """std = sqrt(var + 1/12) px per axis (module docstring: the one-pixel floor); w2d = 1 / std."""
    return jnp.sqrt(var + PIXEL_VARIANCE)


def laplace_nll(x, x_gt, std, valid=None):
    """Mean over valid keypoints and both axes of |x - x_gt| / b + log b, b = std / sqrt(2).

    x, x_gt, std (K, 2); valid (K,) bool or 0/1 (None: all). Returns (mean nll, per-keypoint
    sums (K,)). The mean divides by max(2 * #valid, 1), so an instance without valid keypoints
    contributes 0; invalid keypoints (e.g. outside the crop) carry no gradient.
    """
    x, x_gt, std = jnp.asarray(x), jnp.asarray(x_gt), jnp.asarray(std)
    if x.ndim != 2 or x.shape[-1] != 2 or x_gt.shape != x.shape or std.shape != x.shape:
        raise ValueError(f"x, x_gt and std must all have shape (K, 2), got {x.shape}, {x_gt.shape}, {std.shape}")
    v = jnp.ones(x.shape[:1], bool) if valid is None else jnp.asarray(valid) > 0
    if v.shape != x.shape[:1]:
        raise ValueError(f"valid must have shape {x.shape[:1]}, got {v.shape}")
    b = std * LAPLACE_B_PER_STD
    r = jnp.where(v[:, None], x - x_gt, 0.0)              # where before abs: no NaN/inf gradient leak
    b = jnp.where(v[:, None], b, 1.0)
    per_kpt = jnp.sum(jnp.abs(r) / b + jnp.log(b), axis=-1) * v
    n = jnp.maximum(2.0 * jnp.sum(v), 1.0)
    return jnp.sum(per_kpt) / n, per_kpt
