"""Convert BOP splits to lcpose's TFDS dataset (array_record, one example per object instance).

    python -m data_prep.build_tfds --bop_root DIR --dataset {lmo,ycbv,synthetic} --splits train_pbr,test --out TFDS_DIR

Examples:
    # the paper's LM-O setting: LM real + PBR training images, LM-O test (BOP'19 targets)
    python -m data_prep.build_tfds --bop_root /data/bop/lmo --lm_root /data/bop/lm --dataset lmo \\
        --splits train_real,train_pbr,test --detections /data/dets/lmo_test_bboxes.json --out /data/tfds
    python -m data_prep.build_tfds --bop_root /data/bop/ycbv --dataset ycbv --splits train_real,train_pbr,test \\
        --image_stride 10 --out /data/tfds

The dataset lands in TFDS_DIR/bop_<dataset>/1.0.0; re-running skips splits already built.
TensorFlow is not needed. Load it with lcpose.data.pipeline.make_loader(TFDS_DIR, split, ...).
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    from lcpose.data import bop, tfds_builder

    p = argparse.ArgumentParser(prog="python -m data_prep.build_tfds",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--bop_root", required=True, help="BOP dataset folder (with models/ and the split folders)")
    p.add_argument("--dataset", required=True, choices=sorted(bop.DATASETS))
    p.add_argument("--splits", required=True, help="comma-separated BOP splits, e.g. train_pbr,test")
    p.add_argument("--out", required=True, help="TFDS data dir")
    p.add_argument("--lm_root", default=None, help="LM's BOP folder (lmo train_real: LM's real images)")
    p.add_argument("--detections", default=None, help="detection json for the test split (GDR-Net or BOP'22 format)")
    p.add_argument("--test_list", default=None,
                   help="test images to keep instead of the BOP'19 targets (e.g. YCB-V's keyframe.txt)")
    p.add_argument("--obj_ids", default=None, help="comma-separated object ids (default: the dataset's)")
    p.add_argument("--image_stride", type=int, default=1, help="keep every n-th image of each scene")
    p.add_argument("--min_visib_fract", type=float, default=None,
                   help="store instances at least this visible (default 0.1 for training splits, 0 for test)")
    p.add_argument("--image_format", choices=["auto", "png", "jpeg"], default="auto",
                   help="encoding of the stored crops (auto: JPEG for JPEG sources such as PBR images, else PNG)")
    p.add_argument("--xyz_oversample", type=float, default=tfds_builder.StoreConfig.xyz_oversample)
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count, at most 8)")
    a = p.parse_args(argv)
    t0 = time.time()
    try:
        store = tfds_builder.StoreConfig(image_format=a.image_format, xyz_oversample=a.xyz_oversample)
        d = tfds_builder.build_tfds(
            a.bop_root, a.dataset, [s for s in a.splits.split(",") if s], a.out,
            lm_root=a.lm_root, detections=a.detections, test_list=a.test_list,
            obj_ids=None if a.obj_ids is None else [int(x) for x in a.obj_ids.split(",")],
            image_stride=a.image_stride, min_visib_fract=a.min_visib_fract, store=store, workers=a.workers,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = tfds_builder.read_meta(d)
    print(json.dumps({"dataset_dir": d, "seconds": round(time.time() - t0, 1),
                      "splits": {k: v["num_examples"] for k, v in meta["splits"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
