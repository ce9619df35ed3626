"""BOP round trip: synthetic set (CLI) -> BOP reader -> TFDS (CLI) -> grain loader.

One tiny set is generated once per module (3 objects, 4 train_pbr + 2 test images at LM-O's
640x480) and converted once.
"""
import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from lcpose import geometry
from lcpose.data import bop, synthetic
from lcpose.data.pipeline import OUTPUT_KEYS, load_model_table, make_loader
from lcpose.data.render import rasterize

K_LMO = synthetic.LMO_K
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from data_prep import build_tfds, make_synthetic_bop

    base = tmp_path_factory.mktemp("bop")
    root = str(base / "synth")
    assert make_synthetic_bop.main(["--out", root, "--objects", "3", "--train-images", "4", "--test-images", "2",
                                    "--seed", "5", "--images-per-scene", "2", "--workers", "0"]) == 0
    out = str(base / "tfds")
    assert build_tfds.main(["--bop_root", root, "--dataset", "synthetic", "--splits", "train_pbr,test",
                            "--out", out, "--workers", "0"]) == 0
    return root, out, os.path.join(out, "bop_synthetic", "1.0.0")


def _project(X, R, t, K):
    return np.asarray(geometry.project(X.astype(np.float64), R.astype(np.float64), t.astype(np.float64), K.astype(np.float64)))


# ------------------------------------------------------------------------------------------
# The synthetic set and the reader
# ------------------------------------------------------------------------------------------


def test_synthetic_set_is_valid_bop(data):
    root = data[0]
    assert sorted(bop.list_splits(root)) == ["test", "train_pbr"]
    assert bop.list_scenes(root, "train_pbr") == [0, 1] and bop.list_scenes(root, "test") == [0]
    cam = json.load(open(os.path.join(root, "camera.json")))
    assert (cam["width"], cam["height"], cam["fx"], cam["cy"]) == (640, 480, 572.4114, 242.04899)
    models = bop.load_models(root)
    assert sorted(models) == [1, 2, 3]
    for m in models.values():
        assert 50 <= m.diameter <= 250 and m.colors is not None and len(m.faces) > 100
        np.testing.assert_allclose(m.vertices.min(0), [m.info["min_x"], m.info["min_y"], m.info["min_z"]], atol=1e-4)
        np.testing.assert_allclose(m.bbox3d.min(0), m.vertices.min(0), atol=1e-4)
        np.testing.assert_allclose(m.bbox3d.max(0), m.vertices.max(0), atol=1e-3)
    assert not models[1].symmetric
    pts = bop.sample_model_points(models[1], 1000, seed=0)
    assert pts.shape == (1000, 3) and np.array_equal(pts, bop.sample_model_points(models[1].vertices, 1000, seed=0))
    assert len(np.unique(pts, axis=0)) == 1000 and np.all(np.isin(pts, models[1].vertices))
    syms = np.array(models[2].info["symmetries_discrete"]).reshape(-1, 4, 4)
    assert len(syms) == 3
    # A declared symmetry S leaves the rendered object unchanged: pose (R, t) and (R S, t + R s).
    from lcpose.data.render import shade_lambert

    m = models[2]
    R0, t0 = geometry.so3_exp(np.array([0.4, -0.3, 0.9])), np.array([0.0, 0.0, 600.0])
    R0 = np.asarray(R0, dtype=np.float64)
    colours = [m.colors.astype(np.float32) / 255]

    def look(R, t):
        r = rasterize([(m.vertices, m.faces)], [(R, t)], K_LMO, 640, 480)
        return r, shade_lambert(r, [(m.vertices, m.faces)], [(R, t)], colours, [0.3, -0.2, -1.0], 0.5, 0.5)

    r0, c0 = look(R0, t0)
    for S in syms:
        r1, c1 = look(R0 @ S[:3, :3], t0 + R0 @ S[:3, 3])
        assert (r0.mask ^ r1.mask).sum() <= 0.002 * r0.mask.sum()
        both = r0.mask & r1.mask
        np.testing.assert_allclose(r0.depth[both], r1.depth[both], atol=1e-2)
        assert np.abs(c0[both] - c1[both]).mean() < 0.02
    # ... and an arbitrary rotation about z does not (the texture is not continuous-symmetric).
    r1, c1 = look(R0 @ np.asarray(geometry.so3_exp(np.array([0.0, 0.0, 0.6]))), t0)
    both = r0.mask & r1.mask
    assert (r0.mask ^ r1.mask).sum() > 0.02 * r0.mask.sum() or np.abs(c0[both] - c1[both]).mean() > 0.02
    assert models[3].info["symmetries_continuous"] == [{"axis": [0, 0, 1], "offset": [0, 0, 0]}]

    scene = bop.load_scene(root, "test", 0)
    im_id = scene.im_ids[0]
    img = bop.load_image(scene.rgb_path(im_id))
    depth = bop.load_depth(scene.depth_path(im_id), scene.camera[im_id]["depth_scale"])
    assert img.shape == (480, 640, 3) and depth.shape == (480, 640)
    visib_all = np.zeros((480, 640), bool)
    for k, (g, info) in enumerate(zip(scene.gt[im_id], scene.gt_info[im_id])):
        mv = bop.load_mask(scene.mask_path(im_id, k, visib=True))
        mf = bop.load_mask(scene.mask_path(im_id, k, visib=False))
        assert not np.any(mv & ~mf) and not np.any(mv & visib_all)
        visib_all |= mv
        assert info["px_count_visib"] == mv.sum() and info["px_count_all"] == mf.sum()
        if mv.any():
            ys, xs = np.nonzero(mv)
            assert info["bbox_visib"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        # The stored pose re-renders the stored depth on the visible pixels (0.1 mm PNG steps).
        m = models[g["obj_id"]]
        r = rasterize([(m.vertices, m.faces)], [(g["R"], g["t"])], scene.camera[im_id]["K"], 640, 480)
        np.testing.assert_array_equal(r.mask, mf)
        np.testing.assert_allclose(depth[mv], r.depth[mv], atol=0.06)
    assert np.all(depth[~(depth > 0)] == 0) and np.all(depth[visib_all] > 0)


def test_synthetic_views_are_tabletop_by_default(data):
    # Objects stand on a table seen from 15-75 deg above it: the model z axis points towards
    # the camera by sin(elevation) (camera roll does not change that component).
    root = data[0]
    cfg = json.load(open(os.path.join(root, "synthetic_config.json")))
    assert cfg["views"] == "tabletop"
    zs = []
    for split in ("train_pbr", "test"):
        for scene in sorted(os.listdir(os.path.join(root, split))):
            for gts in json.load(open(os.path.join(root, split, scene, "scene_gt.json"))).values():
                for gt in gts:
                    R = np.asarray(gt["cam_R_m2c"], np.float64).reshape(3, 3)
                    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-6)
                    assert np.linalg.det(R) > 0
                    zs.append(R[2, 2])
    assert len(zs) > 5
    assert np.all((np.asarray(zs) < -np.sin(np.deg2rad(15)) + 1e-6) & (np.asarray(zs) > -np.sin(np.deg2rad(75)) - 1e-6))
    with pytest.raises(ValueError, match="views"):
        synthetic.generate_synthetic_bop(os.path.join(root, "..", "never"), views="upright")


