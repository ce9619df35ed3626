"""Sparse model keypoints: farthest-point sampling on the model surface (the paper's Sec. 4.2).

The sparse network of Table 5 regresses the 2D projections of K = 16 keypoints per object,
picked by farthest point sampling (FPS) on the model. Here FPS runs on a dense, area-weighted
sample of the mesh surface (not on the vertices: a box-like CAD model has only 8 vertices,
and vertex density follows tessellation, not geometry). Everything is NumPy and deterministic:
the same mesh, count and seed give the same keypoints bit for bit.

* `surface_samples(V, F, n, seed)` -- n points uniformly distributed over the surface area.
* `farthest_point_sampling(points, k)` -- the greedy FPS order, started at the point farthest
  from the centroid (so no random first pick).
* `model_keypoints(V, F, count, extra)` -- FPS keypoints, optionally followed by the centre of
  the model's box (``"centroid"``) and / or its 8 corners (``"corners"``, in
  `lcpose.geometry.bbox3d_corners` order).
* `ensure_keypoints(ds_dir, spec)` -- the keypoints of every object of a converted dataset,
  computed once from the dataset's PLY models and cached next to the TFDS files as
  ``lcpose_keypoints-<spec>.npz`` (obj_ids (n,), keypoints (n, K, 3) float32 mm);
  `lcpose.data.tfds_builder.build_tfds` writes the default ``"fps16"``.
* `project_keypoints(kpt3d, R, t, K, size)` -- ground-truth 2D projections on an output grid
  (pixel-centre convention) and whether each lies in front of the camera and inside the grid.

A spec is ``"fps<K>"`` optionally followed by ``"+centroid"`` and / or ``"+corners"``, e.g.
``"fps16"``, ``"fps8+centroid"``, ``"fps16+corners"``.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

__all__ = [
    "DEFAULT_SPEC", "KEYPOINT_EXTRAS", "parse_spec", "spec_size", "surface_samples", "farthest_point_sampling",
    "model_keypoints", "ensure_keypoints", "keypoints_path", "project_keypoints",
]

DEFAULT_SPEC = "fps16"
KEYPOINT_EXTRAS = ("centroid", "corners")
SURFACE_SAMPLES = 20000   # FPS candidates per model: spacing ~ diameter / 100, far below a pixel's reach
_SPEC_RE = re.compile(r"^fps(\d+)((?:\+[a-z]+)*)$")


def parse_spec(spec: str) -> tuple[int, tuple[str, ...]]:
    """(FPS count, extras) of a keypoint spec such as ``"fps16+centroid"``."""
    m = _SPEC_RE.match(str(spec))
    if not m:
        raise ValueError(f"keypoint spec must look like 'fps16', 'fps16+centroid' or 'fps16+corners', got {spec!r}")
    count = int(m.group(1))
    extra = tuple(e for e in m.group(2).split("+") if e)
    bad = [e for e in extra if e not in KEYPOINT_EXTRAS]
    if bad or len(set(extra)) != len(extra):
        raise ValueError(f"keypoint spec {spec!r}: extras must be distinct names of {KEYPOINT_EXTRAS}, got {extra}")
    total = _total(count, extra)
    if total < 4:
        raise ValueError(f"keypoint spec {spec!r} gives {total} keypoints; PnP needs at least 4")
    return count, extra


def _total(count: int, extra: Sequence[str]) -> int:
    return count + ("centroid" in extra) + 8 * ("corners" in extra)


def spec_size(spec: str) -> int:
    """Number of keypoints of a spec (``"fps16+centroid"`` -> 17)."""
    return _total(*parse_spec(spec))


def _check_mesh(V, F):
    V = np.asarray(V, dtype=np.float64)
    F = np.asarray(F)
    if V.ndim != 2 or V.shape[1] != 3 or len(V) == 0:
        raise ValueError(f"vertices must be a non-empty (N, 3) array, got shape {V.shape}")
    if F.ndim != 2 or F.shape[1] != 3 or len(F) == 0:
        raise ValueError(f"faces must be a non-empty (F, 3) array, got shape {F.shape}")
    if F.min() < 0 or F.max() >= len(V):
        raise ValueError(f"faces index vertices outside [0, {len(V)})")
    if not np.all(np.isfinite(V)):
        raise ValueError("vertices must be finite")
    return V, F.astype(np.int64)


def surface_samples(V, F, n: int = SURFACE_SAMPLES, seed: int = 0) -> np.ndarray:
    """(n, 3) float64 points uniformly distributed over the area of the mesh (V, F).

    Triangles are drawn with probability proportional to their area, points inside a triangle
    from the square-root barycentric map (uniform on the triangle). Deterministic for a seed.
    """
    V, F = _check_mesh(V, F)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    a, b, c = V[F[:, 0]], V[F[:, 1]], V[F[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    total = area.sum()
    if not total > 0:
        raise ValueError("the mesh has zero surface area")
    rng = np.random.default_rng(seed)
    tri = rng.choice(len(F), size=n, p=area / total)
    r1 = np.sqrt(rng.random(n))[:, None]
    r2 = rng.random(n)[:, None]
    return (1.0 - r1) * a[tri] + r1 * (1.0 - r2) * b[tri] + r1 * r2 * c[tri]


def farthest_point_sampling(points, k: int) -> np.ndarray:
    """Indices (k,) of the greedy farthest-point order of ``points`` (N, 3).

    The first pick is the point farthest from the centroid of ``points``; each next one
    maximises the distance to those picked (ties: lowest index). Deterministic.
    """
    P = np.asarray(points, dtype=np.float64)
    if P.ndim != 2 or P.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {P.shape}")
    if not 1 <= k <= len(P):
        raise ValueError(f"k must be in [1, {len(P)}] (the number of points), got {k}")
    idx = np.empty(k, dtype=np.int64)
    idx[0] = int(np.argmax(np.sum((P - P.mean(0)) ** 2, axis=1)))
    d2 = np.sum((P - P[idx[0]]) ** 2, axis=1)
    for i in range(1, k):
        idx[i] = int(np.argmax(d2))
        d2 = np.minimum(d2, np.sum((P - P[idx[i]]) ** 2, axis=1))
    return idx


def model_keypoints(V, F, count: int = 16, extra: Sequence[str] = (), *, n_surface: int = SURFACE_SAMPLES,
                    seed: int = 0) -> np.ndarray:
    """(count [+1] [+8], 3) float32 keypoints (mm) of a mesh: FPS on its surface, then extras.

    extra: "centroid" appends the centre of the vertices' axis-aligned box, "corners" its 8
    corners (`lcpose.geometry.bbox3d_corners` order), in the order given.
    """
    from lcpose import geometry

    V, F = _check_mesh(V, F)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    bad = [e for e in extra if e not in KEYPOINT_EXTRAS]
    if bad:
        raise ValueError(f"extra must name {KEYPOINT_EXTRAS}, got {list(extra)}")
    parts = []
    if count:
        P = surface_samples(V, F, max(n_surface, count), seed)
        parts.append(P[farthest_point_sampling(P, count)])
    lo, hi = V.min(0), V.max(0)
    for e in extra:
        if e == "centroid":
            parts.append((0.5 * (lo + hi))[None])
        else:
            parts.append(np.asarray(geometry.bbox3d_corners(lo, hi), dtype=np.float64))
    out = np.concatenate(parts, axis=0) if parts else np.zeros((0, 3))
    if len(out) < 4:
        raise ValueError(f"{len(out)} keypoints requested (count={count}, extra={list(extra)}); PnP needs at least 4")
    return out.astype(np.float32)


def keypoints_path(ds_dir: str, spec: str = DEFAULT_SPEC) -> str:
    parse_spec(spec)
    return os.path.join(ds_dir, f"lcpose_keypoints-{spec}.npz")


def ensure_keypoints(ds_dir: str | os.PathLike, spec: str = DEFAULT_SPEC, *, models_dir: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(obj_ids (n,) int32, keypoints (n, K, 3) float32 mm) of a converted dataset's objects.

    Read from ``<ds_dir>/lcpose_keypoints-<spec>.npz``; computed from the PLY models (default:
    ``<bop_root>/models`` of the dataset's lcpose_meta.json) and written there (atomically)
    when missing. Objects follow the order of the dataset's model table (`ModelTable.obj_ids`).
    """
    from lcpose.data import bop
    from lcpose.data.tfds_builder import read_meta

    ds_dir = os.fspath(ds_dir)
    count, extra = parse_spec(spec)
    path = keypoints_path(ds_dir, spec)
    meta = read_meta(ds_dir)
    # the order of the dataset's model table (lcpose_models.npz, written in this order)
    obj_ids = np.array([int(o) for o in meta["params"]["obj_ids"]], dtype=np.int32)
    if os.path.isfile(path):
        z = np.load(path)
        if np.array_equal(z["obj_ids"], obj_ids):
            return z["obj_ids"].astype(np.int32), z["keypoints"].astype(np.float32)
    mdir = models_dir or os.path.join(meta["bop_root"], "models")
    kpts = []
    for o in obj_ids:
        V, F, _ = bop.load_model(os.path.join(mdir, f"obj_{int(o):06d}.ply"))
        kpts.append(model_keypoints(V, F, count, extra))
    kpts = np.stack(kpts).astype(np.float32)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, obj_ids=obj_ids, keypoints=kpts)
    os.replace(tmp, path)
    return obj_ids, kpts


def project_keypoints(kpt3d, R, t, K, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(kpt2d (N, 2) float32 px, in_crop (N,) float32 0/1) of model points on a size x size grid.

    Float64 projection ``K (R X + t)``; ``in_crop`` is 1 where the point lies in front of the
    camera (z > 1 mm) and inside the grid, i.e. u, v in [-0.5, size - 0.5] (pixel centres at
    integers). Points behind the camera get kpt2d = 0 (finite) and in_crop = 0.
    """
    X = np.asarray(kpt3d, np.float64) @ np.asarray(R, np.float64).T + np.asarray(t, np.float64)
    z = X[:, 2]
    front = z > 1.0
    uvw = X @ np.asarray(K, np.float64).T
    uv = np.where(front[:, None], uvw[:, :2] / np.where(front, z, 1.0)[:, None], 0.0)
    inside = front & np.all((uv >= -0.5) & (uv <= size - 0.5), axis=1)
    return uv.astype(np.float32), inside.astype(np.float32)
