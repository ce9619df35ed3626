"""The faults lcpose survives: each test reproduces one hostile-but-realistic use first.

Read the test names and docstrings as the list. User errors end in one line naming the file or
flag (the CLI prints ``error: ...`` and exits with status 2, no traceback); silent wrong results
are turned into errors, warnings or left-out rows. Faults of ``lc_loss`` (non-finite inputs)
and of ``solve`` (points behind the camera) are tested in test_losses_lc / test_pnp.

The end-to-end runs of ``experiments.lmo_gdr`` use a tiny registered config (2 training steps of
a ResNet-18 at widths 8..16 on 64x64 crops, baseline variant only) on the tiny synthetic set
that test_experiment_run also uses.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lcpose.data import bop
from lcpose.train.workdir import WorkdirError, WorkdirLock, check_start

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SET = dict(objects=2, train_images=8, test_images=4, workers=0, views="uniform")


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    env.pop("XLA_FLAGS", None)
    return env


def _cli_error(capsys, argv) -> str:
    """Run ``experiments.lmo_gdr.main(argv)`` in-process; assert it exits 2 with one line."""
    from experiments.lmo_gdr import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error: "), err
    return err[-1]


# ------------------------------------------------------------------------------------------
# The working folder of an experiment
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    from lcpose.data.synthetic import ensure_synthetic_tfds

    cache = tmp_path_factory.getbasetemp() / "lcpose_tiny_cache"
    ensure_synthetic_tfds(cache, progress=False, **TINY_SET)
    return cache


@pytest.fixture(scope="module")
def tiny_config():
    """Registers the "tiny" config of experiments.lmo_gdr for this module."""
    from experiments import config as C
    from lcpose.evaluate import PnPConfig
    from lcpose.train.loop import TrainConfig

    train = TrainConfig(preset="cpu", model_overrides=(("encoder_widths", (8, 8, 16, 16)), ("head_channels", 8)),
                        input_size=64, output_size=16, batch_size=4, total_steps=2, learning_rate=3e-3,
                        warmup_steps=1, seed=0, worker_count=0, log_every=1, ckpt_every=2,
                        keep_checkpoints=1)
    tiny = C.CPU.replace(name="tiny", train=train, variants=("baseline",), eval_batch_size=8,
                         synthetic=tuple(TINY_SET.items()), objects=(1,),
                         pnp=PnPConfig(ransac=False, use_mask=True))   # no RANSAC: half the compile
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(C.CONFIGS, "tiny", tiny)
        yield "tiny"


def _tiny_argv(workdir, *extra):
    return ["--config", "tiny", "--workdir", str(workdir), "--no_progress", *extra]


@pytest.fixture(scope="module")
def obj1_run(tiny_cache, tiny_config, tmp_path_factory):
    """`--resume --obj 1` on an empty workdir that holds a stale lock of a killed run: the
    tiny experiment's first run. Returns (workdir, results, stderr)."""
    from experiments.lmo_gdr import run

    workdir = tmp_path_factory.mktemp("lmo_gdr")
    dead = _lock_holder(workdir)
    dead.send_signal(signal.SIGKILL)         # a run killed with -9 leaves its lock file
    dead.wait()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LCPOSE_CACHE", str(tiny_cache))
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            results = run(_tiny_argv(workdir, "--resume", "--obj", "1"))
    return workdir, results, err.getvalue(), dead.pid


