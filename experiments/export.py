"""Export a trained variant for inference without the training code.

    python -m experiments.export --workdir runs/lmo_gdr --variant lc --obj 1 --out exported/lc_obj1

Restores the newest checkpoint of ``<workdir>/<variant>`` (``<workdir>/<variant>/obj_XXXXXX``
with ``--obj`` for runs with one network per object; or ``--step``), and writes the
serialised test pipeline (network -> top weights -> RANSAC -> weighted PnP, ``jax.export``)
with its weights and the objects' boxes into ``--out``; load it in any process with
``lcpose.export.load_exported(out)``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> str:
    p = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="the experiment's workdir (e.g. runs/lmo_gdr)")
    p.add_argument("--variant", required=True, help="variant folder inside workdir (e.g. lc)")
    p.add_argument("--obj", type=int, default=None,
                   help="object id, for runs with one network per object (<variant>/obj_XXXXXX)")
    p.add_argument("--out", required=True, help="export folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--platforms", default=None, help="comma-separated lowering platforms, e.g. cpu,cuda "
                                                      "(default: the current backend)")
    p.add_argument("--threshold_px", type=float, default=None, help="RANSAC threshold (output-grid px)")
    args = p.parse_args(argv)

    import dataclasses
    import json

    from lcpose.evaluate import PnPConfig
    from lcpose.export import export_predictor
    from lcpose.train.loop import config_from_meta, load_trained

    run_dir = os.path.join(args.workdir, args.variant)
    if args.obj is not None:
        run_dir = os.path.join(run_dir, f"obj_{args.obj:06d}")
    elif not os.path.isdir(os.path.join(run_dir, "ckpt")) and os.path.isdir(run_dir):
        per_obj = sorted(d for d in os.listdir(run_dir) if d.startswith("obj_"))
        if per_obj:
            p.error(f"{run_dir} holds one network per object ({', '.join(per_obj)}); choose one with --obj")
    model, variables, _ = load_trained(run_dir, args.step)
    with open(os.path.join(run_dir, "config.json")) as f:
        meta = json.load(f)
    cfg, objective = config_from_meta(meta)
    pnp = PnPConfig(**meta["pnp"]) if isinstance(meta.get("pnp"), dict) else PnPConfig()
    if args.threshold_px is not None:
        pnp = dataclasses.replace(pnp, threshold_px=args.threshold_px)
    obj_ids = bbox3d = None
    try:
        from lcpose.data.pipeline import load_model_table

        table = load_model_table(meta["dataset"])
        keep = [i for i, o in enumerate(table.obj_ids) if cfg.obj_ids is None or int(o) in cfg.obj_ids]
        obj_ids, bbox3d = table.obj_ids[keep], table.bbox3d[keep]
    except (OSError, ValueError, KeyError) as err:
        print(f"lcpose: object boxes not stored ({err}); callers must pass bbox3d", file=sys.stderr)
    platforms = [s for s in args.platforms.split(",") if s] if args.platforms else None
    out = export_predictor(args.out, model, variables, input_size=cfg.input_size, pnp=pnp,
                           obj_ids=obj_ids, bbox3d=bbox3d, platforms=platforms,
                           meta={"variant": args.variant, "source": os.path.abspath(run_dir),
                                 "train": meta["train"], "objective": meta["objective"]})
    print(f"exported {run_dir} to {out}")
    return out


if __name__ == "__main__":
    main()
