"""The training loop of a correspondence network with a PnP loss: loader -> shard -> pmapped step -> log -> Orbax.

The network is chosen by name (``TrainConfig.model``, :mod:`lcpose.models.registry`; default
GDR-Net); its head's ``surrogate_loss`` / ``decode_train`` make the objective
(:mod:`lcpose.train.objective`) and its ``EXAMPLE_KEYS`` the batch keys sent to the devices.

``train(tfds_dir, workdir, cfg, objective)`` trains one network on one split of an lcpose TFDS
dataset (:func:`lcpose.data.pipeline.make_loader`) and returns the final state. One code path
for one CPU and for all local GPUs/TPUs: the step runs under ``jax.pmap`` over
``jax.local_devices()`` (BatchNorm statistics and gradients averaged over the device axis), the
global batch is split evenly across them.

Files in ``workdir``:

* ``ckpt/<step>/``   Orbax checkpoints (every ``ckpt_every`` steps and at the end, newest
  ``keep_checkpoints`` kept): the train state (params, Ranger + Lookahead state, BatchNorm
  statistics, step, RNG, clipper state), the grain iterator state and the run's configuration.
* ``config.json``    the configuration (what :func:`load_trained` rebuilds the network from).
* ``metrics.jsonl``  one record per ``log_every`` steps; ``curves.png`` the loss curves.

Resumption: ``train(..., resume=True)`` continues from the newest checkpoint with the saved
iterator state, so a killed run reaches the same parameters as an uninterrupted one (the step
is deterministic; tested bitwise on CPU). A run with ``resume=False`` refuses a folder whose
``ckpt/`` holds checkpoints unless ``overwrite=True`` (which deletes them first).
The configuration saved with a checkpoint must match the one resumed with (apart from
logging/checkpoint intervals), otherwise :class:`~lcpose.train.workdir.WorkdirError` (a
ValueError) names the differing fields.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from typing import Any, List, NamedTuple, Optional, Sequence

import jax
import optax

from lcpose.train.checkpoint import Checkpointer
from lcpose.symmetry import SYMMETRY_KEYS, SymmetryConfig, symmetry_table
from lcpose.train.objective import ObjectiveConfig, make_objective, uses_scale_branch
from lcpose.train.optim import flat_cosine_schedule, ranger
from lcpose.train.progress import ProgressLogger
from lcpose.train.state import TrainState
from lcpose.train.workdir import WorkdirError, config_differences
from lcpose.train.step import AXIS_NAME, make_train_step, replicate, shard_batch, unreplicate

__all__ = ["TrainConfig", "TrainResult", "train", "build_model", "load_trained", "config_from_meta",
           "TRAIN_KEYS", "CURVE_KEYS"]

# Batch keys GDR-Net's objective reads (the rest of the loader's output stays on the host); a
# run sends lcpose.models.registry.example_keys(model) of its own model.
TRAIN_KEYS = ("image", "xyz", "mask_visib", "K_out", "R", "t", "bbox3d")
# Metrics drawn in curves.png (those present).
CURVE_KEYS = ("loss", "loss/xyz", "loss/mask", "loss/pose", "loss/weight_bce", "loss/code",
              "code/bit_error", "grad_correct",
              "lc/e_cov", "lc/e_prior", "lc/e_linear", "log_scale", "grad_norm", "grad/xyz_norm",
              "grad/log_scale_norm", "lr")
CONFIG_FILE = "config.json"   # the run's configuration (also saved with every checkpoint)
# Fields that may change between a run and its resumption.
_RESUMABLE_CHANGES = ("log_every", "ckpt_every", "keep_checkpoints")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything but the objective that determines a training run (hashable).

    model: the network's name in :mod:`lcpose.models.registry` (``lcpose.models.<model>``).
    preset / model_overrides: passed to its ``build`` (GDR-Net: a ``lcpose.models.PRESETS``
      name and GDRNet attribute overrides as (name, value) pairs). ``scale_branch`` follows the
      objective (:func:`~lcpose.train.objective.uses_scale_branch`) unless overridden here.
    input_size / output_size: crop and map sizes (must match the network: GDR-Net out = in / 4,
      ZebraPose out = in / 2).
    batch_size: global batch (split across local devices; divisible by their number).
    total_steps: optimiser updates. learning_rate, weight_decay: Ranger's (2e-4, 1e-4).
    optimizer: "ranger" (RAdam + Lookahead, the LC recipe) or "adam" (ZebraPose's; plain
      optax.adam on the same schedule, weight_decay must then be 0).
    warmup_steps / warmup_factor / anneal_start: the flat-cosine schedule (1000 / 0.001 / 0.72).
    clip_weight_logits: the LC recipe's running-norm clipper on the weight-logit gradient
      (rel_thresh 0.7, the reference's ``clip_weight_grad``, on by default).
    clip_scale_grad / clip_points_grad: the reference's two optional clippers (rel_thresh 2, off
      in its LM-O configuration): on the gradient w.r.t. the weight-scale output ``log_scale``
      and w.r.t. the xyz output. The reference clips the pose loss's gradient on the sampled
      3D points; here the clipper sees the whole xyz-output gradient (L1 + pose loss), whose
      L1 part is steady, so it acts on the pose loss's spikes alike. They guard against the
      runaway of the weight scale and the points that an LC run can fall into when its weights
      concentrate on a few pixels (seen on the 16x16 CPU maps; see BUILD.md, "The main job").
    seed: initialisation, data order/augmentation and the per-step RNG.
    train_split / obj_ids: what to train on (None: all objects of the dataset).
    color_aug_prob / bg_switch_prob: training augmentation (``lcpose.data.pipeline.make_loader``;
      0.8 / 0.5 as GDR-Net, for the sim-to-real gap of PBR training images).
    rotate_prob / rotate_max_deg: in-plane rotation of the training crops (the LC reference's
      ``rotate_prob: 1``, any angle; pose and intrinsics rotate with them).
    worker_count: grain worker processes (0: in-process); part of the data order.
    pretrained: folder of converted ImageNet encoder weights (``data_prep.convert_resnet``).
    log_every / ckpt_every / keep_checkpoints: logging and Orbax intervals.
    """

    model: str = "gdrnet"
    preset: str = "cpu"
    model_overrides: Any = ()
    input_size: int = 128
    output_size: int = 32
    batch_size: int = 16
    total_steps: int = 1000
    learning_rate: float = 2e-4
    weight_decay: float = 1e-4
    optimizer: str = "ranger"
    warmup_steps: int = 1000
    warmup_factor: float = 0.001
    anneal_start: float = 0.72
    clip_weight_logits: bool = True
    clip_scale_grad: bool = False
    clip_points_grad: bool = False
    seed: int = 0
    train_split: str = "train_pbr"
    obj_ids: Optional[Sequence[int]] = None
    color_aug_prob: float = 0.8
    bg_switch_prob: float = 0.5
    rotate_prob: float = 0.0
    rotate_max_deg: float = 180.0
    worker_count: int = 2
    pretrained: Optional[str] = None
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 3

    def __post_init__(self):
        ov = self.model_overrides
        ov = sorted(ov.items()) if isinstance(ov, dict) else [tuple(p) for p in ov]
        # lists (e.g. from JSON) become tuples: the config is a compilation-cache key
        ov = tuple((str(k), tuple(v) if isinstance(v, list) else v) for k, v in ov)
        object.__setattr__(self, "model_overrides", ov)
        if self.obj_ids is not None:
            object.__setattr__(self, "obj_ids", tuple(int(o) for o in self.obj_ids))
        for name in ("batch_size", "total_steps", "log_every", "ckpt_every", "keep_checkpoints",
                     "input_size", "output_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32, got {self.input_size}")
        if self.optimizer not in ("ranger", "adam"):
            raise ValueError(f"optimizer must be 'ranger' or 'adam', got {self.optimizer!r}")
        if self.optimizer == "adam" and self.weight_decay:
            raise ValueError(f"weight_decay={self.weight_decay} needs optimizer='ranger' (adam has none)")
        if self.warmup_steps < 0 or self.worker_count < 0:
            raise ValueError("warmup_steps and worker_count must be >= 0")
        for name in ("color_aug_prob", "bg_switch_prob", "rotate_prob"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["model_overrides"] = [[k, list(v) if isinstance(v, tuple) else v]
                                for k, v in self.model_overrides]
        d["obj_ids"] = None if self.obj_ids is None else list(self.obj_ids)
        return d


class TrainResult(NamedTuple):
    state: TrainState          # host (unreplicated) final state; eval with eval_params(state)
    model: Any                 # the GDRNet trained (axis_name=None: apply it with jit)
    steps: int                 # optimiser steps done in all (incl. resumed ones)
    train_seconds: float       # wall time of this session's loop (incl. the step's compilation)
    compile_seconds: float     # wall time of the first step of this session (mostly compilation)
    history: List[dict]        # logged metric records (incl. those before a resume)
    workdir: str


def build_model(cfg: TrainConfig, objective: ObjectiveConfig, axis_name: Optional[str] = None):
    """The network of a run (``axis_name=AXIS_NAME`` for the pmapped train step):
    ``get_model(cfg.model, preset=..., axis_name=..., scale_branch=..., **cfg.model_overrides)``."""
    from lcpose.models.registry import get_model, map_size

    overrides = dict(cfg.model_overrides)
    overrides.setdefault("scale_branch", uses_scale_branch(objective))
    model = get_model(cfg.model, preset=cfg.preset, axis_name=axis_name, **overrides)
    out = map_size(model, cfg.input_size)
    if out != cfg.output_size:
        raise ValueError(f"output_size={cfg.output_size} does not match the network: input "
                         f"{cfg.input_size} gives {out}x{out} maps (model {cfg.model!r}, preset {cfg.preset!r})")
    return model


@functools.lru_cache(maxsize=8)
def _compiled_step(model, objective: ObjectiveConfig, cfg_key: tuple):
    """(tx, schedule, pmapped step) for a configuration; cached so repeated runs in one process
    (tests, several variants with equal settings) compile once."""
    tx, sched = _make_tx(cfg_key)
    clips = dict(cfg_key[-1])
    step = make_train_step(model, make_objective(objective, head=model), tx, AXIS_NAME,
                           output_clip={name: {"rel_thresh": rel} for name, rel in clips.items()} or None,
                           learning_rate_fn=sched)
    return tx, sched, jax.pmap(step, axis_name=AXIS_NAME, donate_argnums=(0,))


def _make_tx(cfg_key: tuple):
    (lr, wd, total, warmup, wf, anneal, optimizer, _) = cfg_key
    sched = flat_cosine_schedule(lr, total, anneal_start=anneal, warmup_steps=warmup,
                                 warmup_factor=wf)
    if optimizer == "adam":
        return optax.adam(sched), sched
    return ranger(sched, weight_decay=wd), sched


def _step_key(cfg: TrainConfig) -> tuple:
    return (float(cfg.learning_rate), float(cfg.weight_decay), int(cfg.total_steps),
            int(cfg.warmup_steps), float(cfg.warmup_factor), float(cfg.anneal_start),
            str(cfg.optimizer), output_clips(cfg))


def output_clips(cfg: TrainConfig) -> tuple:
    """The clipped network outputs of a run and their clippers' rel_thresh: ((name, rel), ...).

    The names are also the clipper states of the run's TrainState (``clip_names``).
    """
    clips = []
    if cfg.clip_weight_logits:
        clips.append(("weight_logits", 0.7))
    if cfg.clip_scale_grad:
        clips.append(("log_scale", 2.0))
    if cfg.clip_points_grad:
        clips.append(("xyz", 2.0))
    return tuple(clips)


def _meta(cfg: TrainConfig, objective: ObjectiveConfig, tfds_dir: str, extra: Optional[dict]) -> dict:
    obj = dataclasses.asdict(objective)
    obj["loss_kwargs"] = [list(p) for p in objective.loss_kwargs]
    return {"train": cfg.to_json(), "objective": obj, "dataset": os.path.abspath(tfds_dir),
            **(extra or {})}


def _check_resumable(saved: Optional[dict], now: dict, path: str):
    if not saved:
        return
    # a field added since the run was saved reads as its default
    defaults = {"train": _defaults(TrainConfig), "objective": _defaults(ObjectiveConfig)}
    diffs = config_differences({k: {**defaults[k], **saved.get(k, {})} for k in ("train", "objective")},
                               {k: now[k] for k in ("train", "objective")},
                               ignore=_RESUMABLE_CHANGES)
    if diffs:
        raise WorkdirError(f"cannot resume from {path}: the configuration differs ("
                           + "; ".join(diffs) + "); use another workdir or resume=False")


def _defaults(cls) -> dict:
    return {f.name: json.loads(json.dumps(f.default)) for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}


def train(tfds_dir, workdir, cfg: TrainConfig, objective: ObjectiveConfig, *,
          resume: bool = False, overwrite: bool = False, max_steps: Optional[int] = None,
          progress: bool = True, desc: str = "train", meta: Optional[dict] = None) -> TrainResult:
    """Train GDR-Net on ``cfg.train_split`` of ``tfds_dir``; see the module docstring.

    Args:
      tfds_dir: an lcpose TFDS dataset (``ensure_synthetic_tfds()`` or ``build_tfds``).
      workdir: folder of this run (checkpoints, metrics, curves).
      cfg, objective: the run.
      resume: continue from the newest checkpoint in ``workdir/ckpt`` (if any).
      overwrite: without ``resume``, delete the checkpoints of a previous run in ``workdir``;
        when False (default) such a folder is refused (:class:`WorkdirError`).
      max_steps: stop this session after that many steps without the final save (used to
        simulate a killed run); the result is then the state at that point.
      progress: show a tqdm bar. desc: its label. meta: extra JSON saved with checkpoints.
    """
    from lcpose.data.pipeline import make_loader
    from lcpose.models import init_variables, load_encoder_weights, merge_encoder_weights
    from lcpose.models.registry import example_keys, loader_kwargs

    workdir = os.path.abspath(os.fspath(workdir))
    os.makedirs(workdir, exist_ok=True)
    ckpt_dir = os.path.join(workdir, "ckpt")
    if not resume and not overwrite and os.path.isdir(ckpt_dir) and any(
            d.isdigit() for d in os.listdir(ckpt_dir)):
        raise WorkdirError(f"{ckpt_dir} holds the checkpoints of a previous run; resume it "
                           f"(resume=True) or delete them (overwrite=True)")
    n_dev = jax.local_device_count()
    n_proc = jax.process_count()
    if cfg.batch_size % (n_dev * n_proc):
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the "
                         f"{n_dev * n_proc} devices")
    model = build_model(cfg, objective, axis_name=AXIS_NAME)
    keys = example_keys(model)
    loader = make_loader(tfds_dir, cfg.train_split, cfg.batch_size // n_proc, train=True,
                         seed=cfg.seed, shard=(jax.process_index(), n_proc),
                         worker_count=cfg.worker_count, obj_ids=cfg.obj_ids,
                         input_size=cfg.input_size, output_size=cfg.output_size,
                         color_aug_prob=cfg.color_aug_prob, bg_switch_prob=cfg.bg_switch_prob,
                         rotate_prob=cfg.rotate_prob, rotate_max_deg=cfg.rotate_max_deg,
                         **loader_kwargs(model))
    tx, _, p_step = _compiled_step(model, objective, _step_key(cfg))
    sym_table = None
    if objective.symmetry is not None:       # symmetry-aware ground truth: per-example candidates
        sym_table = _symmetry_table(loader.models, objective.symmetry, cfg.obj_ids)
        keys = tuple(keys) + tuple(k for k in ("xyz", "mask_visib", "R", "t") + SYMMETRY_KEYS if k not in keys)

    run_meta = _meta(cfg, objective, tfds_dir, meta)
    config_path = os.path.join(workdir, CONFIG_FILE)
    if resume and os.path.isfile(config_path):
        _check_resumable(_read_json(config_path), run_meta, config_path)

    def make_state(variables):
        return TrainState.create(params=variables["params"], batch_stats=variables["batch_stats"],
                                 tx=tx, rng=jax.random.PRNGKey(cfg.seed),
                                 clip_names=[name for name, _ in output_clips(cfg)])

    if not resume and os.path.isdir(ckpt_dir):
        shutil.rmtree(ckpt_dir)
    ckpt = Checkpointer(ckpt_dir, save_interval_steps=cfg.ckpt_every,
                        max_to_keep=cfg.keep_checkpoints)
    it = iter(loader)
    start = 0
    if resume and ckpt.latest_step() is not None:
        # only the structure is needed: no initialisation is run
        abstract = jax.eval_shape(lambda: make_state(init_variables(model, cfg.seed, cfg.input_size)))
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n_dev,) + x.shape, x.dtype), abstract)
        restored = ckpt.restore(target, replicated=True)
        _check_resumable(restored.meta, run_meta, os.path.join(ckpt_dir, str(restored.step)))
        state, start = restored.state, restored.step
        if restored.data_state is not None:
            it.set_state(restored.data_state)
    else:
        variables = init_variables(model, cfg.seed, cfg.input_size)
        if cfg.pretrained:
            variables = merge_encoder_weights(variables, load_encoder_weights(cfg.pretrained))
        state = replicate(make_state(variables))
    with open(config_path, "w") as f:
        json.dump(run_meta, f, indent=1)
    end = cfg.total_steps if max_steps is None else min(cfg.total_steps, start + int(max_steps))

    log = ProgressLogger(cfg.total_steps, workdir, initial_step=start, desc=desc,
                         disable=not progress,
                         postfix_keys=["loss", "loss/xyz", "loss/pose", "grad_correct"])
    t0 = time.perf_counter()
    compile_seconds = 0.0
    try:
        for s in range(start, end):
            batch = next(it)
            if sym_table is not None:
                batch.update(sym_table.gather(batch["obj_index"]))
            batch = shard_batch({k: batch[k] for k in keys}, n_dev)
            state, metrics = p_step(state, batch)
            if s == start:
                jax.block_until_ready(metrics)
                compile_seconds = time.perf_counter() - t0
            if (s + 1) % cfg.log_every == 0 or s + 1 == end:
                rec = log.log(s + 1, unreplicate(metrics))
                if not math.isfinite(rec.get("loss", 0.0)):
                    raise FloatingPointError(
                        f"training loss is not finite at step {s + 1} (metrics {rec}); "
                        f"the newest checkpoint is step {ckpt.latest_step()} in {ckpt_dir}")
            ckpt.save(s + 1, state, data_state=it.get_state(), meta=run_meta, replicated=True)
        if max_steps is None:
            ckpt.save(end, state, data_state=it.get_state(), meta=run_meta, replicated=True,
                      force=True)
        jax.block_until_ready(state)
        seconds = time.perf_counter() - t0
    finally:
        ckpt.close()
        log.close()
    if log.history:
        keys = [k for k in CURVE_KEYS if any(k in r for r in log.history)]
        log.plot(os.path.join(workdir, "curves.png"), keys=keys, title=desc,
                 smooth=5 if len(log.history) > 20 else 0)
    host_state = jax.device_get(unreplicate(state))
    eval_model = model.clone(axis_name=None)
    return TrainResult(state=host_state, model=eval_model, steps=end, train_seconds=seconds,
                       compile_seconds=compile_seconds, history=list(log.history), workdir=workdir)


