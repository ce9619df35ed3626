"""Pose-error metrics and recall scores with the BOP definitions, plus gradient correctness.

Per-instance errors (jit/vmap friendly, accept numpy or jax arrays, return jax scalars; a batch
is `jax.vmap`)::

    add(R, t, R_gt, t_gt, pts)                  ADD  (bop_toolkit pose_error.add)        [mm]
    add_s(R, t, R_gt, t_gt, pts)                ADD-S / ADI (pose_error.adi)             [mm]
    add_or_add_s(R, t, R_gt, t_gt, pts, symmetric)   ADD(-S): ADD-S for symmetric objects
    mssd(R, t, R_gt, t_gt, pts, sym_R, sym_t)   MSSD (pose_error.mssd)                   [mm]
    mspd(R, t, R_gt, t_gt, K, pts, sym_R, sym_t)     MSPD (pose_error.mspd)              [px]
    rotation_error_deg(R, R_gt)                 re (pose_error.re)                       [deg]
    translation_error(t, t_gt)                  te (pose_error.te)                       [mm]
    gradient_correctness(grad_x3d, x3d, x2d, K, R_gt, t_gt, valid=None)   fraction in [0, 1]
    gradient_correct_mask(...)                  its per-point booleans (correct, counted)

Host-side helpers (numpy; called once per object or once per evaluation)::

    symmetry_transformations(model_info, max_sym_disc_step=0.01) -> (sym_R, sym_t)
    add_recall(errors, diameters, fraction=0.1)     ADD(-S) recall at 10 % of the diameter
    auc(errors, max_threshold=100.0, points=None)   area under the accuracy-threshold curve
    auc_11point(errors, max_threshold=100.0)   the YCB-V "11-point" AUC of GDR-Net / the LC paper
    ar_mssd(errors, diameters), ar_mspd(errors_px, image_width=640)   BOP19 average recalls

Conventions: 3D in mm, 2D in pixels, pose X_cam = R @ X + t (DESIGN.md). `pts` are model
points (N, 3); every per-instance error also takes an optional `valid` (N,) mask so that models
of different sizes can be padded to one N and vmapped together (padded points are ignored; an
instance without any valid point gets the error +inf, which every recall counts as a failure).
Errors follow the floating dtype of their inputs (float32 in stays float32).

Not provided: VSD and AR_VSD (they need rendered depth of the model and the test depth image).
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lcpose.geometry import axis_angle_to_matrix, project, transform

__all__ = [
    "add",
    "add_s",
    "add_or_add_s",
    "rotation_error_deg",
    "translation_error",
    "symmetry_transformations",
    "mssd",
    "mspd",
    "add_recall",
    "auc",
    "auc_11point",
    "ar_mssd",
    "ar_mspd",
    "MSSD_THRESHOLDS",
    "MSPD_THRESHOLDS_PX",
    "gradient_correct_mask",
    "gradient_correctness",
]

# BOP19 thresholds of correctness (scripts/eval_bop19_pose.py), built with the same np.arange
# calls so that the float values, and therefore ties at a threshold, are identical.
MSSD_THRESHOLDS = np.arange(0.05, 0.51, 0.05)  # fractions of the object diameter
MSPD_THRESHOLDS_PX = np.arange(5, 51, 5).astype(np.float64)  # pixels at an image width of 640

# Default chunk sizes: peak memory of ADD-S is chunk x N x 3 floats, of MSSD/MSPD chunk x N x 3.
_NN_CHUNK = 256
_SYM_CHUNK = 32


# ----------------------------------------------------------------------------------------------
# Argument checks (Python boundary; shapes are static, so these also run under jit/vmap)
# ----------------------------------------------------------------------------------------------


def _shape(x, name):
    try:
        return tuple(np.shape(x))
    except Exception as e:  # pragma: no cover - exotic inputs
        raise ValueError(f"`{name}` is not an array: {type(x).__name__}") from e


def _check_R(R, name):
    if _shape(R, name) != (3, 3):
        raise ValueError(f"`{name}` must be a (3, 3) rotation matrix, got shape {_shape(R, name)}")


def _as_t(t, name):
    """Translation as (3,); BOP's (3, 1) column is accepted."""
    s = _shape(t, name)
    if int(np.prod(s)) != 3 or len(s) > 2:
        raise ValueError(f"`{name}` must be a translation of shape (3,) or (3, 1), got {s}")
    return jnp.reshape(jnp.asarray(t), (3,))


