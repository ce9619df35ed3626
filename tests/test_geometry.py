"""lcpose.geometry: conversions, SO(3) exp/log near 0 and pi, retraction, projection, crops."""
import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcpose import geometry as g

RNG = np.random.default_rng(0)
ANGLES = [0.0, 1e-9, 1e-6, 1e-3, 0.3, 1.5, 3.0, np.pi - 1e-7, np.pi]


def _axis(rng):
    a = rng.normal(size=3)
    return a / np.linalg.norm(a)


def _rodrigues(w):
    return cv2.Rodrigues(np.asarray(w, np.float64))[0]


def _fd_jacobian(f, x, eps=1e-6):
    x = np.asarray(x, np.float64)
    cols = []
    for k in range(x.size):
        d = np.zeros_like(x)
        d.flat[k] = eps
        cols.append((np.asarray(f(x + d)) - np.asarray(f(x - d))).ravel() / (2 * eps))
    return np.stack(cols, axis=-1)


@pytest.mark.parametrize("theta", ANGLES)
def test_so3_exp_log_round_trip_and_opencv(theta):
    w = _axis(RNG) * theta
    R = np.asarray(g.so3_exp(jnp.asarray(w)))
    np.testing.assert_allclose(R, _rodrigues(w), atol=1e-12)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    w2 = np.asarray(g.so3_log(jnp.asarray(R)))
    np.testing.assert_allclose(np.asarray(g.so3_exp(jnp.asarray(w2))), R, atol=1e-12)
    assert np.linalg.norm(w2) <= np.pi + 1e-12
    if theta < np.pi - 1e-6:
        np.testing.assert_allclose(w2, w, atol=1e-9)


@pytest.mark.parametrize("theta", ANGLES)
def test_quaternion_sixd_axis_angle_round_trips(theta):
    w = _axis(RNG) * theta
    R = g.so3_exp(jnp.asarray(w))
    q = g.matrix_to_quat(R)
    assert q[0] >= 0 and abs(float(jnp.linalg.norm(q)) - 1) < 1e-12
    np.testing.assert_allclose(g.quat_to_matrix(q), R, atol=1e-12)
    np.testing.assert_allclose(g.quat_to_matrix(-3.0 * q), R, atol=1e-12)  # unnormalised, sign
    np.testing.assert_allclose(g.sixd_to_matrix(g.matrix_to_sixd(R)), R, atol=1e-12)
    np.testing.assert_allclose(g.axis_angle_to_matrix(g.matrix_to_axis_angle(R)), R, atol=1e-12)
    # hand value: q = (cos(theta/2), sin(theta/2) axis)
    half = 0.5 * theta
    q_ref = np.concatenate([[np.cos(half)], np.sin(half) * w / max(theta, 1e-300)])
    if theta > 0:  # q and -q are the same rotation; at theta = pi both have w = 0
        sign = np.sign(np.dot(np.asarray(q), q_ref))
        np.testing.assert_allclose(sign * np.asarray(q), q_ref, atol=1e-9)


def test_sixd_gram_schmidt_of_perturbed_columns():
    R = np.asarray(g.so3_exp(jnp.array([0.2, -0.5, 0.9])))
    m = np.concatenate([2.0 * R[:, 0], R[:, 1] + 0.3 * R[:, 0]])  # scaled, sheared columns
    np.testing.assert_allclose(g.sixd_to_matrix(jnp.asarray(m)), R, atol=1e-12)


@pytest.mark.parametrize("theta", [0.0, 1e-7, 0.4, 3.0, np.pi - 1e-4])
def test_exp_log_derivatives_against_finite_differences(theta):
    w = _axis(np.random.default_rng(3)) * theta
    J = np.asarray(jax.jacfwd(g.so3_exp)(jnp.asarray(w))).reshape(9, 3)
    num = _fd_jacobian(lambda x: g.so3_exp(jnp.asarray(x)), w)
    np.testing.assert_allclose(J, num, atol=1e-7, rtol=1e-5)
    assert np.all(np.isfinite(J))
    R = g.so3_exp(jnp.asarray(w))
    # derivative of log(R exp(d)) at d = 0 is finite and matches differences (right Jacobian^-1)
    f = lambda d: g.so3_log(R @ g.so3_exp(jnp.asarray(d)))  # noqa: E731
    Jl = np.asarray(jax.jacfwd(f)(jnp.zeros(3)))
    assert np.all(np.isfinite(Jl))
    if theta < np.pi - 1e-3:
        np.testing.assert_allclose(Jl, _fd_jacobian(f, np.zeros(3)), atol=1e-7, rtol=1e-5)


def test_quaternion_and_sixd_gradients_against_finite_differences():
    R = np.asarray(g.so3_exp(jnp.array([0.3, 2.5, -0.4])))  # a large angle: non-w pivot
    for fn in (g.matrix_to_quat, g.matrix_to_sixd):
        J = np.asarray(jax.jacfwd(fn)(jnp.asarray(R))).reshape(-1, 9)
        np.testing.assert_allclose(J, _fd_jacobian(lambda x: fn(jnp.asarray(x.reshape(3, 3))), R.ravel()), atol=1e-7)
    q = np.array([0.3, -0.5, 0.2, 0.7])
    J = np.asarray(jax.jacfwd(g.quat_to_matrix)(jnp.asarray(q))).reshape(9, 4)
    np.testing.assert_allclose(J, _fd_jacobian(lambda x: g.quat_to_matrix(jnp.asarray(x)), q), atol=1e-8)


