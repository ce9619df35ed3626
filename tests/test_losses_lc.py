"""The LC loss: values and gradients against a dense closed-form reference, the linearisation
against the empirical covariance of the solver, invariances, the averaging effect, ablations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.common import LMO_K, pnp_scenes
from tests.numeric import central_differences
from lcpose import geometry, metrics, pnp
from lcpose.losses import lc_loss
from lcpose.losses.lc import RESIDUAL_CLAMP_PX, huber2, representation_fn, robust_weights

K = jnp.asarray(LMO_K)
BBOX = geometry.bbox3d_corners(jnp.array([-60.0, -50.0, -40.0]), jnp.array([60.0, 50.0, 40.0]))


def _instance(seed=0, n=12, noise=2.0, outlier=True):
    rng = np.random.default_rng(seed)
    x3d, x2d, R, t, _ = pnp_scenes(rng, 1, n, noise_px=noise)
    x2d = x2d[0].copy()
    if outlier:
        x2d[0] += [45.0, -20.0]  # beyond the 32 px clamp
    w = rng.uniform(0.5, 2.0, size=(n, 2))
    if outlier:
        w[1] = [25.0, 30.0]  # a weight far above what its residual supports (robust W limit)
    return (jnp.asarray(x2d), jnp.asarray(x3d[0]), jnp.asarray(w), jnp.asarray(R[0]), jnp.asarray(t[0]))


def _frozen_constants(x2d, x3d, w, R, t, robust):
    """The stop-gradient quantities of the LC loss, evaluated once at the base point."""
    r = np.asarray(x2d - geometry.project(x3d, R, t, K))
    norm = np.linalg.norm(r, axis=1, keepdims=True)
    f = np.maximum(0.0, (norm - RESIDUAL_CLAMP_PX) / (norm + 1e-6)) if robust else np.zeros_like(norm)
    r_c = r - f * r
    m = np.mean(np.abs(r_c), axis=0)
    M = np.asarray(huber2(np.abs(r_c), 3 * m)) if robust else r_c**2
    m_w = np.mean(np.asarray(w) ** 2 * M, axis=0)
    d_w = np.sqrt(4 * m_w / (M + 1e-6))
    return dict(clamp=f * r, m=m, d_w=d_w, r_c=r_c, x3d=np.asarray(x3d))


def _lc_reference(x2d, x3d, w, R, t, c, robust=True, nll="laplace"):
    """Dense, closed-form LC (Eqs. 9-17) with the detached quantities frozen (constants `c`)."""
    r = x2d - geometry.project(x3d, R, t, K)
    if robust:
        r_c = r - c["clamp"]
        M = huber2(jnp.abs(r_c), 3 * c["m"])
        W = huber2(w, c["d_w"])
    else:
        M, W = r * r, w * w
    J = geometry.project_jacobian(jnp.asarray(c["x3d"]), R, t, K)  # x3d held constant in A
    H = jnp.einsum("nai,na,naj->ij", J, W, J)
    A = jnp.linalg.solve(H, (J * W[..., None]).reshape(-1, 6).T)  # (6, 2N), point-major
    C = A @ jnp.diag(M.reshape(-1)) @ A.T
    e = A @ jnp.asarray(c["r_c"]).reshape(-1)
    # bbox3d: corner k moves by [-R [X_k]x, I] y
    Jf = jnp.concatenate([jnp.concatenate([-R @ geometry.skew(X), jnp.eye(3)], axis=1) for X in BBOX], axis=0)
    Hinv = jnp.linalg.inv(H)
    cov = jnp.diag(Jf @ C @ Jf.T).reshape(8, 3).sum(1)
    prior = jnp.diag(Jf @ Hinv @ Jf.T).reshape(8, 3).sum(1)
    lin = ((Jf @ e) ** 2).reshape(8, 3).sum(1)
    if nll == "laplace":
        e_cov, e_prior, e_lin = jnp.mean(jnp.sqrt(cov)), jnp.mean(jnp.sqrt(prior)), jnp.mean(jnp.sqrt(lin))
    else:
        e_cov, e_prior, e_lin = jnp.mean(cov), jnp.mean(prior), jnp.mean(lin)
    return jnp.log(e_prior) + 0.5 * (e_cov + e_lin) / e_prior, (e_cov, e_prior, e_lin)


@pytest.mark.parametrize("robust, nll", [(True, "laplace"), (False, "laplace"), (True, "gaussian")])
def test_values_and_gradients_against_the_closed_form_reference(robust, nll):
    x2d, x3d, w, R, t = _instance(1)
    c = _frozen_constants(x2d, x3d, w, R, t, robust)
    loss_fn = jax.jit(lambda a, b, ww: lc_loss(a, b, ww, K, R, t, BBOX, robust=robust, nll=nll))
    terms = loss_fn(x2d, x3d, w)
    ref, (rc, rp, rl) = _lc_reference(x2d, x3d, w, R, t, c, robust, nll)
    np.testing.assert_allclose([terms.loss, terms.e_cov, terms.e_prior, terms.e_linear], [ref, rc, rp, rl], rtol=1e-9)
    grads = jax.grad(lambda a, b, ww: loss_fn(a, b, ww).loss, argnums=(0, 1, 2))(x2d, x3d, w)
    ref_fn = jax.jit(lambda a, b, ww: _lc_reference(a, b, ww, R, t, c, robust, nll)[0])
    for got, num in zip(grads, central_differences(ref_fn, (x2d, x3d, w))):
        err = np.max(np.abs(np.asarray(got) - num)) / np.max(np.abs(num))
        assert err < 1e-5, err


def _lc_autodiff(x2d, x3d, w, R, t, valid, representation="bbox3d", nll="laplace", robust=True,
                 detach_residual_cov=False, detach_weights_cov=False, use_cov=True, use_linear=True,
                 use_prior=True):
    """LC (Eqs. 9-17) with A = H^-1 [J_i^T W_i]_i formed densely and every stop-gradient of
    `lc_loss`'s docstring applied, differentiated by plain autodiff: the reference for the loss's
    hand-written backward passes."""
    sg = jax.lax.stop_gradient
    r = x2d - geometry.project(x3d, R, t, K)
    r_c, M, W = robust_weights(r, w, jnp.ones(len(x2d)) if valid is None else valid, robust)
    J = geometry.project_jacobian(sg(x3d), R, t, K).reshape(-1, 6)  # x3d held constant in A
    W, M = W.reshape(-1), M.reshape(-1)
    H = J.T @ (W[:, None] * J)
    H_inv = jnp.linalg.inv(H)
    W_c = sg(W) if detach_weights_cov else W
    A_c = (sg(H_inv) if detach_weights_cov else H_inv) @ (J * W_c[:, None]).T
    C = A_c @ jnp.diag(sg(M) if detach_residual_cov else M) @ A_c.T
    e = H_inv @ (J * W[:, None]).T @ sg(r_c).reshape(-1)
    f, groups = representation_fn(representation, R, t, K, BBOX)
    Jf = jax.jacfwd(f)(jnp.zeros(6))
    ends = np.cumsum(groups)[:-1]
    per_group = lambda v: jnp.stack([jnp.sum(g) for g in jnp.split(v, ends)])  # noqa: E731
    diags = (jnp.diag(Jf @ C @ Jf.T), jnp.diag(Jf @ H_inv @ Jf.T), (Jf @ e) ** 2)
    cov, prior, lin = (per_group(v) for v in diags)
    agg = (lambda v: jnp.mean(jnp.sqrt(v))) if nll == "laplace" else jnp.mean  # noqa: E731
    e_cov, e_prior, e_lin = agg(cov), agg(prior), agg(lin)
    spread = 0.5 * ((e_cov if use_cov else 0.0) + (e_lin if use_linear else 0.0))
    loss = jnp.log(e_prior) + spread / e_prior if use_prior else spread
    return loss, e_cov, e_prior, e_lin


@pytest.mark.parametrize(
    "switches",
    [
        {},
        {"robust": False, "representation": "bbox2d", "nll": "gaussian"},
        {"representation": "quaternion", "detach_residual_cov": True, "use_prior": False},  # unequal groups
        {"detach_weights_cov": True, "use_linear": False},
        {"use_cov": False},
    ],
)
def test_hand_written_backward_matches_autodiff_for_every_switch(switches):
    """Values and VJPs of all four terms (one generic cotangent for all) against `_lc_autodiff`,
    with a valid mask, a clamped outlier and an over-confident weight."""
    x2d, x3d, w, R, t = _instance(10)
    valid = jnp.asarray(np.arange(12) != 5)
    got, vjp = jax.vjp(lambda a, b, c: tuple(lc_loss(a, b, c, K, R, t, BBOX, valid, **switches))[:4], x2d, x3d, w)
    ref, vjp_ref = jax.vjp(lambda a, b, c: _lc_autodiff(a, b, c, R, t, valid, **switches), x2d, x3d, w)
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    cotangent = (jnp.asarray(1.3), jnp.asarray(-0.7), jnp.asarray(0.4), jnp.asarray(2.1))
    for g, g_ref in zip(vjp(cotangent), vjp_ref(cotangent)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-8, atol=1e-10 * float(np.max(np.abs(g_ref))))


def test_linearised_covariance_matches_the_solver_empirically():
    """Small noise: A diag(sigma^2) A^T (the covariance LC uses) vs the spread of pnp.solve."""
    n, draws, sigma = 48, 3000, 0.5
    rng = np.random.default_rng(3)
    x3d, x2d0, R, t, _ = pnp_scenes(rng, 1, n, noise_px=0.0)
    X, R_gt, t_gt = jnp.asarray(x3d[0]), jnp.asarray(R[0]), jnp.asarray(t[0])
    noisy = jnp.asarray(x2d0[0][None] + sigma * rng.normal(size=(draws, n, 2)))
    ones = jnp.ones((n, 2))
    sols = jax.jit(jax.vmap(lambda x: pnp.solve(X, x, ones, K, R0=R_gt, t0=t_gt)))(noisy)
    assert np.all(np.asarray(sols.converged))
    dy = np.concatenate(
        [np.asarray(jax.vmap(lambda Rs: geometry.so3_log(R_gt.T @ Rs))(sols.R)), np.asarray(sols.t - t_gt)], axis=1
    )
    empirical = np.var(dy, axis=0)
    A = np.asarray(pnp.implicit_jacobian(X, jnp.asarray(x2d0[0]), ones, K, R_gt, t_gt))
    predicted = np.diag(A @ (sigma**2 * np.eye(2 * n)) @ A.T)
    np.testing.assert_allclose(empirical / predicted, np.ones(6), atol=0.1)


@pytest.mark.parametrize("robust", [True, False])
def test_global_weight_scale_leaves_cov_and_linear_terms_unchanged(robust):
    x2d, x3d, w, R, t = _instance(2)
    f = jax.jit(lambda ww: lc_loss(x2d, x3d, ww, K, R, t, BBOX, robust=robust))
    a, b = f(w), f(3.0 * w)
    np.testing.assert_allclose(b.e_cov, a.e_cov, rtol=1e-9)
    np.testing.assert_allclose(b.e_linear, a.e_linear, rtol=1e-9)
    np.testing.assert_allclose(b.e_prior, a.e_prior / 3.0, rtol=1e-9)  # Laplace: std scales 1/s


def test_averaging_effect_pose_loss_misleads_good_points_lc_does_not():
    """Fig. 2 in PnP: with one outlier a pose loss gives good correspondences gradients that
    increase their own error; LC's per-correspondence terms keep every gradient correct."""
    n = 24
    rng = np.random.default_rng(4)
    x3d, x2d, R, t, _ = pnp_scenes(rng, 1, n, noise_px=0.3)
    X, x, R_gt, t_gt = jnp.asarray(x3d[0]), jnp.asarray(x2d[0]), jnp.asarray(R[0]), jnp.asarray(t[0])
    x = x.at[0].add(jnp.array([25.0, 15.0]))  # one bad correspondence
    w = jnp.ones((n, 2))

    def pose_loss(X):
        res = pnp.solve(X, x, w, K, R0=R_gt, t0=t_gt)
        return jnp.mean(jnp.linalg.norm(geometry.transform(BBOX, res.R, res.t) - geometry.transform(BBOX, R_gt, t_gt), axis=1))

    g_pose = jax.jit(jax.grad(pose_loss))(X)
    g_lc = jax.jit(jax.grad(lambda X: lc_loss(x, X, w, K, R_gt, t_gt, BBOX).loss))(X)
    ok_pose, counted_pose = metrics.gradient_correct_mask(g_pose, X, x, K, R_gt, t_gt)
    ok_lc, counted_lc = metrics.gradient_correct_mask(g_lc, X, x, K, R_gt, t_gt)
    good = np.arange(n) > 0
    assert np.all(np.asarray(ok_lc)[np.asarray(counted_lc)])  # LC: every gradient is correct
    wrong_pose = (~np.asarray(ok_pose)) & np.asarray(counted_pose) & good
    assert wrong_pose.sum() >= 3  # the pose loss moves several good points the wrong way


