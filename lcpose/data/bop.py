"""Reading BOP datasets (https://bop.felk.cvut.cz/datasets/) without bop_toolkit.

Layout understood (any BOP dataset: LM, LM-O, YCB-V, T-LESS, ... and lcpose's synthetic set)::

    ROOT/models/obj_XXXXXX.ply, models_info.json      (also models_eval/, models_cad/, ...)
    ROOT/camera.json                                   (optional)
    ROOT/test_targets_bop19.json                       (optional)
    ROOT/<split>/<scene:06d>/scene_gt.json, scene_gt_info.json, scene_camera.json,
                            rgb/<im:06d>.png|jpg, depth/<im:06d>.png,
                            mask/ and mask_visib/<im:06d>_<gt:06d>.png

Splits are folder names: ``train_pbr``, ``train_real``, ``train_synt``, ``test``, ``val``...
(only RGB images are supported; the ``gray/`` images of T-LESS/ITODD are not).

Detection files: the json format used by GDR-Net (``{"scene_id/im_id": [{"obj_id",
"bbox_est" [x, y, w, h], "score"}, ...]}``) and the BOP'22 default-detection format (a list of
``{"scene_id", "image_id", "category_id", "bbox" [x, y, w, h], "score"}``) are both read by
`load_detections`.

Every missing or malformed file raises an error that names the file (`BopFormatError`, a
ValueError, or FileNotFoundError).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

__all__ = [
    "BopFormatError",
    "load_json",
    "load_models_info",
    "load_model",
    "load_models",
    "ObjectModel",
    "sample_model_points",
    "list_splits",
    "list_scenes",
    "Scene",
    "load_scene",
    "load_image",
    "load_depth",
    "load_mask",
    "load_detections",
    "load_test_targets",
    "iter_instances",
    "Instance",
    "DATASETS",
]


class BopFormatError(ValueError):
    """A BOP file is missing a field or holds malformed data (the message names the file)."""


# What lcpose knows about the BOP datasets it supports. `obj_ids`: the objects of the
# dataset's test targets; `test_split`: the BOP-19 test images (test_targets_bop19.json);
# `train_splits`: what the LC-loss paper trains on (LM-O: LM real images + PBR images);
# `detections_file`: a detection file in the dataset folder used when none is given.
# Symmetries always come from models_info.json.
DATASETS: dict[str, dict[str, Any]] = {
    "lmo": dict(
        obj_ids=[1, 5, 6, 8, 9, 10, 11, 12],
        test_split="test",
        test_targets="test_targets_bop19.json",
        train_splits=["train_real", "train_pbr"],
        # LM-O has no real training images of its own: they are LM's ("lm/test" scene of each
        # object), read with --lm_root.
        train_real_from_lm=True,
        image_size=(640, 480),
    ),
    "ycbv": dict(
        obj_ids=list(range(1, 22)),
        test_split="test",
        test_targets="test_targets_bop19.json",
        train_splits=["train_real", "train_pbr"],
        train_real_from_lm=False,
        image_size=(640, 480),
    ),
    "synthetic": dict(
        obj_ids=None,  # all objects in models_info.json
        test_split="test",
        test_targets="test_targets_bop19.json",
        train_splits=["train_pbr"],
        train_real_from_lm=False,
        image_size=None,
        detections_file="detections_test.json",   # written by lcpose.data.synthetic
    ),
}


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------


def load_json(path: str | os.PathLike, *, what: str = "file") -> Any:
    """json.load with errors that name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"BOP {what} not found: {path}")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BopFormatError(f"corrupt json in {path}: {e}") from e


def _int_keys(d: Mapping, path: str) -> dict[int, Any]:
    if not isinstance(d, Mapping):
        raise BopFormatError(f"{path}: expected a json object keyed by id, got {type(d).__name__}")
    out = {}
    for k, v in d.items():
        try:
            out[int(k)] = v
        except ValueError as e:
            raise BopFormatError(f"{path}: key {k!r} is not an integer id") from e
    return out


def _require(entry: Mapping, keys: Sequence[str], path: str, where: str) -> None:
    missing = [k for k in keys if k not in entry]
    if missing:
        raise BopFormatError(f"{path}: {where} lacks {', '.join(missing)}")


def _models_dir(root: str, models_subdir: str) -> str:
    d = os.path.join(os.fspath(root), models_subdir)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"BOP models folder not found: {d}")
    return d


