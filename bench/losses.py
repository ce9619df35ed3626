"""Forward+backward time of the pose losses (LC, BPnP, EPro-PnP): the runtime column of Table 3.

    python -m bench.losses [--batch 32] [--points 1024] [--epro-points 512] [--dtype float32]

Each loss is vmapped over the batch; the timed step is `jax.value_and_grad` of the batch-mean loss
w.r.t. (x2d, x3d, w2d), jitted, after compilation, median (and quartiles) of `--repeats` runs. The correspondences
are dense-map-like: N points of a synthetic object, in the pixels of a 64x64 zoom-in crop with its
intrinsics K_out, 1.5 px image noise. EPro-PnP runs on a random subset of `--epro-points` points
(512, as its paper does) with 4 x 128 AMIS samples. Prints one JSON object to stdout.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import LMO_K, emit, log, pnp_scenes, time_calls
from lcpose import geometry
from lcpose.correspondences import Correspondences
from lcpose.losses.registry import PoseLossInputs, get_pose_loss


def crop_problem(rng, batch, n, *, noise_px=1.5, out_size=64):
    """Scenes of bench.common.pnp_scenes moved into a zoom-in crop of each object (K_out, pixels)."""
    x3d, x2d, R, t, _ = pnp_scenes(rng, batch, n, noise_px=noise_px)
    lo, hi = x2d.min(axis=1), x2d.max(axis=1)
    center = 0.5 * (lo + hi)
    scale = 1.5 * np.max(hi - lo, axis=1)
    A = np.stack([np.asarray(geometry.crop_affine_np(c, s, out_size)) for c, s in zip(center, scale)])
    K_out = np.stack([np.asarray(geometry.crop_intrinsics_np(LMO_K, c, s, out_size)) for c, s in zip(center, scale)])
    x2d_out = np.einsum("bij,bnj->bni", A[:, :, :2], x2d) + A[:, None, :, 2]
    k = out_size / scale  # output pixels per image pixel
    w2d = (1.0 / (noise_px * k))[:, None, None] * rng.uniform(0.5, 1.5, size=(batch, n, 2))
    bbox = np.asarray(geometry.bbox3d_corners(jnp.full(3, -60.0), jnp.full(3, 60.0)), np.float64)
    return x2d_out, x3d, w2d, K_out, R, t, np.broadcast_to(bbox, (batch, 8, 3)).copy()


def _timed(name, step, args, repeats):
    log(f"{name}: compiling")
    t0 = time.perf_counter()
    out = jax.block_until_ready(step(*args))
    compile_s = time.perf_counter() - t0
    ms = 1e3 * time_calls(lambda: jax.block_until_ready(step(*args)), repeats=repeats)
    loss, grads = out
    finite = bool(np.isfinite(np.asarray(loss)) and all(np.all(np.isfinite(np.asarray(g))) for g in grads))
    med = float(np.median(ms))
    log(f"{name}: {med:.1f} ms fwd+bwd (median of {repeats})")
    # the quartiles show how much of a figure is this machine's noise (VMs vary by +-30 %)
    return {"fwd_bwd_ms": med, "fwd_bwd_ms_quartiles": [round(float(q), 3) for q in np.percentile(ms, [25, 75])],
            "repeats": repeats, "first_call_s": compile_s, "loss": float(loss), "finite": finite}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--points", type=int, default=1024)
    p.add_argument("--epro-points", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per loss (default: 50 LC, 15 BPnP, 7 EPro-PnP: about 1 s each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--losses", default="lc,bpnp,epropnp",
                   help="comma-separated names of lcpose.losses.registry")
    args = p.parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dt = jnp.dtype(args.dtype)
    B, N = args.batch, args.points
    which = [s.strip() for s in args.losses.split(",") if s.strip()]

    rng = np.random.default_rng(args.seed)
    x2d, x3d, w2d, K, R, t, bbox = (jnp.asarray(a, dt) for a in crop_problem(rng, B, N))
    keys = jax.random.split(jax.random.key(args.seed), B)
    diff = (x2d, x3d, w2d)

    def timed_loss(per_instance):
        def mean_loss(x2d, x3d, w2d):
            return jnp.mean(per_instance(x2d, x3d, w2d))

        return jax.jit(jax.value_and_grad(mean_loss, argnums=(0, 1, 2)))

    def reps(name):
        return args.repeats if args.repeats is not None else {"lc": 50, "bpnp": 15, "epropnp": 7}.get(name, 15)

    valid = jnp.ones((B, N), bool)
    results = {}
    for name in which:
        loss = get_pose_loss(name)     # any registered loss (ValueError naming them otherwise)
        kw = {"num_points": min(args.epro_points, N)} if name == "epropnp" else {}

        def one(key, a, b, c, v, k, r, tt, bb, loss=loss, kw=kw):
            inputs = PoseLossInputs(corr=Correspondences(x2d=a, x3d=b, w2d=c, valid=v), K=k, R=r, t=tt,
                                    bbox3d=bb, key=key)
            return loss.fn(inputs, **kw)[0]

        f = jax.vmap(one)
        step = timed_loss(lambda a, b, c, f=f: f(keys, a, b, c, valid, K, R, t, bbox))
        results[name] = _timed(name, step, diff, reps(name))
        if name == "epropnp":
            results[name].update({"points": kw["num_points"], "samples": 512})

    dev = jax.devices()[0]
    out = {
        "bench": "losses",
        "what": "jit(value_and_grad(mean over batch of loss)) w.r.t. x2d, x3d, w2d; ms per batch",
        "device": str(dev.device_kind),
        "platform": dev.platform,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        # Shared CI machines: a 1-minute load average above cpu_count inflates every figure.
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "batch": B,
        "points": N,
        "dtype": args.dtype,
        **results,
    }
    if "lc" in results and "fwd_bwd_ms" in results["lc"]:
        out["lc_target_ms_cpu"] = 4.0
    emit(out)


if __name__ == "__main__":
    main()
