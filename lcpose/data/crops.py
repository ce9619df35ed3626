"""Crop geometry shared by the TFDS converter and the grain pipeline (NumPy, no JAX).

All maps are 2x3 affine matrices from full-image pixels to the pixels of some stored or
output grid, with the pixel-centre convention of DESIGN.md (pixel j covers [j - 0.5, j + 0.5]).
A crop of a crop is the composition of the matrices, so the pipeline warps the *stored* crop
straight to the output with ``compose(A_out, invert(A_stored))`` -- the same result as
warping the full image with ``A_out`` (`lcpose.geometry.crop_affine`).

Dynamic zoom-in (GDR-Net's DZI): for a box (x, y, w, h) with centre c = (x + w/2, y + h/2)
and size s = max(w, h),

    train: c' = c + shift_ratio * (w, h) * U(-1, 1)^2,   scale = s * pad_scale * (1 + scale_ratio * U(-1, 1))
    test:  c' = c,                                       scale = s * pad_scale

and the scale is clipped to the image's longer side. The converter stores, around each
instance, a window of half side ``window_factor * s`` (at least what DZI can reach:
``shift_ratio + pad_scale * (1 + scale_ratio) / 2``), so that every crop the pipeline can
draw lies inside the stored data.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from lcpose.geometry import crop_affine_np, crop_intrinsics_np

__all__ = [
    "DZIConfig",
    "bbox_center_size",
    "sample_roi",
    "compose",
    "invert",
    "translation_affine",
    "resize_affine",
    "crop_affine_np",
    "crop_intrinsics_np",
]


@dataclasses.dataclass(frozen=True)
class DZIConfig:
    """Dynamic zoom-in parameters (the LC paper's GDR-Net configuration by default)."""

    shift_ratio: float = 0.25
    scale_ratio: float = 0.25
    pad_scale: float = 1.5

    @property
    def reach(self) -> float:
        """Largest distance from the box centre, in units of s, that a training crop covers."""
        return self.shift_ratio + 0.5 * self.pad_scale * (1.0 + self.scale_ratio)

    @property
    def min_scale(self) -> float:
        """Smallest crop side, in units of s (the most zoomed-in training crop)."""
        return self.pad_scale * (1.0 - self.scale_ratio)


def bbox_center_size(bbox_xywh) -> tuple[np.ndarray, float, float, float]:
    """Centre (2,), size s = max(w, h), w, h of a BOP box [x, y, w, h] (w, h clamped to >= 1)."""
    x, y, w, h = (float(v) for v in bbox_xywh)
    w, h = max(w, 1.0), max(h, 1.0)
    return np.array([x + 0.5 * w, y + 0.5 * h]), max(w, h), w, h


def sample_roi(bbox_xywh, im_size, dzi: DZIConfig, rng: np.random.Generator | None):
    """(centre (2,), scale) of the crop for a box; jittered by DZI when `rng` is given.

    im_size: (width, height); the scale is clipped to max(width, height) as in GDR-Net.
    """
    c, s, w, h = bbox_center_size(bbox_xywh)
    if rng is None:
        scale = s * dzi.pad_scale
    else:
        shift = dzi.shift_ratio * (2.0 * rng.random(2) - 1.0)
        c = c + shift * np.array([w, h])
        scale = s * dzi.pad_scale * (1.0 + dzi.scale_ratio * (2.0 * rng.random() - 1.0))
    scale = min(scale, float(max(im_size)))
    return c, float(scale)


def compose(A, B):
    """The affine map x -> A(B(x)) of two 2x3 matrices."""
    A3 = np.vstack([np.asarray(A, dtype=np.float64), [0.0, 0.0, 1.0]])
    B3 = np.vstack([np.asarray(B, dtype=np.float64), [0.0, 0.0, 1.0]])
    return (A3 @ B3)[:2]


def invert(A):
    """Inverse of a 2x3 affine map."""
    A3 = np.vstack([np.asarray(A, dtype=np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(A3)[:2]


def translation_affine(x0: float, y0: float):
    """Full-image pixels -> pixels of the sub-array img[y0:, x0:]."""
    return np.array([[1.0, 0.0, -float(x0)], [0.0, 1.0, -float(y0)]])


def resize_affine(x0: int, y0: int, w: int, h: int, out_w: int, out_h: int):
    """Full-image pixels -> pixels of img[y0:y0+h, x0:x0+w] resized to (out_w, out_h).

    Pixel-centre aligned, as cv2.resize (INTER_LINEAR / INTER_AREA) and `crop_affine`:
    u' + 0.5 = (u - x0 + 0.5) * out_w / w.
    """
    sx, sy = out_w / float(w), out_h / float(h)
    return np.array([[sx, 0.0, (0.5 - x0) * sx - 0.5], [0.0, sy, (0.5 - y0) * sy - 0.5]])
