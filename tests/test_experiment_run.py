"""The real training loop, evaluation and export on a tiny synthetic BOP set (end to end).

One tiny dataset (2 objects, 8 + 4 images) and one tiny network (ResNet-18 at widths 8..16,
64x64 crops -> 16x16 maps) are shared by all tests; the train step is compiled once per
process (lcpose.train.loop caches it per configuration).
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcpose import evaluate as E
from lcpose.data.pipeline import make_loader
from lcpose.train.loop import TrainConfig, load_trained, train
from lcpose.train.objective import ObjectiveConfig

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = TrainConfig(
    preset="cpu", model_overrides={"encoder_widths": (8, 8, 16, 16), "head_channels": 8},
    input_size=64, output_size=16, batch_size=4, total_steps=12, learning_rate=3e-3,
    warmup_steps=1, seed=0, worker_count=0, log_every=1, ckpt_every=6, keep_checkpoints=3,
    clip_scale_grad=True, clip_points_grad=True)   # the CPU config's clippers (saved and resumed)
# gradient correctness is tested in test_experiment_objective (it doubles the step's compile)
LC = ObjectiveConfig(pose_loss="lc", pose_loss_start_step=4)
PNP = E.PnPConfig(threshold_px=0.5, hypotheses=32)


@pytest.fixture(scope="session")
def tiny_tfds(tmp_path_factory):
    from lcpose.data.synthetic import ensure_synthetic_tfds

    cache = tmp_path_factory.getbasetemp() / "lcpose_tiny_cache"
    # uniform views: all 8 visible test instances are far from the 16x16 grid's quantisation
    # limit of ADD 0.1 d, so the oracle check below can ask for every one of them
    return ensure_synthetic_tfds(cache, objects=2, train_images=8, test_images=4, workers=0,
                                 views="uniform", progress=False)


@pytest.fixture(scope="module")
def full_run(tiny_tfds, tmp_path_factory):
    return train(tiny_tfds, tmp_path_factory.mktemp("full"), TINY, LC, progress=False)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_kill_and_resume_equals_uninterrupted_run(tiny_tfds, full_run, tmp_path):
    """A run stopped after the step-6 checkpoint and resumed reaches the uninterrupted run's
    state bitwise: params, Ranger/Lookahead state, BatchNorm stats, clipper, RNG and the data
    order (grain iterator state restored from the checkpoint)."""
    stopped = train(tiny_tfds, tmp_path, TINY, LC, max_steps=6, progress=False)
    assert stopped.steps == 6
    assert max(int(d) for d in os.listdir(tmp_path / "ckpt") if d.isdigit()) == 6
    resumed = train(tiny_tfds, tmp_path, TINY, LC, resume=True, progress=False)
    assert resumed.steps == 12
    a, b = full_run.state, resumed.state
    assert int(a.step) == int(b.step) == 12
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(x, y)
    # the logged history of the resumed run is the uninterrupted one (steps 1..12)
    assert [r["step"] for r in resumed.history] == list(range(1, 13))
    for ra, rb in zip(full_run.history, resumed.history):
        assert ra.keys() == rb.keys()
        np.testing.assert_array_equal([ra[k] for k in sorted(ra)], [rb[k] for k in sorted(rb)])
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 13))
    assert os.path.isfile(tmp_path / "curves.png")
    # the LC objective ran (finite) and its weight-logit gradient went through the clipper
    assert all(np.isfinite(r["loss/pose"]) for r in resumed.history)
    assert all(r["clip/weight_logits_norm"] > 0 for r in resumed.history)
    # resuming with another configuration is refused, naming the field
    with pytest.raises(ValueError, match="learning_rate"):
        train(tiny_tfds, tmp_path, TrainConfig(**{**TINY.__dict__, "learning_rate": 2e-3}), LC,
              resume=True, progress=False)


def test_load_trained_and_export_round_trip(tiny_tfds, full_run, tmp_path):
    """The restored checkpoint gives the run's eval weights; the exported pipeline, loaded in a
    fresh process without lcpose.train / lcpose.models, gives the same poses."""
    from lcpose.export import export_predictor
    from lcpose.train import eval_params

    model, variables, meta = load_trained(full_run.workdir)
    assert meta["objective"]["pose_loss"] == "lc"
    for x, y in zip(_leaves(variables["params"]), _leaves(eval_params(full_run.state))):
        np.testing.assert_array_equal(x, y)

    loader = make_loader(tiny_tfds, "test", 4, train=False, worker_count=0, boxes="gt",
                         input_size=64, output_size=16)
    batch = next(iter(loader))
    table = loader.models
    out_dir = export_predictor(tmp_path / "exported", model, variables, input_size=64, pnp=PNP,
                               obj_ids=table.obj_ids, bbox3d=table.bbox3d)
    want = jax.jit(E.make_predict_fn(model, PNP))(variables, batch["image"], batch["K_out"],
                                                   batch["bbox3d"], jax.random.PRNGKey(0))
    np.savez(tmp_path / "inputs.npz", image=batch["image"], K_out=batch["K_out"], obj_id=batch["obj_id"])
    script = textwrap.dedent(f"""
        import sys, numpy as np
        from lcpose.export import load_exported
        z = np.load({str(tmp_path / 'inputs.npz')!r})
        m = load_exported({str(out_dir)!r})
        out = m(z["image"], z["K_out"], obj_ids=z["obj_id"], seed=0)
        assert not any(k.startswith(("lcpose.train", "lcpose.models", "flax", "optax")) for k in sys.modules), \\
            sorted(k for k in sys.modules if k.startswith("lcpose"))
        np.savez({str(tmp_path / 'out.npz')!r}, **out)
    """)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    for k in E.PREDICT_KEYS:
        np.testing.assert_allclose(got[k], np.asarray(want[k]), rtol=1e-5, atol=1e-4, err_msg=k)
    with pytest.raises(ValueError, match="obj_ids"):
        from lcpose.export import load_exported

        load_exported(out_dir)(batch["image"], batch["K_out"], obj_ids=[99] * 4)


def test_training_reduces_loss_and_evaluation_pipeline(tiny_tfds, full_run, tmp_path):
    """The loss goes down over the short LC run, and evaluation with a ground-truth oracle in place of the network scores ~100 % ADD(-S):
    crops, K_out, top-weight selection, RANSAC + weighted PnP, the metrics and the BOP CSV
    agree with each other. (A network trained from scratch within a test's budget is at chance
    level on held-out poses.)"""
    base = [r["loss/xyz"] + 0.25 * r["loss/mask"] for r in full_run.history]
    assert np.mean(base[-4:]) < 0.95 * np.mean(base[:4]), base

    loader = make_loader(tiny_tfds, "test", 4, train=False, worker_count=0, boxes="gt",
                         input_size=64, output_size=16)

    class Oracle:
        """Stands in for the network: reads the ground-truth maps packed into the 'image'."""

        def apply(self, variables, images, train=False):
            x = images[:, ::4, ::4]
            on = x[..., 0] < 5.0
            w = jnp.where(on, 1.0, 1e-6)[..., None] * jnp.ones(2)
            return {"xyz": jnp.where(on[..., None], x, 0.0), "w2d": w,
                    "mask_logits": jnp.where(on, 5.0, -5.0)[..., None]}

    def packed():
        for b in loader:
            lo, hi = b["bbox3d"].min(1), b["bbox3d"].max(1)
            xyz = (b["xyz"] - 0.5 * (lo + hi)[:, None, None]) / (hi - lo)[:, None, None]
            xyz = np.where(b["mask_visib"][..., None] > 0, xyz, 9.0).astype(np.float32)
            yield dict(b, image=np.repeat(np.repeat(xyz, 4, 1), 4, 2))

    class Packed:
        steps_per_epoch = loader.steps_per_epoch

        def __iter__(self):
            return packed()

    out = E.evaluate(jax.jit(E.make_predict_fn(Oracle(), PNP)), {}, Packed(), progress=False)
    assert len(out["obj_id"]) == loader.num_examples
    errors = E.compute_errors(out, loader.models)
    summary = E.summarize(out, errors, E.compute_errors(out, loader.models, prefix="ransac"))
    visible = out["visib_fract"] > 0.3
    assert np.mean(errors["add_or_add_s"][visible] < 0.1 * errors["diameter"][visible]) > 0.9
    assert summary["add_s_0.1d"]["mean"] > 70.0 and summary["ar_mspd"] > 60.0
    table = E.format_table({"oracle": summary}, use_rich=False)
    assert "obj 1" in table and "AR_MSPD" in table
    csv = E.write_bop_csv(tmp_path / "oracle_synthetic-test.csv", out)
    lines = open(csv).read().strip().split("\n")
    assert lines[0] == "scene_id,im_id,obj_id,score,R,t,time"
    first = lines[1].split(",")
    R = np.array(first[4].split(), float).reshape(3, 3)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-5)
    assert len(lines) - 1 == int(np.sum(out["has_box"] > 0))
