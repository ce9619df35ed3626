"""Image augmentation for training crops (NumPy/OpenCV, run in grain worker processes).

* `procedural_background(rng, height, width)`: random backgrounds (smooth colour noise,
  gradients, random shapes, fine texture) -- used by the synthetic BOP generator and by the
  background switch when no folder of background images is given.
* `BackgroundSource`: draws backgrounds from a folder of images (random crop + resize) or
  procedurally.
* `color_augment(rng, img)`: the photometric augmentation applied with probability 0.8 in
  training (DESIGN.md): brightness, contrast, saturation, hue shift, Gaussian blur, Gaussian
  noise, each with probability 0.5, in random order.
* `inplane_rotation(theta, size)`: the in-plane rotation of a square crop about its centre
  (the LC reference's `rotate_prob: 1`) as a 2x3 image map and the camera rotation it equals.

All functions take and return uint8 RGB images (H, W, 3) and a `numpy.random.Generator`, so
they are deterministic given the generator.
"""
from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np

__all__ = ["procedural_background", "BackgroundSource", "color_augment", "replace_background", "inplane_rotation"]

_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def procedural_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random (height, width, 3) uint8 RGB background.

    Mixes a smooth colour field (bicubic upsampling of a small random grid) or a linear
    gradient with random filled rectangles, ellipses and lines, then adds fine texture noise
    and a mild blur, so that backgrounds have clutter at several scales.
    """
    h, w = int(height), int(width)
    if rng.random() < 0.6:
        gh, gw = rng.integers(2, 9, size=2)
        grid = rng.uniform(0, 255, size=(gh, gw, 3)).astype(np.float32)
        img = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    else:
        a = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        s = (np.cos(a) * xs + np.sin(a) * ys) / max(h, w)
        s = (s - s.min()) / max(float(s.max() - s.min()), 1e-6)
        c0, c1 = _random_color(rng), _random_color(rng)
        img = (c0[None, None, :] * (1 - s[..., None]) + c1[None, None, :] * s[..., None]).astype(np.float32)
    n_shapes = int(rng.integers(3, 16))
    scale = max(h, w)
    for _ in range(n_shapes):
        color = tuple(float(c) for c in _random_color(rng))
        kind = rng.integers(0, 3)
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        size = int(rng.uniform(0.03, 0.3) * scale)
        if kind == 0:
            dx, dy = int(rng.uniform(0.3, 1.0) * size), int(rng.uniform(0.3, 1.0) * size)
            cv2.rectangle(img, (cx - dx, cy - dy), (cx + dx, cy + dy), color, -1)
        elif kind == 1:
            axes = (max(1, int(rng.uniform(0.3, 1.0) * size)), max(1, int(rng.uniform(0.3, 1.0) * size)))
            cv2.ellipse(img, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, color, -1)
        else:
            ex, ey = int(rng.integers(0, w)), int(rng.integers(0, h))
            cv2.line(img, (cx, cy), (ex, ey), color, int(rng.integers(1, 8)))
    # Fine texture at a quarter resolution, upsampled.
    th, tw = max(1, h // 4), max(1, w // 4)
    tex = rng.normal(0.0, rng.uniform(3, 20), size=(th, tw, 1)).astype(np.float32)
    img += cv2.resize(tex, (w, h), interpolation=cv2.INTER_LINEAR)[..., None]
    img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.5, 1.5)))
    return np.clip(img, 0, 255).astype(np.uint8)


class BackgroundSource:
    """Random background images: from a folder (recursively) or procedural when none is given.

    Picklable (it stores file paths only), so it can live inside a grain transform.
    """

    def __init__(self, folder: str | os.PathLike | None = None, files: Sequence[str] | None = None):
        self.folder = None if folder is None else os.fspath(folder)
        if files is not None:
            self.files = list(files)
        elif self.folder is not None:
            if not os.path.isdir(self.folder):
                raise FileNotFoundError(f"background folder does not exist: {self.folder}")
            found = []
            for dirpath, _, names in os.walk(self.folder):
                for n in names:
                    if n.lower().endswith(_IMAGE_EXTS):
                        found.append(os.path.join(dirpath, n))
            if not found:
                raise ValueError(f"no images ({', '.join(_IMAGE_EXTS)}) found in background folder {self.folder}")
            self.files = sorted(found)
        else:
            self.files = []

    def sample(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        if not self.files:
            return procedural_background(rng, height, width)
        path = self.files[int(rng.integers(len(self.files)))]
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"cannot read background image {path}")
        img = img[..., ::-1]
        ih, iw = img.shape[:2]
        # Random crop with the target aspect ratio, at least half of the image's short side.
        aspect = width / height
        ch = int(rng.uniform(0.5, 1.0) * min(ih, iw / aspect))
        cw = max(1, int(round(ch * aspect)))
        ch = max(1, ch)
        y0 = int(rng.integers(0, ih - ch + 1))
        x0 = int(rng.integers(0, iw - cw + 1))
        crop = img[y0 : y0 + ch, x0 : x0 + cw]
        return cv2.resize(np.ascontiguousarray(crop), (width, height), interpolation=cv2.INTER_LINEAR)


def replace_background(img: np.ndarray, mask: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Pixels where `mask` is 0 take the background's value."""
    keep = mask.astype(bool)[..., None]
    return np.where(keep, img, background)


