"""A vectorised NumPy z-buffer rasteriser for posed triangle meshes.

It renders depth, object-coordinate (xyz) maps, instance maps and (for the synthetic set)
shaded colours, for one or several posed models with mutual occlusion, at any resolution. It
is the project's own renderer: no OpenGL, no GPU, deterministic, and fast enough for low-poly
models (the synthetic BOP set) and for the xyz crops of real BOP models during conversion.

Conventions (DESIGN.md): models in mm, pose ``X_cam = R @ X + t``, pinhole ``K``, pixel
(u, v) is the centre of column u, row v -- a pixel is covered when its centre lies inside the
projected triangle. A crop or a window of a larger image is rendered by shifting/scaling K
(``geometry.crop_intrinsics`` or ``K - [[0, 0, x0], [0, 0, y0], [0, 0, 0]]``).

Interpolation is perspective correct (screen-space barycentrics re-weighted by 1/z), so the
depth and the object coordinates at a pixel are those of the exact ray-triangle intersection
through the pixel centre (the tests check this against trimesh ray casting).

Triangles with a vertex closer than ``near`` (mm) to the camera plane are dropped (no
near-plane clipping); objects in BOP scenes are always far in front of the camera.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

__all__ = ["Raster", "rasterize", "interpolate", "render_xyz", "shade_lambert"]

# Pixel/triangle candidate pairs are processed in chunks of about this many to bound memory
# (~150 bytes per pair).
_CHUNK_PAIRS = 1 << 20


@dataclasses.dataclass
class Raster:
    """Per-pixel result of `rasterize` for an image of height H and width W.

    depth: (H, W) float32 camera z in mm, 0 where no surface.
    obj: (H, W) int32 index of the mesh in the input list, -1 where empty.
    face: (H, W) int32 face index within that mesh, -1 where empty.
    bary: (H, W, 3) float32 perspective-correct barycentric weights of the face's vertices.
    """

    depth: np.ndarray
    obj: np.ndarray
    face: np.ndarray
    bary: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return self.obj >= 0


def _as_pose(R, t):
    R = np.asarray(R, dtype=np.float64).reshape(3, 3)
    t = np.asarray(t, dtype=np.float64).reshape(3)
    return R, t


def rasterize(
    meshes: Sequence[tuple[np.ndarray, np.ndarray]],
    poses: Sequence[tuple[np.ndarray, np.ndarray]],
    K,
    width: int,
    height: int,
    *,
    cull_back: bool = False,
    near: float = 1.0,
) -> Raster:
    """Z-buffer rasterisation of several posed meshes into one (height, width) image.

    Args:
      meshes: sequence of (vertices (N, 3) mm, faces (F, 3) int).
      poses: one (R (3, 3), t (3,)) per mesh, model -> camera.
      K: (3, 3) intrinsics of the rendered image (shift it to render a window).
      width, height: image size in pixels.
      cull_back: drop faces whose outward normal (counter-clockwise winding) points away from
        the camera. Only valid for closed, consistently wound meshes; off by default.
      near: triangles with a vertex at camera z < near (mm) are dropped.
    """
    if len(meshes) != len(poses):
        raise ValueError(f"meshes and poses differ in length: {len(meshes)} vs {len(poses)}")
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3) or not np.all(np.isfinite(K)):
        raise ValueError(f"K must be a finite (3, 3) matrix, got {K!r}")

    # Per mesh: vertices to the camera frame and the image, then gathered per face.
    PX, PY, Z, obj_l, face_l = [], [], [], [], []
    for i, ((verts, faces), (R, t)) in enumerate(zip(meshes, poses)):
        verts = np.asarray(verts, dtype=np.float64)
        faces = np.asarray(faces, dtype=np.int64)
        if verts.ndim != 2 or verts.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
            raise ValueError(f"mesh {i}: vertices must be (N, 3) and faces (F, 3)")
        R, t = _as_pose(R, t)
        cam = verts @ R.T + t
        uvw = cam @ K.T
        with np.errstate(divide="ignore", invalid="ignore"):
            pxv = uvw[:, 0] / uvw[:, 2]
            pyv = uvw[:, 1] / uvw[:, 2]
        f0, f1, f2 = faces[:, 0], faces[:, 1], faces[:, 2]
        PX.append(np.stack([pxv[f0], pxv[f1], pxv[f2]], axis=1))
        PY.append(np.stack([pyv[f0], pyv[f1], pyv[f2]], axis=1))
        Z.append(np.stack([cam[f0, 2], cam[f1, 2], cam[f2, 2]], axis=1))
        obj_l.append(np.full(len(faces), i, dtype=np.int32))
        face_l.append(np.arange(len(faces), dtype=np.int32))
    if PX:
        px, py, z = np.concatenate(PX), np.concatenate(PY), np.concatenate(Z)
        obj_of, face_of = np.concatenate(obj_l), np.concatenate(face_l)
    else:
        px = py = z = np.zeros((0, 3))
        obj_of = face_of = np.zeros(0, dtype=np.int32)

    keep = (z[:, 0] >= near) & (z[:, 1] >= near) & (z[:, 2] >= near)
    x0, y0 = px[:, 0], py[:, 0]
    e1x, e1y = px[:, 1] - x0, py[:, 1] - y0
    e2x, e2y = px[:, 2] - x0, py[:, 2] - y0
    det = e1x * e2y - e2x * e1y  # twice the signed screen area
    keep &= np.abs(det) > 1e-12  # degenerate (edge-on) triangles cover no pixel centre
    if cull_back:
        # With z > 0 the screen area is det(K[:2, :2]) * [c0, c1, c2] / (z0 z1 z2), where
        # [c0, c1, c2] = c0 . ((c1 - c0) x (c2 - c0)) is negative for a face whose outward
        # (counter-clockwise) normal points towards the camera.
        keep &= det * np.sign(K[0, 0] * K[1, 1] - K[0, 1] * K[1, 0]) < 0
    # Integer pixel ranges whose centres may fall inside each triangle.
    with np.errstate(invalid="ignore"):
        u_lo = np.ceil(np.minimum(np.minimum(px[:, 0], px[:, 1]), px[:, 2]) - 1e-9)
        u_hi = np.floor(np.maximum(np.maximum(px[:, 0], px[:, 1]), px[:, 2]) + 1e-9)
        v_lo = np.ceil(np.minimum(np.minimum(py[:, 0], py[:, 1]), py[:, 2]) - 1e-9)
        v_hi = np.floor(np.maximum(np.maximum(py[:, 0], py[:, 1]), py[:, 2]) + 1e-9)
    keep &= np.isfinite(u_lo) & np.isfinite(u_hi) & np.isfinite(v_lo) & np.isfinite(v_hi)
    u_lo = np.where(keep, np.clip(u_lo, 0, width), 0).astype(np.int64)
    u_hi = np.where(keep, np.clip(u_hi, -1, width - 1), -1).astype(np.int64)
    v_lo = np.where(keep, np.clip(v_lo, 0, height), 0).astype(np.int64)
    v_hi = np.where(keep, np.clip(v_hi, -1, height - 1), -1).astype(np.int64)
    bw = np.maximum(u_hi - u_lo + 1, 0)
    bh = np.maximum(v_hi - v_lo + 1, 0)
    counts = bw * bh
    idx = np.nonzero(counts > 0)[0]
    # Per-pixel buffers only over the region that triangles can touch.
    if len(idx):
        rx0, ry0 = int(u_lo[idx].min()), int(v_lo[idx].min())
        rw, rh = int(u_hi[idx].max()) - rx0 + 1, int(v_hi[idx].max()) - ry0 + 1
    else:
        rx0 = ry0 = 0
        rw = rh = 1
    n_pix = rw * rh
    zbuf = np.full(n_pix, np.inf)
    best_tri = np.full(n_pix, -1, dtype=np.int64)
    best_bary = np.zeros((n_pix, 3))
    if len(idx):
        # Inverse of the 2x2 edge matrix: (b1, b2) = M^-1 (p - p0), b0 = 1 - b1 - b2.
        inv_det = 1.0 / det
        i00, i01 = e2y * inv_det, -e2x * inv_det
        i10, i11 = -e1y * inv_det, e1x * inv_det
        inv_z = 1.0 / np.where(keep[:, None], z, 1.0)
        # Chunks of consecutive triangles with a bounded number of candidate pairs.
        csum = np.cumsum(counts[idx])
        starts = [0]
        while True:
            s = starts[-1]
            base = csum[s - 1] if s > 0 else 0
            e = int(np.searchsorted(csum, base + _CHUNK_PAIRS, side="right"))
            e = max(e, s + 1)
            if e >= len(idx):
                break
            starts.append(e)
        starts.append(len(idx))
        # Tolerance on the barycentrics: centres exactly on a shared edge belong to both
        # triangles (same depth), so no cracks appear between them.
        eps = -1e-9
        x0r, y0r = x0 - rx0, y0 - ry0  # triangle origins relative to the region
        for a, b in zip(starts[:-1], starts[1:]):
            ti = idx[a:b]
            cnt = counts[ti]
            total = int(cnt.sum())
            rep = np.repeat(np.arange(len(ti), dtype=np.int32), cnt)
            first = (np.cumsum(cnt) - cnt).astype(np.int32)
            k = np.arange(total, dtype=np.int32) - first[rep]
            t_rep = ti[rep]
            w_rep = bw[t_rep].astype(np.int32)
            dv_i = k // w_rep
            du_i = k - dv_i * w_rep
            # Pixel coordinates relative to the region's corner (exact small integers).
            ur = (u_lo[t_rep] - rx0).astype(np.int32) + du_i
            vr = (v_lo[t_rep] - ry0).astype(np.int32) + dv_i
            du = ur - x0r[t_rep]
            dv = vr - y0r[t_rep]
            b1 = i00[t_rep] * du + i01[t_rep] * dv
            b2 = i10[t_rep] * du + i11[t_rep] * dv
            b0 = 1.0 - b1 - b2
            inside = (b0 >= eps) & (b1 >= eps) & (b2 >= eps)
            if not np.any(inside):
                continue
            t_in = t_rep[inside]
            b0, b1, b2 = b0[inside], b1[inside], b2[inside]
            p = vr[inside].astype(np.int64) * rw + ur[inside]
            iz = inv_z[t_in]
            # 1/z is affine in screen space: perspective-correct depth.
            q0, q1, q2 = b0 * iz[:, 0], b1 * iz[:, 1], b2 * iz[:, 2]
            zz = 1.0 / (q0 + q1 + q2)
            # Per-pixel minimum within the chunk, then against the running buffer.
            zc = np.full(n_pix, np.inf)
            np.minimum.at(zc, p, zz)
            win = (zz <= zc[p]) & (zz < zbuf[p])
            pw = p[win]
            best_tri[pw] = t_in[win]
            zbuf[pw] = zz[win]
            best_bary[pw, 0] = q0[win] * zz[win]
            best_bary[pw, 1] = q1[win] * zz[win]
            best_bary[pw, 2] = q2[win] * zz[win]

    hit = best_tri >= 0
    safe = np.where(hit, best_tri, 0)
    depth = np.zeros((height, width), dtype=np.float32)
    obj = np.full((height, width), -1, dtype=np.int32)
    face = np.full((height, width), -1, dtype=np.int32)
    bary = np.zeros((height, width, 3), dtype=np.float32)
    if len(obj_of):
        sl = (slice(ry0, ry0 + rh), slice(rx0, rx0 + rw))
        depth[sl] = np.where(hit, zbuf, 0.0).reshape(rh, rw)
        obj[sl] = np.where(hit, obj_of[safe], -1).reshape(rh, rw)
        face[sl] = np.where(hit, face_of[safe], -1).reshape(rh, rw)
        bary[sl] = np.where(hit[:, None], best_bary, 0.0).reshape(rh, rw, 3)
    return Raster(depth=depth, obj=obj, face=face, bary=bary)


def _hit_faces(raster: Raster, faces: Sequence[np.ndarray]):
    """Flat indices of covered pixels, their mesh index and the (P, 3) vertex ids of their face
    in the concatenation of all meshes' vertices."""
    obj = raster.obj.reshape(-1)
    sel = np.flatnonzero(obj >= 0)
    o = obj[sel]
    f_local = raster.face.reshape(-1)[sel]
    v_off = np.cumsum([0] + [int(np.max(f)) + 1 if len(f) else 0 for f in faces])
    f_off = np.cumsum([0] + [len(f) for f in faces])
    all_faces = np.concatenate([np.asarray(f, dtype=np.int64) + v_off[i] for i, f in enumerate(faces)])
    return sel, o, all_faces[f_off[o] + f_local], f_off[o] + f_local


