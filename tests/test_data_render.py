"""The NumPy rasteriser against trimesh ray casting, crop helpers against lcpose.geometry,
and the augmentation helpers."""
import numpy as np
import pytest
import trimesh
from trimesh.ray.ray_triangle import ray_triangle_id

from lcpose import geometry
from lcpose.data import augment, crops
from lcpose.data.render import interpolate, rasterize, render_xyz

K = np.array([[572.4114, 0.0, 325.2611], [0.0, 573.57043, 242.04899], [0.0, 0.0, 1.0]])


class _BruteTree:
    """Stands in for trimesh's rtree index (rtree is not installed): AABB overlap by brute force."""

    def __init__(self, tris):
        self.lo, self.hi = tris.min(1), tris.max(1)
        self.bounds = np.concatenate([self.lo.min(0), self.hi.max(0)])

    def intersection(self, box):
        box = np.asarray(box)
        return np.nonzero(np.all(self.lo <= box[3:], 1) & np.all(self.hi >= box[:3], 1))[0]


def _rot(v):
    return trimesh.transformations.rotation_matrix(np.linalg.norm(v), v)[:3, :3]


@pytest.fixture(scope="module")
def scene():
    body = trimesh.creation.icosphere(2, radius=50.0)
    body.vertices *= [1.0, 0.7, 1.3]
    box = trimesh.creation.box(extents=(60.0, 40.0, 30.0))
    meshes = [(np.asarray(body.vertices), np.asarray(body.faces)), (np.asarray(box.vertices), np.asarray(box.faces))]
    poses = [(_rot(np.array([0.3, -0.5, 0.8])), np.array([10.0, -5.0, 700.0])),
             (_rot(np.array([1.1, 0.2, -0.4])), np.array([40.0, 10.0, 600.0]))]  # in front, overlapping
    return meshes, poses


def test_rasterize_matches_ray_casting(scene):
    meshes, poses = scene
    raster = rasterize(meshes, poses, K, 640, 480)
    xyz = interpolate(raster, [m[0] for m in meshes], [m[1] for m in meshes])
    # Ray cast the union of both posed meshes through sampled pixel centres.
    tris = np.concatenate([(V @ R.T + t)[F] for (V, F), (R, t) in zip(meshes, poses)])
    owner = np.concatenate([np.full(len(F), i) for i, (_, F) in enumerate(meshes)])
    ys, xs = np.nonzero(raster.mask)
    rng = np.random.default_rng(0)
    u = rng.integers(xs.min() - 5, xs.max() + 6, 1500)
    v = rng.integers(ys.min() - 5, ys.max() + 6, 1500)
    d = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones(len(u))], 1)
    tri, ray, loc = ray_triangle_id(tris, np.zeros_like(d), d, tree=_BruteTree(tris), multiple_hits=False)
    hit = np.zeros(len(u), bool)
    hit[ray] = True
    assert hit.sum() > 300 and (~hit).sum() > 100
    assert np.array_equal(hit, raster.mask[v, u])  # coverage agrees on every sampled pixel
    np.testing.assert_allclose(raster.depth[v[ray], u[ray]], loc[:, 2], atol=1e-3)  # float32 depth at ~700 mm
    assert np.array_equal(raster.obj[v[ray], u[ray]], owner[tri])  # occlusion between the two objects
    # Object coordinates: the hit point mapped back to the model frame.
    for i, (R, t) in enumerate(poses):
        sel = owner[tri] == i
        X = (loc[sel] - t) @ R
        np.testing.assert_allclose(xyz[v[ray][sel], u[ray][sel]], X, atol=1e-3)
    assert np.all(xyz[~raster.mask] == 0) and np.all(raster.depth[~raster.mask] == 0)


def test_window_render_is_a_crop_and_culling_is_exact(scene):
    meshes, poses = scene
    full = rasterize(meshes, poses, K, 640, 480)
    x0, y0, w, h = 250, 180, 90, 70
    Kw = K.copy()
    Kw[0, 2] -= x0
    Kw[1, 2] -= y0
    win = rasterize(meshes, poses, Kw, w, h)
    np.testing.assert_array_equal(win.obj, full.obj[y0 : y0 + h, x0 : x0 + w])
    np.testing.assert_allclose(win.depth, full.depth[y0 : y0 + h, x0 : x0 + w], atol=1e-3)
    culled = rasterize(meshes, poses, K, 640, 480, cull_back=True)  # closed, outward-wound meshes
    np.testing.assert_array_equal(culled.obj, full.obj)
    # render_xyz of one object equals the single-mesh raster.
    xyz, mask, depth = render_xyz(*meshes[0], *poses[0], K, 640, 480)
    alone = rasterize(meshes[:1], poses[:1], K, 640, 480)
    np.testing.assert_array_equal(mask, alone.mask)
    assert mask.sum() > (full.obj == 0).sum()  # the box occludes part of it