def _lock_holder(workdir):
    """A process that holds the workdir's lock (as a running experiment does) until killed."""
    script = textwrap.dedent(f"""
        import sys, time
        from lcpose.train.workdir import WorkdirLock
        WorkdirLock({str(workdir)!r}).acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_on_the_same_workdir_is_refused_naming_the_first(tmp_path, capsys):
    """Two `experiments.lmo_gdr` runs on one --workdir: the second refuses, naming the first
    run's pid (a lock file in the workdir); once the first dies (kill -9), its stale lock is
    taken over with a message."""
    holder = _lock_holder(tmp_path)
    try:
        msg = _cli_error(capsys, ["--workdir", str(tmp_path), "--no_progress"])
        assert f"in use by another run (pid {holder.pid} " in msg and str(tmp_path) in msg, msg
        assert not os.path.exists(tmp_path / "experiment.json")     # nothing was touched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    logged = []
    with WorkdirLock(tmp_path, log=logged.append) as lock:
        assert lock.stale_pid == holder.pid
        assert logged == [f"lcpose: taking over the stale lock {tmp_path / '.lcpose.lock'} of pid "
                          f"{holder.pid} (no longer running)"]
    assert not os.path.exists(tmp_path / ".lcpose.lock")             # a clean exit removes it


@pytest.mark.slow
def test_resume_on_an_empty_workdir_says_it_starts_fresh(obj1_run):
    """`--resume` on an empty workdir trains from scratch and says so in one line (here the
    workdir also held the stale lock of a killed run, taken over with one line)."""
    workdir, results, err, dead_pid = obj1_run
    lines = err.splitlines()
    assert f"lcpose: taking over the stale lock {workdir / '.lcpose.lock'} of pid {dead_pid} (no longer running)" in lines
    assert f"lcpose: --resume: nothing to resume in {workdir}, starting fresh" in lines
    assert results["variants"]["baseline"]["steps"] == 2
    assert os.path.isdir(workdir / "baseline" / "obj_000001" / "ckpt" / "2")


@pytest.mark.slow
def test_resume_with_another_object_keeps_both_objects_results(obj1_run, tiny_cache, tmp_path, monkeypatch):
    """`--resume --obj 2` on obj 1's workdir (one network per object) trains obj 2 beside obj 1;
    results.json and the BOP CSV hold both objects (merged, not replaced)."""
    from experiments.lmo_gdr import run

    src = obj1_run[0]
    workdir = tmp_path / "wd"
    shutil.copytree(src, workdir)
    with open(workdir / "experiment.json") as f:
        assert json.load(f)["objects"] == [1]
    ckpt1 = sorted(os.listdir(workdir / "baseline" / "obj_000001" / "ckpt"))
    monkeypatch.setenv("LCPOSE_CACHE", str(tiny_cache))
    results = run(_tiny_argv(workdir, "--resume", "--obj", "2"))
    v = results["variants"]["baseline"]
    assert results["objects"] == [1, 2] and v["merged_objects"] == [1]
    assert set(v["add_s_0.1d"]) == {"1", "2", "mean"} and set(v["count"]) == {"1", "2", "mean"}
    assert v["count"]["1"] == obj1_run[1]["variants"]["baseline"]["count"]["1"] > 0
    assert sorted(os.listdir(workdir / "baseline" / "obj_000001" / "ckpt")) == ckpt1   # obj 1 untouched
    with open(workdir / "results.json") as f:
        assert json.load(f)["variants"]["baseline"]["count"] == v["count"]
    # the CSV holds the estimates of both objects: every instance with a box and a pose
    evals = [np.load(workdir / "baseline" / f"obj_00000{o}" / "eval.npz") for o in (1, 2)]
    rows = open(v["bop_csv"]).read().strip().split("\n")[1:]
    want = {o: int(np.sum((e["has_box"] > 0) & (e["t"][:, 2] > 0))) for o, e in zip((1, 2), evals)}
    got = {o: sum(1 for r in rows if r.split(",")[2] == str(o)) for o in (1, 2)}
    assert got == want


@pytest.mark.slow
def test_start_without_resume_on_a_workdir_with_checkpoints_is_refused(obj1_run, tmp_path, capsys):
    """A start without --resume on a workdir with checkpoints is refused (no rmtree of a
    3-hour run on a typo) unless --overwrite is given; train() refuses the same way."""
    from lcpose.train.loop import train
    from lcpose.train.objective import ObjectiveConfig

    workdir = obj1_run[0]
    before = sorted(os.listdir(workdir / "baseline" / "obj_000001" / "ckpt"))
    msg = _cli_error(capsys, _tiny_argv(workdir, "--obj", "1"))
    assert msg == (f"error: {workdir} holds a previous run (checkpoints in baseline/obj_000001, "
                   f"results.json); resume it (--resume) or delete it and start again (--overwrite)")
    assert sorted(os.listdir(workdir / "baseline" / "obj_000001" / "ckpt")) == before
    from experiments import config as C
    with pytest.raises(WorkdirError, match="holds the checkpoints of a previous run"):
        train("/nonexistent", workdir / "baseline" / "obj_000001", C.CONFIGS["tiny"].train,
              ObjectiveConfig(), progress=False)
    # --overwrite deletes the previous run (run folders, results, identity), nothing else
    copy = tmp_path / "wd"
    shutil.copytree(workdir, copy)
    (copy / "notes.txt").write_text("mine")
    logged = []
    assert check_start(copy, {"experiment": "lmo_gdr"}, resume=False, overwrite=True,
                       extra_files=("losses.png",), log=logged.append) == "overwrite"
    assert sorted(os.listdir(copy)) == ["notes.txt"]
    assert logged == [f"lcpose: --overwrite: deleted the previous run in {copy}"]


@pytest.mark.slow
def test_resume_on_a_workdir_of_another_experiment_or_config_is_refused(obj1_run, tmp_path, capsys):
    """`--resume` on a workdir of a different experiment (another experiment.json, or a bare
    lcpose.train.loop.train folder) or with another configuration is refused, naming it."""
    workdir = obj1_run[0]
    msg = _cli_error(capsys, _tiny_argv(workdir, "--resume", "--seed", "3"))
    assert msg == (f"error: cannot resume {workdir}: the configuration differs (train.seed: saved 0, "
                   f"now 3); use another workdir, or --overwrite without --resume")
    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    ident = json.loads((other / "experiment.json").read_text())
    (other / "experiment.json").write_text(json.dumps(dict(ident, experiment="ycbv_zebra")))
    msg = _cli_error(capsys, _tiny_argv(other, "--resume"))
    assert msg == (f"error: cannot resume {other}: it holds a run of experiment 'ycbv_zebra', "
                   f"not 'lmo_gdr'; use another workdir")
    bare = tmp_path / "bare"                      # what train(tfds, bare, ...) leaves
    shutil.copytree(workdir / "baseline" / "obj_000001", bare)
    msg = _cli_error(capsys, _tiny_argv(bare, "--resume"))
    assert msg.startswith(f"error: cannot resume {bare}: it holds a run of lcpose.train.loop.train")


# ------------------------------------------------------------------------------------------
# Input files and folders
# ------------------------------------------------------------------------------------------

_PLY_HEADER = """ply
format ascii 1.0
element vertex 4
property float x
property float y
property float z
property float nx
property float ny
property float nz
property float texture_u
property float texture_v
element face 2
property list uchar int vertex_indices
end_header
"""


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")   # trimesh's uv merge
@pytest.mark.parametrize("bad, name", [((1, 0), "x"), ((1, 5), "nz"), ((2, 7), "texture_v")])
def test_model_ply_with_a_non_finite_vertex_is_named(tmp_path, bad, name):
    """A model PLY with a NaN vertex (or a non-finite normal / texture coordinate) is an error
    naming the file and the vertex; before, a NaN reached ADD and a perfect pose scored NaN."""
    rows = np.array([[0, 0, 0, 0, 0, 1, 0, 0], [10, 0, 0, 0, 0, 1, 1, 0],
                     [0, 10, 0, 0, 0, 1, 0, 1], [10, 10, 0, 0, 0, 1, 1, 1]], dtype=object)
    rows[bad] = "nan" if name != "texture_v" else "inf"
    path = tmp_path / "obj_000001.ply"
    path.write_text(_PLY_HEADER + "\n".join(" ".join(str(x) for x in r) for r in rows)
                    + "\n3 0 1 2\n3 1 3 2\n")
    with pytest.raises(bop.BopFormatError) as exc:
        bop.load_model(path)
    msg = str(exc.value)
    assert msg.startswith(f"model {path}: vertex {bad[0]} has a non-finite {name} (") and "\n" not in msg
    rows[bad] = 0.5                                                 # the same file, finite
    path.write_text(_PLY_HEADER + "\n".join(" ".join(str(x) for x in r) for r in rows)
                    + "\n3 0 1 2\n3 1 3 2\n")
    V, F, _ = bop.load_model(path)
    assert V.shape == (4, 3) and np.all(np.isfinite(V))
    # binary PLY (how BOP ships its models), written by trimesh
    import trimesh

    mesh = trimesh.Trimesh(V.astype(np.float64), F, process=False)
    mesh.vertices[3, 2] = np.nan
    binary = tmp_path / "obj_000002.ply"
    mesh.export(binary)
    with pytest.raises(bop.BopFormatError, match=f"model {binary}: vertex 3 has a non-finite z"):
        bop.load_model(binary)


def test_detection_file_with_a_zero_or_negative_box_is_named(tmp_path):
    """A bbox_est of zero or negative width (or height) is an error naming the file and the
    entry, in both detection formats; before, the crop was built from the height alone."""
    good = {"obj_id": 1, "bbox_est": [10, 10, 30, 20], "score": 0.9}
    for box in ([10, 10, 0, 20], [10, 10, 30, -2]):
        path = tmp_path / "dets.json"
        path.write_text(json.dumps({"0/3": [good, dict(good, bbox_est=box)]}))
        with pytest.raises(bop.BopFormatError) as exc:
            bop.load_detections(path)
        assert str(exc.value) == (f"{path}: detection 1 of '0/3': bbox_est {box!r} has a width "
                                  f"or height <= 0")
    path.write_text(json.dumps([{"scene_id": 2, "image_id": 7, "category_id": 1, "bbox": [1, 2, -3, 4],
                                 "score": 0.5}]))
    with pytest.raises(bop.BopFormatError, match=r"detection 0 \(scene 2, image 7\): bbox .* <= 0"):
        bop.load_detections(path)
    path.write_text(json.dumps({"0/3": [dict(good, bbox_est=[1, 2, "nan", 4])]}))
    with pytest.raises(bop.BopFormatError, match="bbox_est must be 4 finite numbers"):
        bop.load_detections(path)


@pytest.mark.slow
def test_empty_detection_file_warns_with_the_count_of_unboxed_instances(tiny_cache, tmp_path):
    """Detections `{}`: converting the test split warns that all of its instances are left
    without a box (counted as misses), with their count; the split records the count."""
    from lcpose.data.synthetic import ensure_synthetic_bop
    from lcpose.data.tfds_builder import build_tfds, read_meta

    root = ensure_synthetic_bop(tiny_cache, progress=False, **TINY_SET)
    dets = tmp_path / "empty.json"
    dets.write_text("{}")
    with pytest.warns(UserWarning) as rec:
        ds = build_tfds(root, "synthetic", ["test"], tmp_path / "tfds", detections=dets, workers=0,
                        progress=False)
    n = read_meta(ds)["splits"]["test"]["num_examples"]
    assert n > 0 and read_meta(ds)["splits"]["test"]["instances_without_box"] == n
    msgs = [str(w.message) for w in rec if "left without a box" in str(w.message)]
    assert msgs == [f"{dets} holds no detections: all {n} test instances of split 'test' are left "
                    f"without a box (each counts as a miss)"]


@pytest.mark.parametrize("with_dataset", [True, False])
def test_bop_root_that_does_not_exist_is_one_line(tmp_path, capsys, with_dataset):
    """`--bop_root` that does not exist: one line naming the path, also without --dataset
    (before: a 7-frame traceback, or a complaint about the dataset name)."""
    missing = tmp_path / "bop" / "lmo_typo"
    argv = ["--bop_root", str(missing), "--workdir", str(tmp_path / "wd"), "--no_progress"]
    msg = _cli_error(capsys, argv + (["--dataset", "lmo"] if with_dataset else []))
    assert msg == f"error: --bop_root {missing}: no such folder"
    assert not os.path.exists(tmp_path / "wd")


def test_cli_user_error_is_one_line_without_traceback(tmp_path):
    """The command line itself: a user error prints one line `error: ...` and exits 2."""
    proc = subprocess.run([sys.executable, "-m", "experiments.lmo_gdr", "--bop_root", str(tmp_path / "nope"),
                           "--workdir", str(tmp_path / "wd")], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --bop_root {tmp_path / 'nope'}: no such folder"]


def _read_only(folder):
    """argv prefix that runs a command with ``folder`` read-only: chmod for a normal user; a
    read-only bind mount in a private mount namespace for root (whom chmod does not stop)."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        return []
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("root without unshare -m: cannot make a read-only folder")
    return ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(folder)]


