"""BOP -> TFDS conversion: one `array_record` example per object instance, no TensorFlow.

`build_tfds(bop_root, dataset, splits, out)` writes a TFDS dataset ``bop_<dataset>`` (version
1.0.0) under `out`, one TFDS split per BOP split, readable with ``tfds.data_source`` /
``tfds.builder_from_directory(...).as_data_source(split)`` and grain. TensorFlow is needed
neither to build nor to read it.

How it is written: examples are encoded with the TFDS feature connectors (`features()`) and
serialised by TFDS's example serializer, written to ``array_record`` shards with TFDS's
file naming, and described by ``tfds.folder_dataset.write_metadata`` (dataset_info.json,
features.json). ``GeneratorBasedBuilder`` is not used on purpose: its shuffler spills splits
larger than 1 GB to temporary files through ``tf.io.gfile``, i.e. it needs TensorFlow for
real BOP datasets (LM PBR alone is tens of GB of crops). Examples keep the BOP order
(scene, image, instance), grain shuffles at read time.

Each example holds what training needs to crop on the fly (see `FEATURES_DOC`): a window of the
image around the instance (large enough for every dynamic zoom-in crop, `crops.DZIConfig`,
and for the detection box on test splits) at native resolution or, for large objects, at
the resolution of the most zoomed-in 256x256 training crop; the visible mask on the same
grid; the object coordinates (xyz, mm, float16) of the whole object (rendered without
occluders by `lcpose.data.render`) at a resolution that gives at least `xyz_oversample`
samples per 64x64 output pixel; the 2x3 affine maps from full-image pixels to both grids;
K, R, t, ids, boxes, visible fraction, and the matched detection (test splits).

Next to the TFDS files the converter writes ``lcpose_meta.json`` (dataset, object ids,
models_info, storage parameters, per-split statistics), ``lcpose_models.npz`` (per object:
1000 model points, diameter), ``lcpose_keypoints-fps16.npz`` (the sparse network's 16
keypoints per object, `lcpose.data.keypoints`) and ``lcpose_index-<split>.npz`` (per example: obj_id,
scene_id, im_id, gt_idx, visib_fract, has_det), which the loader uses to filter examples
without decoding them.

Re-running skips splits that are complete; an interrupted split is rebuilt from scratch.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import math
import multiprocessing
import os
import sys
import time
import warnings
from typing import Sequence

import cv2
import numpy as np

from lcpose.data import bop
from lcpose.data.crops import DZIConfig, bbox_center_size, resize_affine

__all__ = ["StoreConfig", "features", "FEATURES_DOC", "build_tfds", "dataset_dir", "read_meta", "read_image_list",
           "DATASET_VERSION"]

DATASET_VERSION = "1.0.0"
_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
_SHARD_BYTES = 512 << 20
_META = "lcpose_meta.json"
_MODELS = "lcpose_models.npz"
_LM_NAMES = {
    1: "ape", 2: "benchvise", 3: "bowl", 4: "camera", 5: "can", 6: "cat", 7: "cup", 8: "driller",
    9: "duck", 10: "eggbox", 11: "glue", 12: "holepuncher", 13: "iron", 14: "lamp", 15: "phone",
}


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """What is stored around each instance.

    window_factor: half side of the stored image window in units of s = max(w, h) of the box;
      must be >= DZIConfig.reach of the loader (1.1875 for the paper's DZI).
    min_scale: smallest crop side / s the loader will draw (DZIConfig.min_scale, 1.125); with
      input_size/output_size it sets the stored resolutions.
    test_pad_scale: pad scale of test crops (detection boxes).
    xyz_oversample: xyz samples per output pixel at the smallest crop (>= 1; nearest-neighbour
      resampling then moves a target by at most 0.71 / xyz_oversample output pixels).
    image_format: "auto" (JPEG, quality 95, for JPEG source images such as BOP's PBR
      renderings; lossless PNG for PNG sources), "png" or "jpeg".
    """

    window_factor: float = 1.25
    min_scale: float = DZIConfig().min_scale
    test_pad_scale: float = DZIConfig().pad_scale
    input_size: int = 256
    output_size: int = 64
    xyz_oversample: float = 1.5
    image_format: str = "auto"

    def __post_init__(self):
        if self.window_factor < DZIConfig().reach:
            raise ValueError(f"window_factor {self.window_factor} < {DZIConfig().reach}, the reach of the default DZI")
        if self.image_format not in ("auto", "png", "jpeg"):
            raise ValueError(f"image_format must be 'auto', 'png' or 'jpeg', got {self.image_format!r}")
        if self.xyz_oversample < 1:
            raise ValueError(f"xyz_oversample must be >= 1, got {self.xyz_oversample}")


def features(image_format: str = "auto"):
    """The TFDS feature dictionary of an example (`FEATURES_DOC` describes the fields)."""
    import tensorflow_datasets as tfds

    if image_format == "auto":
        image_format = None  # per example PNG or JPEG; decoding detects the format

    T = tfds.features.Tensor
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=image_format),
            "image_affine": T(shape=(2, 3), dtype=np.float64),
            "mask_visib": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "xyz": T(shape=(None, None, 3), dtype=np.float16, encoding="zlib"),
            "xyz_affine": T(shape=(2, 3), dtype=np.float64),
            "K": T(shape=(3, 3), dtype=np.float64),
            "R": T(shape=(3, 3), dtype=np.float64),
            "t": T(shape=(3,), dtype=np.float64),
            "obj_id": np.int32,
            "scene_id": np.int32,
            "im_id": np.int32,
            "gt_idx": np.int32,
            "im_size": T(shape=(2,), dtype=np.int32),
            "bbox_obj": T(shape=(4,), dtype=np.float32),
            "bbox_visib": T(shape=(4,), dtype=np.float32),
            "visib_fract": np.float32,
            "px_count_visib": np.int32,
            "det_bbox": T(shape=(4,), dtype=np.float32),
            "det_score": np.float32,
            "has_det": np.int32,
        }
    )


FEATURES_DOC = """Fields of an example:

image         (h, w, 3) uint8 RGB   window of the image around the instance
image_affine  (2, 3) float64        full-image pixels -> `image` pixels
mask_visib    (h, w, 1) uint8 0/1   visible mask on the `image` grid
xyz           (hx, wx, 3) float16   object coordinates (mm) of the whole object, 0 off-object
xyz_affine    (2, 3) float64        full-image pixels -> `xyz` pixels
K, R, t                             camera intrinsics and pose (model -> camera, mm)
obj_id, scene_id, im_id, gt_idx     BOP ids (gt_idx: index in scene_gt.json of the image)
im_size       (2,) int32            full image (width, height)
bbox_obj, bbox_visib (4,) float32   BOP boxes [x, y, w, h] in full-image pixels
visib_fract, px_count_visib         from scene_gt_info.json
det_bbox, det_score, has_det        matched detection (test splits), zeros when none
"""




# ------------------------------------------------------------------------------------------
# Per-image work (worker processes)
# ------------------------------------------------------------------------------------------

_W: dict = {}


def _init_worker(models_dir: str, obj_ids: Sequence[int], store: StoreConfig):
    from tensorflow_datasets.core import example_serializer

    feats = features(store.image_format)
    _W.update(
        models={o: bop.load_model(os.path.join(models_dir, f"obj_{o:06d}.ply"))[:2] for o in obj_ids},
        store=store,
        features=feats,
        serializer=example_serializer.ExampleSerializer(feats.get_serialized_info()),
    )


def _window(center, half, W, H):
    x0 = max(int(math.floor(center[0] - half)), 0)
    y0 = max(int(math.floor(center[1] - half)), 0)
    x1 = min(int(math.ceil(center[0] + half)) + 1, W)
    y1 = min(int(math.ceil(center[1] + half)) + 1, H)
    return x0, y0, x1, y1


def _union(a, b):
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def _encode_png(img: np.ndarray, png_filter=cv2.IMWRITE_PNG_FILTER_SUB) -> bytes:
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, png_filter])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _encode_image(rgb: np.ndarray, fmt: str) -> bytes:
    bgr = np.ascontiguousarray(rgb[..., ::-1])  # TFDS decodes with OpenCV and swaps back
    if fmt == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        return buf.tobytes()
    return _encode_png(bgr)


def _instance_example(img, mask_visib, inst: dict, store: StoreConfig, models) -> dict:
    from lcpose.data.render import render_xyz

    H, W = img.shape[:2]
    K, R, t = inst["K"], inst["R"], inst["t"]
    c, s, _, _ = bbox_center_size(inst["bbox_visib"])
    s_min = min(store.min_scale * s, float(max(W, H)))
    f_img = min(1.0, store.input_size / s_min)
    f_xyz = store.xyz_oversample * store.output_size / s_min
    win = _window(c, store.window_factor * s + 2.0, W, H)
    if inst["has_det"]:
        cd, sd, _, _ = bbox_center_size(inst["det_bbox"])
        sd_test = min(store.test_pad_scale * sd, float(max(W, H)))
        f_img = max(f_img, min(1.0, store.input_size / sd_test))
        f_xyz = max(f_xyz, store.xyz_oversample * store.output_size / sd_test)
        dwin = _window(cd, store.window_factor * sd + 2.0, W, H)
        if dwin[2] > dwin[0] and dwin[3] > dwin[1]:
            win = _union(win, dwin)
    x0, y0, x1, y1 = win
    w, h = x1 - x0, y1 - y0
    if f_img >= 1.0:
        A_img = resize_affine(x0, y0, w, h, w, h)
        img_s = img[y0:y1, x0:x1]
        mask_s = mask_visib[y0:y1, x0:x1]
    else:
        ow, oh = max(1, int(round(w * f_img))), max(1, int(round(h * f_img)))
        A_img = resize_affine(x0, y0, w, h, ow, oh)
        img_s = cv2.resize(np.ascontiguousarray(img[y0:y1, x0:x1]), (ow, oh), interpolation=cv2.INTER_AREA)
        mask_s = cv2.warpAffine(mask_visib.astype(np.uint8), A_img, (ow, oh), flags=cv2.INTER_NEAREST)

    # xyz of the whole object (no occluders), rendered on the window at its own resolution,
    # then cut to the object's box (1 px margin) -- zeros elsewhere are implied.
    V, F = models[inst["obj_id"]]
    f_xyz = min(f_xyz, 1024.0 / max(w, h))  # cap the map at 1024 px
    ow, oh = max(1, int(math.ceil(w * f_xyz))), max(1, int(math.ceil(h * f_xyz)))
    A_xyz = resize_affine(x0, y0, w, h, ow, oh)
    K_xyz = np.vstack([A_xyz, [0.0, 0.0, 1.0]]) @ K
    xyz, obj_mask, _ = render_xyz(V, F, R, t, K_xyz, ow, oh)
    ys, xs = np.nonzero(obj_mask)
    if len(xs):
        a0, a1 = max(int(ys.min()) - 1, 0), min(int(ys.max()) + 2, oh)
        b0, b1 = max(int(xs.min()) - 1, 0), min(int(xs.max()) + 2, ow)
    else:  # the object misses the window (cannot happen for a visible instance)
        a0, a1, b0, b1 = 0, 1, 0, 1
    xyz = xyz[a0:a1, b0:b1]
    A_xyz = A_xyz - np.array([[0.0, 0.0, b0], [0.0, 0.0, a0]])

    return {
        "image": _encode_image(np.ascontiguousarray(img_s), inst["image_format"]),
        "image_affine": A_img,
        "mask_visib": _encode_png((mask_s > 0).astype(np.uint8)[..., None], cv2.IMWRITE_PNG_FILTER_NONE),
        "xyz": xyz.astype(np.float16),
        "xyz_affine": A_xyz,
        "K": K,
        "R": R,
        "t": t,
        "obj_id": inst["obj_id"],
        "scene_id": inst["scene_id"],
        "im_id": inst["im_id"],
        "gt_idx": inst["gt_idx"],
        "im_size": np.array([W, H], dtype=np.int32),
        "bbox_obj": np.asarray(inst["bbox_obj"], dtype=np.float32),
        "bbox_visib": np.asarray(inst["bbox_visib"], dtype=np.float32),
        "visib_fract": np.float32(inst["visib_fract"]),
        "px_count_visib": np.int32(inst["px_count_visib"]),
        "det_bbox": np.asarray(inst["det_bbox"], dtype=np.float32),
        "det_score": np.float32(inst["det_score"]),
        "has_det": np.int32(inst["has_det"]),
    }


def _process_image(task):
    """(serialised examples, index rows) of one image's instances."""
    rgb_path, insts = task
    img = bop.load_image(rgb_path)
    fmt = _W["store"].image_format
    if fmt == "auto":
        fmt = "jpeg" if os.path.splitext(rgb_path)[1].lower() in (".jpg", ".jpeg") else "png"
    out, rows = [], []
    for inst in insts:
        inst = dict(inst, image_format=fmt)
        mask = bop.load_mask(inst["mask_path"])
        if mask.shape != img.shape[:2]:
            raise bop.BopFormatError(f"{inst['mask_path']}: mask size {mask.shape} != image size {img.shape[:2]} of {rgb_path}")
        ex = _instance_example(img, mask, inst, _W["store"], _W["models"])
        encoded = _W["features"].encode_example(ex)
        out.append(_W["serializer"].serialize_example(encoded))
        rows.append((inst["obj_id"], inst["scene_id"], inst["im_id"], inst["gt_idx"], inst["visib_fract"], inst["has_det"]))
    return out, rows


# ------------------------------------------------------------------------------------------
# Task lists per dataset / split
# ------------------------------------------------------------------------------------------


def _lm_train_lists(lm_root: str, obj_ids) -> dict[int, list[int]] | None:
    """LM's per-object training image lists (``image_set/<name>_train.txt``, one id per line),
    if present (GDR-Net ships them); None means all images."""
    d = os.path.join(lm_root, "image_set")
    if not os.path.isdir(d):
        return None
    out = {}
    for o in obj_ids:
        path = os.path.join(d, f"{_LM_NAMES[o]}_train.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LM training image list not found: {path} (remove {d} to use all images)")
        with open(path) as fh:
            out[o] = [int(line.strip().split()[0].split(".")[0].split("/")[-1]) for line in fh if line.strip()]
    return out


def _warn_unboxed(detections, dets, split, tasks):
    """Warn when a detection file leaves every test instance without a box (an empty file, or
    one of another dataset): they would all count as misses, silently."""
    n = sum(len(lst) for _, lst in tasks)
    if n and not any(inst["has_det"] for _, lst in tasks for inst in lst):
        what = "holds no detections" if not any(dets.values()) else "has no detection for any of them"
        warnings.warn(f"{detections} {what}: all {n} test instances of split {split!r} are left "
                      f"without a box (each counts as a miss)", stacklevel=3)


def read_image_list(path: str | os.PathLike) -> dict[int, list[int]]:
    """{scene_id: [im_id, ...]} from a list of test images, one per line.

    The last two integers of a line are (scene_id, im_id), so the LC reference's lists
    (``test/000048/rgb/000001.png``), the YCB-Video toolbox's ``keyframe.txt`` (``0048/000001``)
    and plain ``48 1`` lines all work; empty lines and lines starting with # are skipped.
    """
    import re

    out: dict[int, list[int]] = {}
    with open(os.fspath(path)) as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            nums = re.findall(r"\d+", line)
            if len(nums) < 2:
                raise bop.BopFormatError(f"{path}:{n}: expected a scene id and an image id, got {line!r}")
            out.setdefault(int(nums[-2]), []).append(int(nums[-1]))
    if not out:
        raise bop.BopFormatError(f"{path}: no images listed")
    return out


def _tasks(bop_root, dataset, split, *, lm_root, detections, obj_ids, image_stride, min_visib_fract,
           test_list=None):
    """[(rgb path, [instance dicts])] for one split."""
    spec = bop.DATASETS[dataset]
    root = bop_root
    targets = None
    scene_ids = None
    im_ids = None
    if split == spec["test_split"] and test_list is not None:
        im_ids = read_image_list(test_list)      # every instance of the listed images
        scene_ids = sorted(im_ids)
    elif split == spec["test_split"]:
        tpath = os.path.join(bop_root, spec["test_targets"])
        if os.path.isfile(tpath):
            targets = bop.load_test_targets(bop_root, spec["test_targets"])
    from_lm = bool(spec.get("train_real_from_lm")) and split == "train_real"
    if from_lm:
        if lm_root is None:
            raise ValueError("LM-O's real training images are LM's: pass lm_root (the BOP 'lm' folder) for split train_real")
        root = lm_root
        split_dir = "test"  # LM's real images of each object are its BOP test scenes
        scene_ids = [o for o in obj_ids if os.path.isdir(os.path.join(lm_root, "test", f"{o:06d}"))]
        if not scene_ids:
            raise FileNotFoundError(f"no LM scenes for objects {list(obj_ids)} under {os.path.join(lm_root, 'test')}")
        im_ids = _lm_train_lists(lm_root, scene_ids)
    else:
        split_dir = split
    dets = bop.load_detections(detections) if (detections is not None and split == spec["test_split"]) else {}
    tasks = []
    n_skipped = 0
    for scene, im_id, insts in bop.iter_instances(root, split_dir, obj_ids=obj_ids, targets=targets,
                                                 scene_ids=scene_ids, im_ids=im_ids):
        if from_lm:
            insts = [i for i in insts if i.obj_id == scene.scene_id]  # only the scene's object is annotated
        if image_stride > 1 and im_id % image_stride and test_list is None:   # a list is kept whole
            continue
        matched = bop.match_detections(insts, dets.get((scene.scene_id, im_id), [])) if dets else [None] * len(insts)
        lst = []
        for inst, det in zip(insts, matched):
            info = inst.info
            bv = info.get("bbox_visib", [-1, -1, -1, -1])
            vf = float(info.get("visib_fract", 0.0))
            if bv[2] <= 0 or bv[3] <= 0 or vf < min_visib_fract:
                n_skipped += 1
                continue
            lst.append(
                dict(
                    mask_path=scene.mask_path(im_id, inst.gt_idx, visib=True),
                    obj_id=inst.obj_id, scene_id=scene.scene_id, im_id=im_id, gt_idx=inst.gt_idx,
                    K=inst.K, R=inst.R, t=inst.t, bbox_obj=info.get("bbox_obj", [-1, -1, -1, -1]), bbox_visib=bv,
                    visib_fract=vf, px_count_visib=int(info.get("px_count_visib", 0)),
                    det_bbox=det["bbox"] if det else [0.0, 0.0, 0.0, 0.0],
                    det_score=det["score"] if det else 0.0, has_det=int(det is not None),
                )
            )
        if lst:
            tasks.append((scene.rgb_path(im_id), lst))
    if detections is not None and split == spec["test_split"]:
        _warn_unboxed(detections, dets, split, tasks)
    return tasks, n_skipped


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------


def dataset_dir(out: str | os.PathLike, dataset: str) -> str:
    return os.path.join(os.fspath(out), f"bop_{dataset}", DATASET_VERSION)


def read_meta(ds_dir: str) -> dict:
    path = os.path.join(ds_dir, _META)
    return bop.load_json(path, what="lcpose TFDS metadata (lcpose_meta.json)")


def _split_complete(ds_dir: str, split: str) -> bool:
    if not os.path.isfile(os.path.join(ds_dir, _META)) or not os.path.isfile(os.path.join(ds_dir, f"lcpose_index-{split}.npz")):
        return False
    meta = read_meta(ds_dir)
    return split in meta.get("splits", {})


def _write_split(ds_dir, name, split, tasks, workers, progress, init_args):
    from array_record.python import array_record_module

    for p in glob.glob(os.path.join(ds_dir, f"{name}-{split}.array_record*")) + glob.glob(os.path.join(ds_dir, f".tmp-{split}-*")):
        os.remove(p)
    shard_paths, shard_lengths = [], []
    writer = None
    cur_bytes = 0
    total_bytes = 0
    rows = []

    def new_shard():
        nonlocal writer, cur_bytes
        if writer is not None:
            writer.close()
        path = os.path.join(ds_dir, f".tmp-{split}-{len(shard_paths):05d}")
        shard_paths.append(path)
        shard_lengths.append(0)
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        cur_bytes = 0

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc=f"{name}/{split}", unit="img", file=sys.stderr)

    def consume(result):
        nonlocal cur_bytes, total_bytes
        examples, r = result
        for b in examples:
            if writer is None or cur_bytes > _SHARD_BYTES:
                new_shard()
            writer.write(b)
            shard_lengths[-1] += 1
            cur_bytes += len(b)
            total_bytes += len(b)
        rows.extend(r)
        if bar is not None:
            bar.update()

    if workers <= 1 or len(tasks) < 4:
        _init_worker(*init_args)
        for task in tasks:
            consume(_process_image(task))
    else:
        ctx = multiprocessing.get_context("spawn")  # the caller may hold JAX threads
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=init_args) as ex:
            for result in ex.map(_process_image, tasks, chunksize=2):
                consume(result)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    if not rows:
        raise ValueError(f"split {split!r} has no instances to convert")
    n = len(shard_paths)
    for i, p in enumerate(shard_paths):
        os.replace(p, os.path.join(ds_dir, f"{name}-{split}.array_record-{i:05d}-of-{n:05d}"))
    r = np.array(rows, dtype=np.float64)
    np.savez(
        os.path.join(ds_dir, f"lcpose_index-{split}.npz"),
        obj_id=r[:, 0].astype(np.int32), scene_id=r[:, 1].astype(np.int32), im_id=r[:, 2].astype(np.int32),
        gt_idx=r[:, 3].astype(np.int32), visib_fract=r[:, 4].astype(np.float32), has_det=r[:, 5].astype(np.int32),
    )
    return shard_lengths, total_bytes


