"""2D-3D correspondences from dense network outputs (xyz and weight maps).

One instance per call (vmap for batches), static shapes. 2D points are in output-grid pixels
with the pixel-centre convention: the pixel in column u, row v has coordinates (u, v). They
pair with the crop intrinsics of the output grid,
`K_out = lcpose.geometry.crop_intrinsics(K, center, scale, out_size=H)` (64 for the paper),
i.e. project(x3d, R, t, K_out) ~ x2d. Object points are whatever the xyz map holds: convert
normalised coordinates with `lcpose.models.xyz_to_mm` first (before or after sampling).

Training: `dense_grid_correspondences` takes every `stride`-th pixel in each direction from
a random offset in {0, .., stride-1} per axis (LC paper: stride 2 on the 64x64 map, 1024
points, all valid). Test: `top_weight_correspondences` keeps the ceil(fraction * H * W)
pixels with the largest weights (GDR-Net/EPro-PnP style quantile selection, fraction 0.3).

`Correspondences` is the one structure every network head hands to the pose losses
(`lcpose.losses.registry`) and the test-time solvers (`lcpose.pnp.registry`): a head's
`decode_train` / `decode_test` (`lcpose.models.registry`) return it. `sample_grid` and
`select_top_weights` are the two samplers above returning it.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Correspondences(NamedTuple):
    """2D-3D correspondences of ONE instance (vmap adds a leading axis), fixed N.

    x2d (N, 2): image points in output-grid pixels (pair with K_out), pixel-centre convention;
    x3d (N, 3): object points in mm (model frame); w2d (N, 2): positive weights = inverse
    standard deviations (0 where invalid); valid (N,) bool.
    """

    x2d: jax.Array
    x3d: jax.Array
    w2d: jax.Array
    valid: jax.Array


def _check_maps(xyz_map, w2d_map):
    xyz_map = jnp.asarray(xyz_map)
    w2d_map = jnp.asarray(w2d_map)
    if xyz_map.ndim != 3 or xyz_map.shape[-1] != 3:
        raise ValueError(f"xyz_map must have shape (H, W, 3) (one instance; vmap for batches), got {xyz_map.shape}")
    if w2d_map.shape != xyz_map.shape[:2] + (2,):
        raise ValueError(f"w2d_map must have shape {xyz_map.shape[:2] + (2,)}, got {w2d_map.shape}")
    return xyz_map, w2d_map


def pixel_grid(height: int, width: int, dtype=jnp.float32):
    """(H, W, 2) pixel-centre coordinates (u, v) = (column, row) of an H x W grid."""
    v, u = jnp.meshgrid(jnp.arange(height, dtype=dtype), jnp.arange(width, dtype=dtype), indexing="ij")
    return jnp.stack([u, v], axis=-1)


def dense_grid_correspondences(key, xyz_map, w2d_map, stride: int = 2):
    """Every `stride`-th pixel of the map from a random offset: (x3d, x2d, w2d), all valid.

    Args:
      key: PRNG key; draws the offset (du, dv), each uniform in {0, .., stride-1}.
      xyz_map: (H, W, 3) object coordinates; w2d_map: (H, W, 2) weights. H, W multiples of stride.
    Returns:
      x3d (N, 3), x2d (N, 2) in output-grid pixels (u = du + stride * i, v = dv + stride * j,
      row-major over (v, u)), w2d (N, 2); N = (H / stride) * (W / stride) = 1024 for 64x64.
      x2d has the dtype of xyz_map when floating.
    """
    xyz_map, w2d_map = _check_maps(xyz_map, w2d_map)
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    h, w = xyz_map.shape[:2]
    if h % stride or w % stride:
        raise ValueError(f"map height and width must be multiples of stride={stride}, got {(h, w)}")
    off = jax.random.randint(key, (2,), 0, stride)  # (du, dv)
    dtype = xyz_map.dtype if jnp.issubdtype(xyz_map.dtype, jnp.floating) else jnp.float32
    # A (H - stride + 1, W - stride + 1) window starting at the offset, then a static stride.
    def take(m):
        win = jax.lax.dynamic_slice(m, (off[1], off[0], 0), (h - stride + 1, w - stride + 1, m.shape[-1]))
        return win[::stride, ::stride].reshape(-1, m.shape[-1])

    grid = pixel_grid(h // stride, w // stride, dtype) * stride + off.astype(dtype)
    return take(xyz_map), grid.reshape(-1, 2), take(w2d_map)


def num_top_points(height: int, width: int, fraction: float = 0.3) -> int:
    """ceil(fraction * H * W), robust to float rounding (0.3 * 4096 -> 1229)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, math.ceil(round(fraction * height * width, 6)))


