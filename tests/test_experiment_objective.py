"""The GDR-Net + pose-loss objective (lcpose.train.objective) against hand-written formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcpose import geometry
from lcpose.losses.lc import lc_loss
from lcpose.metrics import gradient_correct_mask
from lcpose.models import spatial_softmax_weights
from lcpose.train.objective import (
    ObjectiveConfig,
    box_extent_center,
    make_objective,
    pose_blend_factor,
    uses_scale_branch,
)

H = W = 8
_lc = jax.jit(lc_loss)
# One compiled objective for the composition and gradient-correctness tests: every pixel
# (stride 1, no random offset), blend over 20 steps, gradient correctness every 4th step.
_CFG = ObjectiveConfig(pose_loss="lc", stride=1, pose_loss_start_step=20, grad_metric_every=4)
_loss_fn = jax.jit(make_objective(_CFG))


def _bce(x, y):
    return np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))


@pytest.fixture(scope="module")
def example():
    """Two examples of network outputs and targets: a box 60 x 40 x 50 mm off-centre at 600 mm."""
    rng = np.random.default_rng(0)
    B = 2
    lo, hi = np.array([-29.0, -18.0, -22.0]), np.array([31.0, 22.0, 28.0])
    corners = np.asarray(geometry.bbox3d_corners(lo, hi), np.float64)
    K = np.array([[200.0, 0, 3.5], [0, 200.0, 3.5], [0, 0, 1]])
    R = np.stack([np.asarray(geometry.so3_exp(rng.normal(size=3) * 0.5)) for _ in range(B)])
    t = np.array([[2.0, -3.0, 600.0], [-4.0, 1.0, 650.0]])
    xyz_gt = rng.uniform(lo, hi, size=(B, H, W, 3))
    mask = (rng.random((B, H, W)) > 0.4).astype(np.float64)
    xyz_gt = xyz_gt * mask[..., None]
    outputs = {
        "xyz": rng.normal(size=(B, H, W, 3)) * 0.3,
        "weight_logits": rng.normal(size=(B, H, W, 2)),
        "mask_logits": rng.normal(size=(B, H, W, 1)),
        "log_scale": np.log(H * W) + rng.normal(size=(B, 2)) * 0.1,
    }
    outputs["w2d"] = np.asarray(spatial_softmax_weights(outputs["weight_logits"], outputs["log_scale"]))
    batch = {"xyz": xyz_gt, "mask_visib": mask, "bbox3d": np.broadcast_to(corners, (B, 8, 3)),
             "K_out": np.broadcast_to(K, (B, 3, 3)), "R": R, "t": t}
    outputs = {k: jnp.asarray(v) for k, v in outputs.items()}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    return outputs, batch, (lo, hi)


def _expected(outputs, batch, lo, hi, step, start, pose_weight=0.02, mask_points=False):
    """The objective written out with numpy + lc_loss (stride 1: every pixel, no random offset).

    mask_points: pixels outside the visible mask get weight 0 in the pose loss."""
    o = {k: np.asarray(v) for k, v in outputs.items()}
    b = {k: np.asarray(v) for k, v in batch.items()}
    ext, ctr = hi - lo, 0.5 * (lo + hi)
    m = b["mask_visib"][..., None]
    # in half extents (the reference's [-1, 1] coordinates): twice the error in full extents
    l_xyz = np.mean(2.0 * np.abs(o["xyz"] * m - (b["xyz"] - ctr) / ext * m))
    l_mask = np.mean(_bce(o["mask_logits"][..., 0], b["mask_visib"]))
    l_wbce = np.mean(_bce(o["weight_logits"], np.broadcast_to(m, o["weight_logits"].shape)))
    v, u = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    x2d = np.stack([u, v], -1).reshape(-1, 2).astype(np.float64)
    poses = []
    for i in range(o["xyz"].shape[0]):
        x3d = (ctr + ext * o["xyz"][i]).reshape(-1, 3)
        w2d = np.asarray(spatial_softmax_weights(o["weight_logits"][i], o["log_scale"][i])).reshape(-1, 2)
        valid = None
        if mask_points:   # off the mask: weight 0, and not in the robust statistics
            valid = b["mask_visib"][i].reshape(-1) > 0.5
            w2d = w2d * valid[:, None]
        poses.append(float(_lc(x2d, x3d, w2d, b["K_out"][i], b["R"][i], b["t"][i], b["bbox3d"][i], valid).loss))
    l_pose = np.mean(poses)
    f = min(max((step + 1) / (start + 1e-5), 0.0), 1.0)
    total = l_xyz + 0.25 * l_mask + pose_weight * (f * l_pose + (1 - f) * l_wbce)
    return total, dict(xyz=l_xyz, mask=l_mask, wbce=l_wbce, pose=l_pose, f=f)


def test_loss_composition_matches_formula(example):
    outputs, batch, (lo, hi) = example
    for step in (9, 40):
        loss, m = _loss_fn(outputs, batch, jax.random.PRNGKey(3), jnp.asarray(step))
        want, parts = _expected(outputs, batch, lo, hi, step, 20)
        np.testing.assert_allclose(float(loss), want, rtol=1e-7)
        np.testing.assert_allclose(float(m["loss/xyz"]), parts["xyz"], rtol=1e-12)
        np.testing.assert_allclose(float(m["loss/mask"]), parts["mask"], rtol=1e-12)
        np.testing.assert_allclose(float(m["loss/weight_bce"]), parts["wbce"], rtol=1e-12)
        np.testing.assert_allclose(float(m["loss/pose"]), parts["pose"], rtol=1e-7)
        np.testing.assert_allclose(float(m["pose_blend"]), parts["f"], rtol=1e-6)
        assert {"lc/e_cov", "lc/e_prior", "lc/e_linear", "pose_nonfinite"} <= set(m)
    assert parts["f"] == 1.0


def test_pose_points_inside_the_mask(example):
    """pose_points="mask": the pose loss sees only the visible pixels (the others weigh 0)."""
    outputs, batch, (lo, hi) = example
    cfg = ObjectiveConfig(pose_loss="lc", stride=1, pose_loss_start_step=20, pose_points="mask")
    loss, m = jax.jit(make_objective(cfg))(outputs, batch, jax.random.PRNGKey(3), jnp.asarray(40))
    want, parts = _expected(outputs, batch, lo, hi, 40, 20, mask_points=True)
    _, parts_all = _expected(outputs, batch, lo, hi, 40, 20)
    np.testing.assert_allclose(float(m["loss/pose"]), parts["pose"], rtol=1e-7)
    np.testing.assert_allclose(float(loss), want, rtol=1e-7)
    assert abs(parts["pose"] - parts_all["pose"]) > 1e-3        # the mask changes the loss
    with pytest.raises(ValueError, match="pose_points"):
        ObjectiveConfig(pose_points="visible")


def test_baseline_trains_weights_by_mask_bce_only(example):
    outputs, batch, (lo, hi) = example
    loss, m = make_objective(ObjectiveConfig(pose_loss="none"))(outputs, batch, jax.random.PRNGKey(0), 5)
    _, parts = _expected(outputs, batch, lo, hi, 0, 1)
    np.testing.assert_allclose(float(loss), parts["xyz"] + 0.25 * parts["mask"] + 0.02 * parts["wbce"], rtol=1e-12)
    assert "loss/pose" not in m and float(m["pose_blend"]) == 0.0


def test_pose_gradient_reaches_weight_logits_not_w2d(example):
    """The train step clips the gradient of the named output 'weight_logits': the pose loss must
    build its weights from the logits, so nothing flows through out['w2d']."""
    outputs, batch, _ = example
    grads = jax.jit(jax.grad(lambda o: _loss_fn(o, batch, jax.random.PRNGKey(1), 100)[0]))(outputs)
    assert float(jnp.max(jnp.abs(grads["w2d"]))) == 0.0
    assert float(jnp.max(jnp.abs(grads["weight_logits"]))) > 0.0
    assert float(jnp.max(jnp.abs(grads["log_scale"]))) > 0.0
    assert float(jnp.max(jnp.abs(grads["xyz"]))) > 0.0


def test_gradient_correctness_metric(example):
    outputs, batch, (lo, hi) = example
    _, m_off = _loss_fn(outputs, batch, jax.random.PRNGKey(0), jnp.asarray(1))
    _, m_on = _loss_fn(outputs, batch, jax.random.PRNGKey(0), jnp.asarray(3))
    assert np.isnan(float(m_off["grad_correct"]))
    # by hand: gradient of the summed per-example LC loss w.r.t. the 3D points, pooled over points
    ext, ctr = hi - lo, 0.5 * (lo + hi)
    v, u = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    x2d = np.stack([u, v], -1).reshape(-1, 2).astype(np.float64)
    correct = counted = 0
    for i in range(2):
        x3d = jnp.asarray((ctr + ext * np.asarray(outputs["xyz"][i])).reshape(-1, 3))
        w2d = spatial_softmax_weights(outputs["weight_logits"][i], outputs["log_scale"][i]).reshape(-1, 2)
        g = jax.grad(lambda x: _lc(x2d, x, w2d, batch["K_out"][i], batch["R"][i], batch["t"][i],
                                       batch["bbox3d"][i]).loss)(x3d)
        c, n = gradient_correct_mask(g, x3d, x2d, batch["K_out"][i], batch["R"][i], batch["t"][i])
        correct += int(np.sum(c))
        counted += int(np.sum(n))
    assert counted > 100
    np.testing.assert_allclose(float(m_on["grad_correct"]), correct / counted, rtol=1e-12)
    assert float(m_on["grad_correct"]) > 0.9      # LC's gradients point the right way (Table 3)


def test_scale_branch_and_blend_and_config_checks():
    assert uses_scale_branch(ObjectiveConfig(pose_loss="lc"))
    assert not uses_scale_branch(ObjectiveConfig(pose_loss="lc", loss_kwargs={"use_prior": False}))
    assert not uses_scale_branch(ObjectiveConfig(pose_loss="bpnp"))
    assert uses_scale_branch(ObjectiveConfig(pose_loss="epropnp"))
    assert not uses_scale_branch(ObjectiveConfig(pose_loss="none"))
    # the reference's blend: (step + 1) / (2000 + 1e-5), full from step 1999 on
    np.testing.assert_allclose(float(pose_blend_factor(0, 2000)), 1 / 2000, rtol=1e-5)
    assert float(pose_blend_factor(1998, 2000)) < 1.0 and float(pose_blend_factor(1999, 2000)) == 1.0
    assert float(pose_blend_factor(0, 0)) == 1.0
    # the reference's loss_pose_nz_step: nothing before it, then linear up to the start step
    assert float(pose_blend_factor(98, 200, 100)) == 0.0
    np.testing.assert_allclose(float(pose_blend_factor(149, 200, 100)), 0.5, rtol=1e-6)
    # (the reference's 1e-5 leaves 1 - 1e-7 at step 199; full from step 200)
    np.testing.assert_allclose(float(pose_blend_factor(199, 200, 100)), 1.0, rtol=1e-6)
    assert float(pose_blend_factor(200, 200, 100)) == 1.0
    with pytest.raises(ValueError, match="pose_loss_nonzero_step"):
        ObjectiveConfig(pose_loss_start_step=10, pose_loss_nonzero_step=20)
    ext, ctr = box_extent_center(jnp.asarray(geometry.bbox3d_corners(np.array([-1.0, -2, -3]), np.array([3.0, 2, 1]))))
    np.testing.assert_allclose(ext, [4, 4, 4])
    np.testing.assert_allclose(ctr, [1, 0, -1])
    # hashable and normalised (used as a compilation-cache key)
    a = ObjectiveConfig(pose_loss="lc", loss_kwargs={"use_cov": False, "nll": "gaussian"})
    b = ObjectiveConfig(pose_loss="lc", loss_kwargs=(("nll", "gaussian"), ("use_cov", False)))
    assert a == b and hash(a) == hash(b)
    with pytest.raises(ValueError, match="pose_loss"):
        ObjectiveConfig(pose_loss="l1")
    with pytest.raises(ValueError, match="pose_weight"):
        ObjectiveConfig(pose_weight=-1.0)
    with pytest.raises(ValueError, match="stride"):
        ObjectiveConfig(stride=0)
    with pytest.raises(ValueError, match="loss_kwargs"):
        ObjectiveConfig(pose_loss="none", loss_kwargs={"use_cov": False})
    from lcpose.train.loop import TrainConfig

    with pytest.raises(ValueError, match="color_aug_prob"):
        TrainConfig(color_aug_prob=1.5)
    with pytest.raises(ValueError, match="bg_switch_prob"):
        TrainConfig(bg_switch_prob=-0.1)
    from lcpose.train.loop import output_clips

    # the reference's clippers: weight logits (rel 0.7, on), weight scale and points (rel 2, opt-in)
    assert output_clips(TrainConfig()) == (("weight_logits", 0.7),)
    assert output_clips(TrainConfig(clip_weight_logits=False, clip_scale_grad=True, clip_points_grad=True)) \
        == (("log_scale", 2.0), ("xyz", 2.0))


def test_experiment_configs_objectives():
    """What `python -m experiments.lmo_gdr` trains: the paper's blend, and the CPU config's."""
    from experiments.config import CONFIGS, objective_for

    paper = objective_for(CONFIGS["paper"], "lc", 24000)
    assert (paper.pose_loss_start_step, paper.pose_loss_nonzero_step, paper.pose_points) == (2000, 0, "all")
    cpu = objective_for(CONFIGS["cpu-pretrained"], "lc", 2400)
    assert (cpu.pose_loss_start_step, cpu.pose_loss_nonzero_step, cpu.pose_points) == (1200, 720, "mask")
    assert objective_for(CONFIGS["cpu-pretrained"], "lc", 100).pose_loss_nonzero_step == 30   # --steps scales it
    assert CONFIGS["cpu"].pnp.use_mask and not CONFIGS["paper"].pnp.use_mask
    assert objective_for(CONFIGS["cpu"], "baseline", 2400).pose_loss == "none"
    # the official residual clamp (32 px on 64x64) is half the output map; stride 1 on 16x16
    assert paper.kwargs["residual_clamp"] == 32.0 and paper.stride == 2
    cpu_lc = objective_for(CONFIGS["cpu"], "lc", 2400)
    assert cpu_lc.kwargs["residual_clamp"] == 8.0 and cpu_lc.stride == 1
    assert objective_for(CONFIGS["cpu"], "lc_c2", 2400).kwargs == {"use_cov": False, "residual_clamp": 8.0}
    with pytest.raises(ValueError, match="pose_blend_fractions"):
        CONFIGS["cpu"].replace(pose_blend_fractions=(0.8, 0.5))
    with pytest.raises(ValueError, match="pose_points"):
        CONFIGS["cpu"].replace(pose_points="visible")