def _check_pts(pts, name="pts"):
    s = _shape(pts, name)
    if len(s) != 2 or s[1] != 3 or s[0] < 1:
        raise ValueError(f"`{name}` must be (N, 3) points with N >= 1, got shape {s}")
    return s[0]


def _as_valid(valid, n, name="valid"):
    if valid is None:
        return None
    s = _shape(valid, name)
    if s != (n,):
        raise ValueError(f"`{name}` must have shape ({n},), got {s}")
    v = jnp.asarray(valid)
    return v if v.dtype == jnp.bool_ else v != 0


def _check_K(K):
    if _shape(K, "K") != (3, 3):
        raise ValueError(f"`K` must be a (3, 3) intrinsic matrix, got shape {_shape(K, 'K')}")


def _as_syms(sym_R, sym_t):
    sR, st = _shape(sym_R, "sym_R"), _shape(sym_t, "sym_t")
    if len(sR) != 3 or sR[1:] != (3, 3) or sR[0] < 1:
        raise ValueError(f"`sym_R` must be (S, 3, 3) with S >= 1, got shape {sR}")
    if st not in ((sR[0], 3), (sR[0], 3, 1)):
        raise ValueError(f"`sym_t` must be ({sR[0]}, 3) (or ({sR[0]}, 3, 1)), got shape {st}")
    return jnp.asarray(sym_R), jnp.reshape(jnp.asarray(sym_t), (sR[0], 3))


def _float_dtype(*xs):
    # A Python float is weakly typed: float32 inputs stay float32, integer inputs become floats.
    return jnp.result_type(*xs, float)


def _cast(dtype, *xs):
    return tuple(jnp.asarray(x).astype(dtype) for x in xs)


def _masked_mean(x, valid):
    if valid is None:
        return jnp.mean(x)
    n = jnp.sum(valid)
    s = jnp.sum(jnp.where(valid, x, 0.0))
    return jnp.where(n > 0, s / jnp.maximum(n, 1).astype(x.dtype), jnp.inf)


def _masked_max(x, valid):
    if valid is None:
        return jnp.max(x)
    m = jnp.max(jnp.where(valid, x, -jnp.inf))
    return jnp.where(jnp.any(valid), m, jnp.inf)


# ----------------------------------------------------------------------------------------------
# ADD, ADD-S, ADD(-S)
# ----------------------------------------------------------------------------------------------


@jax.jit
def _add_core(R, t, R_gt, t_gt, pts, valid):
    d = jnp.linalg.norm(transform(pts, R, t) - transform(pts, R_gt, t_gt), axis=-1)
    return _masked_mean(d, valid)


def add(R, t, R_gt, t_gt, pts, valid=None):
    """ADD (Hinterstoisser et al., ACCV'12): mean distance of corresponding model points.

    mean_i || (R X_i + t) - (R_gt X_i + t_gt) ||, in the units of `pts` (mm). Equal to
    bop_toolkit's `pose_error.add`. `valid` (N,) selects the points to average over.
    """
    _check_R(R, "R")
    _check_R(R_gt, "R_gt")
    n = _check_pts(pts)
    t, t_gt = _as_t(t, "t"), _as_t(t_gt, "t_gt")
    valid = _as_valid(valid, n)
    dt = _float_dtype(R, t, R_gt, t_gt, pts)
    return _add_core(*_cast(dt, R, t, R_gt, t_gt, pts), valid)


def _nearest_distances(query, ref, ref_valid, chunk_size):
    """For each query point the distance to its nearest reference point, (Nq,).

    A brute-force O(Nq * Nr) search evaluated `chunk_size` query points at a time (lax.map), so
    memory stays at chunk_size x Nr x 3 whatever N is; exact differences (not the
    |a|^2 + |b|^2 - 2ab expansion) keep coincident points at distance 0 in float32.
    """

    def one(q):
        d2 = jnp.sum(jnp.square(ref - q), axis=-1)
        if ref_valid is not None:
            d2 = jnp.where(ref_valid, d2, jnp.inf)
        return jnp.min(d2)

    return jnp.sqrt(jax.lax.map(one, query, batch_size=min(chunk_size, query.shape[0])))


