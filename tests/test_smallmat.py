"""lcpose.smallmat against numpy; `import lcpose` sets no process-wide state, and the batched
evaluation path runs on a 2-thread XLA pool (no concurrent LAPACK calls to deadlock it)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_import_sets_no_process_wide_state():
    """`import lcpose` leaves the environment (e.g. XLA's thread-pool size PJRT_NPROC) alone."""
    code = ("import os; before = dict(os.environ); import lcpose, lcpose.pnp, lcpose.losses; "
            "print(dict(os.environ) == before)")
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip().splitlines()[-1] == "True"


_BATCHED_EVALUATION = """
import jax, jax.numpy as jnp, numpy as np
from bench.common import LMO_K, pnp_scenes
from lcpose import pnp
x3d, x2d, R, t, _ = pnp_scenes(np.random.default_rng(0), 8, 64, noise_px=1.0, outlier_rate=0.2)
K = jnp.asarray(LMO_K, jnp.float32)
X, x = jnp.asarray(x3d, jnp.float32), jnp.asarray(x2d, jnp.float32)
w = jnp.ones_like(x)

def predict(key, X, x, w):  # lcpose.evaluate.predict's PnP: RANSAC, then the weighted solve from it
    r0, _ = pnp.ransac(key, X, x, K, hypotheses=32)
    return pnp.solve(X, x, w, K, R0=r0.R, t0=r0.t, huber=2.0)

res = jax.jit(jax.vmap(predict))(jax.random.split(jax.random.key(0), 8), X, x, w)
print(int(np.sum(np.asarray(res.converged))))
"""


@pytest.mark.slow
def test_batched_evaluation_path_runs_on_a_two_thread_pool():
    """RANSAC + solve, vmapped as in evaluation, on XLA's default pool of a 2-core machine
    (PJRT_NPROC=2): concurrent LAPACK calls used to deadlock there; it must finish. Compiling
    RANSAC + solve dominates (~7 min at load average 40 on the 2-core CI machine); a deadlock
    never ends, hence the generous timeout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")}
    env["PJRT_NPROC"] = "2"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _BATCHED_EVALUATION], env=env, capture_output=True, text=True,
                         timeout=1800, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip().splitlines()[-1]) >= 6
