"""Correspondences from dense maps: grid sampling positions/offsets, top-weight selection."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcpose import geometry
from lcpose.correspondences import (
    dense_grid_correspondences,
    num_top_points,
    pixel_grid,
    sample_grid,
    top_weight_correspondences,
)


def _coded_maps(h, w, dtype=np.float32, seed=0):
    """xyz[v, u] = (u, v, v * w + u) so a sampled point tells where it came from; random weights."""
    v, u = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    xyz = np.stack([u, v, v * w + u], -1).astype(dtype)
    w2d = np.random.default_rng(seed).uniform(0.1, 5.0, (h, w, 2)).astype(dtype)
    return xyz, w2d


_dense = jax.jit(jax.vmap(dense_grid_correspondences, in_axes=(0, None, None)))


def test_dense_grid_positions_and_offsets():
    xyz, w2d = _coded_maps(64, 64)
    keys = jax.random.split(jax.random.key(3), 32)
    x3d, x2d, w = _dense(keys, xyz, w2d)
    assert x3d.shape == (32, 1024, 3) and x2d.shape == (32, 1024, 2) and w.shape == (32, 1024, 2)
    assert x2d.dtype == jnp.float32 and x3d.dtype == jnp.float32
    x3d, x2d, w = map(np.asarray, (x3d, x2d, w))
    # The 2D point is the pixel the 3D point was read from (pixel-centre convention).
    np.testing.assert_array_equal(x3d[..., :2], x2d)
    idx = x3d[..., 2].astype(int)
    np.testing.assert_array_equal(w, w2d.reshape(-1, 2)[idx])
    offsets = set()
    for b in range(32):
        du, dv = x2d[b, 0]
        assert du in (0, 1) and dv in (0, 1)
        offsets.add((int(du), int(dv)))
        grid = np.stack(np.meshgrid(np.arange(32), np.arange(32), indexing="ij")[::-1], -1).reshape(-1, 2)
        np.testing.assert_array_equal(x2d[b], 2 * grid + [du, dv])  # row-major, stride 2
    assert offsets == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_dense_grid_stride_dtype_and_errors():
    xyz, w2d = _coded_maps(16, 24, np.float64)
    x3d, x2d, w = jax.jit(dense_grid_correspondences, static_argnames="stride")(jax.random.key(0), xyz, w2d, stride=4)
    assert x3d.shape == (24, 3) and x2d.dtype == jnp.float64
    assert np.all(np.asarray(x2d) % 4 == np.asarray(x2d[0]))
    np.testing.assert_array_equal(np.asarray(x3d)[:, :2], np.asarray(x2d))
    assert jnp.float64 == w.dtype
    with pytest.raises(ValueError, match="multiples of stride"):
        dense_grid_correspondences(jax.random.key(0), xyz[:15], w2d[:15])
    with pytest.raises(ValueError, match="w2d_map"):
        dense_grid_correspondences(jax.random.key(0), xyz, w2d[..., :1])
    with pytest.raises(ValueError, match="xyz_map"):
        dense_grid_correspondences(jax.random.key(0), xyz[None], w2d)


def test_grid_matches_crop_intrinsics():
    """Points back-projected through each output pixel centre project onto that pixel's x2d."""
    K = np.array([[572.4, 0.0, 325.3], [0.0, 573.6, 242.0], [0.0, 0.0, 1.0]])
    R = np.array([[0.36, 0.48, -0.8], [-0.8, 0.6, 0.0], [0.48, 0.64, 0.6]])  # a rotation
    t = np.array([10.0, -20.0, 700.0])

    @jax.jit
    def residual(key):
        K_out = geometry.crop_intrinsics(K, jnp.array([300.0, 210.0]), 180.0, 64)
        uv = pixel_grid(64, 64, jnp.float64)
        rays = jnp.concatenate([uv, jnp.ones_like(uv[..., :1])], -1) @ jnp.linalg.inv(K_out).T
        xyz_cam = rays * (800.0 + 10.0 * uv[..., :1])
        xyz_obj = (xyz_cam - t) @ R  # X = R^T (X_cam - t)
        x3d, x2d, _ = dense_grid_correspondences(key, xyz_obj, jnp.ones((64, 64, 2)))
        return geometry.project(x3d, jnp.asarray(R), jnp.asarray(t), K_out) - x2d

    np.testing.assert_allclose(np.asarray(residual(jax.random.key(1))), 0.0, atol=1e-8)


_top = jax.jit(top_weight_correspondences, static_argnames=("fraction", "score"))


def test_num_top_points():
    assert num_top_points(64, 64, 0.3) == 1229
    assert num_top_points(10, 1, 0.3) == 3  # 0.3 * 10 is 3.0000000000000004 in floats
    assert num_top_points(32, 32, 1.0) == 1024
    with pytest.raises(ValueError, match="fraction"):
        num_top_points(8, 8, 0.0)