def test_ablation_switches_cut_the_stated_gradients():
    x2d, x3d, w, R, t = _instance(5)

    def grads(term, **kw):
        f = lambda a, b, ww: getattr(lc_loss(a, b, ww, K, R, t, BBOX, **kw), term)  # noqa: E731
        return [np.asarray(g) for g in jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x2d, x3d, w)]

    gx2, gx3, gw = grads("e_prior")
    assert np.all(gx2 == 0) and np.all(gx3 == 0) and np.any(gw != 0)  # weights only
    gx2, gx3, gw = grads("e_linear")
    assert np.all(gx2 == 0) and np.all(gx3 == 0) and np.any(gw != 0)  # residuals detached
    gx2, gx3, gw = grads("e_cov")
    assert np.any(gx2 != 0) and np.any(gx3 != 0) and np.any(gw != 0)
    gx2, gx3, _ = grads("e_cov", detach_residual_cov=True)  # C0
    assert np.all(gx2 == 0) and np.all(gx3 == 0)
    _, _, gw = grads("e_cov", detach_weights_cov=True)  # C1
    assert np.all(gw == 0)
    gx2, gx3, _ = grads("loss", use_cov=False)  # C2: no residual gradient at all
    assert np.all(gx2 == 0) and np.all(gx3 == 0)
    full = lc_loss(x2d, x3d, w, K, R, t, BBOX)
    c3 = lc_loss(x2d, x3d, w, K, R, t, BBOX, use_linear=False)  # C3
    np.testing.assert_allclose(c3.loss, jnp.log(full.e_prior) + 0.5 * full.e_cov / full.e_prior, rtol=1e-12)
    c4 = lc_loss(x2d, x3d, w, K, R, t, BBOX, use_prior=False)  # C4
    np.testing.assert_allclose(c4.loss, 0.5 * (full.e_cov + full.e_linear), rtol=1e-12)


