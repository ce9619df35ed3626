"""lcpose.pnp: EPnP, LM `solve` against OpenCV, implicit derivatives, RANSAC, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.common import LMO_K, pnp_scenes
from bench.pnp import opencv_solve
from tests.numeric import central_differences
from lcpose import geometry, metrics, pnp

K64 = jnp.asarray(LMO_K)
_solve_batch = jax.jit(jax.vmap(pnp.solve, in_axes=(0, 0, 0, None)))
_epnp_batch = jax.jit(jax.vmap(pnp.epnp, in_axes=(0, 0, None)))


def _rot_err(R, R_gt):
    return np.asarray(jax.vmap(metrics.rotation_error_deg)(jnp.asarray(R, jnp.float64), jnp.asarray(R_gt)))


@pytest.mark.parametrize("n", [6, 64])
def test_epnp_is_exact_without_noise(n):
    x3d, x2d, R, t, _ = pnp_scenes(np.random.default_rng(n), 16, n, noise_px=0.0)
    Re, te = _epnp_batch(jnp.asarray(x3d), jnp.asarray(x2d), K64)
    assert np.max(_rot_err(Re, R)) < 1e-6
    assert np.max(np.linalg.norm(np.asarray(te) - t, axis=1)) < 1e-5


_cost_batch = jax.jit(jax.vmap(lambda R, t, X, x: pnp.pnp_cost(R, t, X, x, jnp.ones_like(x), K64)))


@pytest.mark.parametrize(
    "n, dtype", [(6, jnp.float64), (64, jnp.float64), (1024, jnp.float64), (1024, jnp.float32)]
)
def test_solve_is_as_accurate_as_opencv_iterative(n, dtype):
    """Random poses 300-1500 mm away, 1.5 px noise: median errors no worse than OpenCV's."""
    x3d, x2d, R, t, _ = pnp_scenes(np.random.default_rng(100 + n), 32, n, noise_px=1.5)
    res = _solve_batch(
        jnp.asarray(x3d, dtype), jnp.asarray(x2d, dtype), jnp.ones((32, n, 2), dtype), jnp.asarray(LMO_K, dtype)
    )
    assert res.R.dtype == dtype
    assert np.all(np.asarray(res.converged))
    R_cv, t_cv = opencv_solve(x3d, x2d, LMO_K)
    ours = np.median(_rot_err(res.R, R)), np.median(np.linalg.norm(np.asarray(res.t, np.float64) - t, axis=1))
    cv = np.median(_rot_err(R_cv, R)), np.median(np.linalg.norm(t_cv - t, axis=1))
    # Both solve the same least-squares problem: where both reach its minimum the medians agree
    # to rounding; 1 % leaves room for float32 and for which of two minima of a 6-point
    # problem each solver finds.
    assert ours[0] <= cv[0] * 1.01, (ours, cv)
    assert ours[1] <= cv[1] * 1.01, (ours, cv)
    if dtype == jnp.float64 and n >= 64:
        # ... and the minimum is reached at least as precisely as OpenCV's: lower or equal cost.
        X, x = jnp.asarray(x3d), jnp.asarray(x2d)
        c_ours = np.asarray(_cost_batch(res.R, res.t, X, x))
        c_cv = np.asarray(_cost_batch(jnp.asarray(R_cv), jnp.asarray(t_cv), X, x))
        assert np.all(c_ours <= c_cv * (1 + 1e-12) + 1e-12)


