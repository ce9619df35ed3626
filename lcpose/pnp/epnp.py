"""Closed-form (weighted) EPnP (Lepetit, Moreno-Noguer & Fua, IJCV 2009).

Per instance and `jit`/`vmap` friendly: the object points are written as barycentric combinations
of 4 control points (centroid + principal axes); the 2N projection equations are linear in the
12 camera-frame control-point coordinates; their solution lies in the span of the 4 right singular
vectors of M with the smallest singular values. The span coefficients (betas) are fixed by the
6 inter-control-point distances (cases with 1, 2 and 3 vectors), refined by Gauss-Newton, and the
pose is recovered by a weighted Procrustes fit; the candidate with the smallest weighted
reprojection error wins.

Weights multiply the rows of M (one row per image axis), so `w` has the meaning of the solver's
`w2d` (inverse standard deviation per axis).

No LAPACK: the symmetric eigenproblems (the 3x3 point scatter, the 12x12 M^T M, the beta least
squares, Horn's 4x4 Procrustes matrix) use one cyclic Jacobi routine with a parallel (round-robin)
ordering, written with element-wise operations. Under `vmap` XLA fuses these across the batch,
and no LAPACK kernel is launched that could deadlock XLA's CPU thread pool when several run at
once (see lcpose/__init__.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lcpose import geometry
from lcpose.pnp import cost
from lcpose.pnp.checks import check_correspondences

__all__ = ["epnp", "procrustes"]

_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


# ----------------------------------------------------------------------------------------------
# Small symmetric eigenproblems without LAPACK (candidate for lcpose/smallmat.py, see
# /work/notes/i12ransac-requests.md)
# ----------------------------------------------------------------------------------------------


def _round_robin(n):
    """The n - 1 rounds of n / 2 disjoint index pairs that together cover every pair once."""
    players = list(range(n))
    rounds = []
    for _ in range(n - 1):
        rounds.append([(min(players[i], players[n - 1 - i]), max(players[i], players[n - 1 - i])) for i in range(n // 2)])
        players = [players[0], players[-1]] + players[1:-1]
    return rounds


def _rotate_pairs(A, p, q, c, s, axis):
    """Apply the plane rotations (c, s) of the disjoint index pairs (p, q) along `axis` (-2: rows
    of J^T A, -1: columns of A J)."""
    Ap = jnp.take(A, np.asarray(p), axis=axis)
    Aq = jnp.take(A, np.asarray(q), axis=axis)
    shape = [1] * A.ndim
    shape[axis] = len(p)
    c, s = c.reshape(shape), s.reshape(shape)
    perm = list(p) + list(q)
    inv = [perm.index(i) for i in range(len(perm))]
    new = jnp.concatenate([c * Ap - s * Aq, s * Ap + c * Aq], axis=axis)
    return jnp.take(new, np.asarray(inv), axis=axis)


def sym_eig(S, sweeps: int = 8):
    """Eigenvalues (ascending) and eigenvectors (columns) of a small symmetric matrix (n, n).

    Cyclic Jacobi with the round-robin ordering: each round zeroes n/2 disjoint off-diagonal
    entries at once. Convergence is quadratic; 8 sweeps reach float64 rounding for n <= 12.
    Odd n is padded with a decoupled entry larger than every eigenvalue, then dropped.
    """
    n = S.shape[-1]
    if n % 2:
        big = 2.0 * jnp.sum(jnp.abs(S)) + 1.0
        S = jnp.pad(S, ((0, 1), (0, 1))).at[n, n].set(big)
    m = S.shape[-1]
    dtype = S.dtype
    rounds = [(jnp.asarray([a for a, _ in r]), jnp.asarray([b for _, b in r])) for r in _round_robin(m)]
    rounds_np = [([a for a, _ in r], [b for _, b in r]) for r in _round_robin(m)]

    def sweep(_, AV):
        A, V = AV
        for (p, q), (pl, ql) in zip(rounds, rounds_np):
            app, aqq, apq = A[p, p], A[q, q], A[p, q]
            nonzero = apq != 0
            tau = (aqq - app) / (2.0 * jnp.where(nonzero, apq, 1.0))
            t = jnp.where(tau >= 0, 1.0, -1.0) / (jnp.abs(tau) + jnp.sqrt(1.0 + tau * tau))
            t = jnp.where(nonzero, t, 0.0).astype(dtype)
            c = 1.0 / jnp.sqrt(1.0 + t * t)
            s_ = t * c
            A = _rotate_pairs(_rotate_pairs(A, pl, ql, c, s_, -2), pl, ql, c, s_, -1)
            V = _rotate_pairs(V, pl, ql, c, s_, -1)
        return A, V

    A, V = jax.lax.fori_loop(0, sweeps, sweep, (S, jnp.eye(m, dtype=dtype)))
    lam = jnp.diagonal(A)
    order = jnp.argsort(lam)[:n]  # odd n: the padded entry is the largest
    return lam[order], V[:n, order]


def _inverse3(A):
    """Inverse and determinant of a 3x3 matrix by its adjugate (no LAPACK)."""
    c0 = jnp.cross(A[1], A[2])
    c1 = jnp.cross(A[2], A[0])
    c2 = jnp.cross(A[0], A[1])
    det = jnp.dot(A[0], c0)
    adj = jnp.stack([c0, c1, c2], axis=1)
    return adj / jnp.where(det != 0, det, 1.0), det


def _lstsq_sym(A, b, rcond):
    """Minimum-norm least squares of a small system by the eigen-decomposition of A^T A:
    directions with eigenvalue below rcond * largest are dropped (rank-deficient cases)."""
    lam, V = sym_eig(A.T @ A)
    keep = lam > rcond * jnp.maximum(lam[-1], jnp.finfo(A.dtype).tiny)
    inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
    return V @ (inv * (V.T @ (A.T @ b)))


def procrustes(x_src, x_dst, w):
    """Weighted rigid fit: (R, t) minimising sum_i w_i ||R x_src_i + t - x_dst_i||^2 (det R = +1)."""
    return _procrustes_points_last(x_src.T, x_dst.T, w)


def _procrustes_points_last(src_t, dst_t, w):
    wsum = jnp.maximum(jnp.sum(w), jnp.finfo(src_t.dtype).tiny)
    mu_s = jnp.sum(src_t * w, axis=1) / wsum
    mu_d = jnp.sum(dst_t * w, axis=1) / wsum
    a = (src_t - mu_s[:, None]) * w
    b = dst_t - mu_d[:, None]
    C = jnp.sum(a[:, None, :] * b[None, :, :], axis=2)  # (3, 3) cross-covariance S_ab
    # Horn (1987): the rotation's unit quaternion is the top eigenvector of this 4x4 matrix; it
    # is a proper rotation by construction (no reflection fix).
    xx, xy, xz, yx, yy, yz, zx, zy, zz = C.reshape(-1)
    N = jnp.stack(
        [
            jnp.stack([xx + yy + zz, yz - zy, zx - xz, xy - yx]),
            jnp.stack([yz - zy, xx - yy - zz, xy + yx, zx + xz]),
            jnp.stack([zx - xz, xy + yx, yy - xx - zz, yz + zy]),
            jnp.stack([xy - yx, zx + xz, yz + zy, zz - xx - yy]),
        ]
    )
    _, V = sym_eig(N)
    R = geometry.quat_to_matrix(V[:, 3])
    return R, mu_d - R @ mu_s


def _point_weights(x2d, w, valid):
    dtype = x2d.dtype
    n = x2d.shape[0]
    if w is None:
        w2 = jnp.ones((n, 2), dtype)
    else:
        w2 = jnp.broadcast_to(jnp.asarray(w, dtype).reshape(n, -1), (n, 2))
    if valid is not None:
        w2 = w2 * jnp.asarray(valid, dtype)[:, None]
    return w2


def _control_points(x3d_t, wp):
    """Centroid plus the principal axes scaled by their standard deviations, and the alphas.

    Points-last layout: x3d_t (3, N), returns control points (4, 3) and alphas (4, N).
    """
    dtype = x3d_t.dtype
    tiny = jnp.finfo(dtype).tiny
    wsum = jnp.maximum(jnp.sum(wp), tiny)
    c0 = jnp.sum(x3d_t * wp, axis=1) / wsum
    d = x3d_t - c0[:, None]
    cov = jnp.sum((d * wp)[:, None, :] * d[None, :, :], axis=2) / wsum
    lam, V = sym_eig(cov)
    lam = lam[::-1]
    V = V[:, ::-1]
    # Planar or collinear sets have a vanishing axis: keep it finite (the pose is then poorly
    # determined and the caller's conditioning check reports it).
    lam = jnp.maximum(lam, 1e-10 * jnp.maximum(lam[0], tiny) + tiny)
    s = jnp.sqrt(lam)
    ctrl = jnp.concatenate([c0[None], c0[None] + (V * s).T], axis=0)  # (4, 3)
    a = geometry.lincomb_points_last(V.T / s[:, None], d)  # (3, N) scaled principal coordinates
    alphas = jnp.concatenate([1.0 - jnp.sum(a, axis=0, keepdims=True), a], axis=0)  # (4, N)
    return ctrl, alphas


def _betas(Vk, rho):
    """Candidate betas (3, 4) for the cases with 1, 2 and 3 null vectors, then Gauss-Newton."""
    dtype = Vk.dtype
    vs = Vk.T.reshape(4, 4, 3)  # (k, control point, xyz)
    ia = jnp.array([p[0] for p in _PAIRS])
    ib = jnp.array([p[1] for p in _PAIRS])
    dv = vs[:, ia, :] - vs[:, ib, :]  # (4 vectors, 6 pairs, 3)
    # L[pair, (k,l)] = dv_k . dv_l  (the quadratic form of the distance constraints)
    L = jnp.einsum("kpi,lpi->pkl", dv, dv)  # (6, 4, 4)

    # Case 1: beta_1^2 |dv_1|^2 = rho  ->  least squares on |beta_1|.
    n1 = jnp.sqrt(L[:, 0, 0])
    b1 = jnp.sum(n1 * jnp.sqrt(rho)) / jnp.maximum(jnp.sum(L[:, 0, 0]), jnp.finfo(dtype).tiny)
    cand1 = jnp.stack([b1, 0.0 * b1, 0.0 * b1, 0.0 * b1])

    def quad_case(m):
        # unknowns beta_kl = beta_k beta_l for k <= l < m; linear in them.
        idx = [(k, l) for k in range(m) for l in range(k, m)]
        A = jnp.stack([L[:, k, l] * (1.0 if k == l else 2.0) for k, l in idx], axis=1)
        sol = _lstsq_sym(A, rho, 100.0 * jnp.finfo(dtype).eps)
        diag_pos = {k: idx.index((k, k)) for k in range(m)}
        b_first = jnp.sqrt(jnp.abs(sol[diag_pos[0]]))
        out = [b_first]
        for k in range(1, m):
            off = idx.index((0, k))
            out.append(jnp.sign(sol[off]) * jnp.sqrt(jnp.abs(sol[diag_pos[k]])))
        out += [0.0 * b_first] * (4 - m)
        return jnp.stack(out)

    cands = jnp.stack([cand1, quad_case(2), quad_case(3)])

    def residual(beta):
        return jnp.einsum("k,pkl,l->p", beta, L, beta) - rho

    def gn_step(beta, _):
        r = residual(beta)
        J = jax.jacfwd(residual)(beta)  # (6, 4)
        # Jacobi-scaled normal equations with a ridge relative to their unit diagonal (unit-free),
        # by the unrolled Cholesky of pnp.cost.
        JtJ = J.T @ J
        step, _ = cost.spd_solve(JtJ, J.T @ r, ridge=10.0 * jnp.finfo(dtype).eps)
        new = beta - step
        # Keep the step only if it lowers the residual (guards the ill-posed cases).
        better = jnp.sum(residual(new) ** 2) < jnp.sum(r**2)
        return jnp.where(better & jnp.all(jnp.isfinite(new)), new, beta), None

    def refine(beta):
        return jax.lax.scan(gn_step, beta, None, length=5)[0]

    return jax.vmap(refine)(cands)


def _epnp_impl(x3d, x2d, K, w2, valid_pts):
    dtype = x3d.dtype
    # Points-last layout throughout: the point axis is the long, contiguous one.
    x3d_t, x2d_t, w2_t = x3d.T, x2d.T, w2.T
    wp = jnp.mean(w2_t, axis=0)
    ctrl_w, alphas = _control_points(x3d_t, wp)

    # Normalised image coordinates; rows scaled by the focal lengths so their weights stay in pixels.
    xh = geometry.lincomb_points_last(_inverse3(K)[0], jnp.concatenate([x2d_t, jnp.ones_like(x2d_t[:1])], axis=0))
    xn = xh[:2] / xh[2:3]  # (2, N)
    # Rows of M for point i: alpha_ij (e_a - xn_a e_z) w_a f_a (image axis a, control point j).
    # M^T M = sum_i kron(alpha_i alpha_i^T, Q_i) with Q_i = sum_a w_a^2 f_a^2 p_a p_a^T, which
    # has 5 distinct entries: 5 weighted 4x4 Gram matrices instead of a 2N x 12 matrix.
    wu2 = (w2_t[0] * K[0, 0]) ** 2
    wv2 = (w2_t[1] * K[1, 1]) ** 2
    q = jnp.stack([wu2, wv2, -wu2 * xn[0], -wv2 * xn[1], wu2 * xn[0] ** 2 + wv2 * xn[1] ** 2])  # (5, N)
    S = jnp.einsum("qn,jn,kn->qjk", q, alphas, alphas)  # (5, 4, 4)
    E = jnp.zeros((5, 3, 3), dtype)
    E = E.at[0, 0, 0].set(1).at[1, 1, 1].set(1).at[2, 0, 2].set(1).at[2, 2, 0].set(1)
    E = E.at[3, 1, 2].set(1).at[3, 2, 1].set(1).at[4, 2, 2].set(1)
    MtM = jnp.einsum("qjk,qab->jakb", S, E).reshape(12, 12)
    _, evecs = sym_eig(MtM)
    Vk = evecs[:, :4]  # null-space candidates, smallest eigenvalue first

    ia = jnp.array([p[0] for p in _PAIRS])
    ib = jnp.array([p[1] for p in _PAIRS])
    rho = jnp.sum((ctrl_w[ia] - ctrl_w[ib]) ** 2, axis=1)
    betas = _betas(Vk, rho)  # (3, 4)

    def pose_from_beta(beta):
        ctrl_c = (Vk @ beta).reshape(4, 3)
        xc_t = geometry.lincomb_points_last(ctrl_c.T, alphas)  # (3, N)
        # The equations fix the control points up to sign: put the object in front.
        sgn = jnp.where(jnp.sum(valid_pts * xc_t[2]) < 0, -1.0, 1.0).astype(dtype)
        R, t = _procrustes_points_last(x3d_t, sgn * xc_t, valid_pts)
        r = (geometry.project_points_last(x3d_t, R, t, K) - x2d_t) * w2_t
        err = jnp.sum(jnp.where(jnp.isfinite(r), r * r, jnp.inf))
        return R, t, err

    Rs, ts, errs = jax.vmap(pose_from_beta)(betas)
    errs = jnp.where(jnp.isfinite(errs), errs, jnp.inf)
    best = jnp.argmin(errs)
    return Rs[best], ts[best]


def epnp(x3d, x2d, K, w=None, *, valid=None):
    """Closed-form EPnP pose (R, t) of one instance, weighted when `w` ((N, 2) or (N,)) is given.

    Args:
      x3d: (N, 3) object points (mm), N >= 4 (non-planar sets; planar ones give a rough pose).
      x2d: (N, 2) image points (px).
      K: (3, 3) intrinsics.
      w: optional positive weights, the inverse standard deviation of each image coordinate.
      valid: optional (N,) mask; invalid points are ignored.

    Returns:
      (R (3, 3), t (3,)) mapping model to camera. Not differentiated through (use `pnp.solve`).
    """
    check_correspondences(x3d, x2d, K, w2d=w, valid=valid, w_name="w")
    x3d = jnp.asarray(x3d)
    dtype = jnp.result_type(x3d.dtype, jnp.asarray(x2d).dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    x3d = x3d.astype(dtype)
    x2d = jnp.asarray(x2d, dtype)
    K = jnp.asarray(K, dtype)
    w2 = _point_weights(x2d, w, valid)
    valid_pts = (jnp.mean(w2, axis=1) > 0).astype(dtype)
    R, t = _epnp_impl(
        jax.lax.stop_gradient(x3d), jax.lax.stop_gradient(x2d), K, jax.lax.stop_gradient(w2), valid_pts
    )
    return R, t