def _write_tfds_metadata(ds_dir: str, name: str, split_stats: dict, image_format: str) -> None:
    import tensorflow_datasets as tfds

    infos = []
    for split, st in split_stats.items():
        tmpl = tfds.core.ShardedFileTemplate(
            data_dir=ds_dir, template=_TEMPLATE, dataset_name=name, split=split, filetype_suffix="array_record"
        )
        infos.append(tfds.core.SplitInfo(name=split, shard_lengths=list(st["shard_lengths"]),
                                         num_bytes=int(st["num_bytes"]), filename_template=tmpl))
    tfds.folder_dataset.write_metadata(
        data_dir=ds_dir, features=features(image_format), split_infos=infos, filename_template=_TEMPLATE,
        version=DATASET_VERSION, check_data=False,
        description=f"lcpose: BOP instances of '{name}' with crops for dynamic zoom-in (see lcpose.data.tfds_builder).",
    )


def build_tfds(
    bop_root: str | os.PathLike,
    dataset: str,
    splits: Sequence[str],
    out: str | os.PathLike,
    *,
    lm_root: str | os.PathLike | None = None,
    detections: str | os.PathLike | None = None,
    test_list: str | os.PathLike | None = None,
    obj_ids: Sequence[int] | None = None,
    image_stride: int = 1,
    min_visib_fract: float | None = None,
    store: StoreConfig | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> str:
    """Converts BOP splits to the TFDS dataset ``bop_<dataset>``; returns its folder.

    Args:
      bop_root: the BOP dataset folder (``lmo``, ``ycbv``, or a synthetic set).
      dataset: "lmo", "ycbv" or "synthetic" (object ids, test split, targets; `bop.DATASETS`).
      splits: BOP split names, e.g. ["train_pbr", "test"]. For "lmo", "train_real" reads LM's
        real images of the 8 LM-O objects from `lm_root` (LM's ``test/<obj_id>`` scenes,
        restricted to ``image_set/<name>_train.txt`` when that folder exists).
      detections: detection file (GDR-Net or BOP'22 json) for the test split; for the
        synthetic set it defaults to ``<bop_root>/detections_test.json``.
      test_list: a list of test images (`read_image_list`, e.g. the 2949 YCB-V keyframes of
        GDR-Net / the LC paper): the test split holds every instance of those images instead of
        the BOP-19 test targets. Recorded in the split's metadata.
      obj_ids: objects to keep (default: the dataset's, e.g. LM-O's eight).
      image_stride: keep every n-th image of each scene (subsample large splits).
      min_visib_fract: instances less visible are not stored (default 0.1 for training
        splits, 0 for the test split, whose instances come from the test targets).
      store: storage parameters (`StoreConfig`).
      workers: worker processes (default: CPU count, at most 8).
    """
    bop_root = os.fspath(bop_root)
    if dataset not in bop.DATASETS:
        raise ValueError(f"dataset must be one of {sorted(bop.DATASETS)}, got {dataset!r}")
    if isinstance(splits, str):
        splits = [s for s in splits.split(",") if s]
    if not splits:
        raise ValueError("splits is empty")
    if image_stride < 1:
        raise ValueError(f"image_stride must be >= 1, got {image_stride}")
    store = store or StoreConfig()
    spec = bop.DATASETS[dataset]
    models_info = bop.load_models_info(bop_root)
    if obj_ids is None:
        obj_ids = spec["obj_ids"] if spec["obj_ids"] is not None else sorted(models_info)
    obj_ids = [int(o) for o in obj_ids]
    missing = [o for o in obj_ids if o not in models_info]
    if missing:
        raise bop.BopFormatError(f"{os.path.join(bop_root, 'models', 'models_info.json')}: no entry for obj_ids {missing}")
    if detections is None and spec.get("detections_file"):
        cand = os.path.join(bop_root, spec["detections_file"])
        detections = cand if os.path.isfile(cand) else None
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    name = f"bop_{dataset}"
    ds_dir = dataset_dir(out, dataset)
    if not all(_split_complete(ds_dir, split) for split in splits):
        from lcpose.data.synthetic import check_writable

        check_writable(ds_dir)     # one line naming the folder (LCPOSE_CACHE) instead of an OSError
    os.makedirs(ds_dir, exist_ok=True)

    meta_path = os.path.join(ds_dir, _META)
    meta = read_meta(ds_dir) if os.path.isfile(meta_path) else None
    params = dict(dataclasses.asdict(store), obj_ids=obj_ids, dataset=dataset)
    if meta is not None and any(meta["params"].get(k) != v for k, v in params.items()):
        raise ValueError(
            f"{meta_path} was written with other parameters ({meta['params']}); "
            f"use another output folder or delete {ds_dir}"
        )
    if meta is None:
        meta = {"params": params, "bop_root": os.path.abspath(bop_root), "splits": {},
                "models_info": {str(o): models_info[o] for o in obj_ids}}
        # Fixed-size model point sets for metrics (ADD/ADD-S) and the diameters.
        pts, diam = [], []
        for o in obj_ids:
            V, _, _ = bop.load_model(os.path.join(bop_root, "models", f"obj_{o:06d}.ply"))
            pts.append(bop.sample_model_points(V, 1000, seed=0))
            diam.append(float(models_info[o]["diameter"]))
        np.savez(os.path.join(ds_dir, _MODELS), obj_ids=np.array(obj_ids, dtype=np.int32),
                 points=np.stack(pts).astype(np.float32), diameter=np.array(diam, dtype=np.float32))
    init_args = (os.path.join(bop_root, "models"), obj_ids, store)
    for split in splits:
        if _split_complete(ds_dir, split):
            if progress:
                print(f"{name}/{split}: already built, skipped", file=sys.stderr)
            continue
        t0 = time.time()
        mvf = min_visib_fract if min_visib_fract is not None else (0.0 if split == spec["test_split"] else 0.1)
        tasks, n_skipped = _tasks(bop_root, dataset, split, lm_root=None if lm_root is None else os.fspath(lm_root),
                                  detections=detections, obj_ids=obj_ids, image_stride=image_stride, min_visib_fract=mvf,
                                  test_list=test_list if split == spec["test_split"] else None)
        if not tasks:
            raise ValueError(f"split {split!r} of {bop_root} has no instances of objects {obj_ids} to convert")
        shard_lengths, num_bytes = _write_split(ds_dir, name, split, tasks, workers, progress, init_args)
        meta["splits"][split] = dict(
            num_examples=int(sum(shard_lengths)), num_images=len(tasks), skipped_instances=n_skipped,
            instances_without_box=int(sum(1 for _, lst in tasks for i in lst if not i["has_det"]))
            if split == spec["test_split"] else None,
            min_visib_fract=mvf, shard_lengths=shard_lengths, num_bytes=num_bytes,
            detections=None if detections is None or split != spec["test_split"] else os.path.abspath(detections),
            test_list=None if test_list is None or split != spec["test_split"] else os.path.abspath(test_list),
            seconds=round(time.time() - t0, 1),
        )
        _write_tfds_metadata(ds_dir, name, meta["splits"], store.image_format)
        tmp = meta_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(meta, fh, indent=1)
        os.replace(tmp, meta_path)
    # The sparse network's default keypoints (16 by FPS on each model's surface), computed from
    # the same PLY files; other specs are computed on first use (make_loader(keypoints=...)).
    from lcpose.data.keypoints import DEFAULT_SPEC, ensure_keypoints

    ensure_keypoints(ds_dir, DEFAULT_SPEC, models_dir=os.path.join(bop_root, "models"))
    return ds_dir