@pytest.mark.parametrize("representation", ["bbox3d", "bbox2d", "quaternion", "axis_angle", "two_column"])
def test_representations_batched_float32(representation):
    b, n = 4, 64
    x3d, x2d, R, t, _ = pnp_scenes(np.random.default_rng(6), b, n, noise_px=1.0)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    f = jax.jit(
        jax.vmap(
            lambda a, bb, r, tt: lc_loss(a, bb, jnp.ones_like(a), f32(LMO_K), r, tt, f32(BBOX), representation=representation)
        )
    )
    terms = f(f32(x2d), f32(x3d), f32(R), f32(t))
    assert terms.loss.shape == (b,) and terms.loss.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(terms.loss)))
    assert np.all(np.asarray(terms.e_prior) > 0) and np.all(np.asarray(terms.e_cov) > 0)


def test_bbox2d_prior_is_the_projected_prior_covariance():
    x2d, x3d, w, R, t = _instance(7, outlier=False)
    terms = lc_loss(x2d, x3d, w, K, R, t, BBOX, representation="bbox2d", robust=False)
    J = geometry.project_jacobian(x3d, R, t, K)
    H = jnp.einsum("nai,na,naj->ij", J, w * w, J)
    Jc = geometry.project_jacobian(BBOX, R, t, K)  # (8, 2, 6): corners' image Jacobians
    var = jnp.einsum("cai,ij,caj->c", Jc, jnp.linalg.inv(H), Jc)
    np.testing.assert_allclose(terms.e_prior, jnp.mean(jnp.sqrt(var)), rtol=1e-9)