@partial(jax.jit, static_argnames=("chunk_size",))
def _add_s_core(R, t, R_gt, t_gt, pts, valid, chunk_size):
    pts_est = transform(pts, R, t)
    pts_gt = transform(pts, R_gt, t_gt)
    d = _nearest_distances(pts_gt, pts_est, valid, chunk_size)
    return _masked_mean(d, valid)


def add_s(R, t, R_gt, t_gt, pts, valid=None, *, chunk_size=_NN_CHUNK):
    """ADD-S / ADI (Hinterstoisser et al., ACCV'12) for objects with indistinguishable views.

    Mean over the model points in the ground-truth pose of the distance to the NEAREST model
    point in the estimated pose (bop_toolkit's `pose_error.adi`, which uses a KD-tree; here an
    exact chunked brute-force search that jit/vmap can run: O(N^2) work, O(chunk_size * N)
    memory). `valid` (N,) masks padded points out of both sets.
    """
    _check_R(R, "R")
    _check_R(R_gt, "R_gt")
    n = _check_pts(pts)
    t, t_gt = _as_t(t, "t"), _as_t(t_gt, "t_gt")
    valid = _as_valid(valid, n)
    if int(chunk_size) < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}")
    dt = _float_dtype(R, t, R_gt, t_gt, pts)
    return _add_s_core(*_cast(dt, R, t, R_gt, t_gt, pts), valid, int(chunk_size))


def add_or_add_s(R, t, R_gt, t_gt, pts, symmetric, valid=None, *, chunk_size=_NN_CHUNK):
    """ADD(-S): ADD-S if `symmetric` else ADD (the LM-O / YCB-V protocol of GDR-Net and the paper).

    `symmetric` may be a Python bool or a (traced) boolean scalar, so a batch that mixes
    symmetric and non-symmetric objects can be vmapped (then both errors are evaluated).
    A common choice is `symmetric = bool(model_info.get("symmetries_discrete") or
    model_info.get("symmetries_continuous"))`.
    """
    if isinstance(symmetric, (bool, np.bool_)):
        fn = add_s if symmetric else add
        kw = {"chunk_size": chunk_size} if symmetric else {}
        return fn(R, t, R_gt, t_gt, pts, valid, **kw)
    if _shape(symmetric, "symmetric") != ():
        raise ValueError(f"`symmetric` must be a scalar, got shape {_shape(symmetric, 'symmetric')}")
    e_add = add(R, t, R_gt, t_gt, pts, valid)
    e_adds = add_s(R, t, R_gt, t_gt, pts, valid, chunk_size=chunk_size)
    return jnp.where(jnp.asarray(symmetric).astype(bool), e_adds, e_add)


# ----------------------------------------------------------------------------------------------
# Rotation / translation errors
# ----------------------------------------------------------------------------------------------


@jax.jit
def _re_core(R, R_gt):
    # The same angle as bop's arccos((trace(R R_gt^T) - 1) / 2), written as atan2(sin, cos) with
    # the sine from the antisymmetric part: arccos near 1 turns float32 rounding of R (~1e-7) into
    # ~0.03 deg of error, the atan2 form keeps small angles exact to ~1e-5 deg.
    M = R @ R_gt.T
    cos = 0.5 * (jnp.trace(M) - 1.0)
    sin = 0.5 * jnp.sqrt(
        jnp.square(M[2, 1] - M[1, 2]) + jnp.square(M[0, 2] - M[2, 0]) + jnp.square(M[1, 0] - M[0, 1])
    )
    return jnp.degrees(jnp.arctan2(sin, jnp.clip(cos, -1.0, 1.0)))


def rotation_error_deg(R, R_gt):
    """Angle of R R_gt^T in degrees, in [0, 180] (bop_toolkit's `pose_error.re`).

    Equal to arccos((trace(R R_gt^T) - 1) / 2) for rotation matrices, evaluated in the stable
    atan2 form (small errors of float32 rotations are not swamped by rounding). bop uses
    inv(R_gt), which equals R_gt^T for a rotation.
    """
    _check_R(R, "R")
    _check_R(R_gt, "R_gt")
    dt = _float_dtype(R, R_gt)
    return _re_core(*_cast(dt, R, R_gt))