def test_rasterize_rejects_bad_input(scene):
    meshes, poses = scene
    with pytest.raises(ValueError, match="K"):
        rasterize(meshes, poses, np.eye(2), 10, 10)
    with pytest.raises(ValueError, match="differ in length"):
        rasterize(meshes, poses[:1], K, 10, 10)


def test_numpy_crop_twins_match_geometry():
    rng = np.random.default_rng(1)
    for _ in range(5):
        c = rng.uniform(0, 600, 2)
        s = float(rng.uniform(20, 400))
        for n in (64, 256):
            np.testing.assert_allclose(geometry.crop_affine_np(c, s, n), np.asarray(geometry.crop_affine(c, s, n)), rtol=1e-12, atol=1e-9)
            np.testing.assert_allclose(geometry.crop_intrinsics_np(K, c, s, n), np.asarray(geometry.crop_intrinsics(K, c, s, n)), rtol=1e-12, atol=1e-9)
    # compose / invert / resize_affine
    A = crops.resize_affine(10, 20, 100, 50, 37, 19)
    B = geometry.crop_affine_np([60.0, 45.0], 80.0, 64)
    np.testing.assert_allclose(crops.compose(crops.invert(A), A), [[1, 0, 0], [0, 1, 0]], atol=1e-12)
    p = np.array([33.0, 41.0, 1.0])
    np.testing.assert_allclose(crops.compose(B, A) @ p, B @ np.append(A @ p, 1.0))
    # resize_affine follows cv2.resize's pixel-centre convention: a bright pixel moves as predicted.
    import cv2

    img = np.zeros((50, 100), np.float32)
    img[30, 40] = 1.0  # full-image pixel (50, 50) with x0=10, y0=20
    out = cv2.resize(img, (200, 100), interpolation=cv2.INTER_LINEAR)
    ys, xs = np.nonzero(out == out.max())
    centre = np.array([xs.mean(), ys.mean()])
    np.testing.assert_allclose(crops.resize_affine(10, 20, 100, 50, 200, 100) @ [50.0, 50.0, 1.0], centre, atol=1e-6)


def test_dzi_sampling_ranges():
    dzi = crops.DZIConfig()
    rng = np.random.default_rng(0)
    box = [100.0, 50.0, 80.0, 40.0]  # centre (140, 70), s = 80
    cs, ss = zip(*[crops.sample_roi(box, (640, 480), dzi, rng) for _ in range(2000)])
    cs, ss = np.array(cs), np.array(ss)
    assert np.all(np.abs(cs[:, 0] - 140) <= 0.25 * 80 + 1e-9) and np.all(np.abs(cs[:, 1] - 70) <= 0.25 * 40 + 1e-9)
    assert ss.min() >= 80 * 1.5 * 0.75 - 1e-9 and ss.max() <= 80 * 1.5 * 1.25 + 1e-9
    assert ss.max() - ss.min() > 50  # actually jittered
    c, s = crops.sample_roi(box, (640, 480), dzi, None)
    np.testing.assert_allclose(c, [140, 70])
    assert s == 120.0
    # The scale is clipped to the image's longer side (GDR-Net).
    assert crops.sample_roi([0, 0, 600, 470], (640, 480), dzi, None)[1] == 640.0


def test_augment_helpers_are_deterministic():
    a = augment.procedural_background(np.random.default_rng(3), 48, 64)
    b = augment.procedural_background(np.random.default_rng(3), 48, 64)
    assert a.shape == (48, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert a.std() > 5
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    x = augment.color_augment(np.random.default_rng(5), img)
    y = augment.color_augment(np.random.default_rng(5), img)
    assert x.dtype == np.uint8 and x.shape == img.shape and np.array_equal(x, y)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    bg = np.zeros_like(img)
    r = augment.replace_background(img, mask, bg)
    assert np.array_equal(r[8:24, 8:24], img[8:24, 8:24]) and r[:8].max() == 0
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        augment.BackgroundSource("/no_such_folder")
