"""The YCB-V recipe end to end (2 steps) on a YCB-V-shaped synthetic folder.

The folder is the tiny synthetic BOP set laid out as YCB-V is read: ``train_pbr`` and
``train_real`` (a link to the same images), a keyframe list of test images in the YCB-Video
toolbox format, detections in the BOP'22 json list. The recipe (experiments.config "ycbv":
both training splits, symmetry-aware ground truth, keyframes, detections, the AUC table) runs
with its network shrunk to the CPU test size.
"""
import dataclasses
import json
import os

import pytest

# Not marked slow: issue 18's YCB-V recipe runs end to end in CI (about 45 s on the 2-core CPU).


@pytest.fixture(scope="module")
def ycbv_folder(tmp_path_factory):
    from lcpose.data.synthetic import ensure_synthetic_bop

    cache = tmp_path_factory.getbasetemp() / "lcpose_ycbv_cache"
    src = ensure_synthetic_bop(cache, objects=3, train_images=8, test_images=4, workers=0,
                               views="uniform", progress=False)
    root = tmp_path_factory.mktemp("data") / "ycbv"
    root.mkdir()
    for name in ("models", "models_eval", "train_pbr", "test", "camera.json"):
        os.symlink(os.path.join(src, name), root / name)
    os.symlink(os.path.join(src, "train_pbr"), root / "train_real")
    with open(os.path.join(src, "detections_test.json")) as f:
        gdrn = json.load(f)
    bop22 = [{"scene_id": int(k.split("/")[0]), "image_id": int(k.split("/")[1]),
              "category_id": d["obj_id"], "bbox": d["bbox_est"], "score": d["score"], "time": 0.0}
             for k, dets in gdrn.items() for d in dets]
    det_path = root / "detections_bop22.json"
    det_path.write_text(json.dumps(bop22))
    images = sorted({(d["scene_id"], d["image_id"]) for d in bop22})[:3]   # 3 of the 4 images
    kf_path = root / "keyframe.txt"
    kf_path.write_text("".join(f"{s:04d}/{i:06d}\n" for s, i in images))
    return root, det_path, kf_path, images


def test_ycbv_recipe_runs_end_to_end(ycbv_folder, tmp_path, monkeypatch):
    from experiments import config as C
    from experiments import ycbv_gdr

    from lcpose.data import bop

    root, det_path, kf_path, images = ycbv_folder
    # the synthetic objects stand in for YCB-V's: ids 1..3, the symmetric ones 2 and 3
    monkeypatch.setitem(bop.DATASETS["ycbv"], "obj_ids", [1, 2, 3])
    small = C.YCBV.with_train(preset="cpu", model_overrides=(("encoder_widths", (8, 8, 16, 16)),
                                                              ("head_channels", 8)),
                              input_size=64, output_size=16, worker_count=0, log_every=1,
                              ckpt_every=100).replace(eval_batch_size=4,
                                                      pnp=dataclasses.replace(C.YCBV.pnp, hypotheses=16),
                                                      symmetric_obj_ids=(2, 3))
    monkeypatch.setitem(C.CONFIGS, "ycbv", small)
    res = ycbv_gdr.run(["--bop_root", str(root), "--tfds_dir", str(tmp_path / "tfds"),
                        "--detections", str(det_path), "--test_list", str(kf_path), "--obj", "2",
                        "--steps", "2", "--batch_size", "2", "--variants", "baseline",
                        "--workdir", str(tmp_path / "run"), "--no_progress"])
    assert res["dataset"] == "ycbv" and res["config"] == "ycbv"
    v = res["variants"]["baseline"]
    assert v["steps"] == 2 and tuple(v["objective"]["symmetry"]["obj_ids"]) == (2, 3)
    for key in ("auc_add_s", "auc_add_or_add_s", "auc_add_s_p11", "auc_add_or_add_s_p11",
                "xyz_err_mm", "xyz_err_sym_mm"):
        assert set(v[key]) == {"2", "mean"}, key
    # only the keyframes are tested, every instance of object 2 in them
    assert 1 <= v["count"]["2"] <= len(images)
    with open(tmp_path / "run" / "results.json") as f:
        assert "auc_add_or_add_s_p11" in json.load(f)["variants"]["baseline"]
    with open(tmp_path / "run" / "experiment.json") as f:
        assert json.load(f)["experiment"] == "ycbv_gdr"   # not lmo_gdr's identity
    meta = json.load(open(tmp_path / "tfds" / "bop_ycbv" / "1.0.0" / "lcpose_meta.json"))
    assert meta["splits"]["test"]["num_images"] <= len(images)
    assert set(meta["splits"]) == {"train_pbr", "train_real", "test"}