@jax.jit
def _te_core(t, t_gt):
    return jnp.linalg.norm(t - t_gt)


def translation_error(t, t_gt):
    """Euclidean distance ||t - t_gt|| in the units of t (mm) (bop_toolkit's `pose_error.te`)."""
    t, t_gt = _as_t(t, "t"), _as_t(t_gt, "t_gt")
    dt = _float_dtype(t, t_gt)
    return _te_core(*_cast(dt, t, t_gt))


# ----------------------------------------------------------------------------------------------
# Symmetries, MSSD, MSPD
# ----------------------------------------------------------------------------------------------


_batched_axis_angle_to_matrix = jax.jit(jax.vmap(axis_angle_to_matrix))


def symmetry_transformations(model_info, max_sym_disc_step=0.01, *, continuous_steps=None):
    """BOP's symmetry transformations of an object (bop_toolkit `misc.get_symmetry_transformations`).

    Args:
      model_info: one entry of a BOP `models_info.json` (a mapping). Optional keys:
        `symmetries_discrete`: list of row-major 4x4 matrices, each a flat list of 16 numbers
          (translation in mm); `symmetries_continuous`: list of {"axis": [3], "offset": [3]}
          (rotation about `axis` through the point `offset`, mm; a missing offset is 0).
      max_sym_disc_step: the largest fraction of the diameter that the vertex furthest from a
        continuous axis travels between two consecutive discretised rotations. Each continuous
        symmetry becomes C = ceil(pi / max_sym_disc_step) rotations by 2 pi k / C, k = 0..C-1
        (a vertex at radius <= diameter / 2 then moves <= diameter * max_sym_disc_step).
      continuous_steps: if given, C itself (overrides max_sym_disc_step), e.g. 384, the
        discretisation of the LC reference's symmetry-aware training (`lcpose.symmetry`).

    Returns:
      (sym_R (S, 3, 3), sym_t (S, 3)) float64 numpy arrays (the rotations of continuous
      symmetries come from lcpose.geometry in JAX's default precision, so they are float32-exact
      unless jax_enable_x64 is on), in the same order as bop_toolkit:
      D = identity followed by the discrete symmetries; without continuous symmetries S = D,
      otherwise S = D * (sum of C over the continuous symmetries) and entry d * C_total + c is the
      composition (R_c R_d, R_c t_d + t_c). The identity is always entry 0. A symmetry (R_s, t_s)
      maps model points X -> R_s X + t_s; the symmetric ground-truth poses are
      (R_gt R_s, R_gt t_s + t_gt).
    """
    if not isinstance(model_info, Mapping):
        raise ValueError(
            f"`model_info` must be a models_info.json entry (a mapping), got {type(model_info).__name__}"
        )
    step = float(max_sym_disc_step)
    if not (np.isfinite(step) and step > 0):
        raise ValueError(f"`max_sym_disc_step` must be a positive number, got {max_sym_disc_step}")
    if continuous_steps is not None and (int(continuous_steps) != continuous_steps or continuous_steps < 1):
        raise ValueError(f"`continuous_steps` must be a positive integer, got {continuous_steps!r}")

    disc_R, disc_t = [np.eye(3)], [np.zeros(3)]
    for k, sym in enumerate(model_info.get("symmetries_discrete") or []):
        m = np.asarray(sym, dtype=np.float64)
        if m.size != 16 or not np.all(np.isfinite(m)):
            raise ValueError(
                f"`model_info['symmetries_discrete'][{k}]` must be 16 finite numbers (a row-major "
                f"4x4 matrix), got {sym!r}"
            )
        m = m.reshape(4, 4)
        disc_R.append(m[:3, :3])
        disc_t.append(m[:3, 3])
    disc_R, disc_t = np.stack(disc_R), np.stack(disc_t)

    cont_R, cont_t = [], []
    cont = model_info.get("symmetries_continuous") or []
    if cont:
        count = int(continuous_steps) if continuous_steps is not None else int(np.ceil(np.pi / step))
        angles = 2.0 * np.pi * np.arange(count) / count
        for k, sym in enumerate(cont):
            where = f"`model_info['symmetries_continuous'][{k}]`"
            if not isinstance(sym, Mapping) or "axis" not in sym:
                raise ValueError(
                    f"{where} must be a mapping with an 'axis' (and an 'offset'), got {sym!r}"
                )
            axis = np.asarray(sym["axis"], dtype=np.float64).reshape(-1)
            offset = np.asarray(sym.get("offset", (0.0, 0.0, 0.0)), dtype=np.float64).reshape(-1)
            norm = np.linalg.norm(axis) if axis.size == 3 else 0.0
            if axis.size != 3 or not np.isfinite(norm) or norm == 0:
                raise ValueError(f"{where}['axis'] must be a non-zero 3-vector, got {sym['axis']!r}")
            if offset.size != 3 or not np.all(np.isfinite(offset)):
                raise ValueError(
                    f"{where}['offset'] must be a finite 3-vector, got {sym.get('offset')!r}"
                )
            omegas = angles[:, None] * (axis / norm)[None, :]
            Rs = np.asarray(_batched_axis_angle_to_matrix(jnp.asarray(omegas)), dtype=np.float64)
            cont_R.append(Rs)
            cont_t.append(offset[None, :] - Rs @ offset)  # rotation about the axis through offset
    if not cont_R:
        return disc_R, disc_t
    cont_R, cont_t = np.concatenate(cont_R), np.concatenate(cont_t)
    # [d, c] -> (R_c R_d, R_c t_d + t_c), discrete index outermost (bop's loop order).
    R = np.einsum("cij,djk->dcik", cont_R, disc_R).reshape(-1, 3, 3)
    t = (np.einsum("cij,dj->dci", cont_R, disc_t) + cont_t[None]).reshape(-1, 3)
    return R, t


