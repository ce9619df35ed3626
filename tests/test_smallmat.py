"""lcpose.smallmat against numpy, and the thread-pool setting of `import lcpose`."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lcpose import smallmat


def _spd(rng, n):
    A = rng.normal(size=(n, n))
    return A @ A.T + n * np.eye(n)


def test_small_matrix_functions_match_numpy():
    rng = np.random.default_rng(0)
    S = _spd(rng, 6)
    B = rng.normal(size=(6, 4))
    L = np.asarray(smallmat.cholesky_small(jnp.asarray(S)))
    np.testing.assert_allclose(L, np.linalg.cholesky(S), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(smallmat.cho_solve_small(jnp.asarray(L), jnp.asarray(B))),
                               np.linalg.solve(S, B), rtol=1e-10, atol=1e-12)
    S_inv = np.asarray(smallmat.spd_inverse(jnp.asarray(S)))
    np.testing.assert_allclose(S_inv, np.linalg.inv(S), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(S_inv, S_inv.T)
    np.testing.assert_allclose(np.asarray(smallmat.matmul_small(jnp.asarray(S), jnp.asarray(B))), S @ B,
                               rtol=1e-12, atol=1e-12)
    stacked = np.stack([S, S.T + 1.0])  # leading axes broadcast like np.matmul's
    np.testing.assert_allclose(np.asarray(smallmat.matmul_small(jnp.asarray(stacked), jnp.asarray(B))), stacked @ B,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(smallmat.matmul_small(jnp.asarray(B.T), jnp.asarray(stacked))), B.T @ stacked,
                               rtol=1e-12, atol=1e-12)
    # batched and differentiated like the LC loss uses it: d tr(S^-1) / dS = -S^-2. Only the
    # lower triangle is read, so the gradient there is that of both symmetric entries.
    Ss = jnp.asarray(np.stack([_spd(rng, 6) for _ in range(3)]))
    g = jax.vmap(jax.grad(lambda s: jnp.trace(smallmat.spd_inverse(s))))(Ss)
    for s, gi in zip(np.asarray(Ss), np.asarray(g)):
        inv = np.linalg.inv(s)
        full = -(inv @ inv)
        np.testing.assert_allclose(gi, np.tril(full + full.T) - np.diag(np.diag(full)), rtol=1e-8, atol=1e-12)


def test_import_sizes_the_cpu_thread_pool_for_concurrent_lapack_calls():
    # Batched LAPACK kernels of jaxlib wait on XLA's intra-op pool; with one thread per core
    # (2 here), concurrent ones deadlocked RANSAC's evaluation. `import lcpose` enlarges it.
    code = "import os, lcpose; print(os.environ.get('PJRT_NPROC'))"
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) >= 8
    env["PJRT_NPROC"] = "3"  # a user's own setting is kept
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"