def interpolate(raster: Raster, attributes: Sequence[np.ndarray], faces: Sequence[np.ndarray]):
    """Perspective-correct interpolation of per-vertex attributes over a raster.

    Args:
      raster: the result of `rasterize`.
      attributes: one (N_i, C) array per mesh (same order as in `rasterize`).
      faces: the (F_i, 3) face arrays of those meshes.
    Returns (H, W, C) float32, 0 where no surface.
    """
    H, W = raster.obj.shape
    C = np.asarray(attributes[0]).shape[1]
    out = np.zeros((H * W, C), dtype=np.float32)
    sel, _, corner_ids, _ = _hit_faces(raster, faces)
    if len(sel):
        # Vertex counts from the faces (meshes may carry unreferenced trailing vertices).
        n_ref = [int(np.max(f)) + 1 if len(f) else 0 for f in faces]
        attr = np.concatenate([np.asarray(a, dtype=np.float64)[:n] for a, n in zip(attributes, n_ref)])
        bary = raster.bary.reshape(-1, 3)[sel].astype(np.float64)
        out[sel] = np.einsum("pk,pkc->pc", bary, attr[corner_ids])
    return out.reshape(H, W, C)


def render_xyz(vertices, faces, R, t, K, width: int, height: int, *, near: float = 1.0):
    """Object coordinates of one posed model (no occluders).

    Returns (xyz (H, W, 3) float32 mm in the object frame, 0 off-object; mask (H, W) bool;
    depth (H, W) float32 mm, 0 off-object).
    """
    raster = rasterize([(vertices, faces)], [(R, t)], K, width, height, near=near)
    xyz = interpolate(raster, [vertices], [faces])
    return xyz, raster.mask, raster.depth


