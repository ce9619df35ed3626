"""Sparse keypoints (the paper's Table 5): FPS keypoints, DSNT, the Laplace NLL, the data path.

Numerics run on small analytic inputs; the data-path test builds a tiny synthetic BOP set once
per module (2 objects, 4 + 2 images).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcpose.data import keypoints as KP
from lcpose.models import dsnt as D
from tests.numeric import central_differences


def _blob(h, w, k_centres, sigmas, dtype):
    v, u = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    maps = [-((u - cu) ** 2 + (v - cv) ** 2) / (2 * s * s) for (cu, cv), s in zip(k_centres, sigmas)]
    return jnp.asarray(np.stack(maps, -1), dtype)


# ------------------------------------------------------------------------------------------
# DSNT
# ------------------------------------------------------------------------------------------


def test_dsnt_gaussian_blob_gives_centre_and_variance_float32():
    """A sampled Gaussian log-density gives its centre and sigma^2 (float32): the integer-grid
    sums of a Gaussian with sigma >= 1 equal the continuous moments to ~1e-8 (Poisson
    summation), so what remains is float32 rounding."""
    centres = [(20.3, 41.7), (31.5, 30.25), (24.0, 33.9)]   # >= 6 sigma from the border
    sigmas = [2.5, 1.2, 4.0]
    out = D.dsnt(_blob(64, 64, centres, sigmas, jnp.float32))
    assert out.mean.dtype == jnp.float32 and out.var.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out.mean), np.array(centres), atol=2e-3)
    np.testing.assert_allclose(np.asarray(out.var), np.repeat(np.square(sigmas)[:, None], 2, 1), rtol=2e-3)
    np.testing.assert_allclose(np.asarray(out.prob).sum((0, 1)), 1.0, rtol=1e-5)
    assert bool(jnp.all(out.finite))


def test_dsnt_flat_and_one_hot_bounds_of_the_weights():
    h = w = 16
    flat = D.dsnt(jnp.zeros((h, w, 1), jnp.float32))
    np.testing.assert_allclose(np.asarray(flat.mean), [[7.5, 7.5]], atol=1e-5)
    np.testing.assert_allclose(np.asarray(flat.var), [[(w * w - 1) / 12.0] * 2], rtol=1e-5)
    hot = jnp.full((h, w, 1), -1e4, jnp.float32).at[3, 5, 0].set(0.0)
    one = D.dsnt(hot)
    np.testing.assert_allclose(np.asarray(one.mean), [[5.0, 3.0]], atol=1e-5)
    std = D.keypoint_std(one.var)
    np.testing.assert_allclose(np.asarray(std), math.sqrt(1 / 12), rtol=1e-5)   # the one-pixel floor
    assert float(jnp.max(1.0 / std)) <= math.sqrt(12) + 1e-4
    # the largest possible variance: mass split over the extreme columns -> w2d >= ~2 / (W - 1)
    two = jnp.full((h, w, 1), -1e4, jnp.float32).at[0, 0, 0].set(0.0).at[0, w - 1, 0].set(0.0)
    np.testing.assert_allclose(float(D.dsnt(two).var[0, 0]), ((w - 1) / 2) ** 2, rtol=1e-5)


def test_dsnt_and_nll_gradients_match_finite_differences_float64():
    # float64 inputs (tests/conftest.py enables x64) run the float64 path
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(5, 6, 2)) * 2.0)
    gt = jnp.asarray(rng.uniform(0, 4, size=(2, 2)))
    a = jnp.asarray(rng.normal(size=(2, 2)))
    valid = jnp.array([True, False])

    def f(lg):
        out = D.dsnt(lg)
        std = D.keypoint_std(out.var)
        nll, _ = D.laplace_nll(out.mean, gt, std, valid)
        return jnp.sum(a * out.mean) + 0.3 * jnp.sum(a * out.var) + nll + jnp.sum(1.0 / std)

    g = jax.grad(f)(logits)
    (num,) = central_differences(jax.jit(f), [logits])
    np.testing.assert_allclose(np.asarray(g), num, rtol=1e-6, atol=1e-8)


def test_laplace_nll_matches_formula():
    rng = np.random.default_rng(1)
    x, xg = rng.normal(size=(5, 2)) * 3, rng.normal(size=(5, 2)) * 3
    std = rng.uniform(0.3, 4.0, size=(5, 2))
    valid = np.array([1, 1, 0, 1, 0], bool)
    b = std / np.sqrt(2.0)                                  # Laplace: var = 2 b^2
    per = (np.abs(x - xg) / b + np.log(b)).sum(1)
    nll, per_k = D.laplace_nll(jnp.asarray(x), jnp.asarray(xg), jnp.asarray(std), jnp.asarray(valid))
    np.testing.assert_allclose(float(nll), per[valid].sum() / (2 * valid.sum()), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(per_k), per * valid, rtol=1e-12)
    # no valid keypoint: 0, not NaN
    nll0, _ = D.laplace_nll(jnp.asarray(x), jnp.asarray(xg), jnp.asarray(std), jnp.zeros(5, bool))
    assert float(nll0) == 0.0


def test_nan_heatmap_is_flagged_and_does_not_leak():
    logits = _blob(8, 8, [(3.0, 4.0), (5.0, 2.0)], [1.0, 1.5], jnp.float32)
    bad = logits.at[2, 2, 1].set(jnp.nan)
    out = D.dsnt(bad)
    assert out.finite.tolist() == [True, False]
    assert bool(jnp.all(jnp.isfinite(out.mean))) and bool(jnp.all(jnp.isfinite(out.var)))
    np.testing.assert_allclose(np.asarray(out.mean[0]), np.asarray(D.dsnt(logits).mean[0]), rtol=1e-6)

    def f(lg):
        o = D.dsnt(lg)
        return jnp.sum(o.mean * o.finite[:, None]) + jnp.sum(D.keypoint_std(o.var))

    g = jax.grad(f)(bad)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_dsnt_bad_shapes_raise():
    with pytest.raises(ValueError, match="heatmap logits"):
        D.dsnt(jnp.zeros((8, 8)))
    with pytest.raises(ValueError, match="heatmap logits"):
        D.dsnt(jnp.zeros((8, 8, 2), jnp.int32))
    with pytest.raises(ValueError, match="x, x_gt and std"):
        D.laplace_nll(jnp.zeros((4, 2)), jnp.zeros((4, 3)), jnp.ones((4, 2)))


# ------------------------------------------------------------------------------------------
# Keypoints
# ------------------------------------------------------------------------------------------


def _box_mesh(size=(40.0, 60.0, 100.0)):
    import trimesh

    m = trimesh.creation.box(extents=size)
    return np.asarray(m.vertices), np.asarray(m.faces)


def test_fps_keypoints_are_deterministic_spread_and_on_the_surface():
    V, F = _box_mesh()
    k1 = KP.model_keypoints(V, F, 16)
    k2 = KP.model_keypoints(V, F, 16)
    assert k1.shape == (16, 3) and k1.dtype == np.float32
    np.testing.assert_array_equal(k1, k2)
    # on the surface of the box: at least one coordinate on a face
    half = np.array([20.0, 30.0, 50.0])
    assert np.all(np.min(np.abs(np.abs(k1) - half), axis=1) < 1e-3)
    # spread: FPS's minimum pairwise distance beats a random draw of 16 surface points by far
    def min_dist(P):
        d = np.linalg.norm(P[:, None] - P[None], axis=-1)
        return d[~np.eye(len(P), dtype=bool)].min()
    rand = KP.surface_samples(V, F, 16, seed=3)
    assert min_dist(k1) > 2 * min_dist(rand)
    # the first pick is the surface point farthest from the centre: a box corner
    np.testing.assert_allclose(np.abs(k1[0]), half, atol=1.5)
    ext = KP.model_keypoints(V, F, 8, ("centroid", "corners"))
    assert ext.shape == (17, 3)
    np.testing.assert_allclose(ext[8], 0.0, atol=1e-6)
    np.testing.assert_allclose(np.abs(ext[9:]), np.broadcast_to(half, (8, 3)), atol=1e-5)


def test_keypoint_specs_and_too_few_keypoints():
    assert KP.parse_spec("fps16") == (16, ())
    assert KP.parse_spec("fps0+corners") == (0, ("corners",))
    for bad in ("fps3", "fps16+nose", "kp16", "fps2+centroid"):
        with pytest.raises(ValueError, match="keypoint spec"):
            KP.parse_spec(bad)
    V, F = _box_mesh()
    with pytest.raises(ValueError, match="at least 4"):
        KP.model_keypoints(V, F, 3)


def test_project_keypoints_flags_points_outside_and_behind():
    K = np.array([[100.0, 0, 8.0], [0, 100.0, 8.0], [0, 0, 1]])
    X = np.array([[0.0, 0, 0], [0.0, 0, -2000.0], [300.0, 0, 0], [-79.0, 0, 0]])
    uv, inside = KP.project_keypoints(X, np.eye(3), np.array([0.0, 0.0, 1000.0]), K, 16)
    assert inside.tolist() == [1.0, 0.0, 0.0, 1.0]
    np.testing.assert_allclose(uv[0], [8.0, 8.0])
    np.testing.assert_allclose(uv[3], [8.0 - 7.9, 8.0], atol=1e-5)
    assert np.all(np.isfinite(uv))


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from lcpose.data.synthetic import ensure_synthetic_tfds

    cache = tmp_path_factory.mktemp("sparse_cache")
    return ensure_synthetic_tfds(cache, objects=2, train_images=4, test_images=2, workers=0, progress=False)


def test_keypoint_projections_on_the_synthetic_set(tiny_set):
    """kpt2d is the keypoints' projection on the output grid: checked through the independent
    path full-image projection -> crop affine (< 0.5 px, in fact ~1e-4), in training crops
    (dynamic zoom-in) and test crops; the keypoints are the dataset's cached FPS keypoints."""
    from lcpose import geometry
    from lcpose.data.pipeline import KEYPOINT_KEYS, OUTPUT_KEYS, make_loader

    ids, kpts = KP.ensure_keypoints(tiny_set, "fps16")
    assert kpts.shape == (2, 16, 3)
    n = 0
    for split, train in (("train_pbr", True), ("test", False)):
        loader = make_loader(tiny_set, split, 4, train, worker_count=0, num_epochs=1, keypoints="fps16",
                             input_size=64, output_size=16)
        for batch in loader:
            assert set(batch) == set(OUTPUT_KEYS) | set(KEYPOINT_KEYS)
            assert batch["kpt2d"].shape == (4, 16, 2) and batch["kpt_in_crop"].shape == (4, 16)
            for i in np.nonzero(batch["valid_example"])[0]:
                np.testing.assert_array_equal(batch["kpt3d"][i], kpts[batch["obj_index"][i]])
                X = batch["kpt3d"][i].astype(np.float64)
                uv_full = np.asarray(geometry.project(X, batch["R"][i].astype(np.float64),
                                                      batch["t"][i].astype(np.float64),
                                                      batch["K"][i].astype(np.float64)))
                A = geometry.crop_affine_np(batch["roi_center"][i], batch["roi_scale"][i], 16)
                uv_out = uv_full @ A[:, :2].T + A[:, 2]
                err = np.abs(uv_out - batch["kpt2d"][i])
                assert err.max() < 0.5, err.max()
                inside = np.all((uv_out >= -0.5) & (uv_out <= 15.5), axis=1)
                np.testing.assert_array_equal(inside, batch["kpt_in_crop"][i] > 0)
                n += 1
    assert n >= 6