def _adjust_saturation(img: np.ndarray, factor: float) -> np.ndarray:
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)[..., None]
    return gray + factor * (img.astype(np.float32) - gray)


def color_augment(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Random photometric changes of a uint8 RGB image (each op with probability 0.5)."""
    ops = rng.permutation(6)
    out = img.astype(np.float32)
    for op in ops:
        if rng.random() >= 0.5:
            continue
        if op == 0:  # brightness: multiplicative and additive
            out = out * rng.uniform(0.7, 1.3) + rng.uniform(-25, 25)
        elif op == 1:  # contrast around the mean
            m = out.mean()
            out = (out - m) * rng.uniform(0.6, 1.4) + m
        elif op == 2:  # saturation
            out = _adjust_saturation(np.clip(out, 0, 255).astype(np.uint8), rng.uniform(0.5, 1.5))
        elif op == 3:  # hue shift (OpenCV hue is in [0, 180))
            hsv = cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV)
            shift = int(rng.integers(-10, 11))
            hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 180).astype(np.uint8)
            out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)
        elif op == 4:  # Gaussian blur
            out = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(0.3, 1.5)))
        else:  # Gaussian noise
            out = out + rng.normal(0.0, rng.uniform(2, 10), size=out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def inplane_rotation(theta: float, size: int):
    """(T (2, 3), Rz (3, 3)): rotating a square crop of `size` pixels by `theta` about its centre.

    T maps crop pixels p to c + R2 (p - c), c = ((size - 1) / 2,) * 2 the crop centre (pixel-centre
    convention), R2 the 2D rotation by `theta` (counter-clockwise in (u, v), i.e. clockwise on
    screen). The same image motion is a rotation Rz of the camera about its optical axis: for
    any crop intrinsics K, project(X, Rz R, Rz t, [T; 0 0 1] K Rz^T) = T(project(X, R, t, K))
    exactly, and [T; 0 0 1] K Rz^T is again upper triangular (K with its principal point rotated
    about c) when K has square pixels and no skew; with fx != fy it keeps an off-diagonal term
    of (fx - fy) sin(theta) cos(theta).
    """
    c, s = float(np.cos(theta)), float(np.sin(theta))
    centre = 0.5 * (float(size) - 1.0)
    R2 = np.array([[c, -s], [s, c]])
    T = np.concatenate([R2, (centre - R2 @ np.array([centre, centre]))[:, None]], axis=1)
    Rz = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return T, Rz
