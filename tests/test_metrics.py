"""lcpose.metrics against hand-computed values and the BOP definitions (float64 via conftest)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import cKDTree

from lcpose import metrics as M
from lcpose.geometry import axis_angle_to_matrix, project

K = np.array([[600.0, 0.0, 320.0], [0.0, 600.0, 240.0], [0.0, 0.0, 1.0]])
T0 = np.array([10.0, -20.0, 800.0])
I3 = np.eye(3)


def rot(axis, angle):
    axis = np.asarray(axis, float)
    return np.asarray(axis_angle_to_matrix(jnp.asarray(angle * axis / np.linalg.norm(axis))))


def rand_rot(rng):
    return rot(rng.normal(size=3), rng.uniform(0.3, 2.5))


# 4-fold symmetric about z: two squares of 4 points each (at z = +-30), corners at radius 50.
SQ = np.array([[50.0, 0, 0], [0, 50, 0], [-50, 0, 0], [0, -50, 0]])
PTS4 = np.concatenate([SQ + [0, 0, 30], SQ - [0, 0, 30]])
R_GT = rot([1.0, 2.0, 0.5], 0.7)
INFO_4FOLD = {
    "diameter": 2 * np.hypot(50, 30),
    "symmetries_discrete": [
        np.pad(rot([0, 0, 1], k * np.pi / 2), ((0, 1), (0, 1))).reshape(-1).tolist() for k in (1, 2, 3)
    ],
}
for _m in INFO_4FOLD["symmetries_discrete"]:
    _m[15] = 1.0


def test_identity_pose_gives_zero_errors():
    rng = np.random.default_rng(0)
    pts = rng.normal(scale=40.0, size=(50, 3))
    sR, st = np.eye(3)[None], np.zeros((1, 3))
    for e in (
        M.add(R_GT, T0, R_GT, T0, pts),
        M.add_s(R_GT, T0, R_GT, T0, pts),
        M.mssd(R_GT, T0, R_GT, T0, pts, sR, st),
        M.mspd(R_GT, T0, R_GT, T0, K, pts, sR, st),
        M.rotation_error_deg(R_GT, R_GT),
        M.translation_error(T0, T0),
    ):
        assert float(e) == pytest.approx(0.0, abs=1e-6)


def test_rotation_error_known_angles():
    e = M.rotation_error_deg(R_GT @ rot([0.3, -1, 2], 0.3), R_GT)
    assert float(e) == pytest.approx(np.degrees(0.3))
    assert float(M.rotation_error_deg(np.diag([-1.0, -1.0, 1.0]), I3)) == pytest.approx(180.0)
    # Rounding that pushes the cosine above 1 is clipped, not NaN (as in bop's re).
    assert float(M.rotation_error_deg(I3 * (1 + 1e-9), I3)) == 0.0
    # BOP's (3, 1) translations are accepted.
    assert float(M.translation_error(T0 + [3.0, 4.0, 0.0], T0.reshape(3, 1))) == pytest.approx(5.0)


def test_translation_offset_add_adds_mssd_mspd():
    dt = np.array([3.0, 4.0, 0.0])
    sR, st = np.eye(3)[None], np.zeros((1, 3))
    # Point spacing >> 5 mm, so the nearest neighbour of each gt point is its own estimate.
    assert float(M.add(R_GT, T0 + dt, R_GT, T0, PTS4)) == pytest.approx(5.0)
    assert float(M.add_s(R_GT, T0 + dt, R_GT, T0, PTS4)) == pytest.approx(5.0)
    assert float(M.mssd(R_GT, T0 + dt, R_GT, T0, PTS4, sR, st)) == pytest.approx(5.0)
    # A shift parallel to the image plane moves every projection by f * |dt| / Z pixels.
    t_gt = np.array([0.0, 0.0, 1000.0])
    pts_plane = PTS4 * [1, 1, 0]  # z = 0 in the model; with R = I all points sit at depth 1000
    e = M.mspd(I3, t_gt + dt, I3, t_gt, K, pts_plane, sR, st)
    assert float(e) == pytest.approx(600.0 * 5.0 / 1000.0)


def test_add_vs_add_s_on_symmetric_set():
    R = R_GT @ rot([0, 0, 1], np.pi / 2)  # a symmetry of PTS4
    # Every point moves by a quarter turn at radius 50: |chord| = 50 sqrt(2).
    assert float(M.add(R, T0, R_GT, T0, PTS4)) == pytest.approx(50 * np.sqrt(2))
    assert float(M.add_s(R, T0, R_GT, T0, PTS4)) == pytest.approx(0.0, abs=1e-9)
    assert float(M.add_or_add_s(R, T0, R_GT, T0, PTS4, True)) == pytest.approx(0.0, abs=1e-9)
    assert float(M.add_or_add_s(R, T0, R_GT, T0, PTS4, False)) == pytest.approx(50 * np.sqrt(2))
    # Traced flag under vmap: a mixed batch.
    f = jax.vmap(lambda s: M.add_or_add_s(R, T0, R_GT, T0, PTS4, s))
    np.testing.assert_allclose(f(jnp.array([True, False])), [0.0, 50 * np.sqrt(2)], atol=1e-9)


def test_add_s_matches_kdtree_and_chunking_and_valid():
    rng = np.random.default_rng(1)
    pts = rng.normal(scale=30.0, size=(300, 3))
    R, t = rand_rot(rng), T0 + rng.normal(scale=5.0, size=3)
    nn, _ = cKDTree(pts @ R.T + t).query(pts @ R_GT.T + T0, k=1)  # bop's adi
    for chunk in (64, 300, 1000):  # remainder chunk, exact fit, chunk > N
        e = M.add_s(R, t, R_GT, T0, pts, chunk_size=chunk)
        assert float(e) == pytest.approx(nn.mean(), rel=1e-10)
    add_ref = np.linalg.norm(pts @ R.T + t - (pts @ R_GT.T + T0), axis=1).mean()
    assert float(M.add(R, t, R_GT, T0, pts)) == pytest.approx(add_ref, rel=1e-12)
    # Padding with junk points behind a mask changes nothing.
    padded = np.concatenate([pts, np.full((20, 3), 1e4)])
    valid = np.arange(320) < 300
    assert float(M.add_s(R, t, R_GT, T0, padded, valid)) == pytest.approx(nn.mean(), rel=1e-10)
    assert float(M.add(R, t, R_GT, T0, padded, valid.astype(float))) == pytest.approx(add_ref, rel=1e-12)
    assert float(M.add(R, t, R_GT, T0, padded, np.zeros(320, bool))) == np.inf


def test_symmetry_transformations_discrete():
    sR, st = M.symmetry_transformations(INFO_4FOLD)
    assert sR.shape == (4, 3, 3) and st.shape == (4, 3) and sR.dtype == np.float64
    np.testing.assert_allclose(sR[0], I3)
    assert M.symmetry_transformations({"diameter": 10.0})[0].shape == (1, 3, 3)
    # A discrete symmetry with a translation (row-major 4x4, bop's convention).
    m = np.eye(4)
    m[:3, :3] = rot([1, 0, 0], np.pi)
    m[:3, 3] = [0.0, 0.0, 7.0]
    sR, st = M.symmetry_transformations({"symmetries_discrete": [m.reshape(-1).tolist()]})
    np.testing.assert_allclose(sR[1], m[:3, :3])
    np.testing.assert_allclose(st[1], [0.0, 0.0, 7.0])


def test_symmetry_transformations_continuous_and_combined():
    info = {"symmetries_continuous": [{"axis": [0, 0, 2], "offset": [5.0, -3.0, 0.0]}]}
    sR, st = M.symmetry_transformations(info)
    assert len(sR) == int(np.ceil(np.pi / 0.01)) == 315
    assert len(M.symmetry_transformations(info, max_sym_disc_step=0.1)[0]) == 32
    np.testing.assert_allclose(sR @ np.swapaxes(sR, 1, 2), np.broadcast_to(I3, sR.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(sR), 1.0, atol=1e-12)
    np.testing.assert_allclose(sR[1], rot([0, 0, 1], 2 * np.pi / 315), atol=1e-12)
    # Points on the axis (through the offset) are fixed by every symmetry.
    on_axis = np.array([5.0, -3.0, 40.0])
    np.testing.assert_allclose(sR @ on_axis + st, np.broadcast_to(on_axis, st.shape), atol=1e-9)

    flip = np.eye(4)
    flip[:3, :3] = rot([1, 0, 0], np.pi)
    info2 = {
        "symmetries_discrete": [flip.reshape(-1).tolist()],
        "symmetries_continuous": [{"axis": [0, 0, 1], "offset": [0, 0, 0]}],
    }
    sR2, st2 = M.symmetry_transformations(info2, max_sym_disc_step=0.1)
    assert sR2.shape == (64, 3, 3)
    # bop order: discrete outer, continuous inner, composition R_c @ R_d.
    expected = rot([0, 0, 1], 2 * np.pi * 5 / 32) @ flip[:3, :3]
    np.testing.assert_allclose(sR2[32 + 5], expected, atol=1e-12)
    np.testing.assert_allclose(sR2 @ np.swapaxes(sR2, 1, 2), np.broadcast_to(I3, sR2.shape), atol=1e-12)


def test_symmetry_transformations_bad_input():
    with pytest.raises(ValueError, match="symmetries_discrete"):
        M.symmetry_transformations({"symmetries_discrete": [[1, 0, 0]]})
    with pytest.raises(ValueError, match="axis"):
        M.symmetry_transformations({"symmetries_continuous": [{"axis": [0, 0, 0], "offset": [0, 0, 0]}]})
    with pytest.raises(ValueError, match="max_sym_disc_step"):
        M.symmetry_transformations({}, max_sym_disc_step=0.0)
    with pytest.raises(ValueError, match="model_info"):
        M.symmetry_transformations([1, 2])


def _mssd_loop(R, t, R_gt, t_gt, pts, sR, st):
    """bop's mssd written as its loop over the symmetries."""
    est = pts @ R.T + t
    return min(
        np.linalg.norm(est - (pts @ (R_gt @ a).T + (R_gt @ b + t_gt)), axis=1).max()
        for a, b in zip(sR, st)
    )