# ------------------------------------------------------------------------------------------
# The heatmap head (lcpose.models.sparse) with the registries
# ------------------------------------------------------------------------------------------


def _scene(kp=8, size=16, seed=0):
    """Keypoints on a 60 mm object 600 mm away, seen by a 16x16 output grid."""
    from lcpose import geometry

    rng = np.random.default_rng(seed)
    kpt3d = rng.uniform(-30, 30, size=(kp, 3))
    R = np.asarray(geometry.so3_exp(jnp.asarray([0.3, -0.2, 0.5])))
    t = np.array([5.0, -8.0, 600.0])
    K = np.array([[100.0, 0, 7.5], [0, 100.0, 7.5], [0, 0, 1]])
    kpt2d, in_crop = KP.project_keypoints(kpt3d, R, t, K, size)
    return dict(kpt3d=kpt3d.astype(np.float32), kpt2d=kpt2d, kpt_in_crop=in_crop, K_out=K.astype(np.float32),
                R=R.astype(np.float32), t=t.astype(np.float32),
                bbox3d=np.asarray(geometry.bbox3d_corners(np.full(3, -30.0), np.full(3, 30.0)), np.float32))


def _peaked_logits(kpt2d, size=16, sigma=0.8):
    return _blob(size, size, [tuple(p) for p in kpt2d], [sigma] * len(kpt2d), jnp.float32)


