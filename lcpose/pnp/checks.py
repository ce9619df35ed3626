"""Input validation at the Python boundary of the PnP solvers.

Shapes are static under `jit` and `vmap`, so these checks run at trace time as well; value checks
(non-finite intrinsics) run only when the value is concrete. Degenerate *values* inside `jit` are
never raised on: the solvers return `converged=False` instead.
"""
from __future__ import annotations

import jax
import numpy as np


def _shape(name, a):
    try:
        return tuple(a.shape)
    except AttributeError as e:  # pragma: no cover - defensive
        raise ValueError(f"{name} must be an array, got {type(a).__name__}") from e


def check_correspondences(x3d, x2d, K, *, w2d=None, valid=None, min_points: int = 4, w_name="w2d"):
    """Raise ValueError naming the argument if shapes do not describe one PnP instance."""
    s3 = _shape("x3d", x3d)
    s2 = _shape("x2d", x2d)
    if len(s3) != 2 or s3[1] != 3:
        raise ValueError(
            f"x3d must have shape (N, 3) for one instance (vmap for batches), got {s3}"
        )
    if len(s2) != 2 or s2[1] != 2:
        raise ValueError(
            f"x2d must have shape (N, 2) for one instance (vmap for batches), got {s2}"
        )
    n = s3[0]
    if s2[0] != n:
        raise ValueError(f"x2d has {s2[0]} points but x3d has {n}: shapes {s2} vs {s3}")
    if n < min_points:
        raise ValueError(f"x3d has N={n} points; PnP needs at least {min_points}")
    sk = _shape("K", K)
    if sk != (3, 3):
        raise ValueError(f"K must have shape (3, 3), got {sk}")
    if w2d is not None:
        sw = _shape(w_name, w2d)
        if sw not in ((n, 2), (n,)):
            raise ValueError(f"{w_name} must have shape ({n}, 2) or ({n},), got {sw}")
    if valid is not None:
        sv = _shape("valid", valid)
        if sv != (n,):
            raise ValueError(f"valid must have shape ({n},), got {sv}")
    if not isinstance(K, jax.core.Tracer):
        Kn = np.asarray(K)
        if not np.all(np.isfinite(Kn)):
            raise ValueError("K contains non-finite values")
        if Kn[0, 0] == 0 or Kn[1, 1] == 0 or Kn[2, 2] == 0:
            raise ValueError(f"K is singular (zero focal length or K[2, 2]): {Kn.tolist()}")
    return n


def check_pose(R, t, name_R="R0", name_t="t0"):
    if (R is None) != (t is None):
        raise ValueError(f"{name_R} and {name_t} must be given together")
    if R is None:
        return
    if _shape(name_R, R) != (3, 3):
        raise ValueError(f"{name_R} must have shape (3, 3), got {_shape(name_R, R)}")
    if _shape(name_t, t) != (3,):
        raise ValueError(f"{name_t} must have shape (3,), got {_shape(name_t, t)}")
