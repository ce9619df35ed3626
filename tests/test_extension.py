"""BUILD.md's "How to extend": a new pose loss is one registered function, nothing else.

The toy loss below (under 30 lines) is registered, checked against a hand computation through
the generic objective, and trained for 2 steps by the real training loop on the tiny synthetic
set of tests/test_experiment_run.py.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcpose import geometry
from lcpose.losses import POSE_LOSSES, get_pose_loss, register_pose_loss
from tests.test_experiment_run import TINY, tiny_tfds  # noqa: F401 (a fixture)


# ---- the extension: a toy pose loss -----------------------------------------------------------
@register_pose_loss("toy_reprojection", uses_scale=False)
def toy_reprojection(inputs, *, power: float = 1.0):
    """Mean over valid points of sum_axes |w * r|^power, r the residual at the GT pose."""
    c = inputs.corr
    r = c.x2d - geometry.project(c.x3d, inputs.R, inputs.t, inputs.K)
    per_point = jnp.sum(jnp.abs(c.w2d * r) ** power, axis=-1)
    v = c.valid.astype(r.dtype)
    loss = jnp.sum(v * per_point) / jnp.maximum(jnp.sum(v), 1.0)
    return loss, {"toy/max_px": jnp.max(jnp.where(c.valid, jnp.linalg.norm(r, axis=-1), 0.0))}
# -----------------------------------------------------------------------------------------------


def test_registered_loss_goes_through_the_generic_objective():
    from lcpose.models import spatial_softmax_weights
    from lcpose.train.objective import ObjectiveConfig, make_objective, uses_scale_branch

    assert "toy_reprojection" in POSE_LOSSES and get_pose_loss("toy_reprojection").fn is toy_reprojection
    cfg = ObjectiveConfig(pose_loss="toy_reprojection", stride=1, pose_weight=1.0, xyz_weight=0.0,
                          mask_weight=0.0, pose_loss_start_step=0, loss_kwargs={"power": 2.0})
    assert not uses_scale_branch(cfg)
    rng = np.random.default_rng(0)
    B, H = 2, 4
    lo, hi = np.array([-30.0, -20.0, -25.0]), np.array([30.0, 24.0, 25.0])
    out = {"xyz": rng.normal(size=(B, H, H, 3)) * 0.3, "weight_logits": rng.normal(size=(B, H, H, 2)),
           "mask_logits": rng.normal(size=(B, H, H, 1)), "log_scale": np.full((B, 2), np.log(H * H))}
    K = np.array([[100.0, 0, 1.5], [0, 100.0, 1.5], [0, 0, 1]])
    R = np.stack([np.asarray(geometry.so3_exp(rng.normal(size=3) * 0.3)) for _ in range(B)])
    t = np.array([[1.0, -2.0, 500.0], [3.0, 1.0, 550.0]])
    batch = {"xyz": np.zeros((B, H, H, 3)), "mask_visib": np.ones((B, H, H)),
             "bbox3d": np.broadcast_to(np.asarray(geometry.bbox3d_corners(lo, hi)), (B, 8, 3)),
             "K_out": np.broadcast_to(K, (B, 3, 3)), "R": R, "t": t}
    loss, m = make_objective(cfg)(out, batch, jax.random.PRNGKey(0), 5)
    # by hand: every pixel, x3d = center + extent * xyz, weights the spatial softmax
    v, u = np.meshgrid(np.arange(H), np.arange(H), indexing="ij")
    x2d = np.stack([u, v], -1).reshape(-1, 2)
    want = []
    for i in range(B):
        x3d = (0.5 * (lo + hi) + (hi - lo) * out["xyz"][i]).reshape(-1, 3)
        w = np.asarray(spatial_softmax_weights(out["weight_logits"][i], out["log_scale"][i])).reshape(-1, 2)
        xc = x3d @ R[i].T + t[i]
        uv = (xc @ K.T)[:, :2] / (xc @ K.T)[:, 2:]
        want.append(np.mean(np.sum((w * (x2d - uv)) ** 2, -1)))
    np.testing.assert_allclose(float(m["loss/pose"]), np.mean(want), rtol=1e-10)
    np.testing.assert_allclose(float(loss), np.mean(want), rtol=1e-10)     # f = 1, other weights 0
    assert "toy/max_px" in m


@pytest.mark.slow
def test_registered_loss_trains_two_steps(tiny_tfds, tmp_path):  # noqa: F811 (the fixture)
    from lcpose.train.loop import train
    from lcpose.train.objective import ObjectiveConfig

    cfg = dataclasses.replace(TINY, total_steps=2, ckpt_every=2)
    res = train(tiny_tfds, tmp_path, cfg, ObjectiveConfig(pose_loss="toy_reprojection",
                                                          pose_loss_start_step=0), progress=False)
    assert res.steps == 2 and [r["step"] for r in res.history] == [1, 2]
    assert all(np.isfinite(r["loss/pose"]) and r["loss/pose"] > 0 for r in res.history)
    assert all(r["pose_blend"] == 1.0 and np.isfinite(r["toy/max_px"]) for r in res.history)
    # the loss does not constrain the weight scale: the network was built without the branch
    assert "scale" not in res.state.params