def test_exact_correspondences_give_a_finite_loss():
    """Zero residuals everywhere: no covariance, no error, the prior from the raw weights."""
    x2d, x3d, w, R, t = _instance(9, noise=0.0, outlier=False)
    terms = lc_loss(x2d, x3d, w, K, R, t, BBOX)
    assert np.isfinite(float(terms.loss))
    assert float(terms.e_cov) < 1e-6 and float(terms.e_linear) < 1e-6
    exact = x2d.at[:].set(geometry.project(x3d, R, t, K))  # residuals exactly zero
    terms = lc_loss(exact, x3d, w, K, R, t, BBOX)
    np.testing.assert_allclose(terms.e_prior, lc_loss(exact, x3d, w, K, R, t, BBOX, robust=False).e_prior, rtol=1e-9)
    assert np.all(np.isfinite(np.asarray(jax.grad(lambda ww: lc_loss(x2d, x3d, ww, K, R, t, BBOX).loss)(w))))


def test_bad_input_errors_name_the_argument():
    x2d, x3d, w, R, t = _instance(8)
    with pytest.raises(ValueError, match="bbox3d"):
        lc_loss(x2d, x3d, w, K, R, t, BBOX[:4])
    with pytest.raises(ValueError, match="representation"):
        lc_loss(x2d, x3d, w, K, R, t, BBOX, representation="euler")
    with pytest.raises(ValueError, match="nll"):
        lc_loss(x2d, x3d, w, K, R, t, BBOX, nll="cauchy")
    with pytest.raises(ValueError, match="x2d"):
        lc_loss(x2d[:5], x3d, w, K, R, t, BBOX)


