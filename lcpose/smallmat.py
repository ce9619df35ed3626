"""Unrolled linear algebra for the small matrices of pose problems (3x3, 4x4, 6x6).

Under `jax.vmap` these are element-wise operations on the batch, which XLA on CPU fuses into a
few loops. The alternatives are slower there and, worse, unsafe: a vmapped `jnp.linalg` call
(LU, Cholesky, triangular solve, SVD, eigh) is a LAPACK kernel that splits its batch over
XLA's intra-op thread pool and blocks until the parts are done; several such kernels running
at once can occupy every pool thread and hang the program (see `lcpose/__init__.py`). The
per-instance hot paths (the LC loss, EPro-PnP's proposals) therefore use these functions.

Every function works on one matrix (vmap for batches) and follows the dtype of its input;
non-positive-definite input gives NaN (callers that can meet it check `isfinite`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "matmul_small",
    "cholesky_small",
    "solve_lower_small",
    "solve_upper_t_small",
    "cho_solve_small",
    "spd_inverse",
]


def matmul_small(A, B):
    """A @ B for small matrices (..., m, k) @ (..., k, n) as a broadcast multiply and a reduction.

    Leading axes broadcast like jnp.matmul's: stacking two products into one call costs one op.
    """
    return jnp.sum(A[..., :, :, None] * B[..., None, :, :], axis=-2)


def cholesky_small(S):
    """Lower Cholesky factor of a small SPD matrix (..., n, n); NaN where S is not positive definite."""
    n = S.shape[-1]
    L = [[None] * n for _ in range(n)]
    for j in range(n):
        acc = S[..., j, j]
        for k in range(j):
            acc = acc - L[j][k] * L[j][k]
        d = jnp.sqrt(acc)
        L[j][j] = d
        for i in range(j + 1, n):
            acc = S[..., i, j]
            for k in range(j):
                acc = acc - L[i][k] * L[j][k]
            L[i][j] = acc / d
    zero = jnp.zeros_like(S[..., 0, 0])
    rows = [jnp.stack([L[i][j] if j <= i else zero for j in range(n)], axis=-1) for i in range(n)]
    return jnp.stack(rows, axis=-2)


def solve_lower_small(L, b):
    """L^-1 b for lower-triangular L (n, n) and b (n, ...) by unrolled forward substitution."""
    n = L.shape[-1]
    x = []
    for i in range(n):
        acc = b[i]
        for k in range(i):
            acc = acc - L[i, k] * x[k]
        x.append(acc / L[i, i])
    return jnp.stack(x)


def solve_upper_t_small(L, b):
    """L^-T b for lower-triangular L (n, n) and b (n, ...) by unrolled back substitution."""
    n = L.shape[-1]
    x = [None] * n
    for i in reversed(range(n)):
        acc = b[i]
        for k in range(i + 1, n):
            acc = acc - L[k, i] * x[k]
        x[i] = acc / L[i, i]
    return jnp.stack(x)


def cho_solve_small(L, b):
    """(L L^T)^-1 b for a Cholesky factor L (n, n) and b (n, ...)."""
    return solve_upper_t_small(L, solve_lower_small(L, b))


@jax.custom_vjp
def spd_inverse(S):
    """Inverse of a small symmetric positive definite matrix (n, n), exactly symmetric.

    Through the Cholesky factor: L^-1 by forward substitution, then S^-1 = L^-T L^-1. The
    gradient is the closed form d(S^-1) = -S^-1 dS S^-1 (two small products instead of the
    transposed substitutions), taken w.r.t. the lower triangle, which is all that is read.
    """
    n = S.shape[-1]
    L = cholesky_small(S)
    L_inv = solve_lower_small(L, jnp.eye(n, dtype=S.dtype))
    S_inv = matmul_small(L_inv.T, L_inv)
    return 0.5 * (S_inv + S_inv.T)


def _spd_inverse_fwd(S):
    S_inv = spd_inverse(S)
    return S_inv, S_inv


def _spd_inverse_bwd(S_inv, g):
    full = -matmul_small(matmul_small(S_inv, g), S_inv)  # S^-1 is symmetric
    # Only S's lower triangle is read: it carries the gradient of both symmetric entries.
    lower = jnp.tril(full + full.T)
    return (lower - 0.5 * jnp.diag(jnp.diag(lower)),)


spd_inverse.defvjp(_spd_inverse_fwd, _spd_inverse_bwd)