def test_mssd_mspd_discrete_symmetry():
    sR, st = M.symmetry_transformations(INFO_4FOLD)
    R = R_GT @ rot([0, 0, 1], np.pi / 2)
    assert float(M.mssd(R, T0, R_GT, T0, PTS4, sR, st)) == pytest.approx(0.0, abs=1e-9)
    assert float(M.mssd(R, T0, R_GT, T0, PTS4, sR[:1], st[:1])) == pytest.approx(50 * np.sqrt(2))
    assert float(M.mspd(R, T0, R_GT, T0, K, PTS4, sR, st)) == pytest.approx(0.0, abs=1e-7)
    rng = np.random.default_rng(2)
    Rr, tr = rand_rot(rng), T0 + rng.normal(scale=10, size=3)
    assert float(M.mssd(Rr, tr, R_GT, T0, PTS4, sR, st, chunk_size=3)) == pytest.approx(
        _mssd_loop(Rr, tr, R_GT, T0, PTS4, sR, st), rel=1e-12
    )


def test_mssd_continuous_symmetry_is_invariant_up_to_discretisation():
    # A ring of 36 points at radius 50 (continuous z symmetry), diameter 100.
    a = np.linspace(0, 2 * np.pi, 36, endpoint=False)
    ring = np.stack([50 * np.cos(a), 50 * np.sin(a), np.zeros_like(a)], 1)
    step = 0.05
    info = {"symmetries_continuous": [{"axis": [0, 0, 1], "offset": [0, 0, 0]}]}
    sR, st = M.symmetry_transformations(info, step)
    R = R_GT @ rot([0, 0, 1], 1.234)
    e = float(M.mssd(R, T0, R_GT, T0, ring, sR, st))
    assert 0 < e <= 100 * step  # the bound that defines max_sym_disc_step
    assert float(M.mssd(R, T0, R_GT, T0, ring, sR[:1], st[:1])) > 50  # without the symmetry
    assert e == pytest.approx(_mssd_loop(R, T0, R_GT, T0, ring, sR, st), rel=1e-12)