def top_weight_correspondences(xyz_map, w2d_map, mask=None, fraction: float = 0.3, score: str = "mean"):
    """The ceil(fraction * H * W) pixels with the largest weights: (x3d, x2d, w2d, valid).

    Pixels are ranked by the mean of their two weights (`score="mean"`) or by their product
    (`score="product"`); ties go to the lower row-major index. If `mask` (H, W) is given
    (bool, or a probability thresholded at 0.5), ``fraction`` is of the pixels inside it (the
    reference's "quantile_in_mask": the top ceil(fraction x visible pixels) by weight are valid),
    and pixels outside it rank below all pixels inside and are flagged invalid. Pixels with non-finite
    or non-positive weights likewise. Invalid selections return zeros for x3d and w2d.
    Gradients flow to the selected xyz and weights.

    Returns x3d (N, 3), x2d (N, 2) output-grid pixels, w2d (N, 2), valid (N,) bool, sorted by
    decreasing score; N = num_top_points(H, W, fraction) (1229 for 64x64 at 0.3).
    """
    xyz_map, w2d_map = _check_maps(xyz_map, w2d_map)
    h, w = xyz_map.shape[:2]
    n_keep = num_top_points(h, w, fraction)
    if score not in ("mean", "product"):
        raise ValueError(f"score must be 'mean' or 'product', got {score!r}")
    wf = w2d_map.reshape(-1, 2)
    s = wf.mean(axis=-1) if score == "mean" else wf[:, 0] * wf[:, 1]
    ok = jnp.all(jnp.isfinite(wf) & (wf > 0), axis=-1)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape not in ((h, w), (h, w, 1)):
            raise ValueError(f"mask must have shape {(h, w)}, got {mask.shape}")
        mask = mask.reshape(-1)
        ok = ok & (mask if mask.dtype == jnp.bool_ else mask > 0.5)
    # Excluded pixels get -inf: exact ordering among the valid ones, excluded ones come last.
    key = jnp.where(ok, s, -jnp.inf)
    _, idx = jax.lax.top_k(key, n_keep)
    dtype = xyz_map.dtype if jnp.issubdtype(xyz_map.dtype, jnp.floating) else jnp.float32
    uv = pixel_grid(h, w, dtype).reshape(-1, 2)
    valid = ok[idx]
    if mask is not None:
        # N = ceil(fraction H W) is the static bound; the top ceil(fraction x in-mask pixels)
        # are kept (the 1e-3 absorbs float32 rounding of an exact product)
        n_in = jnp.sum(mask if mask.dtype == jnp.bool_ else mask > 0.5).astype(jnp.float32)
        n_sel = jnp.ceil(jnp.float32(fraction) * n_in - 1e-3)
        valid = valid & (jnp.arange(n_keep) < n_sel)
    # Invalid selections carry finite zeros (never NaN) so a solver may ignore them by mask or weight.
    x3d = jnp.where(valid[:, None], xyz_map.reshape(-1, 3)[idx], 0)
    w2d = jnp.where(valid[:, None], wf[idx], 0)
    return x3d, uv[idx], w2d, valid


def sample_grid(key, xyz_map, w2d_map, stride: int = 2, mask=None) -> Correspondences:
    """`dense_grid_correspondences` as a `Correspondences`: every point valid, or, with
    ``mask`` (H, W), those on pixels where mask > 0.5 (read at the sampled pixels)."""
    x3d, x2d, w2d = dense_grid_correspondences(key, xyz_map, w2d_map, stride)
    if mask is None:
        valid = jnp.ones(x2d.shape[:1], bool)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != xyz_map.shape[:2]:
            raise ValueError(f"mask must have the map's shape {xyz_map.shape[:2]}, got {mask.shape}")
        # x2d holds the sampled pixels' integer (u, v) exactly
        u, v = (jnp.round(x2d[:, i]).astype(jnp.int32) for i in (0, 1))
        valid = (mask[v, u] if mask.dtype == jnp.bool_ else mask[v, u] > 0.5)
    return Correspondences(x2d=x2d, x3d=x3d, w2d=w2d, valid=valid)


def select_top_weights(xyz_map, w2d_map, mask=None, fraction: float = 0.3,
                       score: str = "mean") -> Correspondences:
    """`top_weight_correspondences` as a `Correspondences`."""
    x3d, x2d, w2d, valid = top_weight_correspondences(xyz_map, w2d_map, mask, fraction, score)
    return Correspondences(x2d=x2d, x3d=x3d, w2d=w2d, valid=valid)


__all__ = ["Correspondences", "dense_grid_correspondences", "top_weight_correspondences",
           "pixel_grid", "num_top_points", "sample_grid", "select_top_weights"]
