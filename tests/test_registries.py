"""The seams: pose-loss, solver and model registries, the model box in geometry."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcpose import geometry
from lcpose.correspondences import Correspondences
from lcpose.losses import POSE_LOSSES, PoseLossInputs, get_pose_loss
from lcpose.pnp import SOLVERS, get_solver


def test_pose_loss_registry_entries_and_errors():
    assert {"lc", "bpnp", "epropnp", "none"} <= set(POSE_LOSSES)
    assert get_pose_loss("lc").uses_scale({}) and not get_pose_loss("lc").uses_scale({"use_prior": False})
    assert not get_pose_loss("bpnp").uses_scale() and get_pose_loss("epropnp").uses_scale()
    assert not get_pose_loss("none").uses_scale() and not get_pose_loss("none").active
    with pytest.raises(ValueError, match="unknown pose loss 'l1'.*bpnp, epropnp, lc, none"):
        get_pose_loss("l1")
    c = Correspondences(jnp.zeros((4, 2)), jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones(4, bool))
    loss, metrics = get_pose_loss("none").fn(
        PoseLossInputs(c, jnp.eye(3), jnp.eye(3), jnp.zeros(3), jnp.zeros((8, 3)), jax.random.PRNGKey(0)))
    assert float(loss) == 0.0 and metrics == {}
    with pytest.raises(ValueError, match="no kwargs"):
        get_pose_loss("none").fn(c, use_prior=False)


def test_solver_registry_and_pnp_config():
    from lcpose.evaluate import PnPConfig

    assert {"ransac", "weighted", "ransac_weighted", "weighted_epnp"} <= set(SOLVERS)
    assert get_solver("ransac_weighted") is get_solver("weighted")
    with pytest.raises(ValueError, match="unknown solver 'magic'.*weighted"):
        get_solver("magic")
    assert PnPConfig().solver_name == "weighted"
    assert PnPConfig(ransac=False).solver_name == "weighted_epnp"
    with pytest.raises(ValueError, match="solver"):
        PnPConfig(solver="magic")
    with pytest.raises(ValueError, match="ransac=False"):
        PnPConfig(ransac=False, solver="ransac")


@pytest.mark.slow   # compiles RANSAC three times (about 30 s of CPU)
def test_solvers_recover_an_exact_pose():
    """Every registered solver returns the pose of noise-free correspondences and the same keys."""
    rng = np.random.default_rng(0)
    x3d = rng.uniform(-50, 50, size=(40, 3))
    R, t = np.asarray(geometry.so3_exp(np.array([0.3, -0.2, 0.1]))), np.array([5.0, -3.0, 600.0])
    K = np.array([[500.0, 0, 32], [0, 500.0, 32], [0, 0, 1]])
    x2d = np.asarray(geometry.project(jnp.asarray(x3d), jnp.asarray(R), jnp.asarray(t), jnp.asarray(K)))
    c = Correspondences(jnp.asarray(x2d), jnp.asarray(x3d), jnp.ones((40, 2)), jnp.ones(40, bool))
    for name in ("ransac", "weighted", "weighted_epnp"):
        res, m = jax.jit(lambda k, c, K, name=name: get_solver(name)(k, c, K, hypotheses=16))(
            jax.random.PRNGKey(0), c, jnp.asarray(K))
        np.testing.assert_allclose(np.asarray(res.R), R, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(np.asarray(res.t), t, atol=1e-3, err_msg=name)
        assert set(m) == {"R_ransac", "t_ransac", "inliers"} and int(m["inliers"]) == 40, name


def test_model_registry():
    from lcpose.models import GDRNet, gdrnet
    from lcpose.models.registry import example_keys, get_model, map_size, model_module

    model = get_model("gdrnet", preset="cpu", scale_branch=False)
    assert isinstance(model, GDRNet) and not model.scale_branch
    assert model_module("gdrnet") is gdrnet and model_module(model) is gdrnet
    assert model_module(object(), default="gdrnet") is gdrnet          # a stand-in with GDR outputs
    assert map_size(model, 64) == 16
    assert example_keys(model) == ("image", "K_out", "R", "t", "bbox3d", "xyz", "mask_visib")
    with pytest.raises(ValueError, match="unknown model 'nonet'"):
        get_model("nonet")
    with pytest.raises(ValueError, match="not a model module"):
        model_module("registry")
    with pytest.raises(ValueError, match="identifier"):
        get_model("../x")


def test_model_box_one_home():
    info = {"min_x": -10.0, "min_y": -20.0, "min_z": 5.0, "size_x": 30.0, "size_y": 40.0, "size_z": 10.0}
    corners = geometry.model_box_corners(info)
    assert corners.dtype == np.float32 and corners.shape == (8, 3)
    np.testing.assert_array_equal(corners.min(0), [-10, -20, 5])
    np.testing.assert_array_equal(corners.max(0), [20, 20, 15])
    extent, center = geometry.box_from_model_info(info)
    e2, c2 = geometry.box_extent_center(jnp.asarray(corners))
    np.testing.assert_allclose(extent, [30, 40, 10]) and np.testing.assert_allclose(e2, extent)
    np.testing.assert_allclose(center, [5, 0, 10]) and np.testing.assert_allclose(c2, center)
    x = np.array([[20.0, 20.0, 15.0]])
    np.testing.assert_allclose(geometry.mm_to_xyz(x, extent, center), [[0.5, 0.5, 0.5]])
    np.testing.assert_allclose(geometry.xyz_to_mm(geometry.mm_to_xyz(x, extent, center), extent, center), x)
    with pytest.raises(ValueError, match="size_z"):
        geometry.model_box_corners({k: v for k, v in info.items() if k != "size_z"})
