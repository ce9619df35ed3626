"""grain input pipelines over the TFDS datasets written by `lcpose.data.tfds_builder`.

``make_loader(tfds_dir, split, batch_size, train, seed, shard=(index, count))`` returns a
`Loader`; iterate it for batches (dicts of numpy arrays with fixed shapes). B is the batch
size, S_in the input crop (256), S_out the output grid (64):

=============== ================== =========================================================
key             shape, dtype       meaning
=============== ================== =========================================================
image           (B,S_in,S_in,3) f32 RGB crop, values in [0, 1] (uint8 / 255, no mean/std
                                   normalisation -- the model applies its own)
xyz             (B,S_out,S_out,3) f32 object coordinates in mm (object frame) of the whole
                                   object (amodal), 0 off-object
mask_visib      (B,S_out,S_out) f32 visible mask (1 only where xyz is defined)
mask_full       (B,S_out,S_out) f32 object mask ignoring occluders (xyz != 0)
K_out           (B,3,3) f32        intrinsics of the S_out x S_out output grid:
                                   project(X, R, t, K_out) lands on the xyz pixel of X
K_in            (B,3,3) f32        intrinsics of the S_in x S_in input crop
K               (B,3,3) f32        intrinsics of the full image
R, t            (B,3,3), (B,3) f32 ground-truth pose, model -> camera, mm
obj_id          (B,) int32         BOP object id
obj_index       (B,) int32         index of obj_id in `Loader.models.obj_ids` (class index)
bbox3d          (B,8,3) f32        corners of the model box (models_info min/size,
                                   `geometry.bbox3d_corners` order)
diameter        (B,) f32           model diameter (mm)
roi_center      (B,2) f32          crop centre in full-image pixels
roi_scale       (B,) f32           crop side in full-image pixels
bbox            (B,4) f32          box the crop was built from [x, y, w, h] (GT bbox_visib
                                   or the detection)
score           (B,) f32           detection score; 1 for ground-truth boxes, 0 for
                                   test instances without a detection
has_box         (B,) int32         0 for test instances that no detection matched (crop
                                   from the GT box; count them as misses)
visib_fract     (B,) f32           visible fraction (scene_gt_info)
scene_id, im_id, gt_idx (B,) int32 BOP ids of the instance
valid_example   (B,) f32           0 for the padding of the last test batch
kpt3d           (B,Kp,3) f32       with ``keypoints=spec``: the object's Kp model keypoints (mm,
                                   `lcpose.data.keypoints`, e.g. 16 by farthest point sampling)
kpt2d           (B,Kp,2) f32       their ground-truth projections in output-grid pixels
                                   (``project(kpt3d, R, t, K_out)``, pixel-centre convention)
kpt_in_crop     (B,Kp) f32         1 where that projection lies in front of the camera and
                                   inside the output grid (u, v in [-0.5, S_out - 0.5])
=============== ================== =========================================================

Training (``train=True``): instances with visible fraction >= 0.3, dynamic zoom-in of the GT
visible box (shift 0.25, scale 0.25, pad 1.5; `crops.DZIConfig`), background switch with
probability 0.5 (pixels outside the visible mask replaced by a random image from
`background_dir`, or a procedural one), colour augmentation with probability 0.8
(`augment.color_augment`), in-plane rotation of the crop about its centre with probability
``rotate_prob`` by an angle uniform in [-rotate_max_deg, rotate_max_deg] (the LC reference:
probability 1, any angle; `augment.inplane_rotation`: image, xyz and masks are rotated in one
warp each, and the pose and intrinsics become those of the camera rotated about its optical
axis, R' = Rz R, t' = Rz t, K_out' = T K_out Rz^T, so projections still land on the rotated
xyz pixels; the image's corners beyond the stored window are mirrored, not black),
shuffled, infinitely repeated, last partial batch dropped.
Evaluation (``train=False``): every instance once, in dataset order, crop of side 1.5 x the
box size around the GT visible box (``boxes="gt"``) or the matched detection
(``boxes="detections"``), last batch padded (``valid_example``).

Determinism and resumption: batches are a function of `seed`, `shard`, `batch_size` and
`worker_count` (grain hands whole batches to workers in turn, so the worker count changes
which records share a batch; each record's random draws come from its own Philox generator
seeded by `seed` and its position). ``it = iter(loader)`` is grain's DataLoaderIterator: ``it.get_state()``
(bytes) / ``it.set_state(state)`` resume exactly; save it with Orbax through
``grain.python.PyGrainCheckpointSave(it)`` / ``PyGrainCheckpointRestore(it)``.

Sharding: ``shard=(jax.process_index(), jax.process_count())`` gives each process a disjoint
contiguous part of the (filtered) split.

Workers: ``worker_count`` processes (spawned) decode and augment with NumPy and OpenCV; they
never create JAX arrays, so no worker starts a JAX runtime or touches an accelerator (the
main module of the program is re-imported in each worker by ``spawn``: keep its top level
free of work, behind ``if __name__ == "__main__"``).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import cv2
import grain.python as grain
import numpy as np

from lcpose.data.augment import BackgroundSource, color_augment, inplane_rotation, replace_background
from lcpose.data.crops import DZIConfig, compose, crop_affine_np, crop_intrinsics_np, invert, sample_roi

__all__ = ["make_loader", "Loader", "ModelTable", "load_model_table", "resolve_dataset_dir", "OUTPUT_KEYS",
           "KEYPOINT_KEYS", "DZIConfig"]

OUTPUT_KEYS = (
    "image", "xyz", "mask_visib", "mask_full", "K_out", "K_in", "K", "R", "t", "obj_id", "obj_index",
    "bbox3d", "diameter", "roi_center", "roi_scale", "bbox", "score", "has_box", "visib_fract",
    "scene_id", "im_id", "gt_idx", "valid_example",
)
KEYPOINT_KEYS = ("kpt3d", "kpt2d", "kpt_in_crop")   # added with make_loader(keypoints=spec)


def resolve_dataset_dir(tfds_dir: str | os.PathLike) -> str:
    """The version folder of an lcpose TFDS dataset.

    Accepts that folder itself (``.../bop_<name>/1.0.0``), the dataset folder
    (``.../bop_<name>``) or the TFDS data dir holding exactly one ``bop_*`` dataset.
    """
    d = os.fspath(tfds_dir)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"TFDS dataset folder not found: {d}")
    if os.path.isfile(os.path.join(d, "dataset_info.json")):
        return d
    subs = sorted(n for n in os.listdir(d) if os.path.isdir(os.path.join(d, n)))
    versions = [n for n in subs if all(p.isdigit() for p in n.split(".")) and n.count(".") == 2]
    if versions:
        best = max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))
        return resolve_dataset_dir(os.path.join(d, best))
    datasets = [n for n in subs if n.startswith("bop_")]
    if len(datasets) == 1:
        return resolve_dataset_dir(os.path.join(d, datasets[0]))
    if len(datasets) > 1:
        raise ValueError(f"{d} holds several datasets ({', '.join(datasets)}); pass one of them")
    raise FileNotFoundError(f"no lcpose TFDS dataset (dataset_info.json) under {d}")


@dataclasses.dataclass
class ModelTable:
    """Per-object constants of a converted dataset, indexed by obj_index (sorted obj_ids)."""

    obj_ids: np.ndarray  # (n,) int32
    diameter: np.ndarray  # (n,) float32, mm
    bbox3d: np.ndarray  # (n, 8, 3) float32
    points: np.ndarray  # (n, 1000, 3) float32 model points for ADD(-S)/MSSD/MSPD
    symmetric: np.ndarray  # (n,) bool: models_info declares a symmetry
    models_info: dict  # {obj_id: raw models_info.json entry} (for metrics.symmetry_transformations)

    def index_of(self, obj_id: int) -> int:
        hits = np.nonzero(self.obj_ids == int(obj_id))[0]
        if len(hits) == 0:
            raise KeyError(f"obj_id {obj_id} is not in this dataset ({self.obj_ids.tolist()})")
        return int(hits[0])


def load_model_table(tfds_dir: str | os.PathLike) -> ModelTable:
    """The `ModelTable` of a converted dataset (from lcpose_meta.json and lcpose_models.npz)."""
    from lcpose import geometry
    from lcpose.data.tfds_builder import read_meta

    d = resolve_dataset_dir(tfds_dir)
    meta = read_meta(d)
    path = os.path.join(d, "lcpose_models.npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lcpose model table not found: {path}")
    z = np.load(path)
    obj_ids = z["obj_ids"].astype(np.int32)
    info = {int(k): v for k, v in meta["models_info"].items()}
    boxes = [geometry.model_box_corners(info[int(o)]) for o in obj_ids]
    sym = np.array([bool(info[int(o)].get("symmetries_discrete") or info[int(o)].get("symmetries_continuous")) for o in obj_ids])
    return ModelTable(obj_ids=obj_ids, diameter=z["diameter"].astype(np.float32), bbox3d=np.stack(boxes),
                      points=z["points"].astype(np.float32), symmetric=sym, models_info=info)


class _Concat:
    """Random access over several data sources one after the other (picklable)."""

    def __init__(self, sources):
        self._sources = list(sources)
        self._starts = np.cumsum([0] + [len(x) for x in self._sources])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i):
        j = int(np.searchsorted(self._starts, int(i), side="right")) - 1
        return self._sources[j][int(i) - int(self._starts[j])]

    def __repr__(self) -> str:
        return f"_Concat({self._sources!r})"


class _Subset:
    """A random-access view of some records of a data source (picklable for grain workers)."""

    def __init__(self, source, indices: np.ndarray):
        self._source = source
        self._indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i):
        return self._source[int(self._indices[i])]

    def __repr__(self) -> str:
        return f"_Subset({self._source!r}, n={len(self._indices)})"


@dataclasses.dataclass
class _CropConfig:
    train: bool
    boxes: str
    dzi: DZIConfig
    input_size: int
    output_size: int
    color_prob: float
    bg_prob: float
    obj_index: dict
    bbox3d: np.ndarray
    diameter: np.ndarray
    rotate_prob: float = 0.0
    rotate_max_deg: float = 180.0
    keypoints: np.ndarray | None = None  # (n, Kp, 3) per obj_index, or None (no keypoint keys)


def _keypoint_targets(kpt3d: np.ndarray, example: dict, size: int) -> dict:
    """The keypoint keys of one cropped example, from its final pose and output intrinsics."""
    from lcpose.data.keypoints import project_keypoints

    kpt2d, in_crop = project_keypoints(kpt3d, example["R"], example["t"], example["K_out"], size)
    return {"kpt3d": np.asarray(kpt3d, np.float32), "kpt2d": kpt2d, "kpt_in_crop": in_crop}


def _crop(ex: dict, cfg: _CropConfig, rng: np.random.Generator | None, backgrounds: BackgroundSource | None) -> dict:
    S_in, S_out = cfg.input_size, cfg.output_size
    im_size = ex["im_size"]
    use_det = cfg.boxes == "detections"
    has_det = bool(ex["has_det"])
    if use_det and has_det:
        box, score, has_box = ex["det_bbox"], float(ex["det_score"]), 1
    else:
        box = ex["bbox_visib"]
        score, has_box = (0.0, 0) if use_det else (1.0, 1)
    center, scale = sample_roi(box, im_size, cfg.dzi, rng if cfg.train else None)

    A_in = crop_affine_np(center, scale, S_in)
    A_out = crop_affine_np(center, scale, S_out)
    Rz = None
    if cfg.train and cfg.rotate_prob > 0 and rng.random() < cfg.rotate_prob:
        theta = np.deg2rad(cfg.rotate_max_deg) * rng.uniform(-1.0, 1.0)
        T_in, Rz = inplane_rotation(theta, S_in)
        T_out, _ = inplane_rotation(theta, S_out)
        A_in, A_out = compose(T_in, A_in), compose(T_out, A_out)
    # Stored grids -> output grids (the stored crops hold every pixel these crops can reach).
    M_img_in = compose(A_in, invert(ex["image_affine"]))
    M_img_out = compose(A_out, invert(ex["image_affine"]))
    M_xyz_out = compose(A_out, invert(ex["xyz_affine"]))
    border = dict(borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # a rotated crop's corners reach beyond the stored window: mirror the image there
    image_border = border if Rz is None else dict(borderMode=cv2.BORDER_REFLECT_101)
    image = cv2.warpAffine(ex["image"], M_img_in, (S_in, S_in), flags=cv2.INTER_LINEAR, **image_border)
    mask_s = np.ascontiguousarray(ex["mask_visib"][..., 0])
    # Nearest neighbour for the targets: object coordinates are never blended across edges.
    xyz = cv2.warpAffine(ex["xyz"].astype(np.float32), M_xyz_out, (S_out, S_out), flags=cv2.INTER_NEAREST, **border)
    mask_full = np.any(xyz != 0, axis=-1)
    mask_visib = (cv2.warpAffine(mask_s, M_img_out, (S_out, S_out), flags=cv2.INTER_NEAREST, **border) > 0) & mask_full

    if cfg.train:
        if rng.random() < cfg.bg_prob:
            mask_in = cv2.warpAffine(mask_s, M_img_in, (S_in, S_in), flags=cv2.INTER_NEAREST, **border)
            image = replace_background(image, mask_in, backgrounds.sample(rng, S_in, S_in))
        if rng.random() < cfg.color_prob:
            image = color_augment(rng, image)

    K = np.asarray(ex["K"], dtype=np.float64)
    R, t = np.asarray(ex["R"], dtype=np.float64), np.asarray(ex["t"], dtype=np.float64)
    K_out, K_in = crop_intrinsics_np(K, center, scale, S_out), crop_intrinsics_np(K, center, scale, S_in)
    if Rz is not None:
        # the rotated crop is the view of the camera rotated about its optical axis by Rz;
        # K: the full image's intrinsics of that camera (K_out = crop_affine_np(...) K)
        K_out = np.vstack([T_out, [0.0, 0.0, 1.0]]) @ K_out @ Rz.T
        K_in = np.vstack([T_in, [0.0, 0.0, 1.0]]) @ K_in @ Rz.T
        K = np.linalg.solve(np.vstack([crop_affine_np(center, scale, S_out), [0.0, 0.0, 1.0]]), K_out)
        R, t = Rz @ R, Rz @ t
    k = cfg.obj_index[int(ex["obj_id"])]
    out = {
        "image": image.astype(np.float32) * np.float32(1.0 / 255.0),
        "xyz": xyz,
        "mask_visib": mask_visib.astype(np.float32),
        "mask_full": mask_full.astype(np.float32),
        "K_out": K_out.astype(np.float32),
        "K_in": K_in.astype(np.float32),
        "K": K.astype(np.float32),
        "R": R.astype(np.float32),
        "t": t.astype(np.float32),
        "obj_id": np.int32(ex["obj_id"]),
        "obj_index": np.int32(k),
        "bbox3d": cfg.bbox3d[k],
        "diameter": cfg.diameter[k],
        "roi_center": center.astype(np.float32),
        "roi_scale": np.float32(scale),
        "bbox": np.asarray(box, dtype=np.float32),
        "score": np.float32(score),
        "has_box": np.int32(has_box),
        "visib_fract": np.float32(ex["visib_fract"]),
        "scene_id": np.int32(ex["scene_id"]),
        "im_id": np.int32(ex["im_id"]),
        "gt_idx": np.int32(ex["gt_idx"]),
        "valid_example": np.float32(1.0),
    }
    if cfg.keypoints is not None:
        out.update(_keypoint_targets(cfg.keypoints[k], out, S_out))
    return out


class _TrainCrop(grain.RandomMapTransform):
    def __init__(self, cfg: _CropConfig, backgrounds: BackgroundSource):
        self.cfg, self.backgrounds = cfg, backgrounds

    def random_map(self, element, rng: np.random.Generator):
        return _crop(element, self.cfg, rng, self.backgrounds)


class _EvalCrop(grain.MapTransform):
    def __init__(self, cfg: _CropConfig):
        self.cfg = cfg

    def map(self, element):
        return _crop(element, self.cfg, None, None)


class _PadBatch(grain.MapTransform):
    """Pads the last (partial) evaluation batch to the batch size; valid_example is 0 there."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def map(self, batch):
        n = len(batch["valid_example"])
        if n == self.batch_size:
            return batch
        out = {}
        for key, v in batch.items():
            v = np.asarray(v)
            out[key] = np.concatenate([v, np.zeros((self.batch_size - n,) + v.shape[1:], dtype=v.dtype)])
        return out