def _symmetric_gt_poses(R_gt, t_gt, sym_R, sym_t):
    return R_gt[None] @ sym_R, sym_t @ R_gt.T + t_gt[None]


@partial(jax.jit, static_argnames=("chunk_size",))
def _mssd_core(R, t, R_gt, t_gt, pts, sym_R, sym_t, valid, chunk_size):
    pts_est = transform(pts, R, t)
    Rs, ts = _symmetric_gt_poses(R_gt, t_gt, sym_R, sym_t)

    def one(pose):
        d = jnp.linalg.norm(pts_est - transform(pts, pose[0], pose[1]), axis=-1)
        return _masked_max(d, valid)

    return jnp.min(jax.lax.map(one, (Rs, ts), batch_size=min(chunk_size, Rs.shape[0])))


def mssd(R, t, R_gt, t_gt, pts, sym_R, sym_t, valid=None, *, chunk_size=_SYM_CHUNK):
    """Maximum Symmetry-aware Surface Distance (BOP19; bop_toolkit's `pose_error.mssd`), mm.

    min over the symmetries s of max_i || (R X_i + t) - (R_gt R_s X_i + R_gt t_s + t_gt) ||, with
    (sym_R, sym_t) from `symmetry_transformations` (pass `np.eye(3)[None], np.zeros((1, 3))`
    for an object without symmetries). BOP evaluates it on the vertices of the eval models.
    """
    _check_R(R, "R")
    _check_R(R_gt, "R_gt")
    n = _check_pts(pts)
    t, t_gt = _as_t(t, "t"), _as_t(t_gt, "t_gt")
    sym_R, sym_t = _as_syms(sym_R, sym_t)
    valid = _as_valid(valid, n)
    dt = _float_dtype(R, t, R_gt, t_gt, pts)
    return _mssd_core(*_cast(dt, R, t, R_gt, t_gt, pts, sym_R, sym_t), valid, int(chunk_size))


@partial(jax.jit, static_argnames=("chunk_size",))
def _mspd_core(R, t, R_gt, t_gt, K, pts, sym_R, sym_t, valid, chunk_size):
    uv_est = project(pts, R, t, K)
    Rs, ts = _symmetric_gt_poses(R_gt, t_gt, sym_R, sym_t)

    def one(pose):
        d = jnp.linalg.norm(uv_est - project(pts, pose[0], pose[1], K), axis=-1)
        return _masked_max(d, valid)

    return jnp.min(jax.lax.map(one, (Rs, ts), batch_size=min(chunk_size, Rs.shape[0])))


