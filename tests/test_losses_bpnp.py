"""bpnp_loss: implicit gradients against central finite differences, OpenCV's pose, zero loss at a
perfect instance, finite zero gradients for failed solves, float64 (conftest).

One jitted function (vmapped over a batch of 4 instances, value and gradient) serves every test:
compile time dominates on CI.
"""
import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcpose import geometry
from lcpose.losses.bpnp import bpnp_loss
from lcpose.losses.common import corner_distance

K = np.array([[572.4114, 0.0, 325.2611], [0.0, 573.57043, 242.04899], [0.0, 0.0, 1.0]])
N = 10
BBOX = np.asarray(geometry.bbox3d_corners(jnp.array([-40.0, -30.0, -20.0]), jnp.array([40.0, 30.0, 20.0])))


def _instance(rng, noise_px):
    x3d = rng.uniform(-40.0, 40.0, size=(N, 3))
    R = np.asarray(geometry.so3_exp(jnp.asarray(rng.normal(size=3))))
    t = np.array([rng.uniform(-60, 60), rng.uniform(-40, 40), rng.uniform(500, 900)])
    x2d = np.asarray(geometry.project(jnp.asarray(x3d), jnp.asarray(R), jnp.asarray(t), jnp.asarray(K)))
    x2d = x2d + rng.normal(size=(N, 2)) * noise_px
    w2d = rng.uniform(0.5, 2.0, size=(N, 2))
    return x2d, x3d, w2d, R, t


@pytest.fixture(scope="module")
def batch():
    """0: noisy, 1: perfect, 2: all weights zero, 3: a NaN image point (both must fail)."""
    rng = np.random.default_rng(3)
    insts = [_instance(rng, 2.0), _instance(rng, 0.0), _instance(rng, 1.0), _instance(rng, 1.0)]
    x2d, x3d, w2d, R, t = (np.stack(a) for a in zip(*insts))
    w2d[2] = 0.0
    x2d[3, 4, 0] = np.nan
    return x2d, x3d, w2d, R, t


@pytest.fixture(scope="module")
def value_and_grad():
    def total(x2d, x3d, w2d, R, t):
        terms = jax.vmap(lambda a, b, c, r, tt: bpnp_loss(a, b, c, K, r, tt, BBOX))(x2d, x3d, w2d, R, t)
        return jnp.sum(terms.loss), terms

    return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True))


@pytest.fixture(scope="module")
def result(batch, value_and_grad):
    return value_and_grad(*batch)


def test_gradient_matches_central_differences(batch, value_and_grad, result):
    x2d, x3d, w2d, R, t = batch
    (_, terms), grads = result
    assert bool(terms.converged[0])
    assert float(terms.loss[0]) > 0.1  # noisy: the solution is not the ground truth
    for arg, h in ((0, 1e-4), (1, 1e-4), (2, 1e-6)):
        base = [np.array(a) for a in batch]
        g = np.asarray(grads[arg][0]).ravel()
        fd = np.zeros_like(g)
        for j in range(g.size):
            plus = [a.copy() for a in base]
            minus = [a.copy() for a in base]
            plus[arg][0].reshape(-1)[j] += h
            minus[arg][0].reshape(-1)[j] -= h
            lp = float(value_and_grad(*plus)[0][1].loss[0])
            lm = float(value_and_grad(*minus)[0][1].loss[0])
            fd[j] = (lp - lm) / (2 * h)
        rel = np.linalg.norm(g - fd) / np.linalg.norm(fd)
        assert rel < 1e-5, (arg, rel)


def test_matches_opencv_pose(batch, value_and_grad):
    """With unit weights the solver is OpenCV's iterative PnP; compare on the noisy instance."""
    x2d, x3d, w2d, R, t = batch
    (_, out), _ = value_and_grad(x2d, x3d, np.ones_like(w2d), R, t)
    # Start OpenCV at the ground truth so that both land in the same (global) minimum.
    rvec0 = cv2.Rodrigues(R[0])[0]
    ok, rvec, tvec = cv2.solvePnP(
        x3d[0], x2d[0], K, None, rvec0, t[0].reshape(3, 1).copy(), True, flags=cv2.SOLVEPNP_ITERATIVE
    )
    assert ok
    R_cv = cv2.Rodrigues(rvec)[0]
    # OpenCV's LM stops earlier (its criteria are ~1e-6 relative): compare at that precision and
    # check that ours is at least as low a minimum.
    np.testing.assert_allclose(np.asarray(out.R[0]), R_cv, atol=2e-5)
    np.testing.assert_allclose(np.asarray(out.t[0]), tvec.ravel(), atol=2e-2)

    def sq_err(Rm, tv):
        return float(np.sum((np.asarray(geometry.project(x3d[0], Rm, tv, K)) - x2d[0]) ** 2))

    assert sq_err(np.asarray(out.R[0]), np.asarray(out.t[0])) <= sq_err(R_cv, tvec.ravel()) + 1e-9
    expect = corner_distance(
        jnp.asarray(R_cv), jnp.asarray(tvec.ravel()), jnp.asarray(R[0]), jnp.asarray(t[0]), jnp.asarray(BBOX)
    )
    # The loss is the smoothed distance sqrt(d^2 + s^2) - s, s = 1e-3 mm.
    assert float(out.loss[0]) == pytest.approx(float(expect), abs=2e-3)


def test_perfect_correspondences_give_zero_loss_and_gradient(result):
    (_, terms), grads = result
    assert bool(terms.converged[1])
    assert float(terms.loss[1]) < 1e-9
    for g in grads:
        assert float(np.max(np.abs(np.asarray(g[1])))) < 1e-6


def test_failed_solves_give_finite_zero_loss_and_gradient(result):
    (total, terms), grads = result
    assert np.isfinite(float(total))
    for i in (2, 3):
        assert not bool(terms.converged[i])
        assert float(terms.loss[i]) == 0.0
        assert np.all(np.isfinite(np.asarray(terms.R[i]))) and np.all(np.isfinite(np.asarray(terms.t[i])))
        for g in grads:
            gi = np.asarray(g[i])
            assert np.all(np.isfinite(gi)) and np.all(gi == 0.0)


def test_bad_shapes_raise_naming_the_argument():
    x2d = np.zeros((N, 2))
    x3d = np.zeros((N, 3))
    with pytest.raises(ValueError, match="bbox3d"):
        bpnp_loss(x2d, x3d, np.ones((N, 2)), K, np.eye(3), np.zeros(3), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="x2d"):
        bpnp_loss(np.zeros((N, 3)), x3d, np.ones((N, 2)), K, np.eye(3), np.zeros(3), BBOX)
    with pytest.raises(ValueError, match="t_gt"):
        bpnp_loss(x2d, x3d, np.ones((N, 2)), K, np.eye(3), np.zeros(4), BBOX)