def _symmetry_table(models, sym: SymmetryConfig, obj_ids):
    """The padded candidates of the dataset's objects; only the trained ones (``obj_ids``, None:
    all) among ``sym.obj_ids`` (None: those declaring a symmetry) get their symmetries, so S is
    that of the trained objects."""
    chosen = [int(o) for o in models.obj_ids
              if (sym.obj_ids is None and models.symmetric[models.index_of(o)])
              or (sym.obj_ids is not None and int(o) in sym.obj_ids)]
    if obj_ids is not None:
        chosen = [o for o in chosen if o in set(obj_ids)]
    return symmetry_table(models.models_info, models.obj_ids, symmetric_obj_ids=chosen,
                          continuous_steps=sym.continuous_steps)


def config_from_meta(meta: dict):
    """(TrainConfig, ObjectiveConfig) from the ``meta`` saved with a checkpoint of :func:`train`."""
    if not meta or "train" not in meta or "objective" not in meta:
        raise ValueError("checkpoint metadata lacks the 'train'/'objective' configuration "
                         "(not written by lcpose.train.loop.train?)")
    tr = dict(meta["train"])
    tr["model_overrides"] = tuple(tuple(p) for p in tr.get("model_overrides") or ())
    obj = dict(meta["objective"])
    obj["loss_kwargs"] = tuple(tuple(p) for p in obj.get("loss_kwargs") or ())
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return (TrainConfig(**{k: v for k, v in tr.items() if k in names}),
            ObjectiveConfig(**obj))


