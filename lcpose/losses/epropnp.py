"""EPro-PnP's Monte Carlo pose loss (Chen et al., "EPro-PnP: Generalized End-to-End Probabilistic
Perspective-n-Points for Monocular Object Pose Estimation", CVPR 2022), in JAX.

The correspondences define a pose posterior p(y | X) = exp(-c(y)) / Z with the robust PnP cost

    c(y) = sum_i rho(|| w_i * (x2d_i - project(x3d_i, y)) ||)       (the paper's Eq. 3-4)

and the loss is the KL divergence between a Dirac target at y_gt and p, up to a constant (Eq. 7):

    L_KL = L_tgt + L_pred,  L_tgt = c(y_gt),  L_pred = log Z = log integral exp(-c(y)) dy.

L_pred is estimated by Adaptive Multiple Importance Sampling (AMIS, Algorithm 1 of the paper):
T iterations (`num_iters`, 4) of K' samples (`num_samples`, 128) from proposals q_0..q_{T-1}; every
sample is weighted by the deterministic mixture of all proposals, exp(-c(y)) / (1/T sum_j q_j(y)),
and Z is their mean (computed with logsumexp). The proposal of a pose is a product of

  * position: a 3-DoF multivariate t distribution (3 degrees of freedom);
  * orientation: an angular central Gaussian (ACG) on unit quaternions, p(x) ∝ (x^T Λ^-1 x)^-2.

q_0 is fitted to the Levenberg-Marquardt solution y* and its covariance (the inverse Gauss-Newton
Hessian; its rotation block becomes the ACG as in the official code: Λ ∝ (T Σ_s^-1 T^T + I)^-1 with
T the tangent basis at q* and Σ_s the covariance of the half-angle, trace-normalised, plus a small
dispersion det(Λ)^(1/4) * 1e-3 I). Later proposals are refitted to all weighted samples so far
(weighted mean/covariance for the position, 3 fixed-point iterations of the ACG maximum-likelihood
estimate of Tyler (1987) for the orientation). The samples and the proposals carry no gradient; the
gradient of L_pred, -E_p[dc/dx], reaches x2d, x3d and w2d through the sample costs (Eq. 8).

Derivative regularisation (Sec. 3.4 of the paper): one Gauss-Newton step from the detached LM
solution, y+ = y* + dy(x) with dy = -(J^T J)^-1 J^T r (differentiable w.r.t. the correspondences),
penalised by smooth-L1 on the position error ||t+ - t_gt|| (beta = 0.05 m in the official code =
50 mm here) and 1 - cos of the rotation error angle (= 2 (1 - <q+, q_gt>^2), the official form).

Units and measures (lcpose vs the official code)
------------------------------------------------
* lcpose passes x2d in the pixels of the output grid with its intrinsics K (K_out), x3d in mm and
  w2d as inverse standard deviations of those pixels. The official 6DoF code uses image pixels
  and the original camera; the cost w * r is the same in both (the scale of the pixels cancels),
  and so is the adaptive Huber threshold (a weight times a pixel spread). Translations are in mm
  here (metres there): the proposals are fitted to the Laplace covariance in mm and radians, so
  they are well scaled whatever the unit; the position regulariser is converted (beta 50 mm, weight
  per mm = weight per metre / 1000).
* The integral over orientations is taken with the Haar measure of SO(3) normalised to agree with
  the rotation-vector volume d^3 omega at the identity (total volume 8 pi^2). The proposals are
  densities on the unit-quaternion sphere S^3 (surface area 2 pi^2), which covers SO(3) twice and
  has volume (1/2)^3 d^3 omega per half-angle chart, so log Z_Haar = log Z_S3 + log 4. With this
  choice the Laplace approximation is exactly the Gaussian integral in (omega, dt),

      L_pred ≈ -c(y*) + 3 log(2 pi) - 0.5 log det H         (H: Hessian in (omega, dt), mm/rad),

  and L_KL ≈ 0.5 d^T H d + 3 log(2 pi) - 0.5 log det H, d = y_gt - y* (the Gaussian negative log
  likelihood of the target). L_KL is the negative log density of y_gt under p, so it is NOT
  bounded below by 0: it is negative whenever p is concentrated (log det H large). What always
  holds is L_tgt >= c(y*) and integral exp(-L_KL(y)) dy = 1.
* The official code reports logsumexp(log-weights) without the 1/M of the mean and with the S^3
  measure: L_pred(official) = L_pred(here) + log(M) - log(4), a constant; gradients are identical.

Other differences from the official code, each for numerical safety in float32 and mm:
* proposals live in the local frame of y* (q_local = q*^-1 q, t_local = t - t*), which keeps the
  tiny tangent variances of the ACG representable (the frame change is orthogonal, so densities
  are unchanged); the absolute 1e-5 ridge of their ACG fit is replaced by a relative one;
* samples that put a valid point at a depth below `z_min_mm` are dropped (weight 0) instead of
  clamping the depth and the projection box;
* the LM solve is `lcpose.pnp.solve` (to convergence) started from the lower-cost of weighted
  EPnP and the ground truth (the official training starts its LM from the lower-cost of its
  random-sample LM and the ground truth), unless R0, t0 are given.
The official trainer divides L_KL by a running mean of the predicted global weight scale: pass it
as `norm_factor` (default 1). K is data here (no gradient).

Accuracy: on a well-conditioned 6-DoF problem the estimate of log Z is within ~0.05 of the
Laplace value per key; AMIS's proposals are refitted to the samples they then reweight, which
biases log Z low by ~0.06 at K' = 128 (~0.01 at K' = 512); `num_iters=1` (plain importance
sampling from the Laplace-fitted proposal) is unbiased. tests/test_losses_epropnp.py checks these.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

from lcpose import geometry, pnp
from lcpose.pnp.cost import huber_terms, spd_cholesky, spd_inverse, spd_solve
from lcpose.losses.common import (
    adaptive_huber_delta,
    check_loss_inputs,
    loss_dtype,
    masked_weights,
    robust_cost_t,
    rotation_cosine_distance,
    safe_norm,
    smooth_l1,
)
from lcpose.smallmat import cho_solve_small, cholesky_small, solve_lower_small

__all__ = ["EProPnPTerms", "epropnp_loss", "laplace_log_normaliser"]

# log of the S^3 surface area, the normaliser of the ACG density.
_LOG_AREA_S3 = math.log(2.0 * math.pi**2)
# log Z_Haar - log Z_S3 (see the module docstring).
_LOG_S3_TO_HAAR = math.log(4.0)


class EProPnPTerms(NamedTuple):
    """Result of `epropnp_loss` for one instance (fields gain a batch axis under vmap).

    loss: (l_tgt + l_pred) / norm_factor + l_reg, the quantity to minimise (scale by the trainer's
      Monte Carlo loss weight, 0.02 in the official LM config).
    l_tgt: c(y_gt), the robust cost at the ground truth.
    l_pred: log Z (Haar measure on SO(3), mm on R^3), the AMIS estimate.
    l_reg: weighted derivative regularisation, reg_weight_t * l_reg_t + reg_weight_r * l_reg_r.
    R, t: the LM solution y* (detached).
    l_reg_t: smooth-L1 of ||t+ - t_gt|| (mm); l_reg_r: 1 - cos(angle(R+ R_gt^T)).
    converged: the LM solve converged (its covariance fitted the first proposal).
    ess: effective sample size of the final importance weights, 1 / sum(w_k^2) in [1, T K'].
    delta: the Huber threshold used (on ||w_i r_i||), NaN-free; inf when no robust kernel.
    """

    loss: jax.Array
    l_tgt: jax.Array
    l_pred: jax.Array
    l_reg: jax.Array
    R: jax.Array
    t: jax.Array
    l_reg_t: jax.Array
    l_reg_r: jax.Array
    converged: jax.Array
    ess: jax.Array
    delta: jax.Array


# ----------------------------------------------------------------------------------------------
# Proposal distributions (all arguments detached)
# ----------------------------------------------------------------------------------------------


def _mvt_log_prob(x, mu, L, dof):
    """Log density of a multivariate t (loc mu, scale L L^T, `dof` degrees of freedom) at x (M, d)."""
    d = x.shape[-1]
    z = solve_lower_small(L, (x - mu).T)
    m = jnp.sum(z * z, axis=0)
    half_log_det = jnp.sum(jnp.log(jnp.diagonal(L)))
    return (
        gammaln(0.5 * (dof + d))
        - gammaln(0.5 * dof)
        - 0.5 * d * jnp.log(dof * jnp.pi)
        - half_log_det
        - 0.5 * (dof + d) * jnp.log1p(m / dof)
    )


def _chi2_draws(key, dof, shape, dtype):
    """Chi-square draws; for an integer dof a sum of squared normals (cheap to compile)."""
    if float(dof).is_integer() and 1 <= dof <= 32:
        z = jax.random.normal(key, shape + (int(dof),), dtype)
        return jnp.sum(z * z, axis=-1)
    return 2.0 * jax.random.gamma(key, 0.5 * dof, shape, dtype)


def _mvt_transform(z, chi2, mu, L, dof):
    """Multivariate t samples mu + L z sqrt(dof / chi2) from standard normals z (n, d)."""
    scale = jnp.sqrt(dof / jnp.maximum(chi2, jnp.finfo(z.dtype).tiny))
    return mu + (z @ L.T) * scale[:, None]


def _acg_log_prob(x, L):
    """Log density of the angular central Gaussian ACG(L L^T) on S^3 at unit x (M, 4).

    p(x) = |Λ|^-1/2 (x^T Λ^-1 x)^-2 / (2 pi^2) w.r.t. the surface measure of S^3 (Tyler 1987).
    """
    z = solve_lower_small(L, x.T)
    m = jnp.sum(z * z, axis=0)
    half_log_det = jnp.sum(jnp.log(jnp.diagonal(L)))
    return -2.0 * jnp.log(m) - half_log_det - _LOG_AREA_S3


def _acg_transform(z, L):
    """ACG samples L z / |L z| from standard normals z (n, 4)."""
    y = z @ L.T
    nrm = jnp.linalg.norm(y, axis=1, keepdims=True)
    ident = jnp.zeros_like(y).at[:, 0].set(1.0)
    return jnp.where(nrm > 0, y / jnp.where(nrm > 0, nrm, 1.0), ident)


def _safe_cholesky(S, fallback):
    L = cholesky_small(S)
    ok = jnp.all(jnp.isfinite(L))
    return jnp.where(ok, L, fallback), ok


def _acg_with_dispersion(Lam, dispersion, fallback):
    """Cholesky factor of Λ + det(Λ)^(1/4) * dispersion * I (the official widening)."""
    dtype = Lam.dtype
    eye = jnp.eye(4, dtype=dtype)
    L0, _ = _safe_cholesky(Lam, fallback)
    det_q = jnp.exp(0.5 * jnp.sum(jnp.log(jnp.diagonal(L0))))  # det(Λ)^(1/4)
    L, _ = _safe_cholesky(Lam + det_q * dispersion * eye, fallback)
    return L


def _acg_from_covariance(cov_rot):
    """ACG matrix Λ (local frame, trace 1) of a rotation-vector covariance (right perturbation).

    In the local frame q* = e0, a right perturbation omega is q_local = (cos|w|/2, sin|w|/2 w/|w|),
    so the tangent coordinates are the half angle s = omega / 2, Σ_s = Σ_omega / 4. Following the
    official `initial_fit`: Λ = (T Σ_s^-1 T^T + I)^-1 = blockdiag(1, Σ_s (I + Σ_s)^-1).
    """
    dtype = cov_rot.dtype
    S = 0.25 * cov_rot
    B = cho_solve_small(cholesky_small(jnp.eye(3, dtype=dtype) + S), S)
    B = 0.5 * (B + B.T)
    Lam = jnp.zeros((4, 4), dtype).at[0, 0].set(1.0).at[1:, 1:].set(B)
    return Lam / jnp.trace(Lam)


def _acg_mle(x, w, iters):
    """Weighted ACG maximum-likelihood fit by Tyler's fixed point, starting from Λ = I.

    Λ <- sum_k a_k x_k x_k^T / sum_k a_k,  a_k = w_k / (x_k^T Λ^-1 x_k); trace(Λ) stays 1.
    A ridge of 1e-4 times the mean tangent variance keeps Λ invertible for degenerate weights
    (the official code adds an absolute 1e-5, too large for tangent variances of ~1e-7).
    """
    dtype = x.dtype
    eye = jnp.eye(4, dtype=dtype)
    xxT = x[:, :, None] * x[:, None, :]
    tiny = jnp.finfo(dtype).tiny ** 0.5

    def step(Lam, _):
        L = cholesky_small(Lam)
        z = solve_lower_small(L, x.T)
        m = jnp.maximum(jnp.sum(z * z, axis=0), jnp.finfo(dtype).eps)
        a = w / m
        a = a / jnp.sum(a)
        new = jnp.sum(a[:, None, None] * xxT, axis=0)
        ridge = 1e-4 * jnp.trace(new[1:, 1:]) / 3.0 + tiny
        new = new + ridge * eye
        new = new / jnp.trace(new)
        new = jnp.where(jnp.all(jnp.isfinite(new)), new, Lam)
        return new, None

    Lam, _ = jax.lax.scan(step, eye, None, length=iters)
    return Lam


def _weighted_gaussian_fit(x, w):
    mu = jnp.sum(w[:, None] * x, axis=0)
    d = x - mu
    cov = (w[:, None] * d).T @ d
    ridge = 1e-6 * jnp.trace(cov) / x.shape[1] + jnp.finfo(x.dtype).tiny ** 0.5
    return mu, cov + ridge * jnp.eye(x.shape[1], dtype=x.dtype)


# ----------------------------------------------------------------------------------------------
# Costs of many pose samples, with a hand-written backward pass
# ----------------------------------------------------------------------------------------------


def _sample_cost_terms(Rs, ts, x3d_t, x2d_t, w2_t, K, delta):
    """Robust costs (S,) of S poses and the intermediates the backward pass needs.

    This is geometry.project_points_last for S poses at once, written out on (S, N) planes (one
    per image axis): XLA:CPU vectorises these plain element-wise chains over the point axis, while
    the vmapped (S, 3, N) layout of lincomb_points_last runs about 10x slower here.
    """
    P = jnp.einsum("ab,sbc->sac", K, Rs)  # K R_s
    p = ts @ K.T  # K t_s
    X0, X1, X2 = x3d_t[0][None], x3d_t[1][None], x3d_t[2][None]

    def row(a):
        return P[:, a, 0:1] * X0 + P[:, a, 1:2] * X1 + P[:, a, 2:3] * X2 + p[:, a : a + 1]

    inv_z = 1.0 / row(2)
    u, v = row(0) * inv_z, row(1) * inv_z
    ru, rv = x2d_t[0][None] - u, x2d_t[1][None] - v
    eu, ev = w2_t[0][None] * ru, w2_t[1][None] * rv
    rho, s, small = huber_terms(eu * eu + ev * ev, delta)
    return jnp.sum(rho, axis=-1), (P, u, v, inv_z, ru, rv, eu, ev, s, small)


@jax.custom_vjp
def _pose_sample_costs(Rs, ts, x3d_t, x2d_t, w2_t, K, delta):
    """sum_i rho(||w_i (x2d_i - project(x3d_i, R_s, t_s))||) for each pose s; points last.

    Equal to vmap(robust_cost_t) over the poses with delta the Huber threshold (inf: least
    squares). Differentiated w.r.t. x3d_t, x2d_t, w2_t and delta only: the poses (EPro-PnP's
    samples) and K are constants, and callers pass them through stop_gradient. The hand-written
    backward pass keeps everything on (S, N) planes, several times faster than autodiff of the
    vmapped cost on CPU (512 samples x 512 points).
    """
    return _sample_cost_terms(Rs, ts, x3d_t, x2d_t, w2_t, K, delta)[0]


def _pose_sample_costs_fwd(Rs, ts, x3d_t, x2d_t, w2_t, K, delta):
    return _pose_sample_costs(Rs, ts, x3d_t, x2d_t, w2_t, K, delta), (Rs, ts, x3d_t, x2d_t, w2_t, K, delta)


def _pose_sample_costs_bwd(res, cot):
    Rs, ts, x3d_t, x2d_t, w2_t, K, delta = res
    # Recomputed rather than stored: (S, N) intermediates for every AMIS iteration are large.
    _, (P, u, v, inv_z, ru, rv, eu, ev, s, small) = _sample_cost_terms(*res)
    g = cot[:, None] * jnp.where(small, 1.0, delta / s)  # cot_s rho'(s) / s
    gu, gv = g * eu, g * ev  # d(sum_s cot_s c_s) / d e
    x2d_bar = w2_t * jnp.stack([jnp.sum(gu, axis=0), jnp.sum(gv, axis=0)])
    w2_bar = jnp.stack([jnp.sum(gu * ru, axis=0), jnp.sum(gv * rv, axis=0)])
    # Through u = uvw_0 / z, v = uvw_1 / z, uvw = K (R_s X + t_s).
    ub = -w2_t[0][None] * gu * inv_z
    vb = -w2_t[1][None] * gv * inv_z
    zb = -(ub * u + vb * v)
    x3d_bar = jnp.stack(
        [jnp.sum(P[:, 0, b : b + 1] * ub + P[:, 1, b : b + 1] * vb + P[:, 2, b : b + 1] * zb, axis=0) for b in range(3)]
    )
    # d rho / d delta = s - delta beyond the threshold (0 inside; delta = inf never gets there).
    delta_bar = jnp.sum(cot * jnp.sum(jnp.where(small, 0.0, s - delta), axis=-1))
    return (
        jnp.zeros_like(Rs),
        jnp.zeros_like(ts),
        x3d_bar,
        x2d_bar,
        w2_bar,
        jnp.zeros_like(K),
        delta_bar,
    )


_pose_sample_costs.defvjp(_pose_sample_costs_fwd, _pose_sample_costs_bwd)


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------


def _subsample(key, n_keep, valid_f, *arrays):
    """A random subset of n_keep points (without replacement, valid points first)."""
    n = valid_f.shape[0]
    # Gumbel top-k: valid points get a score in (0, 1), invalid ones -1.
    u = jax.random.uniform(key, (n,), valid_f.dtype)
    score = jnp.where(valid_f > 0, u, -1.0)
    _, idx = jax.lax.top_k(score, n_keep)
    return idx, [a[idx] for a in arrays]


def laplace_log_normaliser(cost_min, H):
    """Laplace approximation of log integral exp(-c) over (SO(3) Haar-normalised as d^3 omega) x R^3:

    -c(y*) + 3 log(2 pi) - 0.5 log det H, H the 6x6 Hessian of c in (omega, dt) at the minimum.
    """
    # log det H from the Jacobi-scaled Cholesky factor (no LAPACK): H = S^-1 L L^T S^-1; NaN
    # where H is not positive definite.
    L, s, ok = spd_cholesky(H)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(L))) - 2.0 * jnp.sum(jnp.log(s))
    logdet = jnp.where(ok, logdet, jnp.nan)
    return -cost_min + 3.0 * jnp.log(2.0 * jnp.pi) - 0.5 * logdet


def epropnp_loss(
    key,
    x2d,
    x3d,
    w2d,
    K,
    R_gt,
    t_gt,
    valid=None,
    *,
    num_samples: int = 128,
    num_iters: int = 4,
    num_points: Optional[int] = None,
    huber: Union[str, float, None] = "adaptive",
    relative_delta: float = 0.1,
    R0=None,
    t0=None,
    solver_iters: int = 30,
    t_dof: float = 3.0,
    acg_mle_iters: int = 3,
    acg_dispersion: float = 1e-3,
    reg_beta_mm: float = 50.0,
    reg_weight_t: float = 0.1 / 0.02 / 1000.0,
    reg_weight_r: float = 0.1 / 0.02,
    norm_factor=1.0,
    z_min_mm: float = 10.0,
) -> EProPnPTerms:
    """EPro-PnP loss of one instance: Monte Carlo KL loss plus derivative regularisation.

    vmap over a batch with one key per instance (`jax.random.split(key, B)`).

    Args:
      key: PRNG key (the result is deterministic given the key).
      x2d: (N, 2) image points in the pixels of the grid that `K` describes (K_out for a crop).
      x3d: (N, 3) object points (mm).
      w2d: (N, 2) or (N,) weights: inverse standard deviation of each image coordinate.
      K: (3, 3) intrinsics of x2d (treated as data: no gradient).
      R_gt, t_gt: the ground-truth pose (mm).
      valid: optional (N,) mask.
      num_samples: K', samples per AMIS iteration (128).
      num_iters: T, AMIS iterations (4; 512 samples in all).
      num_points: use a random subset of this many (valid) points, as the official trainer does
        (512 of the 64x64 grid); None uses all.
      huber: "adaptive" (official: delta = relative_delta * mean(w) * std(x2d), differentiable
        through w), a fixed threshold on ||w_i r_i||, or None (least squares).
      relative_delta: 0.1 in the official 6DoF trainer.
      R0, t0: initial pose of the LM solve; default the lower-cost of weighted EPnP and (R_gt, t_gt).
      solver_iters: maximum LM iterations.
      t_dof: degrees of freedom of the position proposal (3).
      acg_mle_iters, acg_dispersion: ACG refit iterations (3) and widening (1e-3), as official.
      reg_beta_mm: smooth-L1 beta of the position regulariser (0.05 m official).
      reg_weight_t, reg_weight_r: weights of the regularisers relative to L_KL. The defaults are
        the official LM config (mc 0.02, t 0.1 per metre, r 0.1) divided by the Monte Carlo weight,
        so that 0.02 * loss is the official total pose loss.
      norm_factor: L_KL is divided by it (the official running mean of the weight scale).
      z_min_mm: samples that put a valid point nearer than this get weight 0.

    Returns:
      EProPnPTerms(loss, l_tgt, l_pred, l_reg, R, t, l_reg_t, l_reg_r, converged, ess, delta).
    """
    check_loss_inputs(x2d, x3d, w2d, K, R_gt, t_gt, None, valid)
    if int(num_samples) < 2 or int(num_iters) < 1:
        raise ValueError(f"num_samples must be >= 2 and num_iters >= 1, got {num_samples}, {num_iters}")
    adaptive = isinstance(huber, str) and huber == "adaptive"
    if isinstance(huber, str):
        bad_huber = not adaptive
    else:
        bad_huber = huber is not None and not float(huber) > 0
    if bad_huber:
        raise ValueError(f"huber must be 'adaptive', a positive threshold or None, got {huber!r}")
    n = x3d.shape[0]
    if num_points is not None and not 4 <= int(num_points) <= n:
        raise ValueError(f"num_points must be in [4, N={n}], got {num_points}")
    dtype = loss_dtype(x2d, x3d, w2d)
    sg = jax.lax.stop_gradient
    x2d, x3d, K, R_gt, t_gt = (jnp.asarray(a, dtype) for a in (x2d, x3d, K, R_gt, t_gt))
    K = sg(K)  # the intrinsics are data: no gradient
    valid_b = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid) > 0
    w2 = masked_weights(w2d, n, dtype)
    # Invalid or non-finite points are zeroed (no NaN reaches the cost or the gradient); a
    # non-finite valid point marks the instance as not converged, as in pnp.solve.
    finite = jnp.all(jnp.isfinite(x2d), 1) & jnp.all(jnp.isfinite(x3d), 1) & jnp.all(jnp.isfinite(w2), 1)
    inputs_ok = jnp.all(finite | ~valid_b)
    use = valid_b & finite
    x2d = jnp.where(use[:, None], x2d, 0.0)
    x3d = jnp.where(use[:, None], x3d, 0.0)
    w2 = jnp.where(use[:, None], jnp.maximum(w2, 0.0), 0.0)
    valid_f = use.astype(dtype)
    k_pts, k_mc = jax.random.split(key)
    if num_points is not None and int(num_points) < n:
        _, (x2d, x3d, w2, valid_f) = _subsample(k_pts, int(num_points), valid_f, x2d, x3d, w2, valid_f)
        n = int(num_points)

    # ---- robust kernel -------------------------------------------------------------------
    if adaptive:
        delta = adaptive_huber_delta(x2d, w2, valid_f, relative_delta)
        delta = jnp.maximum(delta, jnp.finfo(dtype).tiny ** 0.5)
    elif huber is None:
        delta = None
    else:
        delta = jnp.asarray(float(huber), dtype)
    # Points with zero weight on both axes take no part in anything (their exact gradient is 0);
    # zeroing them keeps the 0/0 of a zero residual norm out of the robust Hessian's gradient.
    active = (valid_f > 0) & jnp.any(w2 > 0, axis=1)
    x2d = jnp.where(active[:, None], x2d, 0.0)
    x3d = jnp.where(active[:, None], x3d, 0.0)
    w2 = jnp.where(active[:, None], w2, 0.0)
    valid_f = active.astype(dtype)

    x3d_t, x2d_t, w2_t = x3d.T, x2d.T, w2.T
    delta_arr = jnp.asarray(jnp.inf, dtype) if delta is None else delta

    def cost(R, t, d=delta):
        return robust_cost_t(R, t, x3d_t, x2d_t, w2_t, K, d)

    # ---- LM solution y* (detached) -------------------------------------------------------
    x3d_c, x2d_c, w2_c = sg(x3d), sg(x2d), sg(w2)
    d_c = None if delta is None else sg(delta)
    if R0 is None:
        R_e, t_e = pnp.epnp(x3d_c, x2d_c, K, w2_c, valid=valid_f)
        c_e = robust_cost_t(R_e, t_e, x3d_c.T, x2d_c.T, w2_c.T, K, d_c)
        c_g = robust_cost_t(R_gt, t_gt, x3d_c.T, x2d_c.T, w2_c.T, K, d_c)
        use_gt = ~(c_e <= c_g)  # also when the EPnP cost is NaN
        R0 = jnp.where(use_gt, R_gt, R_e)
        t0 = jnp.where(use_gt, t_gt, t_e)
    if delta is None:
        sol = pnp.solve(x3d_c, x2d_c, w2_c, K, R0=R0, t0=t0, valid=valid_f, iters=solver_iters)
    else:
        # Huber with threshold d on ||w r|| is d^2 times Huber with threshold 1 on ||(w / d) r||:
        # same minimiser, and it keeps the solver's (static) threshold a Python float.
        sol = pnp.solve(
            x3d_c, x2d_c, w2_c / d_c, K, R0=R0, t0=t0, valid=valid_f, huber=1.0, iters=solver_iters
        )
    R_s, t_s = sg(sol.R), sg(sol.t)

    # ---- Gauss-Newton step from y* (the derivative regularisation; differentiable) --------
    H, g = pnp.gauss_newton_hessian(R_s, t_s, x3d, x2d, w2, K, delta)
    eye6 = jnp.eye(6, dtype=dtype)
    # Jacobi-conditioned, no ridge (lcpose.pnp.cost): unit-free, unlike a ridge eps * trace(H).
    cov, H_fin = spd_inverse(sg(H))
    # The step is taken only from a converged solution (the solver's conditioning test passed).
    H_ok = H_fin & jnp.all(jnp.isfinite(sg(g))) & sol.converged & inputs_ok
    # Double where: a singular Hessian (failed solve) gives a zero step and no NaN gradient.
    step, _ = spd_solve(jnp.where(H_ok, H, eye6), jnp.where(H_ok, g, jnp.zeros_like(g)))
    step = -jnp.where(H_ok, step, jnp.zeros_like(step))
    R_p, t_p = geometry.retract(R_s, t_s, step)
    l_reg_t = smooth_l1(safe_norm(t_p - t_gt), jnp.asarray(reg_beta_mm, dtype))
    l_reg_r = rotation_cosine_distance(R_p, R_gt)
    l_reg = jnp.where(H_ok, reg_weight_t * l_reg_t + reg_weight_r * l_reg_r, 0.0)

    # ---- first proposal from y* and the Laplace covariance --------------------------------
    cov = jnp.where(H_fin, cov, eye6)
    cov_rot, cov_t = cov[:3, :3], cov[3:, 3:]
    # Only for a failed solve: a broad, finite default (5 % of the distance, 0.2 rad).
    t_scale = 0.05 * jnp.maximum(jnp.linalg.norm(t_s), 100.0)
    L_t_default = t_scale * jnp.eye(3, dtype=dtype)
    L_t0, ok_t = _safe_cholesky(cov_t, L_t_default)
    Lam_default = _acg_from_covariance(0.04 * jnp.eye(3, dtype=dtype))
    L_q_default = cholesky_small(Lam_default)
    Lam0 = _acg_from_covariance(cov_rot)
    ok_q = jnp.all(jnp.isfinite(Lam0))
    L_q0 = _acg_with_dispersion(jnp.where(ok_q, Lam0, Lam_default), acg_dispersion, L_q_default)
    converged = sol.converged & inputs_ok
    cov_ok = converged & ok_t & ok_q
    L_t0 = jnp.where(cov_ok, L_t0, L_t_default)
    L_q0 = jnp.where(cov_ok, L_q0, L_q_default)
    dof = jnp.asarray(t_dof, dtype)

    # ---- AMIS ------------------------------------------------------------------------------
    x3d_ct = x3d_c.T
    valid_b = valid_f > 0  # after subsampling

    def pose_ok(R, t):
        depth = geometry.lincomb_points_last(R[2:3], x3d_ct)[0] + t[2]
        return jnp.all(jnp.where(valid_b, depth > z_min_mm, True)) & jnp.all(jnp.isfinite(R)) & jnp.all(
            jnp.isfinite(t)
        )

    def sample_costs(dt, q):
        """Costs (differentiable w.r.t. the correspondences) of local samples, and a usable flag."""
        R = R_s @ jax.vmap(geometry.quat_to_matrix)(q)
        t = t_s + dt
        ok = jax.vmap(pose_ok)(R, t)
        # Unusable samples are evaluated at y* (double where: no NaN reaches the gradient).
        R = jnp.where(ok[:, None, None], R, R_s)
        t = jnp.where(ok[:, None], t, t_s)
        c = _pose_sample_costs(sg(R), sg(t), x3d_t, x2d_t, w2_t, K, delta_arr)
        return c, ok & jnp.isfinite(c)

    T, Kp = int(num_iters), int(num_samples)
    M = T * Kp
    k_n, k_c = jax.random.split(k_mc)
    noise = jax.random.normal(k_n, (T, Kp, 7), dtype)  # 3 for the position, 4 for the quaternion
    chi2 = _chi2_draws(k_c, t_dof, (T, Kp), dtype)
    sample_idx = jnp.arange(M)
    prop_idx = jnp.arange(T)

    def mixture_log_density(dt, q, mus, Lts, Lqs, n_props):
        """log (1/n sum_{j<n} q_j) at every sample: the balance-heuristic AMIS denominator."""
        log_q = jax.vmap(lambda mu, Lt, Lq: _mvt_log_prob(dt, mu, Lt, dof) + _acg_log_prob(q, Lq))(
            mus, Lts, Lqs
        )  # (T, M)
        log_q = jnp.where((prop_idx < n_props)[:, None], log_q, -jnp.inf)
        return jax.nn.logsumexp(log_q, axis=0) - jnp.log(n_props.astype(dtype))

    def amis_step(carry, xs):
        mus, Lts, Lqs, dts, qs, costs, oks = carry
        i, z, c2 = xs
        dt_i = _mvt_transform(z[:, :3], c2, mus[i], Lts[i], dof)
        q_i = _acg_transform(z[:, 3:], Lqs[i])
        c_i, ok_i = sample_costs(dt_i, q_i)
        start = i * Kp
        dts = jax.lax.dynamic_update_slice(dts, dt_i, (start, 0))
        qs = jax.lax.dynamic_update_slice(qs, q_i, (start, 0))
        costs = jax.lax.dynamic_update_slice(costs, c_i, (start,))
        oks = jax.lax.dynamic_update_slice(oks, ok_i, (start,))
        # Refit proposal i + 1 to all weighted samples so far (no gradient).
        drawn = sample_idx < start + Kp
        log_mix = mixture_log_density(dts, qs, mus, Lts, Lqs, i + 1)
        use = drawn & oks
        any_ok = jnp.any(use)
        logw = jnp.where(use, -sg(costs) - log_mix, -jnp.inf)
        wn = jax.nn.softmax(jnp.where(any_ok, logw, jnp.where(drawn, 0.0, -jnp.inf)))
        mu_n, cov_n = _weighted_gaussian_fit(dts, wn)
        L_tn, ok_tn = _safe_cholesky(cov_n, Lts[i])
        L_qn = _acg_with_dispersion(_acg_mle(qs, wn, int(acg_mle_iters)), acg_dispersion, Lqs[i])
        good_t = any_ok & ok_tn & jnp.all(jnp.isfinite(mu_n))
        good_q = any_ok & jnp.all(jnp.isfinite(L_qn))
        nxt = jnp.minimum(i + 1, T - 1)
        write = i + 1 < T
        mus = mus.at[nxt].set(jnp.where(write & good_t, mu_n, jnp.where(write, mus[i], mus[nxt])))
        Lts = Lts.at[nxt].set(jnp.where(write & good_t, L_tn, jnp.where(write, Lts[i], Lts[nxt])))
        Lqs = Lqs.at[nxt].set(jnp.where(write & good_q, L_qn, jnp.where(write, Lqs[i], Lqs[nxt])))
        return (mus, Lts, Lqs, dts, qs, costs, oks), None

    eye3, eye4 = jnp.eye(3, dtype=dtype), jnp.eye(4, dtype=dtype)
    init = (
        jnp.zeros((T, 3), dtype),
        jnp.broadcast_to(eye3, (T, 3, 3)).at[0].set(L_t0),
        jnp.broadcast_to(eye4, (T, 4, 4)).at[0].set(L_q0),
        jnp.zeros((M, 3), dtype),
        jnp.zeros((M, 4), dtype).at[:, 0].set(1.0),
        jnp.zeros((M,), dtype),
        jnp.zeros((M,), bool),
    )
    (mus, Lts, Lqs, dts, qs, costs, oks), _ = jax.lax.scan(
        amis_step, init, (jnp.arange(T), noise, chi2)
    )
    # Final weights: every sample against the mixture of all T proposals.
    log_mix = sg(mixture_log_density(dts, qs, mus, Lts, Lqs, jnp.asarray(T)))
    any_ok = jnp.any(oks)
    logw = jnp.where(oks, -costs - log_mix, -jnp.inf)
    logw_safe = jnp.where(any_ok, logw, 0.0)
    log_z = jax.nn.logsumexp(logw_safe) - jnp.log(jnp.asarray(M, dtype)) + _LOG_S3_TO_HAAR
    wn = jax.nn.softmax(sg(logw_safe))
    ess = jnp.where(any_ok, 1.0 / jnp.sum(wn * wn), 0.0)

    l_tgt = cost(R_gt, t_gt)
    l_pred = jnp.where(any_ok, log_z, jnp.zeros_like(log_z))
    l_kl = l_tgt + l_pred
    l_kl = jnp.where(jnp.isfinite(l_kl), l_kl, jnp.zeros_like(l_kl))
    l_reg = jnp.where(jnp.isfinite(l_reg), l_reg, jnp.zeros_like(l_reg))
    loss = l_kl / norm_factor + l_reg
    return EProPnPTerms(
        loss=loss,
        l_tgt=l_tgt,
        l_pred=l_pred,
        l_reg=l_reg,
        R=R_s,
        t=t_s,
        l_reg_t=l_reg_t,
        l_reg_r=l_reg_r,
        converged=converged,
        ess=ess,
        delta=jnp.asarray(jnp.inf, dtype) if delta is None else sg(delta),
    )