def test_vmap_and_float32():
    rng = np.random.default_rng(3)
    Rs = np.stack([rand_rot(rng) for _ in range(3)]).astype(np.float32)
    ts = (T0 + rng.normal(size=(3, 3))).astype(np.float32)
    pts = PTS4.astype(np.float32)
    sR, st = (x.astype(np.float32) for x in M.symmetry_transformations(INFO_4FOLD))
    out = jax.vmap(lambda R, t: jnp.stack([
        M.add(R, t, R_GT.astype(np.float32), T0.astype(np.float32), pts),
        M.add_s(R, t, R_GT.astype(np.float32), T0.astype(np.float32), pts),
        M.mssd(R, t, R_GT.astype(np.float32), T0.astype(np.float32), pts, sR, st),
        M.rotation_error_deg(R, R_GT.astype(np.float32)),
    ]))(Rs, ts)
    assert out.dtype == jnp.float32 and out.shape == (3, 4)
    ref = np.array([
        [float(M.add(R, t, R_GT, T0, PTS4)), float(M.rotation_error_deg(R, R_GT))]
        for R, t in zip(Rs.astype(float), ts.astype(float))
    ])
    np.testing.assert_allclose(np.asarray(out)[:, [0, 3]], ref, rtol=1e-4)


def test_auc_hand_cases():
    e = [0.0, 50.0, 100.0, 200.0]
    # VOCap: steps at 0 (acc 1/4, zero width), 50 (2/4), 100 (3/4); the 200 counts in n only.
    assert M.auc(e, 100.0) == pytest.approx((50 * 0.5 + 50 * 0.75) / 100)
    # 11 points 0, 10, ..., 100 of acc(th) = frac(e <= th): 0..40 -> 1/4, 50..90 -> 2/4, 100 -> 3/4.
    assert M.auc(e, 100.0, points=11) == pytest.approx((5 * 0.25 + 5 * 0.5 + 0.75) / 11)
    assert M.auc([0.0, 0.0], 100.0) == pytest.approx(1.0)
    assert M.auc([150.0, np.inf, np.nan], 100.0) == 0.0
    assert M.auc([20.0, 60.0], 100.0) == pytest.approx((20 * 0.5 + 40 * 1.0 + 40 * 1.0) / 100)
    # Dense uniform errors on [0, 200]: accuracy(th) = th / 200, area on [0, 100] = 1/4.
    dense = np.linspace(0, 200, 20001)
    assert M.auc(dense, 100.0) == pytest.approx(0.25, abs=1e-3)
    assert M.auc(dense, 100.0, points=101) == pytest.approx(0.25, abs=1e-3)
    with pytest.raises(ValueError, match="errors"):
        M.auc([], 100.0)
    with pytest.raises(ValueError, match="points"):
        M.auc(e, 100.0, points=1)


