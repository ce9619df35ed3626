"""Batched `pnp.solve` / `pnp.epnp` vs OpenCV's solvePnP (ITERATIVE and EPNP) on the same data.

    python -m bench.pnp [--batch 256] [--points 1024] [--dtype float32]

Prints one JSON object: per-instance time (ms, after compilation) and accuracy (median rotation
error in degrees, median translation error in mm) of each solver.
"""
from __future__ import annotations

import argparse
import os
import platform

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from bench.common import LMO_K, emit, log, pnp_scenes, rotation_error_deg, time_call
from lcpose import pnp


def _accuracy(R, t, R_gt, t_gt):
    return {
        "rot_err_deg_median": float(np.median(rotation_error_deg(R, R_gt))),
        "trans_err_mm_median": float(np.median(np.linalg.norm(t - t_gt, axis=-1))),
    }


def opencv_solve(x3d, x2d, K, flag=cv2.SOLVEPNP_ITERATIVE):
    """cv2.solvePnP on each instance of a batch: (R (B, 3, 3), t (B, 3))."""
    Rs, ts = [], []
    for X, x in zip(x3d, x2d):
        _, rvec, tvec = cv2.solvePnP(X, x, K, None, flags=flag)
        Rs.append(cv2.Rodrigues(rvec)[0])
        ts.append(tvec.ravel())
    return np.stack(Rs), np.stack(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--points", type=int, default=1024)
    p.add_argument("--noise", type=float, default=1.5)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dt = jnp.dtype(args.dtype)

    rng = np.random.default_rng(args.seed)
    x3d, x2d, R_gt, t_gt, _ = pnp_scenes(rng, args.batch, args.points, noise_px=args.noise)
    B, N = args.batch, args.points
    K = LMO_K

    X, x, Kj = jnp.asarray(x3d, dt), jnp.asarray(x2d, dt), jnp.asarray(K, dt)
    w = jnp.ones((B, N, 2), dt)
    solve_b = jax.jit(jax.vmap(pnp.solve, in_axes=(0, 0, 0, None)))
    epnp_b = jax.jit(jax.vmap(pnp.epnp, in_axes=(0, 0, None)))

    log(f"compiling solve for B={B}, N={N} ({args.dtype}) on {jax.devices()[0].platform}")
    res = jax.block_until_ready(solve_b(X, x, w, Kj))
    t_solve = time_call(lambda: jax.block_until_ready(solve_b(X, x, w, Kj)), repeats=args.repeats)
    Re, te = jax.block_until_ready(epnp_b(X, x, Kj))
    t_epnp = time_call(lambda: jax.block_until_ready(epnp_b(X, x, Kj)), repeats=args.repeats)

    log("OpenCV")
    x3d_c, x2d_c = np.ascontiguousarray(x3d), np.ascontiguousarray(x2d)
    R_it, t_it = opencv_solve(x3d_c, x2d_c, K, cv2.SOLVEPNP_ITERATIVE)
    t_cv_it = time_call(lambda: opencv_solve(x3d_c, x2d_c, K, cv2.SOLVEPNP_ITERATIVE), repeats=3, warmup=0)
    R_ep, t_ep = opencv_solve(x3d_c, x2d_c, K, cv2.SOLVEPNP_EPNP)
    t_cv_ep = time_call(lambda: opencv_solve(x3d_c, x2d_c, K, cv2.SOLVEPNP_EPNP), repeats=3, warmup=0)

    ms = lambda s: 1e3 * s / B  # noqa: E731
    out = {
        "bench": "pnp",
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "batch": B,
        "points": N,
        "noise_px": args.noise,
        "dtype": args.dtype,
        "lcpose_solve": {
            "ms_per_instance": ms(t_solve),
            "batch_ms": 1e3 * t_solve,
            "converged_fraction": float(np.mean(np.asarray(res.converged))),
            "max_iterations": int(np.max(np.asarray(res.iterations))),
            **_accuracy(np.asarray(res.R, np.float64), np.asarray(res.t, np.float64), R_gt, t_gt),
        },
        "lcpose_epnp": {
            "ms_per_instance": ms(t_epnp),
            **_accuracy(np.asarray(Re, np.float64), np.asarray(te, np.float64), R_gt, t_gt),
        },
        "opencv_iterative": {"ms_per_instance": ms(t_cv_it), **_accuracy(R_it, t_it, R_gt, t_gt)},
        "opencv_epnp": {"ms_per_instance": ms(t_cv_ep), **_accuracy(R_ep, t_ep, R_gt, t_gt)},
    }
    out["speedup_solve_vs_opencv_iterative"] = out["opencv_iterative"]["ms_per_instance"] / out["lcpose_solve"]["ms_per_instance"]
    emit(out)


if __name__ == "__main__":
    main()
