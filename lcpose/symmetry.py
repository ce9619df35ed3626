"""Symmetry-aware ground truth for training (the LC paper's YCB-V scheme).

A symmetric object has several ground-truth poses that look the same: with a symmetry
(S, t_s) of the model (``X -> S X + t_s`` maps the model onto itself,
:func:`lcpose.metrics.symmetry_transformations`), the pose (R S, t + R t_s) renders exactly like
(R, t). Its object-coordinate target is then ambiguous, and a network trained on the one
annotated pose learns the average of the equivalent coordinates. The paper (Sec. 4, YCB-V) picks
the ground truth on the fly: among the equivalent poses, the one whose 3D object coordinates at
randomly selected visible 2D locations are closest on average to the network's predicted ones;
the re-mapped coordinate target and the selected pose then replace the annotation in every loss
(the coordinate L1 and the pose loss, LC included).

Under the candidate (R S_k, t + R t_k) the surface point seen at a pixel (camera point
X_cam = R X + t) has the object coordinates

    X_k = S_k^T (X - t_k)                because (R S_k) X_k + t + R t_k = R X + t,

so the re-mapped target is exact: the same camera points, hence the same pixels (no
re-rendering). The selection (one instance; ``jax.vmap`` for a batch)::

    P random visible pixels i (without replacement; fewer if fewer are visible)
    e_k = mean_i || xyz_pred_i - S_k^T (X_i - t_k) ||          (mm)
    k*  = argmin over the valid candidates of e_k                (the identity k = 0 when no
                                                                   pixel is visible)

The LC reference (``fulliu/lc``, ``symmetry.select_pose_3d``) uses P = 256 pixels of the
visible mask, a continuous symmetry discretised into 384 rotations, only the PoseCNN
symmetric objects of YCB-V (13, 16, 19, 20, 21) and selects from the first step (its
``sym_aware_start`` defaults to 0 and the GDR-Net YCB-V configuration does not set it);
``SymmetryConfig`` has those defaults and a ``start_step`` before which the annotation is kept.

Host side: :func:`symmetry_table` pads the candidates of every object of a dataset to one
count S (static shapes, a ``valid`` mask); ``SymmetryTable.gather(obj_index)`` gives the
per-example arrays (keys ``sym_R``, ``sym_t``, ``sym_valid``) that the training objective
reads (:func:`symmetry_aware_example`).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lcpose.metrics import symmetry_transformations

__all__ = [
    "SymmetryConfig",
    "SymmetryTable",
    "SymmetricGT",
    "SYMMETRY_KEYS",
    "symmetry_table",
    "candidate_coordinates",
    "select_symmetric_gt",
    "symmetry_aware_example",
    "symmetry_aware_batch",
    "symmetric_xyz_error",
]

# Per-example keys added to a training batch by SymmetryTable.gather.
SYMMETRY_KEYS = ("sym_R", "sym_t", "sym_valid")


@dataclasses.dataclass(frozen=True)
class SymmetryConfig:
    """Symmetry-aware ground-truth selection in training (hashable).

    obj_ids: the objects treated as symmetric (None: every object whose models_info declares a
      symmetry; YCB-V in the paper: the PoseCNN set 13, 16, 19, 20, 21).
    start_step: keep the annotated pose before this step (0: select from the first step, as
      the LC reference does).
    num_points: random visible pixels compared per example (256 in the reference).
    continuous_steps: rotations that discretise a continuous symmetry (384 in the reference).
    """

    obj_ids: Optional[Tuple[int, ...]] = None
    start_step: int = 0
    num_points: int = 256
    continuous_steps: int = 384

    def __post_init__(self):
        if self.obj_ids is not None:
            object.__setattr__(self, "obj_ids", tuple(int(o) for o in self.obj_ids))
        if int(self.start_step) < 0:
            raise ValueError(f"start_step must be >= 0, got {self.start_step}")
        if int(self.num_points) < 1:
            raise ValueError(f"num_points must be >= 1, got {self.num_points}")
        if int(self.continuous_steps) < 1:
            raise ValueError(f"continuous_steps must be >= 1, got {self.continuous_steps}")


class SymmetryTable(NamedTuple):
    """Symmetry candidates of the objects of a dataset, padded to one count S.

    R (n, S, 3, 3), t (n, S, 3) float32, valid (n, S) bool; row j belongs to the j-th object id
    given to :func:`symmetry_table` (a dataset's ``obj_index``). Entry 0 is the identity.
    """

    R: np.ndarray
    t: np.ndarray
    valid: np.ndarray

    def gather(self, obj_index) -> dict:
        """Per-example arrays for a batch: {"sym_R" (B, S, 3, 3), "sym_t" (B, S, 3), "sym_valid" (B, S)}."""
        idx = np.asarray(obj_index).astype(np.int64)
        return {"sym_R": self.R[idx], "sym_t": self.t[idx], "sym_valid": self.valid[idx]}


def symmetry_table(models_info: Mapping[int, Mapping], obj_ids: Sequence[int], *,
                   symmetric_obj_ids: Optional[Sequence[int]] = None,
                   continuous_steps: int = 384) -> SymmetryTable:
    """The padded candidates (:class:`SymmetryTable`) of ``obj_ids`` (host side, numpy).

    models_info: {obj_id: models_info.json entry}. symmetric_obj_ids: the objects whose
    symmetries are used (None: all of ``obj_ids``); the others, and objects without declared
    symmetries, get the identity only. A continuous symmetry is discretised into
    ``continuous_steps`` rotations (combined with the discrete ones as bop_toolkit does).
    Padding repeats the identity with ``valid`` False.
    """
    obj_ids = [int(o) for o in obj_ids]
    if not obj_ids:
        raise ValueError("obj_ids is empty")
    chosen = set(obj_ids if symmetric_obj_ids is None else (int(o) for o in symmetric_obj_ids))
    rows = []
    for o in obj_ids:
        if o not in models_info:
            raise ValueError(f"models_info has no entry for obj_id {o}")
        if o in chosen:
            rows.append(symmetry_transformations(models_info[o], continuous_steps=continuous_steps))
        else:
            rows.append((np.eye(3)[None], np.zeros((1, 3))))
    S = max(len(r) for r, _ in rows)
    R = np.tile(np.eye(3), (len(rows), S, 1, 1))
    t = np.zeros((len(rows), S, 3))
    valid = np.zeros((len(rows), S), bool)
    for j, (r, tt) in enumerate(rows):
        R[j, :len(r)], t[j, :len(r)], valid[j, :len(r)] = r, tt, True
    return SymmetryTable(R.astype(np.float32), t.astype(np.float32), valid)


class SymmetricGT(NamedTuple):
    """The selected equivalent ground truth of one instance.

    xyz (h, w, 3): the re-mapped coordinate target (mm; 0 where the input map is 0);
    R (3, 3), t (3,): the equivalent pose (R_gt S_k, t_gt + R_gt t_k); index: k (int32);
    errors (S,): mean distance (mm) of each candidate at the sampled pixels (+inf for padded
    candidates); points: how many pixels were compared.
    """

    xyz: jax.Array
    R: jax.Array
    t: jax.Array
    index: jax.Array
    errors: jax.Array
    points: jax.Array


def candidate_coordinates(x_mm, sym_R, sym_t):
    """Object coordinates of the points ``x_mm`` (..., 3) under every candidate: (S, ..., 3).

    X_k = S_k^T (X - t_k) (see the module docstring)."""
    d = x_mm[None] - sym_t.reshape((sym_t.shape[0],) + (1,) * (x_mm.ndim - 1) + (3,))
    return jnp.einsum("s...j,sjk->s...k", d, sym_R)


def _sample_visible(key, mask, num_points: int):
    """Indices (P,) of up to P random pixels of ``mask`` (flattened) without replacement, and
    which of them are real (P,) -- a random permutation of the visible pixels, cut at P."""
    m = mask.reshape(-1) > 0
    P = min(int(num_points), m.shape[0])
    scores = jnp.where(m, jax.random.uniform(key, m.shape), -1.0)
    top, idx = jax.lax.top_k(scores, P)
    return idx, top >= 0.0


def _check_shapes(xyz_pred, xyz_gt, mask, sym_R, sym_t, sym_valid):
    """ValueError naming the argument (shapes are static, so this also runs under jit/vmap)."""
    g = np.shape(xyz_gt)
    if len(g) != 3 or g[-1] != 3:
        raise ValueError(f"`xyz_gt` must be an (h, w, 3) coordinate map, got shape {g}")
    if np.shape(xyz_pred) != g:
        raise ValueError(f"`xyz_pred` must have the shape of xyz_gt {g}, got {np.shape(xyz_pred)}")
    if np.shape(mask) != g[:2]:
        raise ValueError(f"`mask` must be {g[:2]}, got shape {np.shape(mask)}")
    sR = np.shape(sym_R)
    if len(sR) != 3 or sR[1:] != (3, 3) or sR[0] < 1:
        raise ValueError(f"`sym_R` must be (S, 3, 3) with S >= 1, got shape {sR}")
    if np.shape(sym_t) != (sR[0], 3):
        raise ValueError(f"`sym_t` must be ({sR[0]}, 3), got shape {np.shape(sym_t)}")
    if sym_valid is not None and np.shape(sym_valid) != (sR[0],):
        raise ValueError(f"`sym_valid` must be ({sR[0]},), got shape {np.shape(sym_valid)}")


def select_symmetric_gt(key, xyz_pred, xyz_gt, mask, R_gt, t_gt, sym_R, sym_t, sym_valid=None, *,
                        num_points: int = 256, enabled=True) -> SymmetricGT:
    """The equivalent ground truth nearest to a prediction (one instance; jit/vmap).

    key: PRNG key of the random pixels. xyz_pred (h, w, 3): predicted object coordinates in mm
    (no gradient flows through the selection); xyz_gt (h, w, 3): the annotated coordinate map
    (mm, 0 off-object); mask (h, w): the visible mask the pixels are drawn from; R_gt (3, 3),
    t_gt (3,): the annotated pose; sym_R (S, 3, 3), sym_t (S, 3), sym_valid (S,): the object's
    candidates (entry 0 the identity; :func:`symmetry_table`). enabled: a (traced) bool; when
    False the annotation is returned (candidate 0; e.g. before the start step). See the module
    docstring.
    """
    _check_shapes(xyz_pred, xyz_gt, mask, sym_R, sym_t, sym_valid)
    xyz_gt = jnp.asarray(xyz_gt)
    dtype = xyz_gt.dtype
    xyz_pred = jax.lax.stop_gradient(jnp.asarray(xyz_pred, dtype))
    sym_R, sym_t = jnp.asarray(sym_R, dtype), jnp.asarray(sym_t, dtype)
    S = sym_R.shape[0]
    sym_valid = jnp.ones((S,), bool) if sym_valid is None else jnp.asarray(sym_valid) > 0
    idx, real = _sample_visible(key, mask, num_points)
    x_gt = xyz_gt.reshape(-1, 3)[idx]                                        # (P, 3)
    x_pred = xyz_pred.reshape(-1, 3)[idx]
    cand = candidate_coordinates(x_gt, sym_R, sym_t)                         # (S, P, 3)
    dist = jnp.linalg.norm(cand - x_pred[None], axis=-1)                     # (S, P)
    n = jnp.sum(real)
    err = jnp.sum(jnp.where(real[None], dist, 0.0), axis=-1) / jnp.maximum(n, 1).astype(dtype)
    err = jnp.where(sym_valid, err, jnp.inf)
    # Non-finite errors (a NaN prediction) and instances without a visible pixel fall back to
    # the annotation (the argmin of all-inf is index 0, the identity).
    usable = jnp.isfinite(err) & (n > 0) & jnp.asarray(enabled, bool)
    k = jnp.argmin(jnp.where(usable, err, jnp.inf)).astype(jnp.int32)
    S_k, t_k = sym_R[k], sym_t[k]
    on = jnp.any(xyz_gt != 0, axis=-1, keepdims=True)
    xyz = jnp.where(on, candidate_coordinates(xyz_gt, S_k[None], t_k[None])[0], 0.0)
    R_gt = jnp.asarray(R_gt, dtype)
    t_gt = jnp.asarray(t_gt, dtype)
    return SymmetricGT(xyz=xyz, R=R_gt @ S_k, t=t_gt + R_gt @ t_k, index=k, errors=err,
                       points=n.astype(jnp.int32))


def symmetry_aware_example(key, example: Mapping, xyz_pred_mm, step, cfg: SymmetryConfig):
    """``example`` with "xyz", "R", "t" replaced by the selected equivalent ground truth.

    One example of a training batch (a dict with "xyz", "mask_visib", "R", "t" and the
    :data:`SYMMETRY_KEYS` of ``SymmetryTable.gather``); ``xyz_pred_mm`` (h, w, 3) the network's
    coordinates in mm. Before ``cfg.start_step`` the annotation is kept (candidate 0). Returns
    (example', SymmetricGT).
    """
    sel = select_symmetric_gt(key, xyz_pred_mm, jnp.asarray(example["xyz"]), example["mask_visib"],
                              example["R"], example["t"], example["sym_R"], example["sym_t"],
                              example["sym_valid"], num_points=cfg.num_points,
                              enabled=jnp.asarray(step) >= int(cfg.start_step))
    out = dict(example)
    out.update(xyz=sel.xyz, R=sel.R, t=sel.t)
    return out, sel


def symmetry_aware_batch(key, batch: Mapping, xyz_pred_mm, step, cfg: SymmetryConfig):
    """:func:`symmetry_aware_example` over a batch (vmapped): (batch', metrics).

    ``batch`` holds (B, ...) arrays with the keys of ``symmetry_aware_example``; "xyz", "R" and
    "t" are replaced, the other keys are passed through. Metrics: ``sym/switched`` (share of
    the examples whose selected pose is not the annotated one) and ``sym/error_mm`` (mean
    error of the selected candidate at the sampled pixels, over the examples with a visible
    pixel).
    """
    B = xyz_pred_mm.shape[0]
    names = ("xyz", "mask_visib", "R", "t") + SYMMETRY_KEYS
    ex = {k: jnp.asarray(batch[k]) for k in names}
    out, sel = jax.vmap(lambda k, e, p: symmetry_aware_example(k, e, p, step, cfg))(
        jax.random.split(key, B), ex, xyz_pred_mm)
    new = dict(batch)
    new.update(xyz=out["xyz"], R=out["R"], t=out["t"])
    chosen = jnp.take_along_axis(sel.errors, sel.index[:, None], axis=1)[:, 0]
    seen = (sel.points > 0) & jnp.isfinite(chosen)
    dtype = out["xyz"].dtype
    metrics = {"sym/switched": jnp.mean((sel.index != 0).astype(dtype)),
               "sym/error_mm": jnp.sum(jnp.where(seen, chosen, 0.0)) / jnp.maximum(jnp.sum(seen), 1).astype(dtype)}
    return new, metrics


def symmetric_xyz_error(xyz_pred, xyz_gt, mask, sym_R, sym_t, sym_valid=None):
    """Mean coordinate error (mm) over the visible pixels, in the symmetric frame (one instance).

    min over the candidates k of mean_i || xyz_pred_i - S_k^T (X_i - t_k) || over the pixels of
    ``mask``: the error of a prediction that may have picked any equivalent pose (the
    identity-only table gives the plain error). NaN when no pixel is visible.
    """
    m = (jnp.asarray(mask) > 0).reshape(-1)
    x_gt = xyz_gt.reshape(-1, 3)
    x_pred = jnp.asarray(xyz_pred, x_gt.dtype).reshape(-1, 3)
    sym_R, sym_t = jnp.asarray(sym_R, x_gt.dtype), jnp.asarray(sym_t, x_gt.dtype)
    valid = jnp.ones(sym_R.shape[:1], bool) if sym_valid is None else jnp.asarray(sym_valid) > 0

    def one(Rk, tk):
        d = jnp.linalg.norm((x_gt - tk) @ Rk - x_pred, axis=-1)
        return jnp.sum(jnp.where(m, d, 0.0))

    sums = jax.lax.map(lambda a: one(*a), (sym_R, sym_t), batch_size=min(32, sym_R.shape[0]))
    n = jnp.sum(m)
    best = jnp.min(jnp.where(valid, sums, jnp.inf))
    return jnp.where(n > 0, best / jnp.maximum(n, 1).astype(x_gt.dtype), jnp.nan)
