"""Rotations, SO(3) exp/log, the right-perturbation retraction, projection and crop intrinsics.

Every function works on one instance (unbatched arrays) and is `jit`/`vmap`/`grad` friendly; a
batch is `jax.vmap`. Conventions (see DESIGN.md): quaternions are wxyz, poses map model to
camera (`X_cam = R @ X + t`), 3D in mm, 2D in pixels with pixel (u, v) at the centre of
column u, row v (OpenCV/BOP).

This is the one place for rotation and projection helpers in lcpose: the PnP solvers, the
losses, the metrics and the data pipeline all import from here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "skew",
    "quat_to_matrix",
    "matrix_to_quat",
    "axis_angle_to_matrix",
    "matrix_to_axis_angle",
    "sixd_to_matrix",
    "matrix_to_sixd",
    "so3_exp",
    "so3_log",
    "retract",
    "transform",
    "project",
    "project_jacobian",
    "project_points_last",
    "lincomb_points_last",
    "project_with_jacobian_points_last",
    "crop_affine",
    "crop_intrinsics",
    "bbox3d_corners",
    "box_extent_center",
    "xyz_to_mm",
    "mm_to_xyz",
    "box_from_model_info",
    "model_box_corners",
]


def _small_angle_threshold(dtype) -> float:
    # Below this angle the Taylor series are exact to machine precision.
    return 1e-3 if jnp.finfo(dtype).bits <= 32 else 1e-5


def skew(v):
    """The cross-product matrix [v]x, so that skew(v) @ u == cross(v, u)."""
    v = jnp.asarray(v)
    z = jnp.zeros_like(v[0])
    return jnp.stack(
        [
            jnp.stack([z, -v[2], v[1]]),
            jnp.stack([v[2], z, -v[0]]),
            jnp.stack([-v[1], v[0], z]),
        ]
    )


def _vee(S):
    """Inverse of `skew` on the antisymmetric part of S."""
    return 0.5 * jnp.stack([S[2, 1] - S[1, 2], S[0, 2] - S[2, 0], S[1, 0] - S[0, 1]])


# ----------------------------------------------------------------------------------------------
# SO(3) exponential and logarithm
# ----------------------------------------------------------------------------------------------


def so3_exp(omega):
    """Rodrigues' formula R = I + a [w]x + b [w]x^2 with series near 0 (finite gradients at 0)."""
    omega = jnp.asarray(omega)
    theta2 = jnp.sum(omega * omega)
    small = theta2 < _small_angle_threshold(omega.dtype) ** 2
    # Double-where keeps the gradient of sqrt finite at theta = 0.
    theta2_safe = jnp.where(small, jnp.ones_like(theta2), theta2)
    theta = jnp.sqrt(theta2_safe)
    a = jnp.where(small, 1.0 - theta2 / 6.0 + theta2 * theta2 / 120.0, jnp.sin(theta) / theta)
    b = jnp.where(
        small, 0.5 - theta2 / 24.0 + theta2 * theta2 / 720.0, (1.0 - jnp.cos(theta)) / theta2_safe
    )
    W = skew(omega)
    return jnp.eye(3, dtype=omega.dtype) + a * W + b * (W @ W)


def so3_log(R):
    """Rotation vector of R, stable near 0 (series) and near pi (from the symmetric part).

    Returns omega with |omega| in [0, pi].
    """
    R = jnp.asarray(R)
    dtype = R.dtype
    cos_theta = jnp.clip(0.5 * (jnp.trace(R) - 1.0), -1.0, 1.0)
    v = _vee(R)  # = sin(theta) * axis
    sin2 = jnp.sum(v * v)
    # Generic and small-angle branch: omega = theta / sin(theta) * v, with
    # theta / sin(theta) ~ 1 + sin^2(theta) / 6 near 0 (double-where keeps gradients finite).
    small = (sin2 < _small_angle_threshold(dtype) ** 2) & (cos_theta > 0)
    sin_theta = jnp.sqrt(jnp.where(small | (sin2 <= 0), jnp.ones_like(sin2), sin2))
    scale = jnp.where(small, 1.0 + sin2 / 6.0, jnp.arctan2(sin_theta, cos_theta) / sin_theta)
    omega_generic = scale * v
    # The angle for the branch near pi, where sin(theta) may be exactly 0.
    eps = jnp.finfo(dtype).eps
    theta = jnp.arctan2(jnp.sqrt(sin2 + eps * eps), cos_theta)

    # Near pi the antisymmetric part vanishes; use B = (R + R^T)/2 - cos(theta) I = (1 - cos) a a^T.
    near_pi = cos_theta < -0.9
    B = 0.5 * (R + R.T) - cos_theta * jnp.eye(3, dtype=dtype)
    # Away from pi this branch is unused; feed it a harmless matrix so its gradient stays finite.
    B = jnp.where(near_pi, B, jnp.diag(jnp.array([1.0, 0.0, 0.0], dtype=dtype)))
    one_minus_cos = jnp.where(near_pi, 1.0 - cos_theta, jnp.ones_like(cos_theta))
    diag = jnp.clip(jnp.diagonal(B) / one_minus_cos, 0.0, None)
    k = jnp.argmax(diag)
    col = B[:, k] / one_minus_cos
    axis = col / jnp.sqrt(jnp.maximum(diag[k], jnp.finfo(dtype).tiny))
    axis = axis / jnp.maximum(jnp.linalg.norm(axis), jnp.finfo(dtype).tiny)
    # Fix the sign of the axis with the antisymmetric part (sin(theta) * axis).
    sgn = jnp.where(jnp.dot(axis, v) < 0, -1.0, 1.0).astype(dtype)
    omega_pi = sgn * theta * axis
    return jnp.where(near_pi, omega_pi, omega_generic)