def test_retract_is_right_perturbation():
    R = g.so3_exp(jnp.array([0.1, 0.2, -0.3]))
    t = jnp.array([1.0, 2.0, 300.0])
    d = jnp.array([0.01, -0.02, 0.03, 1.0, -2.0, 3.0])
    R2, t2 = g.retract(R, t, d)
    np.testing.assert_allclose(R2, R @ g.so3_exp(d[:3]), atol=1e-14)
    np.testing.assert_allclose(t2, t + d[3:], atol=1e-14)


K_TEST = np.array([[572.4114, 0.0, 325.2611], [0.0, 573.57043, 242.04899], [0.0, 0.0, 1.0]])
K_SKEW = K_TEST + np.array([[0.0, 0.7, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # OpenCV ignores skew


def test_project_matches_opencv_and_jacobian_matches_differences():
    X = RNG.uniform(-50, 50, size=(20, 3))
    w = np.array([0.3, -1.2, 0.5])
    t = np.array([20.0, -10.0, 600.0])
    R = _rodrigues(w)
    uv = np.asarray(g.project(jnp.asarray(X), jnp.asarray(R), jnp.asarray(t), jnp.asarray(K_TEST)))
    uv_cv = cv2.projectPoints(X, w, t, K_TEST, None)[0].reshape(-1, 2)
    np.testing.assert_allclose(uv, uv_cv, atol=1e-9)
    J = np.asarray(g.project_jacobian(jnp.asarray(X), jnp.asarray(R), jnp.asarray(t), jnp.asarray(K_SKEW)))

    def f(d):
        Rd, td = g.retract(jnp.asarray(R), jnp.asarray(t), jnp.asarray(d))
        return g.project(jnp.asarray(X), Rd, td, jnp.asarray(K_SKEW))

    num = _fd_jacobian(f, np.zeros(6)).reshape(20, 2, 6)
    np.testing.assert_allclose(J, num, rtol=1e-6, atol=1e-6)
    uv_t, J_t = g.project_with_jacobian_points_last(jnp.asarray(X.T), jnp.asarray(R), jnp.asarray(t), jnp.asarray(K_SKEW))
    uv_skew = np.asarray(g.project(jnp.asarray(X), jnp.asarray(R), jnp.asarray(t), jnp.asarray(K_SKEW)))
    np.testing.assert_allclose(uv_t.T, uv_skew, atol=1e-10)
    np.testing.assert_allclose(np.asarray(J_t).transpose(2, 0, 1), J, atol=1e-10)


def test_crop_intrinsics_agree_with_the_affine_and_with_warp_affine():
    K = jnp.asarray(K_TEST)
    center, scale, out = jnp.array([300.3, 210.8]), 123.0, 64
    A = np.asarray(g.crop_affine(center, scale, out))
    Kc = g.crop_intrinsics(K, center, scale, out)
    X = jnp.asarray(RNG.uniform(-40, 40, size=(10, 3)))
    R, t = g.so3_exp(jnp.array([0.2, 0.1, -0.4])), jnp.array([5.0, -3.0, 700.0])
    uv = np.asarray(g.project(X, R, t, K))
    np.testing.assert_allclose(uv @ A[:, :2].T + A[:, 2], g.project(X, R, t, Kc), atol=1e-9)
    # The crop's edges: the left edge of the crop (center - scale/2) maps to -0.5 (pixel edge).
    np.testing.assert_allclose(A @ np.array([300.3 - 61.5, 210.8 - 61.5, 1.0]), [-0.5, -0.5], atol=1e-12)
    # cv2.warpAffine uses the same pixel-centre convention: a single lit pixel lands where A says.
    img = np.zeros((480, 640), np.float32)
    img[200, 310] = 1.0
    s = 2.0  # an integer zoom keeps the lit pixel a pixel
    A2 = np.asarray(g.crop_affine(jnp.array([310.0 + 0.25, 200.0 + 0.25]), 32.0, 64))
    assert np.isclose(A2[0, 0], s)
    crop = cv2.warpAffine(img, A2, (64, 64), flags=cv2.INTER_LINEAR)
    target = A2 @ np.array([310.0, 200.0, 1.0])
    v, u = np.unravel_index(np.argmax(crop), crop.shape)
    assert np.hypot(u - target[0], v - target[1]) <= 0.5 + 1e-9


def test_bbox3d_corners_order():
    c = np.asarray(g.bbox3d_corners(jnp.array([-1.0, -2.0, -3.0]), jnp.array([1.0, 2.0, 3.0])))
    assert c.shape == (8, 3)
    np.testing.assert_allclose(c[0], [-1, -2, -3])
    np.testing.assert_allclose(c[1], [1, -2, -3])
    np.testing.assert_allclose(c[7], [1, 2, 3])
    assert len({tuple(r) for r in c}) == 8


def test_float32_stays_float32():
    w = jnp.array([0.1, 0.2, 0.3], jnp.float32)
    assert g.so3_exp(w).dtype == jnp.float32
    assert g.so3_log(g.so3_exp(w)).dtype == jnp.float32
    assert g.matrix_to_quat(g.so3_exp(w)).dtype == jnp.float32