def test_synthetic_generation_is_deterministic(data, tmp_path):
    root = data[0]
    again = synthetic.generate_synthetic_bop(tmp_path / "again", objects=3, train_images=1, test_images=0, seed=5,
                                             images_per_scene=2, workers=0, progress=False)
    a = open(os.path.join(root, "train_pbr", "000000", "rgb", "000000.jpg"), "rb").read()
    b = open(os.path.join(again, "train_pbr", "000000", "rgb", "000000.jpg"), "rb").read()
    assert a == b
    ga = json.load(open(os.path.join(root, "train_pbr", "000000", "scene_gt.json")))["0"]
    gb = json.load(open(os.path.join(again, "train_pbr", "000000", "scene_gt.json")))["0"]
    assert ga == gb
    assert open(os.path.join(root, "models", "obj_000002.ply"), "rb").read() == \
        open(os.path.join(again, "models", "obj_000002.ply"), "rb").read()


def test_detections_and_targets(data):
    root = data[0]
    dets = bop.load_detections(os.path.join(root, synthetic.DETECTIONS_FILE))
    targets = bop.load_test_targets(root)
    assert targets and set(dets) == {(0, 0), (0, 1)}
    raw = json.load(open(os.path.join(root, synthetic.DETECTIONS_FILE)))
    assert set(raw) == {"0/0", "0/1"} and {"obj_id", "bbox_est", "score"} <= set(raw["0/0"][0])
    scene = bop.load_scene(root, "test", 0)
    for t in targets:
        objs = [g["obj_id"] for g in scene.gt[t["im_id"]]]
        assert objs.count(t["obj_id"]) == t["inst_count"]
    # Matching: the best detection of an object goes to its single instance.
    for scene_, im_id, insts in bop.iter_instances(root, "test", targets=targets):
        matched = bop.match_detections(insts, dets[(0, im_id)])
        for inst, d in zip(insts, matched):
            if d is not None:
                assert d["obj_id"] == inst.obj_id
                assert bop._bbox_iou(d["bbox"], inst.info["bbox_visib"]) > 0.3