def test_recalls():
    assert M.add_recall([1.0, 5.0, 10.0, 20.0], 100.0) == pytest.approx(0.5)  # strict <
    assert M.add_recall([1.0, 5.0, np.inf], [10.0, 100.0, 100.0]) == pytest.approx(1 / 3)
    # AR_MSPD at width 640: 4 px passes all 10 thresholds, 26 px passes 30..50 (5), 60 none.
    assert M.ar_mspd([4.0, 26.0, 60.0]) == pytest.approx(15 / 30)
    # At width 1280 the errors count half: 2, 13, 30 px -> 10 + 8 + 4 (30 < 30 fails).
    assert M.ar_mspd([4.0, 26.0, 60.0], image_width=1280) == pytest.approx(22 / 30)
    # AR_MSSD: 0.12 d passes 0.15..0.5 (8 of 10), 0.5 d fails all (strict), 0.01 d passes all.
    assert M.ar_mssd([12.0, 50.0, 1.0], 100.0) == pytest.approx(18 / 30)
    with pytest.raises(ValueError, match="diameters"):
        M.add_recall([1.0, 2.0], [1.0, 2.0, 3.0])


# ----------------------------------------------------------------------------------------------
# Gradient correctness
# ----------------------------------------------------------------------------------------------


def _reproj_err(x3d, x2d):
    return jnp.linalg.norm(project(x3d, R_GT, T0, K) - x2d, axis=-1)


