"""Batched `pnp.solve` / `pnp.epnp` / `pnp.ransac` vs OpenCV's solvePnP / solvePnPRansac.

    python -m bench.pnp [--batch 256] [--points 1024] [--dtype float32] [--ransac-points 1000]

Prints one JSON object: per-instance time (ms, after compilation) and accuracy (median rotation
error in degrees, median translation error in mm) of each solver. The "ransac" entry compares
`pnp.ransac` at its defaults, batched (jit(vmap)), with OpenCV's solvePnPRansac at its defaults
(ITERATIVE, 100 iterations, 8 px, confidence 0.99), single-threaded (cv2.setNumThreads(1)), on
`object_scenes` (an elongated and a small object, 30 % junk around the object): success rate
(rotation error < 1 deg), median errors, wall and CPU ms per instance, and the load average
(the machine may be shared: compare the two within one run).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from bench.common import LMO_K, emit, log, pnp_scenes, random_rotations, rotation_error_deg, time_call, time_calls
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


# Real-shaped objects for the RANSAC comparison (sizes in mm): an elongated box, LM-O's glue-like
# 180 x 60 x 40, and a small cylinder, LM-O's ape/can-like, radius 35 and height 80.
OBJECT_SHAPES = {"elongated": ("box", (180.0, 60.0, 40.0)), "small": ("cylinder", (35.0, 80.0))}


def _surface_points(rng, shape, dims, n):
    """n points uniform on the surface of a centred box (dims = sizes) or z-axis cylinder
    (dims = radius, height), with their outward normals: (n, 3), (n, 3)."""
    if shape == "box":
        half = np.asarray(dims) / 2.0
        areas = np.array([dims[1] * dims[2], dims[0] * dims[2], dims[0] * dims[1]] * 2)
        face = rng.choice(6, size=n, p=areas / areas.sum())
        axis, sign = face % 3, np.where(face < 3, 1.0, -1.0)
        p = rng.uniform(-half, half, size=(n, 3))
        p[np.arange(n), axis] = sign * half[axis]
        nrm = np.zeros((n, 3))
        nrm[np.arange(n), axis] = sign
        return p, nrm
    r, h = dims
    side, cap = 2 * np.pi * r * h, np.pi * r * r
    part = rng.choice(3, size=n, p=np.array([side, cap, cap]) / (side + 2 * cap))
    phi = rng.uniform(0, 2 * np.pi, n)
    rad = np.where(part == 0, r, r * np.sqrt(rng.uniform(0, 1, n)))
    z = np.where(part == 0, rng.uniform(-h / 2, h / 2, n), np.where(part == 1, h / 2, -h / 2))
    p = np.stack([rad * np.cos(phi), rad * np.sin(phi), z], -1)
    nrm = np.where(
        (part == 0)[:, None],
        np.stack([np.cos(phi), np.sin(phi), np.zeros(n)], -1),
        np.stack([np.zeros(n), np.zeros(n), np.where(part == 1, 1.0, -1.0)], -1),
    )
    return p, nrm


def object_scenes(rng, batch, n, obj="elongated", *, noise_px=1.5, outlier_rate=0.3, z_range=(500.0, 1400.0), K=LMO_K):
    """RANSAC scenes on a real-shaped object: n correspondences on the camera-facing surface
    (what a dense correspondence network predicts), random rotations, depth in z_range, noise_px
    Gaussian noise per axis, and outlier_rate of the 2D points replaced by junk drawn uniformly in
    the object's 2D box grown by half its size on each side ("around the object").

    Returns x3d (B, N, 3), x2d (B, N, 2), R (B, 3, 3), t (B, 3), outlier mask (B, N); float64.
    """
    shape, dims = OBJECT_SHAPES[obj]
    R = random_rotations(rng, batch)
    z = rng.uniform(*z_range, size=batch)
    t = np.stack([rng.uniform(-0.2, 0.2, batch) * z, rng.uniform(-0.15, 0.15, batch) * z, z], -1)
    x3d = np.empty((batch, n, 3))
    for b in range(batch):  # scene generation only; the solvers never loop over instances
        p, nrm = _surface_points(rng, shape, dims, 4 * n)
        xc = p @ R[b].T + t[b]
        facing = np.einsum("ij,nj,ni->n", R[b], nrm, xc) < 0  # normal points towards the camera
        pts = p[facing]
        x3d[b] = pts[rng.choice(len(pts), size=n, replace=len(pts) < n)]
    xc = np.einsum("bij,bnj->bni", R, x3d) + t[:, None, :]
    uvw = xc @ K.T
    uv = uvw[..., :2] / uvw[..., 2:3]
    lo, hi = uv.min(1), uv.max(1)
    lo, hi = lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo)
    x2d = uv + rng.normal(size=(batch, n, 2)) * noise_px
    out = rng.random((batch, n)) < outlier_rate
    junk = lo[:, None, :] + rng.random((batch, n, 2)) * (hi - lo)[:, None, :]
    x2d = np.where(out[..., None], junk, x2d)
    return x3d, x2d, R, t, out


def opencv_ransac(x3d, x2d, K, **kwargs):
    """cv2.solvePnPRansac at its defaults (ITERATIVE, 100 iterations, 8 px, confidence 0.99) on
    each instance of a batch: (R (B, 3, 3), t (B, 3), success (B,)). kwargs go to OpenCV."""
    Rs, ts, ok = [], [], []
    for X, x in zip(x3d, x2d):
        found, rvec, tvec, _ = cv2.solvePnPRansac(X, x, K, None, **kwargs)
        if not found or rvec is None:
            rvec, tvec = np.zeros(3), np.array([0.0, 0.0, 1.0])
        Rs.append(cv2.Rodrigues(np.asarray(rvec, np.float64))[0])
        ts.append(np.asarray(tvec, np.float64).ravel())
        ok.append(bool(found))
    return np.stack(Rs), np.stack(ts), np.asarray(ok)


def _wall_and_cpu_ms(fn, instances, repeats):
    """(median wall ms, mean process-CPU ms) per instance of `repeats` calls of fn() (blocking)."""
    cpu0 = time.process_time()
    walls = time_calls(fn, repeats=repeats, warmup=0)
    cpu = (time.process_time() - cpu0) / repeats
    return 1e3 * float(np.median(walls)) / instances, 1e3 * cpu / instances


def _ransac_accuracy(R, t, R_gt, t_gt):
    err = rotation_error_deg(R, R_gt)
    return {
        "success_rate_rot_lt_1deg": float(np.mean(err < 1.0)),
        **_accuracy(R, t, R_gt, t_gt),
    }


def ransac_comparison(batch, points, *, seed=0, repeats=3, noise_px=1.5, outlier_rate=0.3):
    """`pnp.ransac` (defaults, batched, float32) vs OpenCV's solvePnPRansac (defaults, one thread)
    on `object_scenes` of each object in OBJECT_SHAPES: a dict per object."""
    cv2.setNumThreads(1)
    Kj = jnp.asarray(LMO_K, jnp.float32)
    ransac_b = jax.jit(jax.vmap(lambda k, X, x: pnp.ransac(k, X, x, Kj)))
    keys = jax.random.split(jax.random.key(seed), batch)
    out = {}
    for i, obj in enumerate(OBJECT_SHAPES):
        x3d, x2d, R_gt, t_gt, _ = object_scenes(
            np.random.default_rng([seed, i]), batch, points, obj, noise_px=noise_px, outlier_rate=outlier_rate
        )
        X, x = jnp.asarray(x3d, jnp.float32), jnp.asarray(x2d, jnp.float32)
        log(f"ransac on {obj}: compiling for B={batch}, N={points}")
        res, inliers = jax.block_until_ready(ransac_b(keys, X, x))
        wall, cpu = _wall_and_cpu_ms(lambda: jax.block_until_ready(ransac_b(keys, X, x)), batch, repeats)
        x3d_c, x2d_c = np.ascontiguousarray(x3d), np.ascontiguousarray(x2d)
        R_cv, t_cv, found = opencv_ransac(x3d_c, x2d_c, LMO_K)
        wall_cv, cpu_cv = _wall_and_cpu_ms(lambda: opencv_ransac(x3d_c, x2d_c, LMO_K), batch, repeats)
        out[obj] = {
            "lcpose_ransac": {
                "ms_per_instance": wall,
                "cpu_ms_per_instance": cpu,
                "converged_fraction": float(np.mean(np.asarray(res.converged))),
                "max_iterations": int(np.max(np.asarray(res.iterations))),
                **_ransac_accuracy(np.asarray(res.R, np.float64), np.asarray(res.t, np.float64), R_gt, t_gt),
            },
            "opencv_ransac": {
                "ms_per_instance": wall_cv,
                "cpu_ms_per_instance": cpu_cv,
                "found_fraction": float(np.mean(found)),
                **_ransac_accuracy(R_cv, t_cv, R_gt, t_gt),
            },
        }
        out[obj]["speedup_cpu_vs_opencv"] = cpu_cv / cpu
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--points", type=int, default=1024)
    p.add_argument("--noise", type=float, default=1.5)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ransac-points", type=int, default=1000, help="N of the RANSAC comparison (0: skip it)")
    p.add_argument("--ransac-batch", type=int, default=256)
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
    if args.ransac_points > 0:
        if args.dtype != "float32":
            log("the RANSAC comparison runs in float32")
        out["ransac"] = {
            "batch": args.ransac_batch,
            "points": args.ransac_points,
            "noise_px": args.noise,
            "outlier_rate": 0.3,
            "opencv_threads": 1,
            "objects": ransac_comparison(args.ransac_batch, args.ransac_points, seed=args.seed, noise_px=args.noise),
        }
    out["load_avg_1min"] = round(os.getloadavg()[0], 2)
    emit(out)


if __name__ == "__main__":
    main()
