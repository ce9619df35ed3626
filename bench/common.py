"""Shared helpers for the benchmarks: synthetic PnP scenes, timing, JSON output."""
from __future__ import annotations

import json
import sys
import time

import numpy as np

# LM-O's camera.
LMO_K = np.array([[572.4114, 0.0, 325.2611], [0.0, 573.57043, 242.04899], [0.0, 0.0, 1.0]])


def random_rotations(rng, n):
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )


def pnp_scenes(rng, batch, n, *, noise_px=1.5, outlier_rate=0.0, extent_mm=60.0, K=LMO_K):
    """Random PnP instances: points in a cube of half-size extent_mm, poses 300-1500 mm away.

    Returns x3d (B, N, 3), x2d (B, N, 2), R (B, 3, 3), t (B, 3), outlier mask (B, N); float64.
    """
    x3d = rng.uniform(-extent_mm, extent_mm, size=(batch, n, 3))
    R = random_rotations(rng, batch)
    z = rng.uniform(300.0, 1500.0, size=batch)
    t = np.stack([rng.uniform(-0.2, 0.2, batch) * z, rng.uniform(-0.15, 0.15, batch) * z, z], -1)
    xc = np.einsum("bij,bnj->bni", R, x3d) + t[:, None, :]
    uvw = xc @ K.T
    x2d = uvw[..., :2] / uvw[..., 2:3] + rng.normal(size=(batch, n, 2)) * noise_px
    out = rng.random((batch, n)) < outlier_rate
    x2d = np.where(out[..., None], rng.uniform([0.0, 0.0], [640.0, 480.0], size=(batch, n, 2)), x2d)
    return x3d, x2d, R, t, out


def rotation_error_deg(R, R_gt):
    """Batched rotation angle of R R_gt^T in degrees (lcpose.metrics' stable atan2 form)."""
    import jax

    from lcpose import metrics

    R = np.asarray(R, np.float64)
    R_gt = np.asarray(R_gt, np.float64)
    return np.asarray(jax.vmap(metrics.rotation_error_deg)(R, R_gt))


def time_calls(fn, *, repeats=5, warmup=1):
    """Wall times (s) of `repeats` runs of fn() after `warmup` runs (fn must block)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def time_call(fn, *, repeats=5, warmup=1):
    """Median wall time (s) of fn() over `repeats` runs after `warmup` runs (fn must block)."""
    return float(np.median(time_calls(fn, repeats=repeats, warmup=warmup)))


def emit(result: dict):
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)
