"""GDR-Net with and without the LC loss on LM-O (or the embedded synthetic BOP set).

    python -m experiments.lmo_gdr                       # CPU default: synthetic set, baseline + lc
    python -m experiments.lmo_gdr --config paper --bop_root /data/bop/lmo --lm_root /data/bop/lm \
        --detections /data/dets/lmo_test_bboxes.json    # the paper's LM-O recipe (GPUs)

Trains each variant (``--variants``, default ``baseline,lc``), evaluates it on the test split
(detections, top 30 % weights, RANSAC + weighted PnP), prints the per-object ADD(-S) table and
writes into ``--workdir`` (default ``runs/lmo_gdr``)::

    results.json                      {"dataset", "config", "variants": {name: {"add_s_0.1d":
                                       {obj_id: %, ..., "mean": %}, "ar_mspd", "steps",
                                       "train_seconds", ...}}}
    <variant>/ckpt/                   Orbax checkpoints (resume with --resume)
    <variant>/metrics.jsonl, curves.png
    (with one network per object, the default of the CPU config: <variant>/obj_XXXXXX/ckpt/ ...)
    <variant>/gdrnet<variant>_<dataset>-test.csv   BOP challenge estimates (bop_toolkit)
    losses.png                        loss curves of all variants

The entry point only parses flags; the work is in lcpose.train.loop (training),
lcpose.evaluate (evaluation) and experiments.config (the configurations).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.lmo_gdr", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="cpu", help="cpu (default) or paper (experiments/config.py)")
    p.add_argument("--bop_root", default=None,
                   help="real BOP dataset folder (e.g. /data/bop/lmo); default: the embedded synthetic set")
    p.add_argument("--dataset", default=None, help="BOP dataset name of --bop_root (default: its folder name)")
    p.add_argument("--lm_root", default=None, help="LM's BOP folder (LM-O train_real: LM's real images)")
    p.add_argument("--detections", default=None, help="detection json for the test split")
    p.add_argument("--test_list", default=None,
                   help="test images to keep (e.g. YCB-V's keyframe.txt; replaces the BOP-19 test targets)")
    p.add_argument("--sym_aware", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetry-aware ground truth in training (default: the config's; ycbv: yes)")
    p.add_argument("--sym_start", type=int, default=None,
                   help="step from which the symmetry-aware ground truth is used (default: the config's, 0)")
    p.add_argument("--tfds_dir", default=None,
                   help="converted TFDS data dir (default: $LCPOSE_CACHE/tfds for --bop_root)")
    p.add_argument("--train_split", default=None, help="training split (default: the config's, train_pbr)")
    p.add_argument("--obj", default=None, help="comma-separated object ids (default: the config's, cpu: 5; paper: all)")
    p.add_argument("--per_object", action=argparse.BooleanOptionalAction, default=None,
                   help="one network per object (default: the config's; cpu: yes, paper: no)")
    p.add_argument("--steps", type=int, default=None, help="training steps per variant (overrides the config)")
    p.add_argument("--epochs", type=float, default=None, help="training epochs (overrides the config)")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--variants", default=None, help="comma-separated, e.g. baseline,lc,bpnp (experiments.config.VARIANTS)")
    p.add_argument("--workdir", default="runs/lmo_gdr")
    p.add_argument("--resume", action="store_true", help="continue each variant from its newest checkpoint")
    p.add_argument("--pretrained", default=None, help="converted ImageNet encoder (data_prep.convert_resnet --out)")
    p.add_argument("--workers", type=int, default=None, help="grain worker processes")
    p.add_argument("--boxes", choices=["detections", "gt"], default=None, help="test crops from detections or GT boxes")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _config(args):
    from experiments.config import VARIANTS, get_config

    cfg = get_config(args.config)
    tr = {}
    if args.steps is not None:
        tr["total_steps"] = int(args.steps)
        cfg = cfg.replace(epochs=None)
    if args.epochs is not None:
        cfg = cfg.replace(epochs=float(args.epochs))
    if args.batch_size is not None:
        tr["batch_size"] = args.batch_size
    if args.train_split:
        tr["train_split"] = args.train_split
    if args.obj:
        tr["obj_ids"] = tuple(int(o) for o in args.obj.split(",") if o)
        cfg = cfg.replace(objects=tr["obj_ids"])
    if args.per_object is not None:
        cfg = cfg.replace(per_object=bool(args.per_object))
    if args.pretrained:
        tr["pretrained"] = args.pretrained
    if args.workers is not None:
        tr["worker_count"] = args.workers
    if args.seed is not None:
        tr["seed"] = args.seed
    cfg = cfg.with_train(**tr)
    if args.boxes:
        cfg = cfg.replace(boxes=args.boxes)
    if args.sym_aware is not None:
        cfg = cfg.replace(symmetry_aware=bool(args.sym_aware))
    if args.sym_start is not None:
        cfg = cfg.replace(symmetry_start_step=int(args.sym_start))
    if args.variants:
        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
        cfg = cfg.replace(variants=variants)
    return cfg


def _dataset(args, cfg):
    """(tfds_dir, dataset name) of the run, converting / generating the data when needed."""
    if args.bop_root is None:
        from lcpose.data.synthetic import ensure_synthetic_tfds

        return ensure_synthetic_tfds(progress=not args.no_progress, **dict(cfg.synthetic)), "synthetic"
    from lcpose.data.synthetic import default_cache_dir
    from lcpose.data.tfds_builder import build_tfds

    dataset = args.dataset or os.path.basename(os.path.normpath(args.bop_root))
    out = args.tfds_dir or os.path.join(default_cache_dir(), "tfds")
    splits = sorted(set(cfg.train.train_split.split("+")) | {cfg.test_split})
    return build_tfds(args.bop_root, dataset, splits, out, lm_root=args.lm_root,
                      detections=args.detections, test_list=args.test_list,
                      progress=not args.no_progress), dataset


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse flags, train and evaluate every variant, write results.json; returns its content."""
    args = parse_args(argv)
    import jax

    from experiments.config import objective_for
    from lcpose import evaluate as E
    from lcpose.data.pipeline import make_loader, resolve_dataset_dir
    from lcpose.train import eval_params
    from lcpose.train.loop import train

    t_start = time.perf_counter()
    cfg = _config(args)
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    tfds_dir, dataset = _dataset(args, cfg)
    tfds_dir = resolve_dataset_dir(tfds_dir)
    data_seconds = time.perf_counter() - t_start
    progress = not args.no_progress

    test_loader = _test_loader(tfds_dir, cfg, cfg.objects if cfg.objects is not None else cfg.train.obj_ids)
    image_width = _image_width(tfds_dir)
    if cfg.epochs is not None:
        probe = make_loader(tfds_dir, cfg.train.train_split, cfg.train.batch_size, train=True,
                            worker_count=0, obj_ids=cfg.train.obj_ids)
        steps_per_epoch = max(1, probe.num_examples_total // cfg.train.batch_size)
        cfg = cfg.with_train(total_steps=int(round(cfg.epochs * steps_per_epoch)))
        if cfg.pose_loss_start_step is not None:   # the reference: max(2000 steps, 1 epoch)
            cfg = cfg.replace(pose_loss_start_step=max(int(cfg.pose_loss_start_step), steps_per_epoch))
    print(f"lcpose: {cfg.name} config on {dataset} ({tfds_dir}); {jax.local_device_count()} "
          f"{jax.devices()[0].platform} device(s); variants {', '.join(cfg.variants)}; "
          f"{cfg.train.total_steps} steps of batch {cfg.train.batch_size}", file=sys.stderr)

    results_path = os.path.join(workdir, "results.json")
    objects = _objects(cfg, test_loader)
    results = {"dataset": dataset, "tfds_dir": tfds_dir, "config": cfg.name,
               "train": cfg.train.to_json(), "boxes": cfg.boxes,
               "pnp": dataclasses.asdict(cfg.pnp), "devices": jax.local_device_count(),
               "platform": jax.devices()[0].platform, "data_seconds": round(data_seconds, 1),
               "per_object": cfg.per_object, "objects": objects, "variants": {}}
    # One run per variant, or (per_object) one run per variant and object in <variant>/obj_XXXXXX.
    # A class-agnostic run trains on the experiment's objects (None: all of the dataset).
    runs = ([(f"obj_{o:06d}", (o,)) for o in objects] if cfg.per_object
            else [("", cfg.objects if cfg.objects is not None else cfg.train.obj_ids)])
    summaries = {}
    curves = {}
    sym_table = _symmetry_table(test_loader.models)
    for variant in cfg.variants:
        objective = objective_for(cfg, variant, cfg.train.total_steps)
        vdir = os.path.join(workdir, variant)
        outs, histories, wstats, coords = [], [], [], []
        steps = train_seconds = compile_seconds = eval_seconds = 0.0
        for sub, obj_ids in runs:
            name = f"{variant} obj {obj_ids[0]}" if sub else variant
            res = train(tfds_dir, os.path.join(vdir, sub) if sub else vdir,
                        dataclasses.replace(cfg.train, obj_ids=obj_ids), objective, resume=args.resume,
                        progress=progress, desc=name,
                        meta={"variant": variant, "config": cfg.name, "pnp": dataclasses.asdict(cfg.pnp)})
            t0 = time.perf_counter()
            variables = {"params": eval_params(res.state), "batch_stats": res.state.batch_stats}
            predict = jax.jit(E.make_predict_fn(res.model, cfg.pnp))
            loader = test_loader if not sub else _test_loader(tfds_dir, cfg, obj_ids)
            outs.append(E.evaluate(predict, variables, loader, key=cfg.train.seed, progress=progress,
                                   desc=f"eval {name}"))
            coords.append(E.coordinate_errors(res.model, variables, loader, sym_table))
            # where the weights went (weights.png next to the run's curves)
            first = next(iter(_test_loader(tfds_dir, cfg, obj_ids if sub else runs[0][1], workers=0)))
            wstats.append(E.weight_map_stats(res.model, variables, first,
                                             os.path.join(res.workdir, "weights.png")))
            eval_seconds += time.perf_counter() - t0
            steps += res.steps
            train_seconds += res.train_seconds
            compile_seconds += res.compile_seconds
            histories.append(res.history)
            curves[name] = res.history
        out = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        sym = cfg.symmetric_obj_ids
        errors = E.compute_errors(out, test_loader.models, image_width=image_width, symmetric_obj_ids=sym)
        errors_r = E.compute_errors(out, test_loader.models, image_width=image_width, prefix="ransac",
                                    symmetric_obj_ids=sym)
        summary = E.summarize(out, errors, errors_r)
        summary.update(_coordinate_summary(np.concatenate([c["obj_id"] for c in coords]),
                                           {k: np.concatenate([c[k] for c in coords])
                                            for k in ("xyz_err_mm", "xyz_err_sym_mm")}))
        csv = E.write_bop_csv(os.path.join(vdir, f"gdrnet{variant.replace('_', '')}_{dataset}-test.csv"), out)
        gc = [r["grad_correct"] for h in histories for r in h if np.isfinite(r.get("grad_correct", np.nan))]
        last = [h[-1] for h in histories if h]
        summaries[variant] = summary
        results["variants"][variant] = {
            **summary,
            "steps": int(steps),
            "train_seconds": round(train_seconds, 1),
            "compile_seconds": round(compile_seconds, 1),
            "eval_seconds": round(eval_seconds, 1),
            "time_per_instance_ms": round(1000 * float(np.mean(out["time"])), 2),
            "objective": dataclasses.asdict(objective) | {"loss_kwargs": dict(objective.loss_kwargs)},
            "final_loss": float(np.mean([r["loss"] for r in last])) if last else None,
            "final_xyz_loss": float(np.mean([r["loss/xyz"] for r in last])) if last else None,
            "grad_correct": round(100 * float(np.mean(gc)), 2) if gc else None,
            "weight_on_mask": round(float(np.mean([w["weight_on_mask"] for w in wstats])), 2),
            "weight_n_eff": round(float(np.mean([w["weight_n_eff"] for w in wstats])), 1),
            "bop_csv": csv,
        }
        _write_json(results_path, results)
        print(E.format_table({variant: summary}, title=f"{variant}: ADD(-S) 0.1d [%]"), file=sys.stderr)
        if cfg.auc_table:
            print(E.format_table({variant: summary}, metrics=E.YCBV_METRICS,
                                 title=f"{variant}: ADD(-S) 0.1d and AUC to 10 cm [%]"), file=sys.stderr)

    if curves:
        _plot_losses(curves, os.path.join(workdir, "losses.png"))
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    _write_json(results_path, results)
    print(E.format_table(summaries, title=f"ADD(-S) 0.1d [%] on {dataset} ({cfg.name} config, "
                                          f"{cfg.train.total_steps} steps)"))
    if cfg.auc_table:
        print(E.format_table(summaries, metrics=E.YCBV_METRICS,
                             title=f"YCB-V metrics [%] on {dataset} (AUC to 10 cm; p11: 11-point form)"))
    print(E.format_table(summaries, metrics=COORD_METRICS,
                         title="mean xyz error on the visible pixels [mm] (sym: in the symmetric frame)"))
    for v, r in results["variants"].items():
        gc = f", gradient correctness {r['grad_correct']:.1f} %" if r["grad_correct"] is not None else ""
        print(f"{v}: trained {r['steps']} steps in {r['train_seconds']:.0f} s{gc}; test weights: "
              f"{r['weight_on_mask']:.0f} % on the visible mask, {r['weight_n_eff']:.0f} effective pixels")
    print(f"results: {results_path} (total {results['total_seconds']:.0f} s)")
    return results


COORD_METRICS = (("xyz_err_mm", "xyz err"), ("xyz_err_sym_mm", "xyz err sym"))


def _symmetry_table(models):
    """Every declared symmetry of the dataset's objects (the symmetric frame of the xyz error)."""
    from lcpose.symmetry import symmetry_table

    return symmetry_table(models.models_info, models.obj_ids)


def _coordinate_summary(obj_id, errs):
    """{"xyz_err_mm": {obj: mean, "mean": ...}, "xyz_err_sym_mm": ...} (mm, NaN crops left out)."""
    ids = [int(o) for o in np.unique(obj_id)]
    out = {}
    for key, e in errs.items():
        d = {str(o): round(float(np.nanmean(e[obj_id == o])), 2) if np.any(np.isfinite(e[obj_id == o]))
             else float("nan") for o in ids}
        d["mean"] = round(float(np.nanmean([d[str(o)] for o in ids])), 2)
        out[key] = d
    return out


def _objects(cfg, test_loader):
    """The object ids the experiment trains and tests (sorted ints)."""
    objs = cfg.objects if cfg.objects is not None else cfg.train.obj_ids
    if objs is None:
        objs = test_loader.models.obj_ids
    return sorted(int(o) for o in objs)


def _test_loader(tfds_dir, cfg, obj_ids, workers=None):
    from lcpose.data.pipeline import make_loader

    workers = min(cfg.train.worker_count, 2) if workers is None else workers
    return make_loader(tfds_dir, cfg.test_split, cfg.eval_batch_size, train=False,
                       worker_count=workers, boxes=cfg.boxes,
                       obj_ids=obj_ids, input_size=cfg.train.input_size,
                       output_size=cfg.train.output_size)


def _image_width(tfds_dir) -> float:
    """Image width of the dataset's camera (for AR_MSPD), 640 if it cannot be read."""
    try:
        from lcpose.data.tfds_builder import read_meta

        root = read_meta(tfds_dir).get("bop_root")
        with open(os.path.join(root, "camera.json")) as f:
            return float(json.load(f).get("width", 640))
    except (OSError, ValueError, TypeError, KeyError):
        return 640.0


def _write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _plot_losses(curves, path):
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    keys = ["loss", "loss/xyz", "loss/mask", "loss/pose", "grad_correct"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(axes, keys):
        for i, (variant, hist) in enumerate(curves.items()):
            pts = [(r["step"], r[key]) for r in hist if key in r and np.isfinite(r[key])]
            ax.plot(*(zip(*pts) if pts else ([], [])), label=variant, lw=1, color=f"C{i}")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if key.startswith("loss") and key != "loss/pose":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    import signal

    # SIGTERM (e.g. a job scheduler) exits like Ctrl-C: finally-blocks close the checkpointer
    # and multiprocessing's exit handlers stop the grain workers instead of orphaning them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    run()


if __name__ == "__main__":
    main()