axis_angle_to_matrix = so3_exp
matrix_to_axis_angle = so3_log


# ----------------------------------------------------------------------------------------------
# Quaternions (wxyz) and the two-column 6D representation
# ----------------------------------------------------------------------------------------------


def quat_to_matrix(q):
    """Rotation matrix of a quaternion (w, x, y, z); q need not be normalised."""
    q = jnp.asarray(q)
    q = q / jnp.linalg.norm(q)
    w, x, y, z = q[0], q[1], q[2], q[3]
    return jnp.stack(
        [
            jnp.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)]),
            jnp.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)]),
            jnp.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]),
        ]
    )


def matrix_to_quat(R):
    """Unit quaternion (w, x, y, z) with w >= 0 of a rotation matrix (Shepperd's method).

    Of the four algebraically equivalent formulas, the one with the largest pivot is used so
    the result and its gradient are well conditioned everywhere.
    """
    R = jnp.asarray(R)
    dtype = R.dtype
    tr = jnp.trace(R)
    pivots = jnp.stack([tr, R[0, 0], R[1, 1], R[2, 2]])
    k = jnp.argmax(pivots)

    def from_w():
        s = 2.0 * jnp.sqrt(jnp.maximum(1.0 + tr, 1e-12))
        return jnp.stack([0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s])

    def from_x():
        s = 2.0 * jnp.sqrt(jnp.maximum(1.0 + R[0, 0] - R[1, 1] - R[2, 2], 1e-12))
        return jnp.stack([(R[2, 1] - R[1, 2]) / s, 0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s])

    def from_y():
        s = 2.0 * jnp.sqrt(jnp.maximum(1.0 - R[0, 0] + R[1, 1] - R[2, 2], 1e-12))
        return jnp.stack([(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s])

    def from_z():
        s = 2.0 * jnp.sqrt(jnp.maximum(1.0 - R[0, 0] - R[1, 1] + R[2, 2], 1e-12))
        return jnp.stack([(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s])

    cands = jnp.stack([from_w(), from_x(), from_y(), from_z()])
    q = cands[k]
    q = jnp.where(q[0] < 0, -q, q)
    return (q / jnp.linalg.norm(q)).astype(dtype)


def sixd_to_matrix(m):
    """Rotation from the two-column 6D representation m = (first column, second column).

    Gram-Schmidt: c1 = a / |a|, c2 = normalised (b - (c1.b) c1), c3 = c1 x c2 (Zhou et al. 2019).
    """
    m = jnp.asarray(m)
    a, b = m[:3], m[3:6]
    c1 = a / jnp.linalg.norm(a)
    b = b - jnp.dot(c1, b) * c1
    c2 = b / jnp.linalg.norm(b)
    c3 = jnp.cross(c1, c2)
    return jnp.stack([c1, c2, c3], axis=1)


def matrix_to_sixd(R):
    """The first two columns of R, concatenated: (R[:, 0], R[:, 1]) -> (6,)."""
    R = jnp.asarray(R)
    return jnp.concatenate([R[:, 0], R[:, 1]])


# ----------------------------------------------------------------------------------------------
# Poses and projection
# ----------------------------------------------------------------------------------------------


def retract(R, t, delta6):
    """Right perturbation of a pose: R' = R @ exp(omega), t' = t + dt, delta6 = (omega, dt)."""
    delta6 = jnp.asarray(delta6)
    return R @ so3_exp(delta6[:3]), t + delta6[3:6]


def transform(x3d, R, t):
    """Model points (N, 3) to the camera frame: R @ X + t.

    Unrolled over the 3 coordinates: under vmap, XLA on CPU runs `x3d @ R.T` as a batched tiny
    matmul, several times slower than these fused multiply-adds.
    """
    return x3d[:, 0:1] * R[:, 0] + x3d[:, 1:2] * R[:, 1] + x3d[:, 2:3] * R[:, 2] + t


def project(x3d, R, t, K):
    """Pixel coordinates (N, 2) of model points x3d (N, 3) under pose (R, t) and intrinsics K.

    The depth is not clamped: callers that can meet points behind the camera check it.
    """
    P = K @ R
    b = K @ t
    uvw = x3d[:, 0:1] * P[:, 0] + x3d[:, 1:2] * P[:, 1] + x3d[:, 2:3] * P[:, 2] + b
    return uvw[:, :2] / uvw[:, 2:3]


def lincomb_points_last(M, x_t):
    """M @ x_t for a small matrix M (m, k) and points-last x_t (k, N), unrolled over k.

    XLA on CPU runs a vmapped tiny matmul as a slow batched dot; k fused multiply-adds over the
    contiguous point axis are several times faster.
    """
    out = M[:, 0:1] * x_t[0:1]
    for k in range(1, M.shape[1]):
        out = out + M[:, k : k + 1] * x_t[k : k + 1]
    return out


def project_points_last(x3d_t, R, t, K):
    """`project` in the points-last layout: x3d_t (3, N) -> (2, N).

    The solvers' hot loops use this layout: the point axis is the contiguous one, so XLA on CPU
    vectorises the element-wise work and the 6 x 2N Hessian products over it.
    """
    uvw = lincomb_points_last(K @ R, x3d_t) + (K @ t)[:, None]
    return uvw[:2] / uvw[2:3]


def project_with_jacobian_points_last(x3d_t, R, t, K):
    """Projections (2, N) and their Jacobian d project / d(omega, dt) (2, 6, N), points last.

    X_c = R exp(w) X + t  =>  dX_c/dw = -R [X]x, dX_c/d(dt) = I; then the chain rule through
    the pinhole projection (the J_i of Eq. 9 of the paper), written with element-wise products.
    """
    uvw = lincomb_points_last(K @ R, x3d_t) + (K @ t)[:, None]  # (3, N)
    inv_w = 1.0 / uvw[2]
    uv = uvw[:2] * inv_w
    # d u / d X_c = (K[0] - u K[2]) / w, d v / d X_c = (K[1] - v K[2]) / w   (3, N) each.
    d_u = (K[0][:, None] - K[2][:, None] * uv[0][None]) * inv_w[None]
    d_v = (K[1][:, None] - K[2][:, None] * uv[1][None]) * inv_w[None]
    # For a row a = d(u or v)/dX_c:  a . (-R [X]x w) = -(R^T a) . (X x w) = (X x R^T a) . w
    g_u = jnp.cross(x3d_t, lincomb_points_last(R.T, d_u), axis=0)
    g_v = jnp.cross(x3d_t, lincomb_points_last(R.T, d_v), axis=0)
    J = jnp.stack([jnp.concatenate([g_u, d_u], 0), jnp.concatenate([g_v, d_v], 0)])  # (2, 6, N)
    return uv, J


def project_jacobian(x3d, R, t, K):
    """d project / d(omega, dt) at the right perturbation 0, per point: (N, 2, 6)."""
    _, J = project_with_jacobian_points_last(x3d.T, R, t, K)
    return J.transpose(2, 0, 1)


# ----------------------------------------------------------------------------------------------
# Crops ("dynamic zoom-in")
# ----------------------------------------------------------------------------------------------


def crop_affine(center, scale, out_size):
    """2x3 affine map from image pixels to the pixels of a square crop resized to `out_size`.

    The crop is the square of side `scale` pixels centred at `center` (u, v). With the pixel
    centre convention (pixel j covers [j - 0.5, j + 0.5]) the crop's left edge is
    `center - scale / 2` and u' = k (u - left) - 0.5 with k = out_size / scale. Feed this
    matrix to cv2.warpAffine(img, A, (out_size, out_size)) to cut the crop.
    """
    center = jnp.asarray(center)
    scale = jnp.asarray(scale, dtype=center.dtype)
    k = out_size / scale
    left = center - 0.5 * scale
    off = -k * left - 0.5
    zero = jnp.zeros_like(k)
    return jnp.stack([jnp.stack([k, zero, off[0]]), jnp.stack([zero, k, off[1]])])


def crop_intrinsics(K, center, scale, out_size):
    """Intrinsics of the crop of `crop_affine(center, scale, out_size)`: K_crop = A @ K.

    project(X, R, t, crop_intrinsics(K, ...)) equals crop_affine(...) applied to project(X, R, t, K).
    """
    K = jnp.asarray(K)
    A = crop_affine(center, scale, out_size).astype(K.dtype)
    A3 = jnp.concatenate([A, jnp.array([[0.0, 0.0, 1.0]], dtype=K.dtype)], axis=0)
    return A3 @ K


def bbox3d_corners(mins, maxs):
    """The 8 corners (8, 3) of an axis-aligned box, x fastest: (x0y0z0, x1y0z0, x0y1z0, ...)."""
    mins = jnp.asarray(mins)
    maxs = jnp.asarray(maxs)
    sel = jnp.array([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], dtype=bool)
    return jnp.where(sel, maxs[None, :], mins[None, :])


# ----------------------------------------------------------------------------------------------
# The model box and normalised object coordinates (the one home; lcpose.models re-exports)
# ----------------------------------------------------------------------------------------------
# A network regresses object coordinates normalised by the model's axis-aligned box:
# x_mm = center + extent * xyz, so points on the model lie in [-0.5, 0.5]^3 whatever its size.


def box_extent_center(bbox3d):
    """(extent (..., 3), center (..., 3)) of an axis-aligned model box given by its corners (..., 8, 3)."""
    lo = jnp.min(bbox3d, axis=-2)
    hi = jnp.max(bbox3d, axis=-2)
    return hi - lo, 0.5 * (lo + hi)


def xyz_to_mm(xyz, extent, center=None):
    """Normalised coordinates (..., 3) -> millimetres: center + extent * xyz."""
    xyz = jnp.asarray(xyz)
    out = xyz * jnp.asarray(extent, dtype=xyz.dtype)
    if center is not None:
        out = out + jnp.asarray(center, dtype=xyz.dtype)
    return out


def mm_to_xyz(x_mm, extent, center=None):
    """Millimetres (..., 3) -> normalised coordinates: (x_mm - center) / extent."""
    x_mm = jnp.asarray(x_mm)
    if center is not None:
        x_mm = x_mm - jnp.asarray(center, dtype=x_mm.dtype)
    return x_mm / jnp.asarray(extent, dtype=x_mm.dtype)


def _model_box_mins_size(model_info, dtype):
    import numpy as np

    try:
        mins = np.array([model_info["min_x"], model_info["min_y"], model_info["min_z"]], dtype)
        size = np.array([model_info["size_x"], model_info["size_y"], model_info["size_z"]], dtype)
    except KeyError as e:
        raise ValueError(f"model_info lacks {e.args[0]!r} (needs min_x/y/z and size_x/y/z)") from None
    if not np.all(size > 0):
        raise ValueError(f"model_info sizes must be positive, got {size}")
    return mins, size


def box_from_model_info(model_info):
    """(extent (3,), center (3,)) in mm (NumPy float64) of a model's box from a BOP models_info.json entry."""
    mins, size = _model_box_mins_size(model_info, float)
    return size, mins + 0.5 * size


def model_box_corners(model_info):
    """The 8 corners (8, 3) float32 (NumPy) of a model's box from a BOP models_info.json entry,
    in `bbox3d_corners` order: the ``bbox3d`` of the data pipeline and the losses."""
    import numpy as np

    mins, size = _model_box_mins_size(model_info, np.float32)
    return np.asarray(bbox3d_corners(mins, mins + size), dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# NumPy twins for input pipelines
# ----------------------------------------------------------------------------------------------


def crop_affine_np(center, scale, out_size):
    """NumPy (float64) twin of `crop_affine`, same formula, for data-loading code.

    Grain worker processes build crops with it: calling JAX there would start a JAX runtime
    (and claim the accelerator) in every worker. tests/test_data_crops.py checks it against
    `crop_affine`.
    """
    import numpy as np

    center = np.asarray(center, dtype=np.float64)
    k = float(out_size) / float(scale)
    off = -k * (center - 0.5 * float(scale)) - 0.5
    return np.array([[k, 0.0, off[0]], [0.0, k, off[1]]])


def crop_intrinsics_np(K, center, scale, out_size):
    """NumPy (float64) twin of `crop_intrinsics`: [crop_affine_np; 0 0 1] @ K."""
    import numpy as np

    A3 = np.vstack([crop_affine_np(center, scale, out_size), [0.0, 0.0, 1.0]])
    return A3 @ np.asarray(K, dtype=np.float64)