def _shard_size(n: int, index: int, count: int, drop_remainder: bool) -> int:
    """Records of shard `index` (grain's even split: contiguous pieces, the first n % count
    shards one longer unless the remainder is dropped)."""
    per, rem = divmod(n, count)
    return per + (1 if (not drop_remainder and index < rem) else 0)


class Loader:
    """An iterable of batches (see the module docstring for the keys).

    ``iter(loader)`` returns grain's DataLoaderIterator (``get_state`` / ``set_state``).
    """

    def __init__(self, data_loader, *, dataset_dir, split, batch_size, train, num_examples, num_examples_total,
                 shard, models, indices):
        self.data_loader = data_loader
        self.dataset_dir = dataset_dir
        self.split = split
        self.batch_size = batch_size
        self.train = train
        self.num_examples = num_examples  # in this shard, per epoch
        self.num_examples_total = num_examples_total  # all shards
        self.shard = shard
        self.models = models
        self.indices = indices  # record indices of the TFDS split used (all shards)

    @property
    def steps_per_epoch(self) -> int:
        if self.train:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)

    def __iter__(self):
        return iter(self.data_loader)

    def __repr__(self) -> str:
        return (f"Loader(split={self.split!r}, train={self.train}, batch_size={self.batch_size}, "
                f"num_examples={self.num_examples}, shard={self.shard}, dir={self.dataset_dir!r})")


