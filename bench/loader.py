"""Loader throughput: batches/s of `lcpose.data.pipeline.make_loader` (training mode).

    python -m bench.loader [--tfds_dir DIR] [--split train_pbr] [--batch_size 32] [--workers 2] [--batches 40]

Without --tfds_dir it uses the embedded synthetic set (generated/converted once into the
lcpose cache). Prints one JSON object on stdout; progress on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--tfds_dir", default=None)
    p.add_argument("--split", default="train_pbr")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=40, help="timed batches (after 3 warm-up batches)")
    p.add_argument("--eval", action="store_true", help="evaluation mode (no augmentation)")
    a = p.parse_args(argv)

    from lcpose.data.pipeline import make_loader

    tfds_dir = a.tfds_dir
    if tfds_dir is None:
        from lcpose.data.synthetic import ensure_synthetic_tfds

        tfds_dir = ensure_synthetic_tfds()
    loader = make_loader(tfds_dir, a.split, a.batch_size, train=not a.eval, seed=0, worker_count=a.workers,
                         num_epochs=None)
    it = iter(loader)
    t0 = time.perf_counter()
    for _ in range(3):
        batch = next(it)
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(a.batches):
        batch = next(it)
        if (i + 1) % 10 == 0:
            el = time.perf_counter() - t0
            print(f"{i + 1}/{a.batches} batches, {(i + 1) / el:.2f} batches/s", file=sys.stderr)
    dt = time.perf_counter() - t0
    shapes = {k: list(v.shape) for k, v in batch.items()}
    print(json.dumps({
        "bench": "loader",
        "tfds_dir": os.path.abspath(tfds_dir),
        "split": a.split,
        "train": not a.eval,
        "batch_size": a.batch_size,
        "worker_count": a.workers,
        "batches": a.batches,
        "seconds": round(dt, 3),
        "batches_per_s": round(a.batches / dt, 3),
        "examples_per_s": round(a.batches * a.batch_size / dt, 1),
        "warmup_seconds_3_batches": round(t_warm, 2),
        "image_shape": shapes["image"],
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