def shade_lambert(raster: Raster, meshes, poses, vertex_colors, light_dir, ambient, diffuse):
    """Flat-shaded Lambertian colours (H, W, 3) float32 in [0, 1] (0 where empty).

    colour = albedo * (ambient + diffuse * max(0, n . l)), with `albedo` the interpolated
    vertex colour (values in [0, 1]), `n` the outward face normal in the camera frame and
    `l` the unit direction from the surface towards the light (camera frame). `ambient` and
    `diffuse` are scalars or RGB triples.
    """
    H, W = raster.obj.shape
    faces = [np.asarray(m[1]) for m in meshes]
    out = np.zeros((H * W, 3), dtype=np.float32)
    sel, _, corner_ids, gface = _hit_faces(raster, faces)
    if len(sel) == 0:
        return out.reshape(H, W, 3)
    light_dir = np.asarray(light_dir, dtype=np.float64)
    light_dir = light_dir / np.linalg.norm(light_dir)
    # Per-face Lambert term of every mesh, concatenated in face order.
    lam_faces = []
    for (verts, f), (R, _) in zip(meshes, poses):
        verts = np.asarray(verts, dtype=np.float64)
        f = np.asarray(f)
        n = np.cross(verts[f[:, 1]] - verts[f[:, 0]], verts[f[:, 2]] - verts[f[:, 0]])
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        lam_faces.append(np.maximum(n @ (np.asarray(R, dtype=np.float64).T @ light_dir), 0.0))
    lam = np.concatenate(lam_faces)[gface]
    n_ref = [int(np.max(f)) + 1 if len(f) else 0 for f in faces]
    cols = np.concatenate([np.asarray(c, dtype=np.float64)[:n] for c, n in zip(vertex_colors, n_ref)])
    bary = raster.bary.reshape(-1, 3)[sel].astype(np.float64)
    albedo = np.einsum("pk,pkc->pc", bary, cols[corner_ids])
    shade = np.asarray(ambient, dtype=np.float64) + np.asarray(diffuse, dtype=np.float64) * lam[:, None]
    out[sel] = np.clip(albedo * shade, 0.0, 1.0)
    return out.reshape(H, W, 3)