def test_sparse_model_outputs_one_heatmap_per_keypoint():
    from lcpose.models.registry import get_model, map_size

    model = get_model("sparse", preset="cpu", keypoints="fps16", encoder_widths=(8, 8, 16, 16), head_channels=8)
    assert map_size(model, 64) == 16
    from lcpose.models import init_variables

    variables = init_variables(model, 0, 64)
    out = model.apply(variables, jnp.zeros((2, 64, 64, 3)), train=False)
    assert set(out) == {"heatmap_logits"} and out["heatmap_logits"].shape == (2, 16, 16, 16)
    with pytest.raises(ValueError, match="at least 4"):
        get_model("sparse", preset="cpu", keypoints="fps3")


def test_sparse_decode_masks_keypoints_outside_the_crop_and_detaches_x3d():
    from lcpose.models import sparse

    ex = _scene()
    ex["kpt_in_crop"] = ex["kpt_in_crop"].copy()
    ex["kpt_in_crop"][2] = 0.0                                  # as if it left the crop
    out = {"heatmap_logits": _peaked_logits(ex["kpt2d"])}
    corr, aux = sparse.decode_train(jax.random.key(0), out, ex, None)
    assert corr.valid.tolist() == [i != 2 for i in range(8)]
    assert float(jnp.abs(corr.w2d[2]).sum()) == 0.0 and bool(jnp.all(corr.w2d[corr.valid] > 0))
    np.testing.assert_allclose(np.asarray(corr.x2d), ex["kpt2d"], atol=0.05)
    np.testing.assert_allclose(np.asarray(corr.w2d[corr.valid]), 1 / np.asarray(aux["std"][corr.valid]), rtol=1e-6)
    g = jax.grad(lambda k3: jnp.sum(sparse.decode_train(None, out, dict(ex, kpt3d=k3), None)[0].x3d))(
        jnp.asarray(ex["kpt3d"]))
    assert float(jnp.abs(g).sum()) == 0.0                       # fixed keypoints: no gradient
    test = sparse.decode_test(out, ex, None)
    assert bool(jnp.all(test.valid))
    with pytest.raises(ValueError, match="kpt3d"):
        sparse.decode_train(None, out, dict(ex, kpt3d=ex["kpt3d"][:5]), None)