def load_models_info(root: str | os.PathLike, models_subdir: str = "models") -> dict[int, dict]:
    """models_info.json of a dataset: {obj_id: {"diameter", "min_x", ..., "size_z",
    optional "symmetries_discrete" / "symmetries_continuous"}}."""
    path = os.path.join(_models_dir(os.fspath(root), models_subdir), "models_info.json")
    info = _int_keys(load_json(path, what="models_info.json"), path)
    if not info:
        raise BopFormatError(f"{path}: no objects")
    for obj_id, e in info.items():
        _require(e, ["diameter", "min_x", "min_y", "min_z", "size_x", "size_y", "size_z"], path, f"object {obj_id}")
        if not np.isfinite(float(e["diameter"])) or float(e["diameter"]) <= 0:
            raise BopFormatError(f"{path}: object {obj_id} has diameter {e['diameter']!r}")
        for s in e.get("symmetries_discrete", []):
            if len(s) != 16:
                raise BopFormatError(f"{path}: object {obj_id}: a discrete symmetry must be 16 numbers (4x4 row-major)")
        for s in e.get("symmetries_continuous", []):
            _require(s, ["axis", "offset"], path, f"object {obj_id} continuous symmetry")
    return info


@dataclasses.dataclass
class ObjectModel:
    """One object model: mesh in mm and its models_info entry."""

    obj_id: int
    vertices: np.ndarray  # (N, 3) float32, mm
    faces: np.ndarray  # (F, 3) int32
    colors: np.ndarray | None  # (N, 3) uint8 vertex colours, if the PLY has them
    info: dict  # the raw models_info.json entry
    diameter: float
    bbox3d: np.ndarray  # (8, 3) corners of the box min/size of models_info

    @property
    def symmetric(self) -> bool:
        return bool(self.info.get("symmetries_discrete") or self.info.get("symmetries_continuous"))


def load_model(path: str | os.PathLike):
    """(vertices (N, 3) float32, faces (F, 3) int32, colours (N, 3) uint8 or None) of a PLY."""
    import trimesh

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"BOP model file not found: {path}")
    try:
        mesh = trimesh.load(path, process=False, force="mesh")
    except Exception as e:  # trimesh raises many types on broken files
        raise BopFormatError(f"cannot read model {path}: {e}") from e
    V = np.asarray(mesh.vertices, dtype=np.float32)
    F = np.asarray(mesh.faces, dtype=np.int32)
    if V.ndim != 2 or V.shape[1] != 3 or len(V) == 0 or F.ndim != 2 or F.shape[1] != 3 or len(F) == 0:
        raise BopFormatError(f"model {path} has no triangle mesh (vertices {V.shape}, faces {F.shape})")
    colors = None
    vc = getattr(mesh.visual, "vertex_colors", None) if mesh.visual.kind == "vertex" else None
    if vc is not None and len(vc) == len(V):
        colors = np.asarray(vc)[:, :3].astype(np.uint8)
    return V, F, colors


def _bbox3d(info: dict) -> np.ndarray:
    from lcpose import geometry

    mins = np.array([info["min_x"], info["min_y"], info["min_z"]], dtype=np.float32)
    size = np.array([info["size_x"], info["size_y"], info["size_z"]], dtype=np.float32)
    return np.asarray(geometry.bbox3d_corners(mins, mins + size), dtype=np.float32)


def load_models(
    root: str | os.PathLike,
    obj_ids: Sequence[int] | None = None,
    models_subdir: str = "models",
) -> dict[int, ObjectModel]:
    """All (or the listed) object models of a dataset, keyed by obj_id."""
    info = load_models_info(root, models_subdir)
    if obj_ids is None:
        obj_ids = sorted(info)
    mdir = _models_dir(os.fspath(root), models_subdir)
    out = {}
    for obj_id in obj_ids:
        if obj_id not in info:
            raise BopFormatError(f"{os.path.join(mdir, 'models_info.json')}: no entry for obj_id {obj_id}")
        V, F, colors = load_model(os.path.join(mdir, f"obj_{obj_id:06d}.ply"))
        out[obj_id] = ObjectModel(
            obj_id=obj_id, vertices=V, faces=F, colors=colors, info=info[obj_id],
            diameter=float(info[obj_id]["diameter"]), bbox3d=_bbox3d(info[obj_id]),
        )
    return out