def mspd(R, t, R_gt, t_gt, K, pts, sym_R, sym_t, valid=None, *, chunk_size=_SYM_CHUNK):
    """Maximum Symmetry-aware Projection Distance (BOP19; bop_toolkit's `pose_error.mspd`), px.

    min over the symmetries s of max_i || proj(X_i; R, t) - proj(X_i; R_gt R_s, R_gt t_s + t_gt) ||
    with the pinhole `K` (lcpose.geometry.project; points are assumed in front of the camera).
    """
    _check_R(R, "R")
    _check_R(R_gt, "R_gt")
    _check_K(K)
    n = _check_pts(pts)
    t, t_gt = _as_t(t, "t"), _as_t(t_gt, "t_gt")
    sym_R, sym_t = _as_syms(sym_R, sym_t)
    valid = _as_valid(valid, n)
    dt = _float_dtype(R, t, R_gt, t_gt, K, pts)
    return _mspd_core(*_cast(dt, R, t, R_gt, t_gt, K, pts, sym_R, sym_t), valid, int(chunk_size))


# ----------------------------------------------------------------------------------------------
# Recall scores (host side, numpy)
# ----------------------------------------------------------------------------------------------


def _errors_1d(errors, name="errors"):
    e = np.asarray(errors, dtype=np.float64).reshape(-1)
    if e.size == 0:
        raise ValueError(f"`{name}` is empty")
    if np.any(e < 0):
        raise ValueError(f"`{name}` must be non-negative (errors are distances)")
    return e


def _positive(x, name, n):
    a = np.asarray(x, dtype=np.float64)
    try:
        a = np.broadcast_to(a.reshape(-1) if a.ndim else a, (n,))
    except ValueError as e:
        raise ValueError(f"`{name}` must be a scalar or have one value per error ({n})") from e
    if not np.all(np.isfinite(a) & (a > 0)):
        raise ValueError(f"`{name}` must be finite and positive")
    return a


def add_recall(errors, diameters, fraction=0.1):
    """Fraction of instances with error < fraction * diameter (the ADD(-S) 0.1d score).

    `errors` (M,) are ADD / ADD-S / ADD(-S) errors, `diameters` a scalar or (M,) (models_info's
    "diameter", mm). The comparison is strict, as in bop_toolkit's pose matching. An instance
    without an estimate should be given error +inf (or NaN): it counts as a failure.
    Returns a Python float in [0, 1].
    """
    e = _errors_1d(errors)
    d = _positive(diameters, "diameters", e.size)
    if not (np.isfinite(fraction) and fraction > 0):
        raise ValueError(f"`fraction` must be positive, got {fraction}")
    return float(np.mean(e < fraction * d))


def auc(errors, max_threshold=100.0, points=None):
    """Area under the accuracy-threshold curve on [0, max_threshold], normalised to [0, 1].

    accuracy(th) = fraction of `errors` <= th (errors in mm for ADD / ADD-S, max 100 mm = the
    "AUC up to 10 cm" of PoseCNN / YCB-V).

    * points=None (default): the YCB-Video toolbox's "VOCap" area that PoseCNN, GDR-Net and the
      paper report. With the errors sorted e_1 <= ... <= e_n and those > max_threshold dropped
      (they still count in n), the curve is the step function through (e_j, j / n) extended to
      max_threshold at the last accuracy, and the area is
      sum_j (e_j - e_{j-1}) * j / n + (max - e_k) * k / n  (e_0 = 0, k kept errors), / max.
      This is a right-endpoint rule: it exceeds the exact integral of accuracy(th) by
      e_k / (n * max) at most 1 / n; tied errors contribute the first tie's accuracy (both
      quirks of the original toolbox are kept so the numbers are comparable).
      Example: errors [0, 50, 100, 200], max 100 -> (50 * 2/4 + 50 * 3/4) / 100 = 0.625.
    * points=P (int >= 2): the P-point sampled variant, mean of accuracy(th) over
      th = linspace(0, max_threshold, P) (e.g. P = 11). The example above gives
      (5 * 1/4 + 5 * 2/4 + 3/4) / 11 = 4.5 / 11.

    Errors +inf / NaN (missing estimates) count as failures. Returns a Python float.
    """
    e = _errors_1d(errors)
    e = np.where(np.isnan(e), np.inf, e)
    mx = float(max_threshold)
    if not (np.isfinite(mx) and mx > 0):
        raise ValueError(f"`max_threshold` must be positive and finite, got {max_threshold}")
    n = e.size
    if points is not None:
        if int(points) != points or points < 2:
            raise ValueError(f"`points` must be an integer >= 2 (or None), got {points}")
        ths = np.linspace(0.0, mx, int(points))
        return float(np.mean(np.mean(e[None, :] <= ths[:, None], axis=1)))
    e = np.sort(e)
    acc = np.arange(1, n + 1, dtype=np.float64) / n
    keep = e <= mx
    if not np.any(keep):
        return 0.0
    x = np.concatenate([[0.0], e[keep], [mx]])
    y = np.concatenate([[0.0], acc[keep], [acc[keep][-1]]])
    step = np.nonzero(x[1:] != x[:-1])[0] + 1  # the first point of each distinct abscissa
    return float(np.sum((x[step] - x[step - 1]) * y[step]) / mx)


