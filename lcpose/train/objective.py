"""The GDR-Net training objective with an end-to-end PnP loss (LC, BPnP or EPro-PnP).

``make_objective(cfg)`` returns ``loss_fn(outputs, batch, rng, step) -> (loss, metrics)`` for
:func:`lcpose.train.make_train_step`, where ``outputs`` is what :class:`lcpose.models.GDRNet`
returns and ``batch`` holds the keys of :mod:`lcpose.data.pipeline` (``xyz``, ``mask_visib``,
``K_out``, ``R``, ``t``, ``bbox3d``; others are ignored). Per example, with ``m`` the visible
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

averaged over the (local) batch. This is the LC reference recipe (``losses.Loss_fn`` of the
official code with ``w_loss_noc = 1``, ``w_loss_seg = 0.25``, ``w_loss_pose = 0.02``,
``pose_loss_start_step = 2000``): the L1 loss is taken on the normalised coordinates (as
GDR-Net / the reference regress them), so it weighs every object alike whatever its size; the
pose loss is blended in linearly from a BCE of the weight logits against the visible mask,
which (through the spatial softmax) first pulls the weights onto the visible object; the blend
reaches 1 at step ``pose_loss_start_step - 1`` (``pose_loss_nonzero_step``, the reference's
``loss_pose_nz_step``, delays its start: before it only the weight BCE acts). ``pose_loss="none"`` (the "baseline"
variant) keeps ``f = 0`` for the whole run: the weights are only trained to cover the visible
mask, so the same test-time pipeline (top 30 % weights, weighted PnP) applies to both variants
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

from lcpose.correspondences import dense_grid_correspondences
from lcpose.metrics import gradient_correct_mask
from lcpose.models import spatial_softmax_weights
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
]

POSE_LOSSES = ("none", "lc", "bpnp", "epropnp")
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
      "mask" -- the sum over the visible pixels divided by 3 x their number (GDR-Net's
      normalisation; a stronger xyz signal relative to the mask terms).
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
            raise ValueError(f"pose_loss must be one of {POSE_LOSSES}, got {self.pose_loss!r}")
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
    (``use_prior=False``) and the baseline (its weight BCE acts on the logits only).
    """
    if cfg.pose_loss in ("none", "bpnp"):
        return False
    if cfg.pose_loss == "lc":
        return bool(cfg.kwargs.get("use_prior", True))
    return True


def pose_blend_factor(step, start_step: int, nonzero_step: int = 0):
    """f = clip((step - n + 1) / (start_step - n + 1e-5), 0, 1) with n = nonzero_step: the LC
    reference's blend of the pose loss (0 before step n - 1, 1 from step start_step - 1)."""
    step = jnp.asarray(step, jnp.float32)
    n = float(nonzero_step)
    return jnp.clip((step - n + 1.0) / (max(float(start_step) - n, 0.0) + 1e-5), 0.0, 1.0)


def box_extent_center(bbox3d):
    """(extent (..., 3), center (..., 3)) of an axis-aligned model box given by its corners (..., 8, 3)."""
    lo = jnp.min(bbox3d, axis=-2)
    hi = jnp.max(bbox3d, axis=-2)
    return hi - lo, 0.5 * (lo + hi)


def dense_correspondences(key, xyz_norm, weight_logits, log_scale, bbox3d, stride: int = 2,
                          mask=None):
    """Training correspondences of ONE example: (x3d mm (N, 3), x2d px (N, 2), w2d (N, 2)).

    xyz_norm (h, w, 3) normalised coordinates, weight_logits (h, w, 2), log_scale (2,),
    bbox3d (8, 3). The weights are built from the logits (see the module docstring). With
    ``mask`` (h, w), pixels outside it get weight 0 (``ObjectiveConfig.pose_points="mask"``).
    """
    extent, center = box_extent_center(bbox3d)
    xyz_mm = center + extent * xyz_norm
    w2d = spatial_softmax_weights(weight_logits, log_scale)
    if mask is not None:
        w2d = w2d * (jnp.asarray(mask) > 0).astype(w2d.dtype)[..., None]
    return dense_grid_correspondences(key, xyz_mm, w2d, stride=stride)


def _pose_loss_fn(cfg: ObjectiveConfig) -> Callable:
    """Per-example ``f(key, x2d, x3d, w2d, K, R, t, bbox3d) -> (loss, terms dict)``."""
    kw = cfg.kwargs
    if cfg.pose_loss == "lc":
        from lcpose.losses.lc import lc_loss

        def f(key, x2d, x3d, w2d, K, R, t, bbox3d):
            terms = lc_loss(x2d, x3d, w2d, K, R, t, bbox3d, None, **kw)
            return terms.loss, {"lc/e_cov": terms.e_cov, "lc/e_prior": terms.e_prior,
                                "lc/e_linear": terms.e_linear}
    elif cfg.pose_loss == "bpnp":
        from lcpose.losses.bpnp import bpnp_loss

        def f(key, x2d, x3d, w2d, K, R, t, bbox3d):
            return bpnp_loss(x2d, x3d, w2d, K, R, t, bbox3d, None, **kw).loss, {}
    elif cfg.pose_loss == "epropnp":
        from lcpose.losses.epropnp import epropnp_loss

        def f(key, x2d, x3d, w2d, K, R, t, bbox3d):
            return epropnp_loss(key, x2d, x3d, w2d, K, R, t, None, **kw).loss, {}
    else:
        raise ValueError(f"no pose loss for pose_loss={cfg.pose_loss!r}")
    return f