def load_trained(run_dir, step: Optional[int] = None):
    """Restore a run of :func:`train` for inference: ``(model, variables, meta)``.

    ``run_dir`` is the ``workdir`` given to :func:`train` (with ``ckpt/``); ``step`` defaults
    to the newest checkpoint. ``variables`` = ``{"params": Lookahead slow weights,
    "batch_stats": ...}`` as host arrays; ``model`` is the GDRNet with ``axis_name=None``.
    """
    from lcpose.models import init_variables
    from lcpose.train.state import eval_params

    ckpt_dir = os.path.join(os.fspath(run_dir), "ckpt")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints folder: {ckpt_dir}")
    with Checkpointer(ckpt_dir, async_save=False) as ckpt:
        step = ckpt.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
        meta = _read_json(os.path.join(os.fspath(run_dir), CONFIG_FILE))
        cfg, objective = config_from_meta(meta)
        model = build_model(cfg, objective)
        variables = jax.eval_shape(lambda: init_variables(model, cfg.seed, cfg.input_size))
        tx, _ = _make_tx(_step_key(cfg))
        target = jax.eval_shape(lambda v: TrainState.create(
            params=v["params"], batch_stats=v["batch_stats"], tx=tx, rng=jax.random.PRNGKey(0),
            clip_names=[name for name, _ in output_clips(cfg)]), variables)
        restored = ckpt.restore(target, step)
    state = jax.device_get(restored.state)
    return model, {"params": eval_params(state), "batch_stats": state.batch_stats}, restored.meta


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"run configuration not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