# ------------------------------------------------------------------------------------------
# Conversion and loading
# ------------------------------------------------------------------------------------------


def test_loader_keys_and_exact_geometry(data):
    root, out, ds = data
    for split, train, boxes in (("train_pbr", True, "gt"), ("test", False, "gt"), ("test", False, "detections")):
        loader = make_loader(out, split, 4, train, seed=1, worker_count=0, num_epochs=1 if train else None, boxes=boxes)
        n_checked = 0
        for batch in loader:
            assert set(batch) == set(OUTPUT_KEYS)
            assert batch["image"].shape == (4, 256, 256, 3) and batch["image"].dtype == np.float32
            assert batch["xyz"].shape == (4, 64, 64, 3) and batch["mask_visib"].shape == (4, 64, 64)
            assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
            for i in np.nonzero(batch["valid_example"])[0]:
                vs, us = np.nonzero(batch["mask_visib"][i])
                if len(us) == 0:
                    continue
                uv = _project(batch["xyz"][i][vs, us], batch["R"][i], batch["t"][i], batch["K_out"][i])
                err = np.linalg.norm(uv - np.stack([us, vs], 1), axis=1)
                # < 1 px required; nearest-neighbour sampling of xyz stored with >= 1.5 samples per
                # output pixel bounds the error by 0.71 / 1.5 = 0.47 px.
                assert err.max() < 0.5, (split, err.max())
                # K_out is the output-grid intrinsics of the crop (geometry.crop_intrinsics).
                K_ref = geometry.crop_intrinsics_np(batch["K"][i], batch["roi_center"][i], batch["roi_scale"][i], 64)
                np.testing.assert_allclose(batch["K_out"][i], K_ref, rtol=1e-5, atol=1e-3)
                assert np.all(batch["xyz"][i][batch["mask_full"][i] == 0] == 0)
                n_checked += 1
        assert n_checked >= 4


def test_inplane_rotation_keeps_projections_on_the_rotated_targets(data):
    """rotate_prob=1: the crop, xyz/mask targets, K_out and R, t rotate together (< 1 px)."""
    root, out, ds = data
    S_in, S_out = 128, 32
    loader = make_loader(out, "train_pbr", 4, True, seed=3, worker_count=0, num_epochs=1, rotate_prob=1.0,
                         input_size=S_in, output_size=S_out)
    plain = make_loader(out, "train_pbr", 4, True, seed=3, worker_count=0, num_epochs=1,
                        input_size=S_in, output_size=S_out)
    angles, n_checked = [], 0
    for batch, ref in zip(loader, plain):
        np.testing.assert_array_equal(batch["gt_idx"], ref["gt_idx"])  # same records, same order
        for i in range(4):
            R, t, K_out = (batch[k][i].astype(np.float64) for k in ("R", "t", "K_out"))
            # R' = Rz R, t' = Rz t with Rz a rotation about the optical axis
            Rz = R @ ref["R"][i].astype(np.float64).T
            np.testing.assert_allclose(Rz[2], [0, 0, 1], atol=1e-5)
            np.testing.assert_allclose(t, Rz @ ref["t"][i], rtol=1e-5, atol=1e-3)
            angles.append(np.degrees(np.arctan2(Rz[1, 0], Rz[0, 0])))
            # K_out stays an intrinsics matrix: last row (0, 0, 1), focal lengths kept
            # (LM-O's fx != fy leaves an off-diagonal term (fx - fy) k sin cos, below 0.01 f)
            np.testing.assert_allclose(K_out[2], [0, 0, 1], atol=1e-6)
            assert abs(K_out[0, 1]) < 1e-2 * K_out[0, 0] and abs(K_out[1, 0]) < 1e-2 * K_out[1, 1]
            np.testing.assert_allclose(np.diag(K_out)[:2], np.diag(ref["K_out"][i])[:2], rtol=1e-2)
            # image and targets rotate alike: K_in is K_out at the input grid's pixel size
            Sc = np.diag([S_in / S_out, S_in / S_out, 1.0])
            Sc[:2, 2] = 0.5 * (S_in / S_out) - 0.5
            np.testing.assert_allclose(batch["K_in"][i], Sc @ K_out, rtol=1e-4, atol=1e-2)
            # K is the full image's intrinsics of the rotated camera
            K_ref = geometry.crop_intrinsics_np(batch["K"][i], batch["roi_center"][i], batch["roi_scale"][i], S_out)
            np.testing.assert_allclose(K_out, K_ref, rtol=1e-5, atol=1e-3)
            vs, us = np.nonzero(batch["mask_visib"][i])
            if len(us) == 0:
                continue
            uv = _project(batch["xyz"][i][vs, us], R, t, K_out)
            err = np.linalg.norm(uv - np.stack([us, vs], 1), axis=1)
            assert err.max() < 0.5, err.max()
            n_checked += 1
            # the visible mask moved with the rotation (not the unrotated mask)
            assert batch["mask_visib"][i].sum() > 0
    assert n_checked >= 4
    assert np.ptp(angles) > 30.0, angles  # rotations of various angles were drawn