def auc_11point(errors, max_threshold=100.0):
    """The sampled AUC that GDR-Net and the LC paper report as "11-point" on YCB-V.

    mean over k = 1..10 of accuracy(k * max_threshold / 10), accuracy(th) = fraction of
    `errors` < th (strict), i.e. the accuracies at 1, 2, ..., 10 cm for ADD(-S) in mm. The
    eleventh point of the 0..10 cm grid, th = 0, is left out (the LC reference's
    ``AUCad_10_p11`` and GDR-Net's YCB-V evaluator): that is why this form exceeds the
    continuous :func:`auc` (94.1 vs 89.8 for GDR-Net-LC's ADD-S), while ``auc(points=11)``,
    which includes th = 0, is at most 10/11 of it. Example: errors [5, 15, 50, 100, 250], max 100
    -> (1 + 2 + 2 + 2 + 2 + 3 + 3 + 3 + 3 + 3) / 5 / 10 = 0.48. Errors +inf / NaN count as
    failures. Returns a Python float.
    """
    e = _errors_1d(errors)
    e = np.where(np.isnan(e), np.inf, e)
    mx = float(max_threshold)
    if not (np.isfinite(mx) and mx > 0):
        raise ValueError(f"`max_threshold` must be positive and finite, got {max_threshold}")
    ths = mx * np.arange(1, 11) / 10.0
    return float(np.mean(e[None, :] < ths[:, None]))


def ar_mssd(errors, diameters):
    """BOP19 AR_MSSD: recall averaged over thresholds 0.05, 0.10, ..., 0.50 of the diameter.

    mean over th in MSSD_THRESHOLDS of mean(errors / diameters < th), errors from `mssd` (mm),
    diameters a scalar or (M,). Missing estimates: error +inf. (AR_VSD is not provided: VSD
    needs rendered model depth and the test depth image.)
    """
    e = _errors_1d(errors)
    d = _positive(diameters, "diameters", e.size)
    return float(np.mean((e / d)[None, :] < MSSD_THRESHOLDS[:, None]))


def ar_mspd(errors_px, image_width=640):
    """BOP19 AR_MSPD: recall averaged over thresholds 5, 10, ..., 50 px at an image width of 640.

    The errors (from `mspd`, px) are rescaled by 640 / image_width (a scalar or (M,)) before the
    thresholds, as bop_toolkit's eval_calc_scores does; missing estimates: error +inf.
    """
    e = _errors_1d(errors_px, "errors_px")
    w = _positive(image_width, "image_width", e.size)
    return float(np.mean((e * (640.0 / w))[None, :] < MSPD_THRESHOLDS_PX[:, None]))


# ----------------------------------------------------------------------------------------------
# Gradient correctness (the paper's Table 3)
# ----------------------------------------------------------------------------------------------