@pytest.fixture(scope="module")
def grad_problem():
    rng = np.random.default_rng(4)
    x3d = rng.normal(scale=40.0, size=(40, 3))
    x2d = np.asarray(project(x3d, R_GT, T0, K)) + rng.normal(scale=3.0, size=(40, 2))
    g_true = np.asarray(jax.grad(lambda X: jnp.sum(_reproj_err(X, x2d)))(jnp.asarray(x3d)))
    return x3d, x2d, g_true


def test_gradient_correctness_constructed(grad_problem):
    x3d, x2d, g = grad_problem
    assert float(M.gradient_correctness(g, x3d, x2d, K, R_GT, T0)) == 1.0
    assert float(M.gradient_correctness(-g, x3d, x2d, K, R_GT, T0)) == 0.0
    flip = np.where((np.arange(40) % 4 == 0)[:, None], -g, 3.0 * g)
    assert float(M.gradient_correctness(flip, x3d, x2d, K, R_GT, T0)) == pytest.approx(0.75)
    # Zero gradients and zero-error points are left out; so are invalid points.
    g2, x2d2 = g.copy(), x2d.copy()
    g2[:5] = 0.0
    x2d2[5:10] = np.asarray(project(x3d[5:10], R_GT, T0, K))
    g2[10:20] *= -1
    valid = np.arange(40) < 30
    correct, counted = M.gradient_correct_mask(g2, x3d, x2d2, K, R_GT, T0, valid)
    np.testing.assert_array_equal(counted, (np.arange(40) >= 10) & valid)
    np.testing.assert_array_equal(correct, (np.arange(40) >= 20) & valid)
    assert float(M.gradient_correctness(g2, x3d, x2d2, K, R_GT, T0, valid)) == pytest.approx(0.5)
    # A gradient along the viewing ray does not change the projection: counted, not correct.
    ray = (x3d @ R_GT.T + T0) @ R_GT  # camera-frame point direction, in model coordinates
    c, n = M.gradient_correct_mask(ray, x3d, x2d, K, R_GT, T0)
    assert bool(np.all(n)) and float(np.mean(c)) < 1.0


def test_gradient_correctness_finite_difference(grad_problem):
    x3d, x2d, _ = grad_problem
    g = np.random.default_rng(5).normal(size=x3d.shape)
    correct, counted = M.gradient_correct_mask(g, x3d, x2d, K, R_GT, T0)
    correct, counted = np.asarray(correct), np.asarray(counted)
    assert counted.all() and 0 < correct.mean() < 1
    h = 1e-4
    de = np.asarray(_reproj_err(x3d - h * g, x2d) - _reproj_err(x3d, x2d))
    np.testing.assert_array_equal(de < 0, correct)


def test_gradient_correctness_vmap_float32(grad_problem):
    x3d, x2d, g = grad_problem
    gs = np.stack([g, -g]).astype(np.float32)
    args32 = [a.astype(np.float32) for a in (x3d, x2d, K, R_GT, T0)]
    f = jax.vmap(lambda gg: M.gradient_correctness(gg, *args32))
    out = f(gs)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, [1.0, 0.0])


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="pts"):
        M.add(I3, T0, I3, T0, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="R_gt"):
        M.add_s(I3, T0, np.eye(4), T0, PTS4)
    with pytest.raises(ValueError, match="sym_t"):
        M.mssd(I3, T0, I3, T0, PTS4, np.eye(3)[None], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="grad_x3d"):
        M.gradient_correctness(np.zeros((3, 3)), PTS4, np.zeros((8, 2)), K, I3, T0)
    with pytest.raises(ValueError, match="valid"):
        M.add(I3, T0, I3, T0, PTS4, np.ones(3, bool))
