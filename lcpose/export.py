"""Export a trained pose network for inference without the training code (``jax.export``).

An export folder holds

* ``predict.jaxexport`` -- the serialised StableHLO of the whole test pipeline
  (:func:`lcpose.evaluate.make_predict_fn`: network -> top weights (``PnPConfig.fraction``) ->
  RANSAC -> weighted LM), a function of ``(variables, images, K_out, bbox3d, key)`` with a
  symbolic batch size;
* ``variables.npz``     -- its parameters and BatchNorm statistics (Lookahead slow weights),
  one array per leaf, keyed by the '/'-joined path;
* ``meta.json``         -- input/output sizes, the PnP settings, the objects' boxes
  (``obj_ids``, ``bbox3d``) and where the weights came from.

``load_exported(dir)`` needs only JAX and NumPy: this module imports neither
``lcpose.train`` nor ``lcpose.models`` unless :func:`export_predictor` is called::

    from lcpose.export import load_exported
    model = load_exported("exported/lc")
    out = model(images, K_out, obj_ids=[1, 5])     # images (B, S, S, 3) RGB in [0, 1]
    out["R"], out["t"]                             # (B, 3, 3), (B, 3) mm, camera frame

``images`` are square crops of side ``meta["input_size"]`` around the object (e.g. 1.5 x its
detected box), ``K_out = lcpose.geometry.crop_intrinsics(K, center, scale, output_size)`` the
intrinsics of the output grid (``meta["output_size"]``, the model's map side) of that crop; the returned
pose is the object's pose in the camera of ``K``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["export_predictor", "load_exported", "ExportedPoseModel", "FUNCTION_FILE",
           "VARIABLES_FILE", "META_FILE"]

FUNCTION_FILE = "predict.jaxexport"
VARIABLES_FILE = "variables.npz"
META_FILE = "meta.json"
FORMAT_VERSION = 1


def _flatten(tree: Mapping, prefix: str = "") -> Dict[str, np.ndarray]:
    flat = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if "/" in str(k):
            raise ValueError(f"variable name {k!r} contains '/'")
        if isinstance(v, Mapping):
            flat.update(_flatten(v, name))
        else:
            flat[name] = np.asarray(v)
    return flat


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, v in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _plain(tree):
    """Nested plain dicts (FrozenDicts and other Mappings unwrapped) with numpy leaves."""
    if isinstance(tree, Mapping):
        return {str(k): _plain(v) for k, v in tree.items()}
    return np.asarray(jax.device_get(tree))


def export_predictor(out_dir, model, variables, *, input_size: int, pnp=None,
                     obj_ids: Optional[Sequence[int]] = None, bbox3d: Optional[np.ndarray] = None,
                     platforms: Optional[Sequence[str]] = None, meta: Optional[dict] = None) -> str:
    """Serialise the test pipeline of ``model`` with ``variables``; returns ``out_dir``.

    Args:
      model: the GDRNet (any ``axis_name``; inference does not use it).
      variables: ``{"params", "batch_stats"}`` (e.g. ``eval_params(state)`` and
        ``state.batch_stats``).
      input_size: crop side S; the function takes (b, S, S, 3) images, b symbolic.
      pnp: :class:`lcpose.evaluate.PnPConfig` (default: the paper's).
      obj_ids, bbox3d: the objects' ids and box corners (n, 8, 3), stored so that callers can
        pass ``obj_ids`` instead of boxes.
      platforms: lowering platforms (default: the current backend; e.g. ("cpu", "cuda")).
      meta: extra JSON (training config, variant, ...).
    """
    from lcpose.evaluate import PnPConfig, make_predict_fn
    from lcpose.models.registry import map_size

    pnp = pnp or PnPConfig()
    model = model.clone(axis_name=None) if getattr(model, "axis_name", None) else model
    variables = _plain(variables)
    predict = jax.jit(make_predict_fn(model, pnp))
    (b,) = jax.export.symbolic_shape("b")
    f32 = jnp.float32
    specs = (
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables),
        jax.ShapeDtypeStruct((b, input_size, input_size, 3), f32),
        jax.ShapeDtypeStruct((b, 3, 3), f32),
        jax.ShapeDtypeStruct((b, 8, 3), f32),
        jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    exported = jax.export.export(predict, platforms=platforms)(*specs)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, FUNCTION_FILE), "wb") as f:
        f.write(exported.serialize())
    np.savez(os.path.join(out_dir, VARIABLES_FILE), **_flatten(variables))
    out_size = map_size(model, input_size)
    info = {
        "format_version": FORMAT_VERSION,
        "input_size": int(input_size),
        "output_size": int(out_size),
        "platforms": list(exported.platforms),
        "pnp": dataclasses.asdict(pnp),
        "inputs": ["variables", f"images (b,{input_size},{input_size},3) float32 RGB in [0,1]",
                   "K_out (b,3,3) float32", "bbox3d (b,8,3) float32 mm", "key (2,) uint32"],
        "outputs": ["R (b,3,3)", "t (b,3) mm", "converged (b,)", "R_ransac", "t_ransac",
                    "inliers (b,)"],
        "obj_ids": None if obj_ids is None else [int(o) for o in obj_ids],
        "bbox3d": None if bbox3d is None else np.asarray(bbox3d, float).tolist(),
        "jax_version": jax.__version__,
        **(meta or {}),
    }
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(info, f, indent=1)
    return out_dir


class ExportedPoseModel:
    """An exported predictor: ``model(images, K_out, bbox3d=None, obj_ids=None, seed=0)``."""

    def __init__(self, directory):
        self.directory = os.fspath(directory)
        paths = {n: os.path.join(self.directory, n) for n in (FUNCTION_FILE, VARIABLES_FILE, META_FILE)}
        for name, path in paths.items():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"exported model file not found: {path}")
        try:
            with open(paths[META_FILE]) as f:
                self.meta = json.load(f)
        except (ValueError, UnicodeDecodeError) as err:   # truncated or not JSON
            raise ValueError(f"{paths[META_FILE]}: not valid JSON ({err})") from None
        if not isinstance(self.meta, dict):
            raise ValueError(f"{paths[META_FILE]}: expected a JSON object, got {type(self.meta).__name__}")
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{paths[META_FILE]}: unsupported format_version "
                             f"{self.meta.get('format_version')!r} (expected {FORMAT_VERSION})")
        with open(paths[FUNCTION_FILE], "rb") as f:
            try:
                self.exported = jax.export.deserialize(bytearray(f.read()))
            except Exception as err:  # corrupt or foreign file
                raise ValueError(f"{paths[FUNCTION_FILE]}: not a serialised jax.export "
                                 f"function ({err})") from None
        try:
            with np.load(paths[VARIABLES_FILE]) as z:
                self.variables = _unflatten({k: z[k] for k in z.files})
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:   # truncated / not an npz
            raise ValueError(f"{paths[VARIABLES_FILE]}: cannot read the variables "
                             f"({type(err).__name__}: {err})") from None
        missing = [k for k in ("input_size", "output_size") if k not in self.meta]
        if missing:
            raise ValueError(f"{paths[META_FILE]}: lacks {', '.join(missing)}")
        self.input_size = int(self.meta["input_size"])
        self.output_size = int(self.meta["output_size"])
        ids = self.meta.get("obj_ids")
        self._boxes = None if ids is None else {
            int(o): np.asarray(b, np.float32) for o, b in zip(ids, self.meta["bbox3d"])}

    def __call__(self, images, K_out, bbox3d=None, *, obj_ids=None, seed: int = 0) -> dict:
        """Poses of a batch of crops; see the module docstring. Returns numpy arrays."""
        images = np.asarray(images, np.float32)
        S = self.input_size
        if images.ndim != 4 or images.shape[1:] != (S, S, 3):
            raise ValueError(f"images must have shape (B, {S}, {S}, 3), got {images.shape}")
        B = images.shape[0]
        K_out = np.asarray(K_out, np.float32)
        if K_out.shape == (3, 3):
            K_out = np.broadcast_to(K_out, (B, 3, 3))
        if K_out.shape != (B, 3, 3):
            raise ValueError(f"K_out must have shape ({B}, 3, 3) or (3, 3), got {K_out.shape}")
        if bbox3d is None:
            if obj_ids is None:
                raise ValueError("give bbox3d (B, 8, 3) or obj_ids")
            if self._boxes is None:
                raise ValueError("this export stores no object boxes; pass bbox3d")
            ids = np.broadcast_to(np.asarray(obj_ids).reshape(-1), (B,))
            unknown = sorted({int(o) for o in ids} - set(self._boxes))
            if unknown:
                raise ValueError(f"obj_ids {unknown} not in the export (has {sorted(self._boxes)})")
            bbox3d = np.stack([self._boxes[int(o)] for o in ids])
        bbox3d = np.asarray(bbox3d, np.float32)
        if bbox3d.shape != (B, 8, 3):
            raise ValueError(f"bbox3d must have shape ({B}, 8, 3), got {bbox3d.shape}")
        key = np.asarray([0, seed & 0xFFFFFFFF], np.uint32)
        out = self.exported.call(self.variables, images, K_out, bbox3d, key)
        return {k: np.asarray(v) for k, v in out.items()}


def load_exported(directory) -> ExportedPoseModel:
    """Load an export folder written by :func:`export_predictor` (JAX + NumPy only)."""
    return ExportedPoseModel(directory)