@jax.jit
def _gradient_mask_core(grad_x3d, x3d, x2d, K, R_gt, t_gt, valid):
    proj = lambda X: project(X, R_gt, t_gt, K)  # noqa: E731
    uv, duv = jax.jvp(proj, (x3d,), (grad_x3d,))  # duv_i = (d proj / d X_i) grad_i
    r = uv - x2d
    # d err_i / d eps along +grad_i = <r_i, duv_i> / |r_i|: only its sign matters, so no division
    # (and no 0/0 at r_i = 0).
    slope = jnp.sum(r * duv, axis=-1)
    # An error at rounding level of the projection is a zero error (its direction is noise).
    tol = 16.0 * jnp.finfo(uv.dtype).eps * jnp.maximum(jnp.max(jnp.abs(uv), axis=-1), 1.0)
    counted = jnp.any(grad_x3d != 0, axis=-1) & (jnp.max(jnp.abs(r), axis=-1) > tol)
    if valid is not None:
        counted = counted & valid
    # Moving along -grad lowers err_i to first order iff the slope along +grad is positive;
    # NaN/inf gradients give a NaN slope and are counted as wrong.
    correct = counted & (slope > 0)
    return correct, counted


def _check_gradient_args(grad_x3d, x3d, x2d, K, R_gt, t_gt, valid):
    n = _check_pts(x3d, "x3d")
    if _shape(grad_x3d, "grad_x3d") != (n, 3):
        raise ValueError(
            f"`grad_x3d` must have the shape of x3d ({n}, 3), got {_shape(grad_x3d, 'grad_x3d')}"
        )
    if _shape(x2d, "x2d") != (n, 2):
        raise ValueError(f"`x2d` must be ({n}, 2), got {_shape(x2d, 'x2d')}")
    _check_K(K)
    _check_R(R_gt, "R_gt")
    t_gt = _as_t(t_gt, "t_gt")
    valid = _as_valid(valid, n)
    dt = _float_dtype(grad_x3d, x3d, x2d, K, R_gt, t_gt)
    return (*_cast(dt, grad_x3d, x3d, x2d, K, R_gt, t_gt), valid)


def gradient_correct_mask(grad_x3d, x3d, x2d, K, R_gt, t_gt, valid=None):
    """Per-point booleans (correct (N,), counted (N,)) behind `gradient_correctness`.

    err_i(X) = || project(X, R_gt, t_gt, K) - x2d_i || is point i's reprojection error under the
    ground-truth pose. Point i's gradient g_i = grad_x3d[i] (dLoss/dx3d_i) is *correct* when a
    small step X_i - eps g_i lowers err_i, i.e. to first order when
    <g_i, d err_i / d X_i> > 0 (evaluated exactly by a forward-mode JVP of the projection).

    `counted` marks the points where the direction is defined: valid, g_i != 0 and err_i != 0
    (at err_i = 0 every step raises the error; a zero gradient has no direction); an error
    within rounding of the projection (each residual component <= 16 eps max(|u|, |v|, 1), eps
    of the dtype) counts as zero. The other points are left out of both the numerator and the
    denominator. A gradient orthogonal to d err_i / d X_i
    (e.g. exactly along the viewing ray) is counted and not correct; so is a non-finite one.
    """
    return _gradient_mask_core(*_check_gradient_args(grad_x3d, x3d, x2d, K, R_gt, t_gt, valid))


def gradient_correctness(grad_x3d, x3d, x2d, K, R_gt, t_gt, valid=None):
    """Fraction of 3D points whose loss gradient points the right way (the paper's Table 3).

    sum(correct) / sum(counted) with the masks of `gradient_correct_mask`: the share of the
    (valid) 3D points x3d (N, 3) for which a small step along the negative gradient grad_x3d
    (N, 3) of a loss lowers that point's own reprojection error w.r.t. its 2D point x2d (N, 2)
    under the ground-truth pose (R_gt, t_gt) and intrinsics K. Returns a scalar in [0, 1]
    (0 when no point is counted). Per instance; vmap for a batch, or pool the masks over a
    batch for a per-point percentage over a data set.
    """
    return _gradient_fraction_core(*_check_gradient_args(grad_x3d, x3d, x2d, K, R_gt, t_gt, valid))


@jax.jit
def _gradient_fraction_core(grad_x3d, x3d, x2d, K, R_gt, t_gt, valid):
    correct, counted = _gradient_mask_core(grad_x3d, x3d, x2d, K, R_gt, t_gt, valid)
    dt = x3d.dtype
    return jnp.sum(correct).astype(dt) / jnp.maximum(jnp.sum(counted), 1).astype(dt)
