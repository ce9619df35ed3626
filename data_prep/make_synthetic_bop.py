"""Generate lcpose's synthetic dataset in BOP layout.

    python -m data_prep.make_synthetic_bop --out DIR --objects 8 --train-images 400 --test-images 50 --seed 0

Writes models/, models_eval/, train_pbr/, test/, camera.json, test_targets_bop19.json and
detections_test.json (GDR-Net's BOP detection format) into DIR (see lcpose.data.synthetic).
Convert it with ``python -m data_prep.build_tfds --bop_root DIR --dataset synthetic
--splits train_pbr,test --out TFDS_DIR``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    from lcpose.data import synthetic

    p = argparse.ArgumentParser(prog="python -m data_prep.make_synthetic_bop", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (created; must be empty)")
    p.add_argument("--objects", type=int, default=synthetic.DEFAULTS["objects"], help="number of object models")
    p.add_argument("--train-images", type=int, default=synthetic.DEFAULTS["train_images"], help="images in train_pbr")
    p.add_argument("--test-images", type=int, default=synthetic.DEFAULTS["test_images"], help="images in test")
    p.add_argument("--seed", type=int, default=synthetic.DEFAULTS["seed"])
    p.add_argument("--width", type=int, default=synthetic.LMO_SIZE[0], help="image width (default LM-O's 640)")
    p.add_argument("--height", type=int, default=synthetic.LMO_SIZE[1], help="image height (default LM-O's 480)")
    p.add_argument("--images-per-scene", type=int, default=100)
    p.add_argument("--views", choices=synthetic.VIEWS, default=synthetic.DEFAULTS["views"],
                   help="object orientations: tabletop (LM-O-like, default) or uniform on SO(3)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count, at most 8)")
    a = p.parse_args(argv)
    t0 = time.time()
    try:
        out = synthetic.generate_synthetic_bop(
            a.out, objects=a.objects, train_images=a.train_images, test_images=a.test_images, seed=a.seed,
            width=a.width, height=a.height, images_per_scene=a.images_per_scene, views=a.views,
            workers=a.workers,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": out, "seconds": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