def _ensure_absl_flags_parsed():
    # grain reads absl flags (e.g. grain_enable_multiprocess_worker_profiling) when it starts
    # workers; outside an absl app they are unparsed and reading them raises. Marking them
    # parsed keeps their defaults; an absl app parses argv itself before this runs.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_loader(
    tfds_dir: str | os.PathLike,
    split: str,
    batch_size: int,
    train: bool,
    seed: int = 0,
    shard: tuple[int, int] = (0, 1),
    *,
    worker_count: int = 2,
    worker_buffer_size: int = 2,
    num_epochs: int | None = None,
    boxes: str = "gt",
    min_visib_fract: float | None = None,
    obj_ids: Sequence[int] | None = None,
    background_dir: str | os.PathLike | None = None,
    dzi: DZIConfig = DZIConfig(),
    color_aug_prob: float = 0.8,
    bg_switch_prob: float = 0.5,
    rotate_prob: float = 0.0,
    rotate_max_deg: float = 180.0,
    input_size: int = 256,
    output_size: int = 64,
    read_threads: int = 4,
    keypoints: str | None = None,
) -> Loader:
    """A grain loader of crops of one split of an lcpose TFDS dataset.

    Args:
      tfds_dir: the dataset (see `resolve_dataset_dir`), e.g. what
        `lcpose.data.synthetic.ensure_synthetic_tfds()` or ``build_tfds`` returned.
      split: TFDS split = BOP split name ("train_pbr", "train_real", "test", ...); several
        joined by "+" ("train_pbr+train_real") are read as one (the YCB-V recipe).
      batch_size: examples per batch.
      train: training mode (augmentation, shuffling, infinite repetition) or evaluation.
      seed: 32-bit seed of the order and of every random draw.
      shard: (index, count): this process's part of the data.
      worker_count: worker processes (0: in the calling process).
      num_epochs: None = infinite in training, 1 in evaluation.
      boxes: "gt" (GT visible box) or "detections" (the matched detection; test splits).
      min_visib_fract: keep instances at least this visible (default 0.3 training, 0 eval).
      obj_ids: keep only these objects (default: all of the dataset).
      background_dir: folder of background images for the background switch (default:
        procedural backgrounds).
      dzi: dynamic zoom-in parameters (training).
      color_aug_prob, bg_switch_prob: augmentation probabilities (training).
      rotate_prob, rotate_max_deg: in-plane rotation of the crop (training; the LC reference:
        1 and 180, i.e. any angle); R, t, K, K_in, K_out of a rotated crop are those of the
        camera rotated about its optical axis (module docstring).
      input_size, output_size: crop sizes (256 and 64 in the paper).
      keypoints: a keypoint spec (`lcpose.data.keypoints`, e.g. "fps16"): adds ``kpt3d``,
        ``kpt2d``, ``kpt_in_crop`` (KEYPOINT_KEYS) to every example; None: no keypoint keys.
    """
    import tensorflow_datasets as tfds

    from lcpose.data.tfds_builder import read_meta

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    index, count = (int(x) for x in shard)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
    if boxes not in ("gt", "detections"):
        raise ValueError(f"boxes must be 'gt' or 'detections', got {boxes!r}")
    if not (isinstance(seed, (int, np.integer)) and 0 <= int(seed) < 2**32):
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    for name, p in (("color_aug_prob", color_aug_prob), ("bg_switch_prob", bg_switch_prob),
                    ("rotate_prob", rotate_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    d = resolve_dataset_dir(tfds_dir)
    meta = read_meta(d)
    parts = [p for p in split.split("+") if p]
    for part in parts or [split]:
        if part not in meta["splits"]:
            raise ValueError(f"split {part!r} not in {d} (has: {', '.join(sorted(meta['splits'])) or 'none'})")
    store = meta["params"]
    if train and dzi.reach > store["window_factor"] + 1e-9:
        raise ValueError(
            f"dzi reaches {dzi.reach:.3f} x the box size but {d} stores windows of {store['window_factor']} x; "
            "rebuild the dataset with a larger StoreConfig.window_factor"
        )
    index_arrays = {}
    for part in parts:
        idx_path = os.path.join(d, f"lcpose_index-{part}.npz")
        if not os.path.isfile(idx_path):
            raise FileNotFoundError(f"lcpose split index not found: {idx_path}")
        z = np.load(idx_path)
        for k in ("visib_fract", "obj_id"):
            index_arrays.setdefault(k, []).append(z[k])
    index_arrays = {k: np.concatenate(v) for k, v in index_arrays.items()}
    if min_visib_fract is None:
        min_visib_fract = 0.3 if train else 0.0
    keep = index_arrays["visib_fract"] >= min_visib_fract
    models = load_model_table(d)
    if obj_ids is not None:
        unknown = sorted(set(int(o) for o in obj_ids) - set(models.obj_ids.tolist()))
        if unknown:
            raise ValueError(f"obj_ids {unknown} are not in {d} (has {models.obj_ids.tolist()})")
        keep &= np.isin(index_arrays["obj_id"], np.asarray(obj_ids))
    indices = np.nonzero(keep)[0]
    if len(indices) == 0:
        raise ValueError(f"no examples in split {split!r} of {d} after filtering "
                         f"(min_visib_fract={min_visib_fract}, obj_ids={obj_ids})")
    if len(indices) < count:
        raise ValueError(f"{len(indices)} examples cannot be split into {count} shards")

    kpts = None
    if keypoints is not None:
        from lcpose.data.keypoints import ensure_keypoints

        kp_ids, kpts = ensure_keypoints(d, keypoints)
        if not np.array_equal(kp_ids, models.obj_ids):
            raise ValueError(f"keypoints of {d} cover objects {kp_ids.tolist()}, the model table {models.obj_ids.tolist()}")
    builder = tfds.builder_from_directory(d)
    sources = [builder.as_data_source(split=part) for part in parts]
    data = _Subset(sources[0] if len(sources) == 1 else _Concat(sources), indices)
    cfg = _CropConfig(
        train=bool(train), boxes=boxes, dzi=dzi, input_size=int(input_size), output_size=int(output_size),
        color_prob=float(color_aug_prob), bg_prob=float(bg_switch_prob),
        rotate_prob=float(rotate_prob), rotate_max_deg=float(rotate_max_deg),
        obj_index={int(o): i for i, o in enumerate(models.obj_ids)}, bbox3d=models.bbox3d, diameter=models.diameter,
        keypoints=kpts,
    )
    shard_options = grain.ShardOptions(shard_index=index, shard_count=count, drop_remainder=bool(train))
    if num_epochs is None and not train:
        num_epochs = 1
    sampler = grain.IndexSampler(num_records=len(data), shard_options=shard_options, shuffle=bool(train),
                                 num_epochs=num_epochs, seed=int(seed))
    if train:
        backgrounds = BackgroundSource(background_dir)
        ops = [_TrainCrop(cfg, backgrounds), grain.Batch(batch_size, drop_remainder=True)]
    else:
        ops = [_EvalCrop(cfg), grain.Batch(batch_size, drop_remainder=False), _PadBatch(batch_size)]
    _ensure_absl_flags_parsed()
    loader = grain.DataLoader(
        data_source=data, sampler=sampler, operations=ops, worker_count=int(worker_count),
        worker_buffer_size=int(worker_buffer_size),
        read_options=grain.ReadOptions(num_threads=int(read_threads), prefetch_buffer_size=2 * batch_size),
    )
    return Loader(loader, dataset_dir=d, split=split, batch_size=batch_size, train=bool(train),
                  num_examples=_shard_size(len(data), index, count, bool(train)), num_examples_total=len(data), shard=(index, count), models=models,
                  indices=indices)