def test_sparse_surrogate_is_the_laplace_nll_and_survives_nan_maps():
    from lcpose.models import sparse

    ex = _scene()
    logits = _peaked_logits(ex["kpt2d"] + 0.3, sigma=1.5)
    loss, m = sparse.surrogate_loss({"heatmap_logits": logits}, ex, None)
    est = D.dsnt(logits)
    ref, _ = D.laplace_nll(est.mean, jnp.asarray(ex["kpt2d"]), D.keypoint_std(est.var), ex["kpt_in_crop"] > 0)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    v = ex["kpt_in_crop"] > 0
    np.testing.assert_allclose(float(m["kpt/err_px"]), np.abs(np.asarray(est.mean) - ex["kpt2d"])[v].mean(), rtol=1e-5)
    assert 0.2 < float(m["kpt/err_px"]) < 0.35         # the 0.3 px shift, less the border's pull
    bad = logits.at[0, 0, 3].set(jnp.nan)
    loss_b, m_b = sparse.surrogate_loss({"heatmap_logits": bad}, ex, None)
    assert np.isfinite(float(loss_b)) and float(m_b["kpt/nonfinite"]) == 1.0
    g = jax.grad(lambda lg: sparse.surrogate_loss({"heatmap_logits": lg}, ex, None)[0])(bad)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_lc_on_keypoints_through_the_registry_and_both_table5_solvers():
    """LC (pose-loss registry) on the DSNT correspondences: finite, gradients reach the logits;
    the two Table 5 solvers (solver registry) recover the pose from exact keypoints, and the
    weighted solver's starting pose is the RANSAC solver's pose (same key)."""
    from lcpose.losses import PoseLossInputs, get_pose_loss
    from lcpose.models import sparse
    from lcpose.pnp import get_solver

    ex = _scene(kp=16)
    assert ex["kpt_in_crop"].all()
    lc = get_pose_loss("lc")

    def loss(lg):
        corr, _ = sparse.decode_train(None, {"heatmap_logits": lg}, ex, None)
        v, _ = lc.fn(PoseLossInputs(corr, jnp.asarray(ex["K_out"]), jnp.asarray(ex["R"]), jnp.asarray(ex["t"]),
                                    jnp.asarray(ex["bbox3d"]), jax.random.key(0)))
        return v

    logits = _peaked_logits(ex["kpt2d"], sigma=1.0)
    v, g = jax.jit(jax.value_and_grad(loss))(logits)
    assert np.isfinite(float(v)) and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
    corr = sparse.decode_test({"heatmap_logits": logits}, ex, None)
    key = jax.random.key(3)
    kw = dict(hypotheses=32, threshold_px=0.5)
    r_w, m_w = jax.jit(lambda k, c, K: get_solver("weighted")(k, c, K, **kw))(key, corr, jnp.asarray(ex["K_out"]))
    r_r, _ = jax.jit(lambda k, c, K: get_solver("ransac")(k, c, K, **kw))(key, corr, jnp.asarray(ex["K_out"]))
    np.testing.assert_allclose(np.asarray(m_w["R_ransac"]), np.asarray(r_r.R), atol=1e-6)
    for r in (r_w, r_r):
        np.testing.assert_allclose(np.asarray(r.t), ex["t"], atol=2.0)      # mm at 600 mm
        np.testing.assert_allclose(np.asarray(r.R), ex["R"], atol=5e-3)