def sample_model_points(model: "ObjectModel | np.ndarray", n: int = 1000, seed: int = 0) -> np.ndarray:
    """A fixed-size (n, 3) subset of a model's vertices (for ADD/ADD-S with static shapes).

    `model` is an `ObjectModel` or a (N, 3) vertex array. Without replacement when the model
    has at least n vertices; deterministic for a seed.
    """
    V = np.asarray(model.vertices if isinstance(model, ObjectModel) else model)
    if V.ndim != 2 or V.shape[1] != 3 or len(V) == 0:
        raise ValueError(f"vertices must be a non-empty (N, 3) array, got shape {V.shape}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(V), size=n, replace=len(V) < n)
    return V[np.sort(idx)].astype(np.float32)


# ------------------------------------------------------------------------------------------
# Splits and scenes
# ------------------------------------------------------------------------------------------


def list_splits(root: str | os.PathLike) -> list[str]:
    """Split folders of a dataset (those holding at least one scene folder)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"BOP dataset root not found: {root}")
    out = []
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        if os.path.isdir(d) and not name.startswith("models") and any(s.isdigit() for s in os.listdir(d)):
            out.append(name)
    return out


def list_scenes(root: str | os.PathLike, split: str) -> list[int]:
    """Scene ids of a split (folder names of six digits)."""
    d = os.path.join(os.fspath(root), split)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"BOP split folder not found: {d}")
    scenes = sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n)))
    if not scenes:
        raise BopFormatError(f"BOP split {split!r} has no scene folders: {d}")
    return scenes


@dataclasses.dataclass
class Scene:
    """The annotations of one scene. Dicts are keyed by im_id."""

    root: str
    split: str
    scene_id: int
    path: str
    camera: dict[int, dict]  # {"K" (3, 3), "depth_scale", raw fields}
    gt: dict[int, list[dict]]  # [{"R" (3, 3), "t" (3,), "obj_id"}]
    gt_info: dict[int, list[dict]] | None  # raw scene_gt_info entries, if present
    rgb_ext: str | None  # ".png" / ".jpg" of the scene's rgb/ images (None: no images found)

    @property
    def im_ids(self) -> list[int]:
        return sorted(self.camera)

    def rgb_path(self, im_id: int) -> str:
        return os.path.join(self.path, "rgb", f"{im_id:06d}{self.rgb_ext or '.png'}")

    def depth_path(self, im_id: int) -> str:
        return os.path.join(self.path, "depth", f"{im_id:06d}.png")

    def mask_path(self, im_id: int, gt_idx: int, visib: bool = True) -> str:
        sub = "mask_visib" if visib else "mask"
        return os.path.join(self.path, sub, f"{im_id:06d}_{gt_idx:06d}.png")


def _rgb_ext(scene_path: str) -> str | None:
    # Annotations can be read without the images; load_image names a missing file.
    d = os.path.join(scene_path, "rgb")
    if os.path.isdir(d):
        for name in os.listdir(d):
            ext = os.path.splitext(name)[1]
            if ext.lower() in (".png", ".jpg", ".jpeg", ".tif"):
                return ext
    return None


def load_scene(root: str | os.PathLike, split: str, scene_id: int, *, require_gt_info: bool = True) -> Scene:
    """Reads scene_camera.json, scene_gt.json (and scene_gt_info.json) of one scene."""
    root = os.fspath(root)
    path = os.path.join(root, split, f"{scene_id:06d}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"BOP scene folder not found: {path}")
    cam_path = os.path.join(path, "scene_camera.json")
    cams = _int_keys(load_json(cam_path, what="scene_camera.json"), cam_path)
    camera = {}
    for im_id, c in cams.items():
        _require(c, ["cam_K"], cam_path, f"image {im_id}")
        K = np.asarray(c["cam_K"], dtype=np.float64)
        if K.size != 9 or not np.all(np.isfinite(K)):
            raise BopFormatError(f"{cam_path}: image {im_id}: cam_K must be 9 finite numbers")
        camera[im_id] = dict(c, K=K.reshape(3, 3), depth_scale=float(c.get("depth_scale", 1.0)))
    gt_path = os.path.join(path, "scene_gt.json")
    gts = _int_keys(load_json(gt_path, what="scene_gt.json"), gt_path)
    gt = {}
    for im_id, lst in gts.items():
        if im_id not in camera:
            raise BopFormatError(f"{gt_path}: image {im_id} has no entry in {cam_path}")
        out = []
        for k, e in enumerate(lst):
            _require(e, ["cam_R_m2c", "cam_t_m2c", "obj_id"], gt_path, f"image {im_id} instance {k}")
            R = np.asarray(e["cam_R_m2c"], dtype=np.float64)
            t = np.asarray(e["cam_t_m2c"], dtype=np.float64)
            if R.size != 9 or t.size != 3:
                raise BopFormatError(f"{gt_path}: image {im_id} instance {k}: bad cam_R_m2c/cam_t_m2c sizes")
            out.append({"R": R.reshape(3, 3), "t": t.reshape(3), "obj_id": int(e["obj_id"])})
        gt[im_id] = out
    info_path = os.path.join(path, "scene_gt_info.json")
    gt_info = None
    if os.path.isfile(info_path) or require_gt_info:
        gt_info = _int_keys(load_json(info_path, what="scene_gt_info.json"), info_path)
        for im_id, lst in gt.items():
            if len(gt_info.get(im_id, [])) != len(lst):
                raise BopFormatError(
                    f"{info_path}: image {im_id} has {len(gt_info.get(im_id, []))} entries, "
                    f"scene_gt.json has {len(lst)}"
                )
            for k, e in enumerate(gt_info[im_id]):
                _require(e, ["bbox_obj", "bbox_visib", "visib_fract"], info_path, f"image {im_id} instance {k}")
    return Scene(root=root, split=split, scene_id=scene_id, path=path, camera=camera, gt=gt,
                 gt_info=gt_info, rgb_ext=_rgb_ext(path))


def load_image(path: str) -> np.ndarray:
    """RGB uint8 (H, W, 3) image."""
    import cv2

    if not os.path.isfile(path):
        raise FileNotFoundError(f"BOP image not found: {path}")
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise BopFormatError(f"cannot decode image {path}")
    return np.ascontiguousarray(img[..., ::-1])


def load_depth(path: str, depth_scale: float) -> np.ndarray:
    """Depth in mm (H, W) float32 from a 16-bit BOP depth PNG (value * depth_scale)."""
    import cv2

    if not os.path.isfile(path):
        raise FileNotFoundError(f"BOP depth image not found: {path}")
    d = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if d is None or d.ndim != 2:
        raise BopFormatError(f"cannot decode depth image {path}")
    return d.astype(np.float32) * np.float32(depth_scale)


def load_mask(path: str) -> np.ndarray:
    """Boolean (H, W) mask from a BOP mask PNG (non-zero = object)."""
    import cv2

    if not os.path.isfile(path):
        raise FileNotFoundError(f"BOP mask not found: {path}")
    m = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if m is None:
        raise BopFormatError(f"cannot decode mask {path}")
    if m.ndim == 3:
        m = m[..., 0]
    return m > 0


# ------------------------------------------------------------------------------------------
# Detections and test targets
# ------------------------------------------------------------------------------------------


def load_detections(path: str | os.PathLike) -> dict[tuple[int, int], list[dict]]:
    """Detections keyed by (scene_id, im_id): [{"obj_id", "bbox" [x, y, w, h], "score"}].

    Reads GDR-Net's format ``{"scene_id/im_id": [{"obj_id", "bbox_est", "score"}]}`` and the
    BOP'22 default-detection format ``[{"scene_id", "image_id", "category_id", "bbox",
    "score"}]``. Lists are sorted by decreasing score.
    """
    path = os.fspath(path)
    data = load_json(path, what="detection file")
    out: dict[tuple[int, int], list[dict]] = {}
    if isinstance(data, Mapping):
        for key, dets in data.items():
            try:
                scene_id, im_id = (int(x) for x in str(key).split("/"))
            except ValueError as e:
                raise BopFormatError(f"{path}: key {key!r} is not 'scene_id/im_id'") from e
            lst = out.setdefault((scene_id, im_id), [])
            for d in dets:
                _require(d, ["obj_id", "bbox_est", "score"], path, f"detection of {key}")
                lst.append({"obj_id": int(d["obj_id"]), "bbox": [float(x) for x in d["bbox_est"]], "score": float(d["score"])})
    elif isinstance(data, list):
        for d in data:
            _require(d, ["scene_id", "image_id", "category_id", "bbox", "score"], path, "detection")
            out.setdefault((int(d["scene_id"]), int(d["image_id"])), []).append(
                {"obj_id": int(d["category_id"]), "bbox": [float(x) for x in d["bbox"]], "score": float(d["score"])}
            )
    else:
        raise BopFormatError(f"{path}: expected a json object or list of detections")
    for lst in out.values():
        for d in lst:
            if len(d["bbox"]) != 4:
                raise BopFormatError(f"{path}: a bbox must be [x, y, w, h]")
        lst.sort(key=lambda d: -d["score"])
    return out


def load_test_targets(root: str | os.PathLike, name: str = "test_targets_bop19.json") -> list[dict]:
    """BOP test targets: [{"scene_id", "im_id", "obj_id", "inst_count"}]."""
    path = os.path.join(os.fspath(root), name)
    data = load_json(path, what="test targets file")
    if not isinstance(data, list):
        raise BopFormatError(f"{path}: expected a json list")
    for k, e in enumerate(data):
        _require(e, ["scene_id", "im_id", "obj_id", "inst_count"], path, f"entry {k}")
    return [{k: int(e[k]) for k in ("scene_id", "im_id", "obj_id", "inst_count")} for e in data]


# ------------------------------------------------------------------------------------------
# Instances (what the TFDS converter iterates over)
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Instance:
    scene: Scene
    im_id: int
    gt_idx: int
    obj_id: int
    R: np.ndarray
    t: np.ndarray
    K: np.ndarray
    info: dict  # scene_gt_info entry


def _bbox_iou(a, b) -> float:
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    iw = min(ax0 + aw, bx0 + bw) - max(ax0, bx0)
    ih = min(ay0 + ah, by0 + bh) - max(ay0, by0)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return float(inter / (aw * ah + bw * bh - inter))


def match_detections(instances: Sequence[Instance], dets: Sequence[dict]) -> list[dict | None]:
    """Assigns detections of one image to its GT instances of the same object.

    Detections are taken by decreasing score; each goes to the unmatched instance of its
    object with the highest IoU (bbox_visib). When an object has a single instance in the image
    (LM-O, YCB-V) its best-scoring detection is taken whatever the IoU -- GDR-Net's protocol
    for those datasets. Unassigned detections (false positives) are dropped.
    """
    out: list[dict | None] = [None] * len(instances)
    by_obj: dict[int, list[int]] = {}
    for k, inst in enumerate(instances):
        by_obj.setdefault(inst.obj_id, []).append(k)
    for d in sorted(dets, key=lambda d: -d["score"]):
        cands = [k for k in by_obj.get(d["obj_id"], []) if out[k] is None]
        if not cands:
            continue
        if len(by_obj[d["obj_id"]]) == 1:
            out[cands[0]] = d
            continue
        ious = [_bbox_iou(d["bbox"], instances[k].info["bbox_visib"]) for k in cands]
        best = int(np.argmax(ious))
        if ious[best] > 0:
            out[cands[best]] = d
    return out


def iter_instances(
    root: str | os.PathLike,
    split: str,
    *,
    obj_ids: Sequence[int] | None = None,
    targets: Sequence[Mapping] | None = None,
    scene_ids: Sequence[int] | None = None,
    im_ids: Mapping[int, Sequence[int]] | None = None,
) -> Iterator[tuple[Scene, int, list[Instance]]]:
    """Yields (scene, im_id, instances) for every image of a split that has instances.

    obj_ids: keep only these objects. targets: keep only the (scene_id, im_id, obj_id) listed
    (BOP test targets). scene_ids: restrict to these scenes. im_ids: {scene_id: im_ids}
    restricts images (e.g. LM's training image lists).
    """
    allowed = None
    if targets is not None:
        allowed = {(int(t["scene_id"]), int(t["im_id"]), int(t["obj_id"])) for t in targets}
    for scene_id in scene_ids if scene_ids is not None else list_scenes(root, split):
        scene = load_scene(root, split, scene_id)
        keep_ims = None if im_ids is None else set(int(i) for i in im_ids.get(scene_id, []))
        for im_id in sorted(scene.gt):
            if keep_ims is not None and im_id not in keep_ims:
                continue
            insts = []
            for k, g in enumerate(scene.gt[im_id]):
                if obj_ids is not None and g["obj_id"] not in obj_ids:
                    continue
                if allowed is not None and (scene_id, im_id, g["obj_id"]) not in allowed:
                    continue
                insts.append(Instance(scene, im_id, k, g["obj_id"], g["R"], g["t"], scene.camera[im_id]["K"],
                                      scene.gt_info[im_id][k] if scene.gt_info is not None else {}))
            if insts:
                yield scene, im_id, insts
