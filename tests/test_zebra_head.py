"""The ZebraPose head (lcpose.models.zebra): network outputs, the surrogate loss, the GT-decoded
training correspondences and the in-mask quantile test selection."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcpose import binary_codes as bc
from lcpose import geometry
from lcpose.evaluate import PnPConfig
from lcpose.models import init_variables, zebra
from lcpose.models.registry import example_keys, get_model, map_size
from lcpose.train.objective import ObjectiveConfig

TINY = dict(encoder_widths=(4, 6, 8, 10), head_channels=8)
EXTENT = np.array([100.0, 50.0, 12.5])      # 7, 6, 4 bits


def _example(h=8, seed=0):
    rng = np.random.default_rng(seed)
    box = np.asarray(geometry.bbox3d_corners(-EXTENT / 2 + 1.0, EXTENT / 2 + 1.0), np.float32)
    mask = np.zeros((h, h), np.float32)
    mask[2:6, 1:7] = 1
    xyz = (1.0 + rng.uniform(-0.5, 0.5, (h, h, 3)) * EXTENT) * mask[..., None]
    return {"xyz": jnp.asarray(xyz, jnp.float32), "mask_visib": jnp.asarray(mask),
            "bbox3d": jnp.asarray(box)}


def _outputs(h=8, seed=1):
    rng = np.random.default_rng(seed)
    bits = bc.bit_counts(EXTENT)
    logits = jnp.asarray(rng.normal(0, 2, (h, h, 3, bc.N_BITS)), jnp.float32)
    logits = jnp.where(bc.bit_mask(bits), logits, 0.0)
    wl = jnp.asarray(rng.normal(size=(h, h, 2)), jnp.float32)
    ls = jnp.array([3.0, 3.5], jnp.float32)
    from lcpose.models import spatial_softmax_weights

    return {"code_logits": logits, "xyz": bc.decode_without_gt(logits, bits),
            "weight_logits": wl, "log_scale": ls, "w2d": spatial_softmax_weights(wl, ls),
            "mask_logits": jnp.asarray(rng.normal(size=(h, h, 1)), jnp.float32)}


def test_network_outputs_and_registry():
    model = get_model("zebra", preset="cpu", code_bits=(7, 6, 4), **TINY)
    assert map_size(model, 64) == 32 and example_keys("zebra")[-2:] == ("xyz", "mask_visib")
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32, 3)), jnp.float32)
    variables = init_variables(model, 0, 32)           # rbg draws: fast to compile
    out = jax.jit(model.apply)(variables, x)
    assert out["code_logits"].shape == (2, 16, 16, 3, 7) and out["w2d"].shape == (2, 16, 16, 2)
    # padding bits are exactly zero; xyz is the test decoding of the code logits
    pad = ~np.asarray(bc.bit_mask(jnp.array([7, 6, 4])))
    assert np.all(np.asarray(out["code_logits"])[..., pad] == 0)
    np.testing.assert_allclose(out["xyz"], bc.decode_without_gt(out["code_logits"], jnp.array([7, 6, 4])), atol=1e-6)
    # the weights are GDRNet's (one home: spatial_softmax_weights of the logits and the scale)
    from lcpose.models import spatial_softmax_weights

    np.testing.assert_allclose(out["w2d"], spatial_softmax_weights(out["weight_logits"], out["log_scale"]), rtol=1e-6)
    assert isinstance(model, zebra.ZebraNet) and model.head_stages == 4
    assert zebra.object_overrides(_example()["bbox3d"]) == {"code_bits": (7, 6, 4)}
    with pytest.raises(ValueError, match="code_bits"):
        zebra.build(preset="cpu", code_bits=(8, 6, 4))
    with pytest.raises(ValueError, match="preset"):
        zebra.build(preset="gpu")


def test_surrogate_loss_is_mask_plus_weighted_hierarchical_loss():
    ex, out = _example(), _outputs()
    cfg = ObjectiveConfig(pose_loss="none", mask_weight=1.0, xyz_weight=3.0)
    loss, m = jax.jit(lambda o, e: zebra.surrogate_loss(o, e, cfg))(out, ex)
    bits = bc.bit_counts(EXTENT)
    gt = bc.encode_xyz(ex["xyz"], bits, extent=EXTENT, center=np.ones(3))
    l_code, _ = bc.hierarchical_bit_loss(out["code_logits"], gt, bits, ex["mask_visib"])
    l_mask = bc.l1_mask_loss(out["mask_logits"][..., 0], ex["mask_visib"])
    np.testing.assert_allclose(loss, l_mask + 3 * l_code, rtol=1e-5)
    np.testing.assert_allclose([m["loss/code"], m["loss/mask"]], [l_code, l_mask], rtol=1e-5)
    assert 0.2 < float(m["code/bit_error"]) < 0.8         # random logits: about half wrong


def test_decode_train_points_and_their_gradient():
    ex, out = _example(), _outputs()
    cfg = ObjectiveConfig(pose_loss="lc", stride=2, pose_points="mask")

    def f(logits):
        corr, aux = zebra.decode_train(jax.random.PRNGKey(0), {**out, "code_logits": logits}, ex, cfg)
        return jnp.sum(corr.x3d * jnp.array([1.0, -2.0, 0.5])), (corr, aux)

    g, (corr, aux) = jax.jit(jax.grad(f, has_aux=True))(out["code_logits"])
    assert corr.x3d.shape == (16, 3)
    # x3d in mm: the GT-decoded map through the box
    bits = bc.bit_counts(EXTENT)
    gt = bc.encode_xyz(ex["xyz"], bits, extent=EXTENT, center=np.ones(3))
    dec, chosen = bc.decode_with_gt(out["code_logits"], gt, bits, has_gt=ex["mask_visib"] > 0)
    np.testing.assert_allclose(aux["xyz"], dec, atol=1e-6)
    # inside the mask the GT-decoded points are within one chosen-bit place value of the truth
    on = np.asarray(corr.w2d[:, 0]) > 0
    assert on.sum() > 0
    # pose_points="mask": the points off the visible mask are not valid (nor weighted)
    np.testing.assert_array_equal(np.asarray(corr.valid), on)
    # the gradient reaches only chosen bits (one per axis and sampled pixel)
    gn = np.asarray(g)
    assert np.all(gn[~np.asarray(chosen)] == 0)
    assert 0 < np.count_nonzero(gn) <= 16 * 3


def test_in_mask_quantile_selection_matches_its_definition():
    rng = np.random.default_rng(3)
    h = 6
    xyz = jnp.asarray(rng.normal(size=(h, h, 3)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.1, 2.0, (h, h, 2)), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(h, h)), jnp.float32)
    c = jax.jit(zebra.select_in_mask_quantile, static_argnums=3)(xyz, w, mask, 0.8)
    s = np.asarray(w).reshape(-1, 2).mean(-1)
    inside = np.asarray(mask).reshape(-1) > 0.5
    thr = np.sort(s[inside])[int(np.floor(0.2 * inside.sum()))]
    want = inside & (s >= thr)           # at or above the 0.2 quantile of the in-mask weights
    valid = np.asarray(c.valid)
    assert c.x3d.shape == (int(np.ceil(0.8 * h * h)), 3) and valid.sum() == want.sum()
    # the valid points are exactly those pixels (x2d gives the pixel), with their xyz and weights
    u, v = (np.asarray(c.x2d)[valid].round().astype(int).T)
    np.testing.assert_array_equal(np.sort(v * h + u), np.flatnonzero(want))
    np.testing.assert_allclose(np.asarray(c.x3d)[valid], np.asarray(xyz)[v, u])
    np.testing.assert_allclose(np.asarray(c.w2d)[valid], np.asarray(w)[v, u])
    assert np.all(np.asarray(c.w2d)[~valid] == 0)
    # decode_test uses it with use_mask (test decoding, mm by the box)
    ex, out = _example(h), _outputs(h)
    ct = zebra.decode_test(out, ex, PnPConfig(fraction=0.8, use_mask=True))
    assert ct.x3d.shape == (int(np.ceil(0.8 * h * h)), 3)
    ca = zebra.decode_test(out, ex, PnPConfig(fraction=0.5))
    assert ca.x3d.shape == (18, 3)


def test_experiment_configs_and_optimizer_choice():
    from experiments.config import get_config, objective_for
    from lcpose.train.loop import TrainConfig, _make_tx, _step_key, build_model

    for name, size, maps in (("zebra_paper", 256, 128), ("zebra_cpu", 64, 16)):
        cfg = get_config(name)
        assert cfg.variants == ("zebra_base", "zebra_lc") and cfg.pose_weight == 0.03
        assert cfg.pnp.use_mask and cfg.pnp.fraction == 0.8          # quantile 0.2 in the mask
        base, lc = (objective_for(cfg, v, cfg.train.total_steps) for v in cfg.variants)
        assert (base.pose_loss, lc.pose_loss) == ("none", "lc")
        # the paper's L_mask + 3 L_hier; the CPU run weighs the mask 0.2 (experiments.config)
        mask_w = 1.0 if name == "zebra_paper" else 0.2
        assert base.mask_weight == lc.mask_weight == mask_w and base.xyz_weight == lc.xyz_weight == 3.0
        model = build_model(cfg.train, lc)
        assert isinstance(model, zebra.ZebraNet) and cfg.train.input_size == size
        assert map_size(model, size) == maps and model.scale_branch
        assert not build_model(cfg.train, base).scale_branch
    paper = get_config("zebra_paper")
    assert paper.pose_loss_start_step == 3000 and paper.train.optimizer == "adam"
    assert paper.train.learning_rate == 2e-4 and build_model(paper.train, lc).depth == 34
    tx, sched = _make_tx(_step_key(paper.train))
    assert float(sched(0)) == float(sched(300_000)) == 2e-4          # constant, as ZebraPose
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(optimizer="adam", weight_decay=1e-4)