def test_bad_instances_are_flagged_with_zero_loss_and_gradient_and_spoil_no_other():
    """NaN x2d, inf x3d, all-zero weights, collinear points: valid=False, loss 0, gradient 0 (not
    NaN) for that instance; the other instances of the batch are unchanged to the last bit."""
    n = 12
    insts = [_instance(s, n=n) for s in range(5)]
    x2d, x3d, w, R, t = (jnp.stack([inst[i] for inst in insts]) for i in range(5))
    x2d = x2d.at[1, 3, 0].set(jnp.nan)
    x3d = x3d.at[2, 4, 1].set(jnp.inf)
    w = w.at[3].set(0.0)
    line = jnp.linspace(-50.0, 50.0, n)[:, None] * jnp.array([[1.0, 0.5, -0.2]])
    x3d = x3d.at[4].set(line)
    x2d = x2d.at[4].set(geometry.project(line, R[4], t[4], K) + 0.5)

    def batch_loss(a, b, c):
        terms = jax.vmap(lambda *z: lc_loss(*z[:3], K, *z[3:], BBOX))(a, b, c, R, t)
        return jnp.sum(terms.loss), terms

    value_and_grad = jax.jit(jax.value_and_grad(batch_loss, argnums=(0, 1, 2), has_aux=True))
    (total, terms), grads = value_and_grad(x2d, x3d, w)
    assert list(np.asarray(terms.valid)) == [True, False, False, False, False]
    assert np.isfinite(float(total))
    np.testing.assert_array_equal(np.asarray(terms.loss)[1:], 0.0)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_array_equal(np.asarray(g)[1:], 0.0)
    # instance 0 is what it is in a batch of good instances
    good = [jnp.stack([inst[i] for inst in insts]) for i in range(3)]
    (_, terms_good), grads_good = value_and_grad(*good)
    assert float(terms.loss[0]) == float(terms_good.loss[0])
    for g, g_good in zip(grads, grads_good):
        np.testing.assert_array_equal(np.asarray(g)[0], np.asarray(g_good)[0])
    # a non-finite point outside the valid mask is dropped, not flagged
    valid = jnp.ones(n, bool).at[3].set(False)
    masked = jax.jit(lambda a: lc_loss(a, x3d[0], w[0], K, R[0], t[0], BBOX, valid))(x2d[0].at[3].set(jnp.nan))
    assert bool(masked.valid) and np.isfinite(float(masked.loss))


def test_residual_clamp_sets_the_clamped_length_and_is_checked():
    """A 10 px residual is clamped to the given length (in value only); the loss changes with
    the clamp only through the points beyond it; a clamp <= 0 or NaN is an error naming it."""
    r = jnp.array([[6.0, 8.0], [0.3, -0.4], [1.0, 0.5]])
    w = jnp.ones((3, 2))
    r_c32 = robust_weights(r, w, jnp.ones(3))[0]
    r_c8 = robust_weights(r, w, jnp.ones(3), residual_clamp=8.0)[0]
    np.testing.assert_allclose(np.asarray(r_c32), np.asarray(r), rtol=1e-6)      # 10 < 32: unchanged
    np.testing.assert_allclose(np.asarray(r_c8[0]), [4.8, 6.4], rtol=1e-5)        # length 8, same direction
    np.testing.assert_allclose(np.asarray(r_c8[1:]), np.asarray(r[1:]), rtol=1e-6)
    g = jax.grad(lambda rr: jnp.sum(robust_weights(rr, w, jnp.ones(3), residual_clamp=8.0)[0]))(r)
    np.testing.assert_allclose(np.asarray(g), 1.0)                                  # gradient passes unchanged
    x2d, x3d, w2d, R, t = _instance(seed=3)                                         # point 0 ~49 px off
    far = lc_loss(x2d, x3d, w2d, K, R, t, BBOX, residual_clamp=64.0).loss
    assert float(lc_loss(x2d, x3d, w2d, K, R, t, BBOX, residual_clamp=20.0).loss) != float(far)
    near = _instance(seed=3, outlier=False)
    a, b = (float(lc_loss(*near[:3], K, *near[3:], BBOX, residual_clamp=c).loss) for c in (16.0, 32.0))
    assert a == b                                                                   # no residual beyond 16 px
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="residual_clamp"):
            lc_loss(x2d, x3d, w2d, K, R, t, BBOX, residual_clamp=bad)