@pytest.mark.parametrize("score", ["mean", "product"])
def test_top_weight_selection(score):
    xyz, w2d = _coded_maps(64, 64, seed=1)
    x3d, x2d, w, valid = _top(xyz, w2d, score=score)
    assert x3d.shape == (1229, 3) and x2d.shape == (1229, 2) and w.shape == (1229, 2) and valid.shape == (1229,)
    assert bool(valid.all())
    s_all = w2d.reshape(-1, 2).mean(-1) if score == "mean" else w2d.reshape(-1, 2).prod(-1)
    idx = np.asarray(x3d[:, 2]).astype(int)
    expected = np.argsort(-s_all, kind="stable")[:1229]
    assert set(idx) == set(expected)
    chosen = np.zeros(s_all.shape, bool)
    chosen[idx] = True
    assert s_all[chosen].min() >= s_all[~chosen].max()
    assert np.all(np.diff(s_all[idx]) <= 0)  # sorted by decreasing score
    np.testing.assert_array_equal(np.asarray(x3d)[:, :2], np.asarray(x2d))
    np.testing.assert_array_equal(np.asarray(w), w2d.reshape(-1, 2)[idx])


def test_top_weight_mask_and_bad_weights():
    xyz, w2d = _coded_maps(16, 16, seed=2)
    w2d[0, 0] = np.nan
    w2d[0, 1, 1] = 0.0
    mask = np.zeros((16, 16), bool)
    mask[4:10, 3:12] = True  # 54 pixels < N = ceil(0.3 * 256) = 77
    mask[0, :2] = True  # inside the mask, but bad weights
    x3d, x2d, w, valid = _top(xyz, w2d, mask=mask.astype(np.float32))
    x3d, w, valid = map(np.asarray, (x3d, w, valid))
    # 56 pixels in the mask: the top ceil(0.3 x 56) = 17 by weight are valid (quantile in mask)
    assert valid.shape == (77,) and valid.sum() == 17 and valid[:17].all()
    inside = np.flatnonzero(mask.reshape(-1)[2:]) + 2                       # the 54 good ones
    score = w2d.reshape(-1, 2).mean(-1)
    top17 = inside[np.argsort(-score[inside], kind="stable")[:17]]
    assert set(x3d[valid, 2].astype(int)) == set(top17)
    assert np.all(np.isfinite(x3d)) and np.all(np.isfinite(w))
    assert np.all(w[~valid] == 0) and np.all(x3d[~valid] == 0)
    # fraction 1: every good pixel of the mask (N = 256 >= 54)
    _, _, _, valid_all = _top(xyz, w2d, mask=mask, fraction=1.0)
    assert int(np.sum(valid_all)) == 54


def test_top_weight_vmap_and_gradient():
    xyz, w2d = _coded_maps(8, 8)
    xyz_b = jnp.stack([xyz, xyz + 1.0])
    w_b = jnp.stack([w2d, w2d[::-1]])
    x3d, x2d, w, valid = jax.jit(jax.vmap(lambda a, b: _top(a, b, fraction=0.5)))(xyz_b, w_b)
    assert x3d.shape == (2, 32, 3) and bool(valid.all())
    g = jax.jit(jax.grad(lambda m: top_weight_correspondences(xyz, m, fraction=0.5)[2].sum()))(jnp.asarray(w2d))
    assert float(g.sum()) == 64.0  # 32 selected pixels x 2 weights, each with derivative 1


def test_sample_grid_mask_marks_the_sampled_pixels_valid():
    """With a mask, a sampled point is valid exactly when its pixel is inside the mask."""
    h = w = 8
    xyz = jnp.arange(h * w * 3, dtype=jnp.float32).reshape(h, w, 3)
    wts = jnp.ones((h, w, 2))
    mask = np.zeros((h, w), bool)
    mask[2:6, 1:4] = True
    for seed in range(4):
        c = sample_grid(jax.random.PRNGKey(seed), xyz, wts, stride=2, mask=jnp.asarray(mask))
        u, v = np.asarray(c.x2d, int).T
        np.testing.assert_array_equal(np.asarray(c.valid), mask[v, u])
        float_mask = sample_grid(jax.random.PRNGKey(seed), xyz, wts, stride=2, mask=jnp.asarray(mask, jnp.float32))
        np.testing.assert_array_equal(np.asarray(float_mask.valid), mask[v, u])
    assert bool(jnp.all(sample_grid(jax.random.PRNGKey(0), xyz, wts).valid))
    with pytest.raises(ValueError, match="mask"):
        sample_grid(jax.random.PRNGKey(0), xyz, wts, mask=jnp.ones((4, 4)))
