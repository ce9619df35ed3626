"""Coordinate-wise binary codes (lcpose.binary_codes): bit counts, encode/decode, the GT decode's
gradient, the hierarchical bit loss and the L1 mask loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcpose import binary_codes as bc
from tests.numeric import central_differences

# LM-O-like model boxes (mm): ape, can, cat, a flat one and a thin one.
EXTENTS = [(75.9, 77.6, 91.8), (100.8, 181.8, 193.7), (67.0, 127.6, 117.5),
           (120.0, 80.0, 12.5), (30.0, 200.0, 9.0)]


def test_bit_counts_known_sizes():
    np.testing.assert_array_equal(bc.bit_counts(np.array([100.0, 50.0, 12.5])), [7, 6, 4])
    np.testing.assert_array_equal(bc.bit_counts(np.array([12.5, 100.0, 50.0])), [4, 7, 6])
    # round(7 + log2(s / s_max)), at least 1 bit
    np.testing.assert_array_equal(bc.bit_counts(np.array([100.0, 1.0, 75.0])), [7, 1, 7])
    np.testing.assert_array_equal(bc.bit_counts(np.array([100.0, 0.5, 70.0])), [7, 1, 6])
    np.testing.assert_array_equal(bc.bit_counts(np.array([[100.0, 50.0, 12.5]] * 2), n_bits=5), [[5, 4, 2]] * 2)
    # the same under jit (traced extent)
    np.testing.assert_array_equal(jax.jit(bc.bit_counts)(jnp.array([100.0, 50.0, 12.5])), [7, 6, 4])


@pytest.mark.parametrize("extent", [(100.0, 0.0, 10.0), (100.0, -1.0, 10.0), (np.nan, 1.0, 1.0)])
def test_zero_extent_is_an_error(extent):
    with pytest.raises(ValueError, match="extent"):
        bc.bit_counts(np.array(extent))
    with pytest.raises(ValueError, match="extent"):
        bc.encode_xyz(np.zeros((4, 3)), np.array([7, 7, 7]), extent=np.array(extent))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="bits"):
        bc.encode_xyz(np.zeros((4, 3)), np.array([8, 7, 7]))
    with pytest.raises(ValueError, match="logits"):
        bc.decode_without_gt(np.zeros((4, 7)), np.array([7, 7, 7]))
    with pytest.raises(ValueError, match="gt_code"):
        bc.decode_with_gt(np.zeros((4, 3, 7)), np.zeros((4, 3, 6)), np.array([7, 7, 7]))
    with pytest.raises(ValueError, match="code"):
        bc.gray_to_binary(np.zeros((4, 7)), np.array([7, 7, 7]))
    with pytest.raises(ValueError, match="bits"):
        bc.gray_to_binary(np.zeros((4, 3, 7)), np.array([8, 7, 7]))


def _logits_of(code, bits, mag=30.0):
    """Confident logits that round to `code` (padding bits get arbitrary signs)."""
    return jnp.where(code > 0, mag, -mag)


@pytest.mark.parametrize("gray", [True, False])
@pytest.mark.parametrize("extent", EXTENTS)
def test_round_trip_exact_to_the_quantisation_step(extent, gray):
    extent = np.array(extent, np.float32)
    center = np.array([1.5, -2.0, 3.0], np.float32)
    bits = bc.bit_counts(extent)
    rng = np.random.default_rng(0)
    x_mm = (center + extent * rng.uniform(-0.5, 0.5, (500, 3))).astype(np.float32)
    code = bc.encode_xyz(x_mm, bits, extent=extent, center=center, gray=gray)
    assert code.shape == (500, 3, bc.N_BITS) and code.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(code)[:, ~np.asarray(bc.bit_mask(bits))], 0)
    levels = 2.0 ** np.asarray(bits) - 1
    q = np.round((x_mm - center) / extent * levels + 0.5 * levels)       # the integer codes
    step_mm = extent / levels
    logits = _logits_of(code, bits)
    for xyz in (bc.decode_without_gt(logits, bits, gray=gray), bc.decode_with_gt(logits, code, bits, gray=gray)[0]):
        dec_mm = center + extent * np.asarray(xyz, np.float64)
        # exactly the code's value (up to sigmoid(30) = 1 - 1e-13 and float32 rounding) ...
        np.testing.assert_allclose(dec_mm, center + extent * (q / levels - 0.5), atol=1e-4 * extent.max())
        # ... hence within half a quantisation step of the input
        assert np.all(np.abs(dec_mm - x_mm) <= 0.5 * step_mm + 1e-4 * extent.max())
    # the normalised entry point gives the same codes
    np.testing.assert_array_equal(bc.encode_xyz((x_mm - center) / extent, bits, gray=gray), code)
    # the integer the bits spell: q itself, or its Gray code q ^ (q >> 1)
    m = np.asarray(bits)
    spelled = np.sum(np.asarray(code) * 2.0 ** np.maximum(m[:, None] - 1 - np.arange(bc.N_BITS), 0)
                     * np.asarray(bc.bit_mask(bits)), axis=-1).astype(np.int64)
    qi = q.astype(np.int64)
    np.testing.assert_array_equal(spelled, qi ^ (qi >> 1) if gray else qi)


def test_gray_code_properties():
    bits = jnp.array([7, 5, 3])
    levels = 2 ** np.asarray(bits) - 1
    # every level of each axis, in order (axes with fewer levels repeat their last)
    q = np.minimum(np.arange(128)[:, None], levels)
    xyz = q / levels - 0.5
    g = np.asarray(bc.encode_xyz(xyz, bits))
    b = np.asarray(bc.encode_xyz(xyz, bits, gray=False))
    # neighbouring levels differ in exactly one Gray bit; the MSB is the binary MSB
    steps = np.abs(np.diff(g, axis=0)).sum(-1)
    moved = np.diff(q, axis=0) > 0
    np.testing.assert_array_equal(steps[moved], 1)
    np.testing.assert_array_equal(steps[~moved], 0)
    np.testing.assert_array_equal(g[..., 0], b[..., 0])
    # gray_to_binary inverts the encoding; Gray bit k toggles every 2^(M-k) levels (binary: 2^(M-1-k))
    np.testing.assert_array_equal(bc.gray_to_binary(g, bits), b)
    x = g[:, 0, :]                                   # the 7-bit axis, all 128 levels
    for k in range(1, 7):
        assert np.abs(np.diff(x[:, k])).sum() == 2 ** k
        assert np.abs(np.diff(b[:, 0, k])).sum() == 2 ** (k + 1) - 1


def test_gray_decode_cases_by_hand():
    bits = jnp.array([3, 3, 3])
    # x: gt level 5 = binary 101, Gray 111; prediction Gray 1 0 1 (bit 1 wrong). Binary logits
    #    follow the ground truth's prefix 1 0: bit 1 negated (above it 1), bit 2 kept (above 0);
    #    value 4 + 2 sigmoid(-z1) + 1
    # y: gt level 2 = binary 010, Gray 011; prediction Gray 1 1 1 (bit 0 wrong) -> 4 p(z0) + 2 + 0
    # z: gt level 6 = binary 110, Gray 101; prediction right -> 4 + 2 + sigmoid(-z2) (above: 1)
    gt = jnp.array([[1, 1, 1], [0, 1, 1], [1, 0, 1]], jnp.float32)
    gt = jnp.pad(gt, ((0, 0), (0, 4)))
    lg = jnp.array([[2.0, -0.5, 3.0], [0.2, 1.0, 4.0], [1.0, -1.5, 0.7]])
    lg = jnp.pad(lg, ((0, 0), (0, 4)), constant_values=5.0)   # padding ignored
    s = jax.nn.sigmoid
    np.testing.assert_array_equal(bc.encode_xyz(jnp.array([5.0, 2.0, 6.0]) / 7 - 0.5, bits), gt)
    xyz, chosen = bc.decode_with_gt(lg, gt, bits)
    value = np.array([4 + 2 * s(0.5) + 1, 4 * s(0.2) + 2, 4 + 2 + s(-0.7)])
    np.testing.assert_allclose(xyz, value / 7 - 0.5, rtol=1e-6)
    np.testing.assert_array_equal(np.argmax(chosen, -1), [1, 0, 2])
    # without GT: rounded Gray 101 / 111 / 101 -> binary 110 / 101 / 110, the LSB's logit
    # negated where the binary bit above it is 1: 4 + 2 + s(-3), 4 + s(4), 4 + 2 + s(-0.7)
    test_value = np.array([4 + 2 + s(-3.0), 4 + s(4.0), 4 + 2 + s(-0.7)])
    np.testing.assert_allclose(bc.decode_without_gt(lg, bits), test_value / 7 - 0.5, rtol=1e-6)
    np.testing.assert_allclose(bc.decode_with_gt(lg[None], gt[None], bits, has_gt=jnp.array([False]))[0][0],
                               test_value / 7 - 0.5, rtol=1e-6)


def test_binary_decode_cases_by_hand():
    bits = jnp.array([3, 3, 3])
    # x: gt 101, prediction 1 1 1 (bit 1 wrong) -> 4 + p1 * 2 + 1
    # y: gt 010, prediction 1 0 1 (bits 0 and 2 wrong) -> p0 * 4 + 2 + 0
    # z: gt 110, all right -> 4 + 2 + p2
    gt = jnp.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]], jnp.float32)
    gt = jnp.pad(gt, ((0, 0), (0, 4)))
    lg = jnp.array([[2.0, 0.5, 3.0], [0.2, -1.0, 4.0], [1.0, 1.5, -0.7]])
    lg = jnp.pad(lg, ((0, 0), (0, 4)), constant_values=5.0)   # padding ignored
    p = jax.nn.sigmoid(lg)
    xyz, chosen = bc.decode_with_gt(lg, gt, bits, gray=False)
    value = np.array([4 + 2 * p[0, 1] + 1, 4 * p[1, 0] + 2, 4 + 2 + p[2, 2]])
    np.testing.assert_allclose(xyz, value / 7 - 0.5, rtol=1e-6)
    np.testing.assert_array_equal(np.argmax(chosen, -1), [1, 0, 2])
    np.testing.assert_array_equal(np.sum(chosen, -1), [1, 1, 1])
    # without GT: rounded 111 / 101 / 110 with the LSB unrounded
    test_value = np.array([4 + 2 + p[0, 2], 4 + p[1, 2], 4 + 2 + p[2, 2]])
    np.testing.assert_allclose(bc.decode_without_gt(lg, bits, gray=False), test_value / 7 - 0.5, rtol=1e-6)
    # has_gt=False falls back to it
    np.testing.assert_allclose(bc.decode_with_gt(lg[None], gt[None], bits, has_gt=jnp.array([False]),
                                                 gray=False)[0][0],
                               test_value / 7 - 0.5, rtol=1e-6)


@pytest.mark.parametrize("gray", [True, False])
def test_gt_decode_gradient_flows_only_through_the_chosen_bit(gray):
    # float64 (tests/conftest.py enables x64)
    bits = jnp.array([7, 6, 4])
    rng = np.random.default_rng(1)
    n = 6
    gt = bc.encode_xyz(jnp.asarray(rng.uniform(-0.5, 0.5, (n, 3))), bits, gray=gray)
    # logits mostly right, some wrong, none within 0.2 of 0 (finite differences never flip a bit)
    sign = np.where(rng.uniform(size=gt.shape) < 0.2, -1.0, 1.0) * (2 * np.asarray(gt) - 1)
    lg = jnp.asarray(sign * rng.uniform(0.2, 3.0, gt.shape), jnp.float64)
    assert lg.dtype == jnp.float64 and gt.dtype == jnp.float64
    coef = jnp.asarray(rng.normal(size=(n, 3)))

    f = jax.jit(lambda z: jnp.sum(coef * bc.decode_with_gt(z, gt, bits, gray=gray)[0]))
    g = np.asarray(jax.grad(f)(lg))
    (fd,) = central_differences(f, [lg], eps=1e-6)
    np.testing.assert_allclose(g, fd, atol=1e-8)
    chosen = np.asarray(bc.decode_with_gt(lg, gt, bits, gray=gray)[1])
    assert np.all(g[~chosen] == 0)
    # on the chosen bit: +-coef * 2^(M-1-k) / (2^M - 1) * sigmoid'(z); for a Gray code the sign
    # is that of the flip to a binary logit (- where the ground truth's binary bit k-1 is 1)
    k = np.argmax(chosen, -1)
    m = np.asarray(bits)[None]
    p = jax.nn.sigmoid(np.take_along_axis(np.asarray(lg), k[..., None], -1)[..., 0])
    flip = np.ones(k.shape)
    if gray:
        b = np.asarray(bc.gray_to_binary(gt, bits))
        above = np.take_along_axis(b, np.maximum(k - 1, 0)[..., None], -1)[..., 0]
        flip = np.where(k > 0, 1.0 - 2.0 * above, 1.0)
        assert (flip < 0).any() and (flip > 0).any()
    want = flip * np.asarray(coef) * 2.0 ** (m - 1 - k) / (2.0 ** m - 1) * p * (1 - p)
    np.testing.assert_allclose(np.take_along_axis(g, k[..., None], -1)[..., 0], want, rtol=1e-10)
    # the mix of cases the test is meant to cover: some wrong bits, some all-right coordinates
    wrong = (np.asarray(lg) > 0) != (np.asarray(gt) > 0)
    wrong &= np.asarray(bc.bit_mask(bits))
    assert wrong.any() and (~wrong.any(-1)).any()


def test_traced_bits_and_vmap_match_concrete():
    extents = jnp.array(EXTENTS[:3], jnp.float32)
    rng = np.random.default_rng(2)
    xyz = jnp.asarray(rng.uniform(-0.5, 0.5, (3, 5, 3)), jnp.float32)

    def one(e, x):
        b = bc.bit_counts(e)
        code = bc.encode_xyz(x, b)
        return code, bc.decode_without_gt(_logits_of(code, b), b)

    codes, dec = jax.jit(jax.vmap(one))(extents, xyz)
    for i in range(3):
        c_i, d_i = one(np.asarray(extents[i]), xyz[i])
        np.testing.assert_array_equal(codes[i], c_i)
        np.testing.assert_allclose(dec[i], d_i, atol=1e-6)


def test_hierarchical_bit_weights_and_loss_by_hand():
    np.testing.assert_allclose(bc.hierarchical_bit_weights(jnp.array([0.0, 0.25, 0.5])),
                               np.exp(3 * np.array([0.0, 0.25, 0.01])), rtol=1e-6)
    bits = jnp.array([2, 1, 1])
    gt = jnp.zeros((1, 2, 3, 2)).at[0, 0, 0, 0].set(1.0)      # pixel 0: x = 10; pixel 1: 00
    lg = jnp.zeros((1, 2, 3, 2)).at[0, 0, 0, 0].set(2.0).at[0, 1, 0, 0].set(1.0)
    mask = jnp.array([[1.0, 1.0]])
    loss, m = bc.hierarchical_bit_loss(lg, gt, bits, mask)
    sp = lambda z: np.log1p(np.exp(z))   # BCE(z, 1) = sp(-z), BCE(z, 0) = sp(z)
    # used bits: x0, x1, y0, z0. Wrong (logit > 0 vs gt): x0 at pixel 1 -> h = 1 / (2 + 1)
    l_x0 = (sp(-2.0) + sp(1.0)) / 2
    l_other = sp(0.0)                    # logit 0 everywhere else
    w_x0 = np.exp(3 * min(1 / 3, 0.51 - 1 / 3))
    want = (w_x0 * l_x0 + 3 * l_other) / (w_x0 + 3)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(m["code/bit_error"], (1 / 3) / 4, rtol=1e-6)
    # masked-out pixels do not count; explicit weights override the histogram
    loss1, _ = bc.hierarchical_bit_loss(lg, gt, bits, jnp.array([[1.0, 0.0]]), weights=jnp.ones((3, 2)))
    np.testing.assert_allclose(loss1, (sp(-2.0) / 2 + 3 * sp(0.0) / 2) / 4, rtol=1e-6)


def test_l1_mask_loss():
    z = jnp.array([[0.0, 2.0], [-1.0, 3.0]])
    m = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    s = 1 / (1 + np.exp(-np.asarray(z)))
    np.testing.assert_allclose(bc.l1_mask_loss(z, m), np.mean(np.abs(s - np.asarray(m))), rtol=1e-6)


@pytest.mark.slow
def test_two_step_end_to_end_run_of_both_variants(tmp_path):
    """zebra_base and zebra_lc through the real loop (2 steps each, tiny synthetic set and
    network, one network for one object with its bit counts) and the evaluation pipeline."""
    import dataclasses

    from experiments.config import get_config, objective_for
    from experiments.lmo_gdr import _train_config
    from lcpose import evaluate as E
    from lcpose.data.pipeline import make_loader
    from lcpose.data.synthetic import ensure_synthetic_tfds
    from lcpose.train import eval_params
    from lcpose.train.loop import train

    tfds = ensure_synthetic_tfds(tmp_path / "cache", objects=2, train_images=4, test_images=2,
                                 workers=0, views="uniform", progress=False)
    cfg = get_config("zebra_cpu")
    cfg = cfg.with_train(model_overrides={"encoder_widths": (4, 4, 8, 8), "head_channels": 8},
                         input_size=32, output_size=16, batch_size=2, total_steps=2, worker_count=0,
                         log_every=1, warmup_steps=0)
    test = make_loader(tfds, "test", 4, train=False, worker_count=0, boxes="gt",
                       input_size=32, output_size=16)
    obj = int(test.models.obj_ids[0])
    tr = _train_config(cfg, (obj,), test.models)
    want_bits = tuple(int(b) for b in np.asarray(bc.bit_counts(
        np.ptp(test.models.bbox3d[test.models.index_of(obj)], axis=0))))
    assert dict(tr.model_overrides)["code_bits"] == want_bits
    for variant in ("zebra_base", "zebra_lc"):
        objective = dataclasses.replace(objective_for(cfg, variant, 2), pose_loss_start_step=1,
                                        grad_metric_every=0)
        res = train(tfds, tmp_path / variant, tr, objective, progress=False)
        assert res.steps == 2 and all(np.isfinite(r["loss"]) for r in res.history)
        assert all(np.isfinite(r["loss/code"]) and 0 <= r["code/bit_error"] <= 1 for r in res.history)
        if variant == "zebra_lc":
            assert all(np.isfinite(r["loss/pose"]) for r in res.history)
        variables = {"params": eval_params(res.state), "batch_stats": res.state.batch_stats}
        predict = jax.jit(E.make_predict_fn(res.model, cfg.pnp))
        out = E.evaluate(predict, variables, test, progress=False)
        assert out["R"].shape[1:] == (3, 3) and np.all(np.isfinite(out["t"]))


def test_float32_decoding_matches_float64():
    # training runs in float32: the decodings of random (partly wrong) logits agree with float64
    bits = jnp.array([7, 6, 4])
    rng = np.random.default_rng(3)
    for gray in (True, False):
        g = bc.encode_xyz(jnp.asarray(rng.uniform(-0.5, 0.5, (64, 3))), bits, gray=gray)
        # mostly right, with ~15 % of the bits wrong
        lg = rng.normal(3.0, 2.0, g.shape) * (2 * np.asarray(g) - 1)
        d64 = bc.decode_with_gt(jnp.asarray(lg, jnp.float64), g.astype(jnp.float64), bits, gray=gray)[0]
        d32 = bc.decode_with_gt(jnp.asarray(lg, jnp.float32), g.astype(jnp.float32), bits, gray=gray)[0]
        assert d32.dtype == jnp.float32
        np.testing.assert_allclose(d32, d64, atol=2e-7)
        t64 = bc.decode_without_gt(jnp.asarray(lg, jnp.float64), bits, gray=gray)
        t32 = bc.decode_without_gt(jnp.asarray(lg, jnp.float32), bits, gray=gray)
        np.testing.assert_allclose(t32, t64, atol=2e-7)