def _mean_finite(x):
    """Mean over examples, non-finite entries counted as 0 (and reported separately)."""
    ok = jnp.isfinite(x)
    return jnp.mean(jnp.where(ok, x, 0.0)), jnp.sum(~ok)


def make_objective(cfg: ObjectiveConfig):
    """``loss_fn(outputs, batch, rng, step) -> (loss, metrics)`` for ``make_train_step``.

    Metrics: ``loss/xyz``, ``loss/mask``, ``loss/weight_bce``, ``loss/pose`` (the unweighted
    pose loss, batch mean), ``pose_blend`` (f), ``pose_nonfinite`` (examples whose pose loss
    was not finite; they contribute 0), ``log_scale`` (mean log weight sum), for LC also
    ``lc/e_cov``, ``lc/e_prior``, ``lc/e_linear`` (batch means), and ``grad_correct``
    (see the module docstring).
    """
    pose_fn = None if cfg.pose_loss == "none" else _pose_loss_fn(cfg)
    every = int(cfg.grad_metric_every)

    def loss_fn(outputs, batch, rng, step):
        xyz = outputs["xyz"]
        dtype = xyz.dtype
        sym_metrics = {}
        if cfg.symmetry is not None:
            # Symmetry-aware ground truth: re-map "xyz", "R", "t" before every loss (its own
            # key, so the other random draws are those of a run without it).
            ext, cen = box_extent_center(jnp.asarray(batch["bbox3d"], dtype))
            batch, sym_metrics = symmetry_aware_batch(
                jax.random.fold_in(rng, 0x5E7), batch, cen[:, None, None] + ext[:, None, None] * xyz,
                step, cfg.symmetry)
        mask = jnp.asarray(batch["mask_visib"], dtype)                       # (B, h, w)
        bbox3d = jnp.asarray(batch["bbox3d"], dtype)
        extent, center = box_extent_center(bbox3d)                           # (B, 3)
        m = mask[..., None]
        target = (jnp.asarray(batch["xyz"], dtype) - center[:, None, None]) / extent[:, None, None]
        diff = jnp.abs(xyz * m - target * m)
        if cfg.xyz_norm == "mask":
            l_xyz = jnp.sum(diff) / jnp.maximum(3.0 * jnp.sum(mask), 1.0)
        else:
            l_xyz = jnp.mean(diff)
        l_mask = jnp.mean(optax.sigmoid_binary_cross_entropy(outputs["mask_logits"][..., 0], mask))
        wl = outputs["weight_logits"]
        l_wbce = jnp.mean(optax.sigmoid_binary_cross_entropy(wl, jnp.broadcast_to(m, wl.shape)))

        metrics = {"loss/xyz": l_xyz, "loss/mask": l_mask, "loss/weight_bce": l_wbce,
                   "log_scale": jnp.mean(outputs["log_scale"]), **sym_metrics}
        loss = cfg.xyz_weight * l_xyz + cfg.mask_weight * l_mask
        if pose_fn is None:
            metrics["pose_blend"] = jnp.zeros((), dtype)
            return loss + cfg.pose_weight * l_wbce, metrics

        B = xyz.shape[0]
        k_corr, k_pose = jax.random.split(rng)
        point_mask = mask if cfg.pose_points == "mask" else None
        x3d, x2d, w2d = jax.vmap(
            lambda k, x, l, s, b, m: dense_correspondences(k, x, l, s, b, cfg.stride, m),
            in_axes=(0, 0, 0, 0, 0, None if point_mask is None else 0),
        )(jax.random.split(k_corr, B), xyz, wl, outputs["log_scale"], bbox3d, point_mask)
        K = jnp.asarray(batch["K_out"], dtype)
        R = jnp.asarray(batch["R"], dtype)
        t = jnp.asarray(batch["t"], dtype)
        pose_keys = jax.random.split(k_pose, B)

        per_example = jax.vmap(pose_fn)
        l_pose_b, terms = per_example(pose_keys, x2d, x3d, w2d, K, R, t, bbox3d)
        l_pose, n_bad = _mean_finite(l_pose_b)
        f = pose_blend_factor(step, cfg.pose_loss_start_step, cfg.pose_loss_nonzero_step).astype(dtype)
        loss = loss + cfg.pose_weight * (f * l_pose + (1.0 - f) * l_wbce)
        metrics.update({"loss/pose": l_pose, "pose_blend": f, "pose_nonfinite": n_bad})
        for k, v in terms.items():
            metrics[k] = _mean_finite(v)[0]

        if every > 0:
            sg = jax.lax.stop_gradient
            args = tuple(sg(a) for a in (x2d, x3d, w2d, K, R, t, bbox3d))

            def grad_metric():
                def total(x3d_):
                    lb, _ = per_example(pose_keys, args[0], x3d_, *args[2:])
                    return jnp.sum(jnp.where(jnp.isfinite(lb), lb, 0.0))

                g = jax.grad(total)(args[1])
                correct, counted = jax.vmap(gradient_correct_mask)(g, args[1], args[0], K, R, t)
                return (jnp.sum(correct) / jnp.maximum(jnp.sum(counted), 1)).astype(dtype)

            metrics["grad_correct"] = jax.lax.cond(
                (step + 1) % every == 0, grad_metric, lambda: jnp.full((), jnp.nan, dtype))
        return loss, metrics

    return loss_fn