def test_read_only_cache_on_first_use_is_one_line(tmp_path):
    """A read-only LCPOSE_CACHE on first use (the encoder and the synthetic set go there): one
    line, the cache folder is not writable, set LCPOSE_CACHE (before: an OSError traceback)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    prefix = _read_only(cache)
    try:
        proc = subprocess.run(prefix + [sys.executable, "-m", "experiments.lmo_gdr", "--workdir",
                                        str(tmp_path / "wd"), "--no_progress"],
                              cwd=REPO, env=_env(LCPOSE_CACHE=str(cache)), capture_output=True, text=True,
                              timeout=300)
    finally:
        os.chmod(cache, 0o755)
    assert proc.returncode == 2, proc.stderr[-2000:]
    reason = "Read-only file system" if prefix else "Permission denied"
    # the first folder written: the converted pretrained encoder, or the synthetic set
    lines = proc.stderr.strip().splitlines()
    assert lines in ([f"error: the cache folder {cache} is not writable ({reason}: {cache / sub}); "
                      f"set LCPOSE_CACHE to a writable folder"]
                     for sub in ("synthetic_bop", os.path.join("pretrained", "efficientnet_lite0"))), proc.stderr


def _tiny_export(folder):
    """An export folder with a real (trivial) serialised function, variables and meta."""
    import jax
    import jax.numpy as jnp

    from lcpose.export import FORMAT_VERSION

    folder.mkdir()
    exp = jax.export.export(jax.jit(lambda x: x + 1))(jax.ShapeDtypeStruct((2,), jnp.float32))
    (folder / "predict.jaxexport").write_bytes(exp.serialize())
    np.savez(folder / "variables.npz", **{"params/w": np.arange(4000, dtype=np.float32)})
    (folder / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "input_size": 64,
                                                  "output_size": 16, "obj_ids": None, "bbox3d": None}))
    return folder


@pytest.mark.parametrize("name", ["variables.npz", "meta.json"])
def test_truncated_export_file_is_named(tmp_path, name):
    """A truncated `variables.npz` / `meta.json` of an export: the error names the file
    (before: a raw BadZipFile / JSONDecodeError)."""
    from lcpose.export import load_exported

    folder = _tiny_export(tmp_path / "exported")
    assert load_exported(folder).variables["params"]["w"].shape == (4000,)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as exc:
        load_exported(folder)
    want = {"variables.npz": "cannot read the variables", "meta.json": "not valid JSON"}[name]
    assert str(exc.value).startswith(f"{folder / name}: {want} (") and "\n" not in str(exc.value)


# ------------------------------------------------------------------------------------------
# Evaluation output
# ------------------------------------------------------------------------------------------


@pytest.mark.slow   # compiles the whole test pipeline (network -> top weights -> weighted LM)
def test_bop_csv_marks_or_leaves_out_solves_that_did_not_converge(tmp_path):
    """Evaluation where a solve did not converge: the BOP CSV row is no longer indistinguishable
    from an estimate. A non-converged solve's last iterate gets score 0 (or, with
    unconverged="omit", is left out: BOP counts a missing estimate as a miss); a placeholder
    pose (R = I, t = 0: nothing in front of the camera) is always left out. Here the weighted
    solve of the second instance has all-zero weights."""
    import jax
    import jax.numpy as jnp

    from lcpose import evaluate as E
    from lcpose.geometry import project

    rng = np.random.default_rng(0)
    K = np.array([[50.0, 0, 8], [0, 50.0, 8], [0, 0, 1]], np.float32)
    xyz = rng.uniform(-0.5, 0.5, (16, 16, 3)).astype(np.float32)    # normalised, box [-50, 50] mm
    bbox3d = np.array([[x, y, z] for x in (-50, 50) for y in (-50, 50) for z in (-50, 50)], np.float32)
    R, t = np.eye(3, dtype=np.float32), np.array([0, 0, 800], np.float32)
    uv = np.stack(np.meshgrid(np.arange(16), np.arange(16)), -1).reshape(-1, 2).astype(np.float32)
    # choose the 3D points so that each pixel sees its own point: a perfect correspondence map
    depth = 800.0 + 100.0 * xyz[..., 2].reshape(-1)
    cam = np.concatenate([(uv - 8.0) / 50.0 * depth[:, None], depth[:, None]], 1)
    xyz[...] = ((cam - t) / 100.0).reshape(16, 16, 3)
    np.testing.assert_allclose(project(jnp.asarray(cam - t), R, t, K), uv, atol=1e-3)

    class Net:
        def apply(self, variables, images, train=False):
            w = jnp.where(images[:, :16, :16, :2] > 0, 1.0, 0.0)   # image 1 all zero: no weights
            return {"xyz": jnp.broadcast_to(jnp.asarray(xyz), (2, 16, 16, 3)), "w2d": w,
                    "mask_logits": jnp.ones((2, 16, 16, 1))}

    images = np.zeros((2, 64, 64, 3), np.float32)
    images[0] = 1.0
    predict = jax.jit(E.make_predict_fn(Net(), E.PnPConfig(ransac=False)))
    out = jax.device_get(predict({}, images, np.stack([K, K]), np.stack([bbox3d, bbox3d]),
                                 jax.random.PRNGKey(0)))
    assert out["converged"].tolist() == [True, False]
    np.testing.assert_allclose(out["t"][0], t, atol=0.5)
    assert not out["t"][1][2] > 0          # the degenerate solve's placeholder: no estimate
    # a third instance: a solve stopped at its iteration limit, whose last iterate is a pose
    result = {k: np.concatenate([v, v[:1]]) for k, v in out.items()}
    result["converged"][2] = False
    result.update(scene_id=np.array([0, 0, 0]), im_id=np.array([5, 6, 7]), obj_id=np.array([1, 1, 1]),
                  score=np.full(3, 0.9), has_box=np.ones(3, np.int32), time=np.full(3, 0.01))

    def rows(**kw):
        path = E.write_bop_csv(tmp_path / "m_synthetic-test.csv", result, **kw)
        return [r.split(",") for r in open(path).read().strip().split("\n")[1:]]

    got = rows()
    assert [(r[1], r[3]) for r in got] == [("5", "0.900000"), ("7", "0.000000")]
    np.testing.assert_allclose(np.array(got[1][5].split(), float), out["t"][0], atol=1e-3)
    assert [r[1] for r in rows(unconverged="omit")] == ["5"]
