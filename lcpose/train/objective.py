"""The training objective: a head's own loss plus an end-to-end PnP loss (LC, BPnP, EPro-PnP, ...).

``make_objective(cfg, head="gdrnet")`` returns ``loss_fn(outputs, batch, rng, step) -> (loss,
metrics)`` for :func:`lcpose.train.make_train_step`. It is head-generic
(:mod:`lcpose.models.registry`): per example, ``loss = surrogate_loss + pose_weight * (f *
L_pose + (1 - f) * pose_warmup_loss)`` with ``L_pose`` the registered pose loss
(:mod:`lcpose.losses.registry`) on ``decode_train``'s correspondences, averaged over the batch.

For the dense GDR-Net head (:mod:`lcpose.models.gdrnet`), ``outputs`` is what
:class:`lcpose.models.GDRNet` returns and ``batch`` holds the keys of :mod:`lcpose.data.pipeline`
(``xyz``, ``mask_visib``, ``K_out``, ``R``, ``t``, ``bbox3d``; others are ignored). Per example, with ``m`` the visible
mask at the output resolution (h x w) and ``xyz*`` the predicted object coordinates in the
model's normalised frame (``x_mm = center + extent * xyz``, ``lcpose.models.xyz_to_mm``; extent
and center come from the example's ``bbox3d``)::

    L_xyz  = mean over (h, w, 3) of | m * xyz* - m * mm_to_xyz(xyz_gt) |      (normalised units;
             xyz_norm="mask": the sum divided by 3 x the visible pixels, as GDR-Net)
    L_mask = mean over (h, w) of BCE(mask_logits, m)
    L_wbce = mean over (h, w, 2) of BCE(weight_logits, m)                      (both channels)
    L_pose = the pose loss on the dense correspondences (below)
    f      = clip((step - n + 1) / (pose_loss_start_step - n + 1e-5), 0, 1),
             n = pose_loss_nonzero_step (0 unless set)
    loss   = xyz_weight L_xyz + mask_weight L_mask
             + pose_weight (f L_pose + (1 - f) L_wbce)

averaged over the (local) batch (each term a per-example mean, then the batch mean). This is
the LC reference recipe (``losses.Loss_fn`` of the
official code with ``w_loss_noc = 1``, ``w_loss_seg = 0.25``, ``w_loss_pose = 0.02``,
``pose_loss_start_step = 2000``): the L1 loss is taken on the normalised coordinates (as
GDR-Net / the reference regress them), so it weighs every object alike whatever its size; the
pose loss is blended in linearly from a BCE of the weight logits against the visible mask,
which (through the spatial softmax) first pulls the weights onto the visible object; the blend
reaches 1 at step ``pose_loss_start_step - 1`` (``pose_loss_nonzero_step``, the reference's
``loss_pose_nz_step``, delays its start: before it only the weight BCE acts). ``pose_loss="none"`` (the "baseline"
variant) keeps ``f = 0`` for the whole run: the weights are only trained to cover the visible
mask, so the same test-time pipeline (top weights, weighted PnP) applies to both variants
and the only difference between them is the PnP loss.

Dense correspondences (training): :func:`lcpose.correspondences.dense_grid_correspondences`
on the predicted xyz map converted to mm and the weights
``spatial_softmax_weights(weight_logits, log_scale)`` -- built from the *logits* output so that
the train step's clipper on the ``weight_logits`` gradient (``output_clip``) sees the whole
pose-loss gradient -- every ``stride``-th pixel from a random 0/1 offset per example, all
valid, 2D points in output-grid pixels with ``K_out``.

Gradient correctness (the paper's Table 3) is measured during training: every
``grad_metric_every`` steps (when ``(step + 1) % grad_metric_every == 0``, i.e. on the steps a
loop that logs every ``grad_metric_every`` updates records), the gradient of the pose loss
w.r.t. the predicted 3D points is computed on detached inputs and scored with
:func:`lcpose.metrics.gradient_correct_mask`, pooled over the points of the batch
(``grad_correct``); on the other steps the metric is NaN.

Pose losses: ``"lc"`` (:func:`lcpose.losses.lc.lc_loss`, keyword arguments from
``loss_kwargs``, e.g. the Table 4 ablations ``detach_residual_cov``, ``detach_weights_cov``,
``use_cov``, ``use_linear``, ``use_prior``), ``"bpnp"``
(:func:`lcpose.losses.bpnp.bpnp_loss`), ``"epropnp"`` (:func:`lcpose.losses.epropnp.epropnp_loss`,
one PRNG key per example) and ``"none"``. :func:`uses_scale_branch` says whether the
network should predict the global weight scale for a configuration (not for BPnP, LC without
E_prior and the baseline, whose losses cannot constrain it).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from lcpose.geometry import box_extent_center
from lcpose.losses.registry import POSE_LOSSES, PoseLossInputs, get_pose_loss
from lcpose.metrics import gradient_correct_mask
from lcpose.models.registry import model_module
from lcpose.symmetry import SymmetryConfig, symmetry_aware_batch

__all__ = [
    "ObjectiveConfig",
    "POSE_LOSSES",
    "POSE_POINTS",
    "make_objective",
    "pose_blend_factor",
    "uses_scale_branch",
    "box_extent_center",
    "dense_correspondences",
    "check_pose_points",
]

POSE_POINTS = ("all", "mask")   # ObjectiveConfig.pose_points


def _items(d) -> Tuple[Tuple[str, Any], ...]:
    if d is None:
        return ()
    if isinstance(d, Mapping):
        return tuple(sorted((str(k), v) for k, v in d.items()))
    return tuple((str(k), v) for k, v in d)


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """What the training objective computes (hashable; see the module docstring).

    pose_loss: "none" | "lc" | "bpnp" | "epropnp".
    pose_weight / xyz_weight / mask_weight: the loss weights (0.02 / 1 / 0.25; ZebraPose-LC
      uses pose_weight 0.03).
    pose_loss_start_step: the pose loss is fully on from this step (2000 in the paper), blended
      in linearly from the weight-logit BCE before it. 0: on from the first step.
    pose_loss_nonzero_step: the blend starts here (the reference's ``loss_pose_nz_step``; 0 in
      its configurations): before it the weights are trained by the weight BCE alone.
    stride: correspondence sampling stride on the output map (2: 1024 points on 64x64).
    loss_kwargs: keyword arguments of the pose loss, as a tuple of (name, value) pairs or a
      mapping (normalised to sorted pairs), e.g. (("use_prior", False),).
    grad_metric_every: measure gradient correctness every this many steps (0: never).
    xyz_norm: "all" -- L_xyz is the mean over all h w 3 elements (the LC reference);
      "mask" -- the sum over the visible pixels divided by 3 x their number, per example
      (GDR-Net's normalisation; a stronger xyz signal relative to the mask terms).
    pose_points: "all" -- every sampled pixel enters the pose loss (the LC reference);
      "mask" -- only those inside the ground-truth visible mask (the others get weight 0), so
      the pose loss cannot lean on background pixels, whose 3D points no surrogate loss
      supervises. Pair it with ``PnPConfig(use_mask=True)`` at test time (the reference's
      "quantile_in_mask" selection). Used by the CPU configuration, where the LC loss otherwise
      puts part of the weight on background pixels that do not carry over to test crops
      (BUILD.md, "The main job").
    symmetry: symmetry-aware ground truth (:class:`lcpose.symmetry.SymmetryConfig`; None: off,
      the LC paper uses it for YCB-V only): before every loss the annotated pose and xyz
      target of a symmetric object are replaced by the equivalent nearest to the prediction.
      The batch then needs the keys ``lcpose.symmetry.SYMMETRY_KEYS`` (the train loop adds them).
    """

    pose_loss: str = "lc"
    pose_weight: float = 0.02
    xyz_weight: float = 1.0
    mask_weight: float = 0.25
    pose_loss_start_step: int = 2000
    pose_loss_nonzero_step: int = 0
    stride: int = 2
    loss_kwargs: Any = ()
    grad_metric_every: int = 0
    xyz_norm: str = "all"
    pose_points: str = "all"
    symmetry: Optional[SymmetryConfig] = None

    def __post_init__(self):
        if self.pose_loss not in POSE_LOSSES:
            raise ValueError(f"pose_loss must be one of {sorted(POSE_LOSSES)} (lcpose.losses.registry), "
                             f"got {self.pose_loss!r}")
        for name in ("pose_weight", "xyz_weight", "mask_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")
        if int(self.pose_loss_start_step) < 0:
            raise ValueError(f"pose_loss_start_step must be >= 0, got {self.pose_loss_start_step}")
        if not 0 <= int(self.pose_loss_nonzero_step) <= max(int(self.pose_loss_start_step), 0):
            raise ValueError(f"pose_loss_nonzero_step must be in [0, pose_loss_start_step="
                             f"{self.pose_loss_start_step}], got {self.pose_loss_nonzero_step}")
        if not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"stride must be a positive int, got {self.stride!r}")
        if int(self.grad_metric_every) < 0:
            raise ValueError(f"grad_metric_every must be >= 0, got {self.grad_metric_every}")
        if self.xyz_norm not in ("all", "mask"):
            raise ValueError(f"xyz_norm must be 'all' or 'mask', got {self.xyz_norm!r}")
        check_pose_points(self.pose_points)
        if isinstance(self.symmetry, Mapping):        # from a saved configuration (JSON)
            object.__setattr__(self, "symmetry", SymmetryConfig(**self.symmetry))
        if self.symmetry is not None and not isinstance(self.symmetry, SymmetryConfig):
            raise ValueError(f"symmetry must be a SymmetryConfig or None, got {self.symmetry!r}")
        object.__setattr__(self, "loss_kwargs", _items(self.loss_kwargs))
        if self.pose_loss == "none" and self.loss_kwargs:
            raise ValueError("loss_kwargs given but pose_loss='none'")

    @property
    def kwargs(self) -> dict:
        return dict(self.loss_kwargs)


def check_pose_points(pose_points: str) -> None:
    """ValueError naming ``pose_points`` unless it is one of POSE_POINTS."""
    if pose_points not in POSE_POINTS:
        raise ValueError(f"pose_points must be one of {POSE_POINTS}, got {pose_points!r}")


def uses_scale_branch(cfg: ObjectiveConfig) -> bool:
    """Whether the network should predict the global weight scale for this objective.

    Off where the loss cannot constrain the scale of the weights (DESIGN.md): BPnP (the PnP
    solution does not change when all weights are scaled), LC without E_prior
    (``use_prior=False``) and the baseline (its weight BCE acts on the logits only). Each
    registered loss says so (``lcpose.losses.registry.PoseLoss.uses_scale``).
    """
    return get_pose_loss(cfg.pose_loss).uses_scale(cfg.kwargs)


def pose_blend_factor(step, start_step: int, nonzero_step: int = 0):
    """f = clip((step - n + 1) / (start_step - n + 1e-5), 0, 1) with n = nonzero_step: the LC
    reference's blend of the pose loss (0 before step n - 1, 1 from step start_step - 1)."""
    step = jnp.asarray(step, jnp.float32)
    n = float(nonzero_step)
    return jnp.clip((step - n + 1.0) / (max(float(start_step) - n, 0.0) + 1e-5), 0.0, 1.0)


def dense_correspondences(key, xyz_norm, weight_logits, log_scale, bbox3d, stride: int = 2,
                          mask=None):
    """Training correspondences of ONE example: (x3d mm (N, 3), x2d px (N, 2), w2d (N, 2)).

    The dense head's sampler (:func:`lcpose.models.gdrnet.train_correspondences`) as a tuple.
    """
    from lcpose.models.gdrnet import train_correspondences

    c = train_correspondences(key, xyz_norm, weight_logits, log_scale, bbox3d, stride, mask)
    return c.x3d, c.x2d, c.w2d


def _mean_finite(x):
    """Mean over examples, non-finite entries counted as 0 (and reported separately)."""
    ok = jnp.isfinite(x)
    return jnp.mean(jnp.where(ok, x, 0.0)), jnp.sum(~ok)


def make_objective(cfg: ObjectiveConfig, head="gdrnet"):
    """``loss_fn(outputs, batch, rng, step) -> (loss, metrics)`` for ``make_train_step``.

    ``head``: the model whose outputs these are -- a name of :mod:`lcpose.models.registry`,
    its module or a flax Module of it (default the dense GDR-Net head). Per example the head's
    ``surrogate_loss`` and ``decode_train`` are vmapped over the batch; the pose loss is
    ``lcpose.losses.registry.get_pose_loss(cfg.pose_loss)`` on the decoded correspondences.

    Metrics: the batch means of the head's surrogate metrics (GDR-Net: ``loss/xyz``,
    ``loss/mask``, ``loss/weight_bce``, ``log_scale``), ``loss/pose`` (the unweighted pose
    loss, batch mean), ``pose_blend`` (f), ``pose_nonfinite`` (examples whose pose loss was
    not finite; they contribute 0), the pose loss's metrics (LC: ``lc/e_cov``, ``lc/e_prior``,
    ``lc/e_linear``, batch means), and ``grad_correct`` (see the module docstring). With
    ``cfg.symmetry``, the batch's "xyz", "R", "t" are first re-mapped to the selected symmetric
    equivalent (:func:`lcpose.symmetry.symmetry_aware_batch`; the head must define
    ``predicted_xyz_mm``), and ``sym/switched`` / ``sym/error_mm`` are logged.
    """
    mod = model_module(head)
    pose = get_pose_loss(cfg.pose_loss)
    kw = cfg.kwargs
    warmup = getattr(mod, "pose_warmup_loss", None)
    every = int(cfg.grad_metric_every)
    xyz_of = getattr(mod, "predicted_xyz_mm", None)
    if cfg.symmetry is not None and xyz_of is None:
        raise ValueError(f"symmetry-aware ground truth (ObjectiveConfig.symmetry) needs the head's "
                         f"predicted_xyz_mm(outputs, example); {mod.__name__} has none")

    def per_example_pose(inputs):
        return jax.vmap(lambda i: pose.fn(i, **kw))(inputs)

    def loss_fn(outputs, batch, rng, step):
        sym_metrics = {}
        if cfg.symmetry is not None:
            # Symmetry-aware ground truth: "xyz", "R", "t" re-mapped before every loss (its own
            # key, so the other random draws are those of a run without it).
            batch, sym_metrics = symmetry_aware_batch(
                jax.random.fold_in(rng, 0x5E7), batch, jax.vmap(xyz_of)(outputs, batch), step,
                cfg.symmetry)
        sur_b, sur_metrics = jax.vmap(lambda o, e: mod.surrogate_loss(o, e, cfg))(outputs, batch)
        loss = jnp.mean(sur_b)
        metrics = {k: jnp.mean(v) for k, v in sur_metrics.items()}
        metrics.update(sym_metrics)
        dtype = sur_b.dtype
        l_warm = (jnp.mean(jax.vmap(lambda o, e: warmup(o, e, cfg))(outputs, batch))
                  if warmup is not None else jnp.zeros((), dtype))
        if not pose.active:
            metrics["pose_blend"] = jnp.zeros((), dtype)
            return loss + cfg.pose_weight * l_warm, metrics

        B = sur_b.shape[0]
        k_corr, k_pose = jax.random.split(rng)
        corr, _ = jax.vmap(lambda k, o, e: mod.decode_train(k, o, e, cfg))(
            jax.random.split(k_corr, B), outputs, batch)
        dtype = corr.x3d.dtype
        inputs = PoseLossInputs(corr=corr, K=jnp.asarray(batch["K_out"], dtype),
                                R=jnp.asarray(batch["R"], dtype), t=jnp.asarray(batch["t"], dtype),
                                bbox3d=jnp.asarray(batch["bbox3d"], dtype),
                                key=jax.random.split(k_pose, B))
        l_pose_b, terms = per_example_pose(inputs)
        l_pose, n_bad = _mean_finite(l_pose_b)
        f = pose_blend_factor(step, cfg.pose_loss_start_step, cfg.pose_loss_nonzero_step).astype(dtype)
        loss = loss + cfg.pose_weight * (f * l_pose + (1.0 - f) * l_warm)
        metrics.update({"loss/pose": l_pose, "pose_blend": f, "pose_nonfinite": n_bad})
        for k, v in terms.items():
            metrics[k] = _mean_finite(v)[0]

        if every > 0:
            fixed = jax.tree.map(jax.lax.stop_gradient, inputs)

            def grad_metric():
                def total(x3d_):
                    lb, _ = per_example_pose(fixed._replace(corr=fixed.corr._replace(x3d=x3d_)))
                    return jnp.sum(jnp.where(jnp.isfinite(lb), lb, 0.0))

                c = fixed.corr
                g = jax.grad(total)(c.x3d)
                correct, counted = jax.vmap(gradient_correct_mask)(
                    g, c.x3d, c.x2d, fixed.K, fixed.R, fixed.t, c.valid)
                return (jnp.sum(correct) / jnp.maximum(jnp.sum(counted), 1)).astype(dtype)

            metrics["grad_correct"] = jax.lax.cond(
                (step + 1) % every == 0, grad_metric, lambda: jnp.full((), jnp.nan, dtype))
        return loss, metrics

    return loss_fn