def test_round_trip_matches_bop_files(data):
    root, out, ds = data
    loader = make_loader(out, "test", 3, False, worker_count=0, boxes="detections")
    dets = bop.load_detections(os.path.join(root, synthetic.DETECTIONS_FILE))
    targets = {(t["scene_id"], t["im_id"], t["obj_id"]) for t in bop.load_test_targets(root)}
    seen = set()
    for batch in loader:
        for i in np.nonzero(batch["valid_example"])[0]:
            sid, iid, k = int(batch["scene_id"][i]), int(batch["im_id"][i]), int(batch["gt_idx"][i])
            scene = bop.load_scene(root, "test", sid)
            g, info = scene.gt[iid][k], scene.gt_info[iid][k]
            assert (sid, iid, g["obj_id"]) in targets and int(batch["obj_id"][i]) == g["obj_id"]
            np.testing.assert_allclose(batch["R"][i], g["R"], atol=1e-6)
            np.testing.assert_allclose(batch["t"][i], g["t"], atol=1e-3)
            np.testing.assert_allclose(batch["K"][i], scene.camera[iid]["K"], atol=1e-4)
            assert abs(batch["visib_fract"][i] - info["visib_fract"]) < 1e-6
            if batch["has_box"][i]:
                d = [d for d in dets[(sid, iid)] if d["obj_id"] == g["obj_id"]][0]
                np.testing.assert_allclose(batch["bbox"][i], d["bbox"], atol=1e-3)
                assert batch["score"][i] == np.float32(d["score"])
            # The crop composed from the stored window equals the crop of the full BOP image.
            full = bop.load_image(scene.rgb_path(iid))
            A = geometry.crop_affine_np(batch["roi_center"][i], batch["roi_scale"][i], 256)
            ref = cv2.warpAffine(full, A, (256, 256), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            diff = np.abs(batch["image"][i] * 255.0 - ref.astype(np.float32))
            assert np.mean(diff) < 0.5 and np.percentile(diff, 99) <= 2.0
            seen.add((sid, iid, k))
    assert len(seen) == loader.num_examples == loader.num_examples_total
    table = load_model_table(out)
    models = bop.load_models(root)
    assert table.obj_ids.tolist() == [1, 2, 3] and table.points.shape == (3, 1000, 3)
    np.testing.assert_allclose(table.bbox3d, np.stack([models[o].bbox3d for o in (1, 2, 3)]))
    assert table.symmetric.tolist() == [False, True, True]


def test_training_loader_is_deterministic_and_resumable(data):
    out = data[1]

    def first(seed, n, workers=0):
        it = iter(make_loader(out, "train_pbr", 4, True, seed=seed, worker_count=workers))
        return [next(it) for _ in range(n)]

    a, b, c = first(7, 2), first(7, 2), first(8, 2)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    # Exact resume from the iterator state, with worker processes.
    loader = make_loader(out, "train_pbr", 4, True, seed=7, worker_count=2)
    it = iter(loader)
    got = [next(it) for _ in range(2)]
    state = it.get_state()
    after = [next(it) for _ in range(2)]
    it2 = iter(loader)
    it2.set_state(state)
    resumed = [next(it2) for _ in range(2)]
    for x, y in zip(after, resumed):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(got[0]["image"], after[0]["image"])
    del it, it2, got, after, resumed
    gc.collect()  # stop the worker processes now, not at interpreter exit


def test_sharding_splits_without_overlap(data):
    out = data[1]

    def keys(loader):
        ks = []
        for batch in loader:
            ks += [(int(s), int(i), int(g)) for s, i, g, v in zip(batch["scene_id"], batch["im_id"], batch["gt_idx"],
                                                                 batch["valid_example"]) if v]
        return ks

    whole = keys(make_loader(out, "test", 4, False, worker_count=0))
    parts = [keys(make_loader(out, "test", 4, False, shard=(i, 3), worker_count=0)) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(whole) and len(set(whole)) == len(whole)
    train_parts = [set(keys(make_loader(out, "train_pbr", 2, True, seed=0, shard=(i, 2), num_epochs=1, worker_count=0)))
                   for i in range(2)]
    assert train_parts[0] and train_parts[1] and not (train_parts[0] & train_parts[1])
    loader = make_loader(out, "test", 4, False, worker_count=0)
    batches = list(loader)
    assert len(batches) == loader.steps_per_epoch
    assert sum(b["valid_example"].sum() for b in batches) == loader.num_examples
    if loader.num_examples % 4:
        assert batches[-1]["valid_example"][-1] == 0 and np.all(batches[-1]["image"][-1] == 0)


def test_reading_and_building_need_no_tensorflow(data, tmp_path):
    root, out, ds = data
    code = textwrap.dedent(f"""
        import importlib.abc, importlib.machinery, sys
        class _Fail(importlib.abc.Loader):
            def create_module(self, spec):
                return None
            def exec_module(self, module):
                raise ImportError("tensorflow is blocked in this test")
        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "tensorflow" or name.startswith("tensorflow."):
                    return importlib.machinery.ModuleSpec(name, _Fail())
                return None
        sys.meta_path.insert(0, _Block())
        try:
            import tensorflow
            raise AssertionError("tensorflow imported")
        except ImportError:
            pass
        from lcpose.data.tfds_builder import build_tfds
        from lcpose.data.pipeline import make_loader
        d = build_tfds({root!r}, "synthetic", ["test"], {str(tmp_path / "tfds")!r}, workers=0, progress=False)
        b = next(iter(make_loader(d, "test", 2, False, worker_count=0)))
        import tensorflow_datasets as tfds
        ex = tfds.data_source("bop_synthetic", data_dir={out!r})["train_pbr"][0]
        assert b["image"].shape == (2, 256, 256, 3) and ex["image"].ndim == 3
        assert "tensorflow" not in sys.modules
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_rebuild_skips_finished_splits(data):
    from lcpose.data.tfds_builder import build_tfds

    root, out, ds = data
    info = os.path.join(ds, "dataset_info.json")
    before = os.path.getmtime(info)
    assert build_tfds(root, "synthetic", ["train_pbr", "test"], out, workers=0, progress=False) == ds
    assert os.path.getmtime(info) == before


def test_ensure_synthetic_caches(tmp_path):
    cfg = dict(objects=2, train_images=2, test_images=1, seed=1, workers=0, progress=False)
    a = synthetic.ensure_synthetic_bop(tmp_path, **cfg)
    stamp = os.path.getmtime(os.path.join(a, "synthetic_config.json"))
    assert synthetic.ensure_synthetic_bop(tmp_path, **cfg) == a
    assert os.path.getmtime(os.path.join(a, "synthetic_config.json")) == stamp
    d = synthetic.ensure_synthetic_tfds(tmp_path, **cfg)
    assert synthetic.ensure_synthetic_tfds(tmp_path, **cfg) == d
    assert next(iter(make_loader(d, "train_pbr", 2, True, worker_count=0, min_visib_fract=0.0)))["image"].shape[0] == 2


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def _copy_annotations(root, dst):
    """A copy of the dataset without its images (enough for the reader's checks)."""
    shutil.copytree(root, dst, ignore=shutil.ignore_patterns("*.png", "*.jpg"))
    return str(dst)


def test_bad_inputs_name_the_file(data, tmp_path):
    root, out, ds = data
    bad = _copy_annotations(root, tmp_path / "bad")
    os.remove(os.path.join(bad, "models", "models_info.json"))
    with pytest.raises(FileNotFoundError, match=r"models_info\.json"):
        bop.load_models_info(bad)
    with pytest.raises(FileNotFoundError, match=r"models_info\.json"):
        make_synth_out = str(tmp_path / "t1")
        from lcpose.data.tfds_builder import build_tfds

        build_tfds(bad, "synthetic", ["train_pbr"], make_synth_out, workers=0, progress=False)

    bad2 = _copy_annotations(root, tmp_path / "bad2")
    os.remove(os.path.join(bad2, "train_pbr", "000001", "scene_camera.json"))
    with pytest.raises(FileNotFoundError, match=r"train_pbr/000001/scene_camera\.json"):
        list(bop.iter_instances(bad2, "train_pbr"))
    with open(os.path.join(bad2, "train_pbr", "000000", "scene_gt.json"), "w") as fh:
        fh.write("{not json")
    with pytest.raises(bop.BopFormatError, match=r"000000/scene_gt\.json"):
        bop.load_scene(bad2, "train_pbr", 0)

    os.makedirs(os.path.join(bad2, "val"))
    with pytest.raises(bop.BopFormatError, match="no scene folders"):
        bop.list_scenes(bad2, "val")
    with pytest.raises(FileNotFoundError, match="train_real"):
        bop.list_scenes(bad2, "train_real")
    with pytest.raises(FileNotFoundError, match=r"000000_000000\.png"):
        bop.load_mask(os.path.join(bad2, "test", "000000", "mask_visib", "000000_000000.png"))
    with pytest.raises(bop.BopFormatError, match="bbox_est"):
        p = tmp_path / "dets.json"
        p.write_text(json.dumps({"0/0": [{"obj_id": 1, "score": 0.5}]}))
        bop.load_detections(p)

    with pytest.raises(ValueError, match="split 'val' not in"):
        make_loader(out, "val", 2, False, worker_count=0)
    with pytest.raises(ValueError, match="no examples"):
        make_loader(out, "test", 2, False, worker_count=0, min_visib_fract=1.01)
    with pytest.raises(ValueError, match="shard"):
        make_loader(out, "test", 2, False, shard=(2, 2))
    with pytest.raises(ValueError, match="lm_root"):
        from lcpose.data.tfds_builder import build_tfds

        build_tfds(root, "lmo", ["train_real"], str(tmp_path / "t2"), obj_ids=[1], workers=0, progress=False)


def test_lmo_variant_objects_targets_and_lm_real(tmp_path):
    """The "lmo" converter on an LM-O-shaped set: only LM-O's 8 objects, test instances from
    the BOP'19 targets, and train_real from LM's per-object scenes (lm_root/test/<obj_id>)."""
    from lcpose.data.tfds_builder import build_tfds, read_meta

    # (seed 2 with uniform views puts object 1 into test scene 0, which plays the LM scene below)
    root = synthetic.generate_synthetic_bop(tmp_path / "lmo", objects=12, train_images=2, test_images=2, seed=2,
                                            width=320, height=240, images_per_scene=2, views="uniform",
                                            workers=0, progress=False)
    lm = tmp_path / "lm"
    shutil.copytree(os.path.join(root, "test", "000000"), lm / "test" / "000001")  # "LM scene of object 1"
    d = build_tfds(root, "lmo", ["train_pbr", "test", "train_real"], tmp_path / "tfds", lm_root=lm,
                   detections=os.path.join(root, synthetic.DETECTIONS_FILE), workers=0, progress=False)
    lmo_ids = bop.DATASETS["lmo"]["obj_ids"]
    assert load_model_table(d).obj_ids.tolist() == lmo_ids
    targets = {(t["scene_id"], t["im_id"], t["obj_id"]) for t in bop.load_test_targets(root)}
    for split in ("train_pbr", "test", "train_real"):
        z = np.load(os.path.join(d, f"lcpose_index-{split}.npz"))
        assert len(z["obj_id"]) > 0 and set(z["obj_id"].tolist()) <= set(lmo_ids)
        if split == "test":
            assert {(s, i, o) for s, i, o in zip(z["scene_id"], z["im_id"], z["obj_id"])} <= targets
        if split == "train_real":
            assert set(z["obj_id"].tolist()) == {1} and set(z["scene_id"].tolist()) == {1}
    assert read_meta(d)["splits"]["test"]["detections"].endswith(synthetic.DETECTIONS_FILE)