@pytest.mark.slow
def test_lmo_sparse_two_steps_end_to_end(tmp_path, monkeypatch):
    """`python -m experiments.lmo_sparse` (both variants, 2 steps each, a tiny network and set):
    trains, evaluates with both Table 5 solvers, writes results.json with the 4 rows."""
    import json

    from experiments import lmo_sparse

    monkeypatch.setenv("LCPOSE_CACHE", str(tmp_path / "cache"))
    tiny = lmo_sparse.CPU.replace(
        synthetic=(("objects", 2), ("train_images", 8), ("test_images", 4), ("views", "uniform")),
        objects=(1,), eval_batch_size=4, grad_metric_every=1,
        pnp=lmo_sparse.CPU.pnp.__class__(threshold_px=0.5, hypotheses=16),
    ).with_train(model_overrides=(("encoder_widths", (8, 8, 16, 16)), ("head_channels", 8), ("keypoints", "fps8")),
                 batch_size=4, worker_count=0, log_every=1, ckpt_every=2)
    monkeypatch.setitem(lmo_sparse.CONFIGS, "cpu", tiny)
    res = lmo_sparse.run(["--steps", "2", "--workdir", str(tmp_path / "run"), "--no_progress", "--workers", "0"])
    with open(tmp_path / "run" / "results.json") as f:
        saved = json.load(f)
    rows = saved["table5"]
    assert [(r["loss"], r["solver"]) for r in rows] == [("MLE", "PnP RANSAC"), ("MLE", "PnP weighted"),
                                                         ("MLE + LC", "PnP RANSAC"), ("MLE + LC", "PnP weighted")]
    assert all(0.0 <= r["add_s_0.1d"] <= 100.0 for r in rows)
    for v in ("mle", "mle_lc"):
        assert saved["variants"][v]["steps"] == 2 and saved["variants"][v]["weight_on_mask"] is None
    assert np.isfinite(saved["variants"]["mle_lc"]["final_loss"])
    assert res["table5"] == rows