def test_cov_is_inverse_hessian_and_weights_scale_it():
    x3d, x2d, R, t, _ = pnp_scenes(np.random.default_rng(7), 1, 20, noise_px=0.0)
    X, x = jnp.asarray(x3d[0]), jnp.asarray(x2d[0])
    w = jnp.asarray(np.random.default_rng(8).uniform(0.5, 2.0, size=(20, 2)))
    solve = jax.jit(pnp.solve)
    res = solve(X, x, w, K64)

    def cost(d):
        return pnp.pnp_cost(*geometry.retract(res.R, res.t, d), X, x, w, K64)

    H = jax.hessian(cost)(jnp.zeros(6))  # exact Hessian = Gauss-Newton at zero residual
    np.testing.assert_allclose(res.cov, np.linalg.inv(np.asarray(H)), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(solve(X, x, 2.0 * w, K64).cov, np.asarray(res.cov) / 4.0, rtol=1e-6, atol=1e-12)
    assert float(res.cost) < 1e-12


def _scene(seed, n=10, noise=2.0):
    rng = np.random.default_rng(seed)
    x3d, x2d, _, _, _ = pnp_scenes(rng, 1, n, noise_px=noise)
    w = rng.uniform(0.5, 2.0, size=(n, 2))
    return jnp.asarray(x3d[0]), jnp.asarray(x2d[0]), jnp.asarray(w)


@pytest.mark.parametrize("huber", [None, 4.0])
def test_solve_gradients_match_finite_differences(huber):
    """Implicit-function-theorem VJP of (R, t) and the cost w.r.t. x3d, x2d, w2d (float64)."""
    X, x, w = _scene(11)
    coef_R = jnp.arange(9.0).reshape(3, 3) / 9.0
    coef_t = jnp.array([1.0, -2.0, 0.5]) * 1e-2

    @jax.jit
    def f(X, x, w):
        r = pnp.solve(X, x, w, K64, huber=huber)
        return jnp.sum(r.R * coef_R) + jnp.sum(r.t * coef_t) + 1e-3 * r.cost

    grads = jax.grad(f, argnums=(0, 1, 2))(X, x, w)
    for got, num in zip(grads, central_differences(f, (X, x, w))):
        assert np.all(np.isfinite(got))
        err = np.max(np.abs(np.asarray(got) - num)) / np.max(np.abs(num))
        assert err < 1e-5, err


def test_implicit_jacobian_matches_solver_differences_and_closed_form():
    X, x, w = _scene(12, n=8)
    solve = jax.jit(lambda xf: pnp.solve(X, xf.reshape(-1, 2), w, K64))
    res = solve(x.reshape(-1))

    def y(xf):
        s = solve(xf)
        return jnp.concatenate([geometry.so3_log(res.R.T @ s.R), s.t - res.t])

    eps = 1e-6
    eye = np.eye(16)
    num = np.stack([(y(x.reshape(-1) + eps * eye[k]) - y(x.reshape(-1) - eps * eye[k])) / (2 * eps) for k in range(16)], 1)
    A = pnp.implicit_jacobian(X, x, w, K64, res.R, res.t, hessian="exact")
    assert A.shape == (6, 16)
    assert np.max(np.abs(np.asarray(A) - num)) / np.max(np.abs(num)) < 1e-5
    # Gauss-Newton mode = the closed form H^-1 [J_i^T diag(w_i^2)] of the LC paper (Eqs. 9-11).
    A_gn = np.asarray(pnp.implicit_jacobian(X, x, w, K64, res.R, res.t))
    J = np.asarray(geometry.project_jacobian(X, res.R, res.t, K64))
    W = np.asarray(w) ** 2
    H = np.einsum("nai,na,naj->ij", J, W, J)
    closed = np.linalg.solve(H, (J * W[..., None]).reshape(-1, 6).T)
    np.testing.assert_allclose(A_gn, closed, rtol=1e-7, atol=1e-9 * np.abs(closed).max())


def test_ransac_with_30_percent_outliers():
    n, b = 128, 40
    x3d, x2d, R, t, out = pnp_scenes(np.random.default_rng(5), b, n, noise_px=1.0, outlier_rate=0.3)
    keys = jax.random.split(jax.random.key(0), b)
    f = jax.jit(jax.vmap(lambda k, X, x: pnp.ransac(k, X, x, jnp.asarray(LMO_K, jnp.float32), threshold_px=4.0)))
    res, inliers = f(keys, jnp.asarray(x3d, jnp.float32), jnp.asarray(x2d, jnp.float32))
    err = _rot_err(res.R, R)
    assert np.mean(err < 1.0) >= 0.95, np.sort(err)[-5:]
    # the inliers found are (almost only) the true inliers
    inl = np.asarray(inliers)
    assert np.mean(inl[~out]) > 0.9 and np.mean(inl[out]) < 0.05


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_shape_errors_name_the_argument():
    X, x, w = _scene(1, n=8)
    with pytest.raises(ValueError, match="x3d"):
        pnp.solve(X[:3], x[:3], w[:3], K64)
    with pytest.raises(ValueError, match="x2d"):
        pnp.solve(X, x[:7], w, K64)
    with pytest.raises(ValueError, match="x3d"):
        pnp.epnp(X[:, :2], x, K64)
    with pytest.raises(ValueError, match="w2d"):
        pnp.solve(X, x, w[:5], K64)
    with pytest.raises(ValueError, match="K"):
        pnp.solve(X, x, w, K64[:2])
    with pytest.raises(ValueError, match="valid"):
        pnp.solve(X, x, w, K64, valid=jnp.ones(5))
    with pytest.raises(ValueError, match="K"):
        pnp.solve(X, x, w, K64.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="R0"):
        pnp.solve(X, x, w, K64, R0=jnp.eye(3))
    with pytest.raises(ValueError, match="threshold_px"):
        pnp.ransac(jax.random.key(0), X, x, K64, threshold_px=0.0)


_solve_flags = jax.jit(lambda X, x, w, R0, t0: pnp.solve(X, x, w, K64, R0=R0, t0=t0))
_solve_plain = jax.jit(lambda X, x, w: pnp.solve(X, x, w, K64))


def _all_finite(res):
    return all(np.all(np.isfinite(np.asarray(a))) for a in (res.R, res.t, res.cov, res.cost))


def test_degenerate_inputs_flag_not_converged_with_finite_outputs():
    X, x, w = _scene(3, n=12, noise=0.5)
    # all-zero weights
    r = _solve_plain(X, x, jnp.zeros_like(w))
    assert not bool(r.converged) and _all_finite(r)
    # collinear object points: rotation about the line is unobservable
    s = jnp.linspace(-50.0, 50.0, 12)[:, None]
    Xc = s * jnp.array([[1.0, 0.5, -0.2]])
    xc = geometry.project(Xc, geometry.so3_exp(jnp.array([0.1, 0.2, 0.3])), jnp.array([0.0, 0.0, 600.0]), K64)
    r = _solve_plain(Xc, xc, jnp.ones_like(w))
    assert not bool(r.converged) and _all_finite(r)
    # a NaN image point
    r = _solve_plain(X, x.at[3, 1].set(jnp.nan), w)
    assert not bool(r.converged) and _all_finite(r)
    # points behind the camera at the solution (projections of a pose with t_z < 0)
    Rb, tb = geometry.so3_exp(jnp.array([0.2, -0.1, 0.3])), jnp.array([10.0, 5.0, -700.0])
    xb = geometry.project(X, Rb, tb, K64)
    r = _solve_flags(X, xb, w, Rb, tb)
    assert not bool(r.converged) and _all_finite(r)
    # From EPnP the solver finds the pose in front of the camera that best explains the data
    # (the image of points behind the camera is that of the mirrored points in front); it is a
    # valid solution with all points in front, and its cost shows the misfit (a reflection is
    # not a rotation): converged=True, as BUILD.md says.
    r = _solve_plain(X, xb, w)
    assert _all_finite(r) and bool(r.converged)
    assert np.all(np.asarray(geometry.transform(X, r.R, r.t))[:, 2] > 0)
    assert float(r.cost) > 1.0  # noise-free data: an exact fit would cost ~0
    # the gradient of a non-converged solve is finite (zero), never NaN
    g = jax.grad(lambda xx: jnp.sum(_solve_plain(Xc, xx, jnp.ones_like(w)).t))(xc)
    assert np.all(np.isfinite(np.asarray(g)))


def test_degenerate_instance_in_a_batch_does_not_spoil_the_others():
    x3d, x2d, R, t, _ = pnp_scenes(np.random.default_rng(9), 4, 16, noise_px=0.5)
    w = np.ones((4, 16, 2))
    w[2] = 0.0
    x2d = x2d.copy()
    x2d[3, 0, 0] = np.nan
    res = jax.jit(jax.vmap(pnp.solve, in_axes=(0, 0, 0, None)))(jnp.asarray(x3d), jnp.asarray(x2d), jnp.asarray(w), K64)
    assert list(np.asarray(res.converged)) == [True, True, False, False]
    assert np.all(np.isfinite(np.asarray(res.R))) and np.all(np.isfinite(np.asarray(res.t)))
    assert np.max(_rot_err(res.R[:2], R[:2])) < 1.0
