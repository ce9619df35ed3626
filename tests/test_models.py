"""lcpose.models: shapes, parameter counts, weight parametrisation, BatchNorm axis, converter.

Converter fixtures in tests/data/models/ were written once by torch 2.13 (see `_FIXTURE_SCRIPT`
at the bottom): a torchvision-layout ResNet-18 with stage widths (4, 6, 8, 10), random BN
parameters and statistics, saved in the zip format and in the legacy format, plus torch's eval
features for `_fixture_input()`.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_prep import convert_resnet
from lcpose.models import (
    GDRNet,
    ResNet,
    box_from_model_info,
    count_params,
    gdrnet_from_preset,
    init_variables,
    load_encoder_weights,
    merge_encoder_weights,
    mm_to_xyz,
    output_size,
    spatial_softmax_weights,
    xyz_to_mm,
)

DATA = os.path.join(os.path.dirname(__file__), "data", "models")
TINY = dict(encoder_widths=(8, 8, 16, 16), head_channels=16)


def _shapes(model, size, batch=2, dtype=jnp.float32):
    """(variable shapes, output shapes) without compiling anything."""
    x = jax.ShapeDtypeStruct((batch, size, size, 3), dtype)
    var = jax.eval_shape(lambda im: model.init(jax.random.key(0), im, train=False), x)
    out = jax.eval_shape(lambda v, im: model.apply(v, im, train=False), var, x)
    return var, out


@pytest.mark.parametrize("depth,encoder_params", [(18, 11_176_512), (34, 21_284_672)])
def test_paper_size_shapes_and_param_counts(depth, encoder_params):
    var, out = _shapes(GDRNet(depth=depth), 256)
    # torchvision resnet18/34 minus the 1000-way classifier (512 * 1000 + 1000).
    assert count_params(var["params"]["encoder"]) == encoder_params
    assert out["xyz"].shape == (2, 64, 64, 3)
    assert out["w2d"].shape == out["weight_logits"].shape == (2, 64, 64, 2)
    assert out["mask_logits"].shape == (2, 64, 64, 1)
    assert out["log_scale"].shape == (2, 2)
    assert all(o.dtype == jnp.float32 for o in out.values())
    # decoder: 3 x (deconv 4x4 + 2 conv 3x3) at 256 channels, 3 BNs per stage, 1x1 output conv
    head = 512 * 256 * 16 + 2 * (256 * 256 * 16) + 3 * 2 * 256 * 256 * 9 + 9 * 2 * 256 + 256 * 6 + 6
    assert count_params(var["params"]["rot_head"]) == head
    assert count_params(var["params"]["scale"]) == 256 + 1   # one global scale (reference: Linear(256, 1))
    assert output_size(256) == 64 and output_size(128) == 32


def test_efficientnet_lite0_encoder_shapes_and_param_count():
    var, out = _shapes(GDRNet(encoder="efficientnet_lite0"), 256)
    # EfficientNet-Lite0's 4.65 M parameters minus the head conv + BN (320 * 1280 + 2 * 1280)
    # and the classifier (1280 * 1000 + 1000)
    assert count_params(var["params"]["encoder"]) == 4_652_008 - 412_160 - 1_281_000
    assert out["xyz"].shape == (2, 64, 64, 3) and out["w2d"].shape == (2, 64, 64, 2)
    assert var["params"]["rot_head"]["up0_deconv"]["kernel"].shape == (4, 4, 320, 256)
    var_r, _ = _shapes(GDRNet(encoder="resnet18"), 64)
    assert count_params(var_r["params"]["encoder"]) == 11_176_512   # encoder= overrides depth=34
    with pytest.raises(ValueError, match="encoder"):
        _shapes(GDRNet(encoder="vgg16"), 64)


def test_scale_branch_switch_and_presets():
    var, out = _shapes(GDRNet(depth=18, scale_branch=False, **TINY), 64)
    assert set(var["params"]) == {"encoder", "rot_head"}
    var, _ = _shapes(GDRNet(depth=18, scale_features="encoder", **TINY), 64)
    assert var["params"]["scale"]["kernel"].shape == (16, 1)
    _, out = _shapes(gdrnet_from_preset("cpu"), 128)
    assert out["xyz"].shape == (2, 32, 32, 3)
    _, out = _shapes(GDRNet(depth=34, **TINY), 64, dtype=jnp.float64)
    assert out["xyz"].dtype == jnp.float64 and out["w2d"].dtype == jnp.float64
    _, out = _shapes(GDRNet(depth=18, dtype=jnp.bfloat16, **TINY), 64)  # mixed precision
    assert out["xyz"].dtype == jnp.float32 and out["w2d"].dtype == jnp.float32
    with pytest.raises(ValueError, match="multiples of 32"):
        _shapes(GDRNet(depth=18, **TINY), 48)
    with pytest.raises(ValueError, match="images"):
        jax.eval_shape(lambda: GDRNet(depth=18, **TINY).init(jax.random.key(0), jnp.zeros((1, 64, 64, 1))))
    with pytest.raises(ValueError, match="depth"):
        _shapes(GDRNet(depth=50), 64)


@pytest.fixture(scope="module")
def tiny():
    """Tiny ResNet-18 GDRNet (64x64 -> 16x16): variables and one compiled call with the
    train-mode outputs (+ batch_stats updates), eval-mode outputs, and train-mode outputs of the
    same network without the scale branch."""
    model = GDRNet(depth=18, **TINY)
    fixed = GDRNet(depth=18, scale_branch=False, **TINY)
    images = jax.random.uniform(jax.random.key(1), (4, 64, 64, 3), jnp.float32)
    var = init_variables(model, 0, 64)
    var_fixed = {"params": {k: v for k, v in var["params"].items() if k != "scale"}, "batch_stats": var["batch_stats"]}

    @jax.jit
    def run(v, v_fixed, im):
        train, upd = model.apply(v, im, train=True, mutable=["batch_stats"])
        evaluation = model.apply(v, im, train=False)
        no_scale, _ = fixed.apply(v_fixed, im, train=True, mutable=["batch_stats"])
        return train, upd, evaluation, no_scale

    return model, var, images, run(var, var_fixed, images)


def test_forward_outputs_and_spatial_softmax(tiny):
    model, var, images, (train, _, evaluation, _) = tiny
    for out in (train, evaluation):
        for k, c in [("xyz", 3), ("w2d", 2), ("weight_logits", 2), ("mask_logits", 1)]:
            assert out[k].shape == (4, 16, 16, c) and out[k].dtype == jnp.float32
            assert bool(jnp.all(jnp.isfinite(out[k])))
        w, logits, s = (np.asarray(out[k], np.float64) for k in ("w2d", "weight_logits", "log_scale"))
        assert np.all(w > 0)
        # ONE softmax over both channels and all pixels (the reference's reshape to (1, -1)),
        # times one global scale: all 2 * h * w weights sum to it
        np.testing.assert_array_equal(s[:, 0], s[:, 1])
        np.testing.assert_allclose(w.sum(axis=(1, 2, 3)), np.exp(s[:, 0]), rtol=1e-5)
        flat = logits.reshape(4, -1)
        softmax = np.exp(flat - flat.max(1, keepdims=True))
        softmax /= softmax.sum(1, keepdims=True)
        np.testing.assert_allclose(w.reshape(4, -1), softmax * np.exp(s[:, :1]), rtol=1e-5)
    # The public helper reproduces the model's weights, batched and for one instance.
    w_b = spatial_softmax_weights(train["weight_logits"], train["log_scale"])
    np.testing.assert_allclose(np.asarray(w_b), np.asarray(train["w2d"]), rtol=1e-6)
    w_1 = spatial_softmax_weights(train["weight_logits"][2], train["log_scale"][2])
    np.testing.assert_allclose(np.asarray(w_1), np.asarray(train["w2d"][2]), rtol=1e-6)
    with pytest.raises(ValueError, match="log_scale"):
        spatial_softmax_weights(train["weight_logits"], train["log_scale"][0])
    # With batch statistics the outputs are O(1e-2) (N(0, 0.01) output layer), not vanishing.
    assert 1e-3 < float(jnp.abs(train["xyz"]).mean()) < 1.0


def test_initial_scale_and_no_scale_branch(tiny):
    _, _, _, (train, _, _, no_scale) = tiny
    # The scale branch starts at log(2 * h * w) (mean weight 1), like the network without it.
    np.testing.assert_allclose(np.asarray(train["log_scale"]), np.log(512.0), atol=0.05)
    np.testing.assert_array_equal(np.asarray(no_scale["log_scale"]), np.full((4, 2), np.log(512.0), np.float32))
    np.testing.assert_allclose(np.asarray(no_scale["w2d"]).mean(axis=(1, 2, 3)), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(no_scale["xyz"]), np.asarray(train["xyz"]))


def test_batchnorm_axis_name_averages_statistics(tiny):
    """Train mode on 2 'devices' x 2 images with axis_name equals one call on all 4 images.

    jax.vmap with axis_name runs the same collectives (pmean) as jax.pmap over devices; the
    training engineer's test runs the full step under pmap on 4 host devices.
    """
    _, var, images, (train, upd, _, _) = tiny
    synced = GDRNet(depth=18, axis_name="batch", **TINY)
    split = images.reshape(2, 2, *images.shape[1:])
    per_dev, upd_dev = jax.jit(
        jax.vmap(lambda x: synced.apply(var, x, train=True, mutable=["batch_stats"]), axis_name="batch")
    )(split)
    np.testing.assert_allclose(
        np.asarray(per_dev["xyz"]).reshape(4, 16, 16, 3), np.asarray(train["xyz"]), rtol=1e-4, atol=1e-6
    )
    for a, b in zip(jax.tree_util.tree_leaves(upd_dev), jax.tree_util.tree_leaves(upd)):
        for dev in range(2):  # every device holds the statistics of the global batch
            np.testing.assert_allclose(np.asarray(a)[dev], np.asarray(b), rtol=1e-4, atol=1e-6)
    # the statistics moved (momentum 0.9 from the initial mean 0)
    assert float(jnp.abs(upd["batch_stats"]["encoder"]["bn1"]["mean"]).max()) > 1e-3


def test_xyz_mm_helpers():
    info = {"diameter": 102.1, "min_x": -37.9, "min_y": -38.8, "min_z": -45.9,
            "size_x": 75.9, "size_y": 77.6, "size_z": 91.8}
    extent, center = box_from_model_info(info)
    np.testing.assert_allclose(extent, [75.9, 77.6, 91.8])
    np.testing.assert_allclose(center, [0.05, 0.0, 0.0], atol=1e-12)
    corner = np.array([info["min_x"], info["min_y"], info["min_z"]])
    np.testing.assert_allclose(np.asarray(mm_to_xyz(corner, extent, center)), -0.5)
    pts = np.random.default_rng(0).normal(size=(5, 3)) * 30
    np.testing.assert_allclose(np.asarray(xyz_to_mm(mm_to_xyz(pts, extent, center), extent, center)), pts)
    with pytest.raises(ValueError, match="size_x"):
        box_from_model_info({"min_x": 0})


# ----------------------------------------------------------------------------------------------
# Converter
# ----------------------------------------------------------------------------------------------


def _fixture_input():
    n, c, h, w = np.meshgrid(*[np.arange(k) for k in (2, 3, 64, 64)], indexing="ij")
    return (np.sin(0.37 * h + 0.23 * w * (c + 1) + 1.3 * n) + 0.1 * c).astype(np.float32)


@pytest.fixture(scope="module")
def torch_sd():
    return convert_resnet.read_torch_state_dict(os.path.join(DATA, "resnet18_tiny.pth"))


def test_read_both_torch_formats(torch_sd):
    legacy = convert_resnet.read_torch_state_dict(os.path.join(DATA, "resnet18_tiny_legacy.pth"))
    assert len(torch_sd) == 122 and set(legacy) == set(torch_sd)
    for k in torch_sd:
        np.testing.assert_array_equal(legacy[k], torch_sd[k])
    assert torch_sd["conv1.weight"].shape == (4, 3, 7, 7) and torch_sd["conv1.weight"].dtype == np.float32
    assert torch_sd["bn1.num_batches_tracked"].dtype == np.int64 and int(torch_sd["bn1.num_batches_tracked"]) == 7
    assert convert_resnet.infer_depth(torch_sd) == 18


def test_conversion_layout_and_forward_matches_torch(torch_sd):
    tree = convert_resnet.torchvision_to_flax(torch_sd)
    p, s = tree["params"], tree["batch_stats"]
    w = torch_sd["layer2.0.downsample.0.weight"]  # (O=6, I=4, 1, 1)
    np.testing.assert_array_equal(p["layer2_0"]["downsample_conv"]["kernel"], w.transpose(2, 3, 1, 0))
    w = torch_sd["layer3.1.conv2.weight"]
    np.testing.assert_array_equal(p["layer3_1"]["conv2"]["kernel"][1, 2], w[:, :, 1, 2].T)  # [kh, kw, in, out]
    np.testing.assert_array_equal(p["layer4_0"]["bn1"]["scale"], torch_sd["layer4.0.bn1.weight"])
    np.testing.assert_array_equal(p["layer4_0"]["bn1"]["bias"], torch_sd["layer4.0.bn1.bias"])
    np.testing.assert_array_equal(s["layer4_0"]["downsample_bn"]["mean"], torch_sd["layer4.0.downsample.1.running_mean"])
    np.testing.assert_array_equal(s["bn1"]["var"], torch_sd["bn1.running_var"])
    # One conv in Flax with the converted kernel equals the same conv on the torch (NCHW, OIHW) layout.
    x = _fixture_input()
    w = torch_sd["conv1.weight"]
    ref = jax.lax.conv_general_dilated(x, w, (2, 2), ((3, 3), (3, 3)), dimension_numbers=("NCHW", "OIHW", "NCHW"))
    import flax.linen as nn

    y = nn.Conv(4, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False).apply(
        {"params": p["conv1"]}, x.transpose(0, 2, 3, 1)
    )
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref).transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    # The whole encoder equals torch's eval-mode features (written with the fixture).
    feats = jax.jit(lambda v, im: ResNet(depth=18, widths=(4, 6, 8, 10)).apply(v, im, train=False))(
        tree, x.transpose(0, 2, 3, 1)
    )
    ref = np.load(os.path.join(DATA, "resnet18_tiny_io.npz"))["features_nchw"].transpose(0, 2, 3, 1)
    assert feats.shape == ref.shape == (2, 2, 2, 10)
    np.testing.assert_allclose(np.asarray(feats), ref, rtol=1e-5, atol=1e-5)


def test_cli_writes_loadable_weights_and_merge(tmp_path, torch_sd):
    out = tmp_path / "w"
    assert convert_resnet.main(["--pth", os.path.join(DATA, "resnet18_tiny.pth"), "--out", str(out), "--depth", "18"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["depth"] == 18 and meta["widths"] == [4, 6, 8, 10] and meta["source"] == "resnet18_tiny.pth"
    enc = load_encoder_weights(str(out))
    model = GDRNet(depth=18, encoder_widths=(4, 6, 8, 10), head_channels=8)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    var = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    merged = merge_encoder_weights(var, enc)
    np.testing.assert_array_equal(
        np.asarray(merged["params"]["encoder"]["layer3_0"]["conv1"]["kernel"]),
        torch_sd["layer3.0.conv1.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        np.asarray(merged["batch_stats"]["encoder"]["layer1_1"]["bn2"]["var"]), torch_sd["layer1.1.bn2.running_var"]
    )
    assert merged["params"]["rot_head"] is var["params"]["rot_head"]  # head untouched
    # Errors name the problem: wrong widths, wrong depth, missing and corrupt files.
    bigger = GDRNet(depth=18, encoder_widths=(4, 6, 8, 12), head_channels=8)
    shapes = jax.eval_shape(lambda: bigger.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    with pytest.raises(ValueError, match="encoder_widths"):
        merge_encoder_weights(jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes), enc)
    with pytest.raises(ValueError, match="ResNet-18"):
        convert_resnet.torchvision_to_flax(torch_sd, depth=34)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        convert_resnet.read_torch_state_dict(str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="bad.pth"):
        convert_resnet.read_torch_state_dict(str(bad))
    assert convert_resnet.main(["--pth", str(bad), "--out", str(tmp_path / "x")]) == 1
    with pytest.raises(FileNotFoundError, match="encoder.msgpack"):
        load_encoder_weights(str(tmp_path))


_FIXTURE_SCRIPT = r'''
# Regenerate tests/data/models/ (needs torch; run from the repo root: python -c "..." or a file).
import numpy as np, torch, torch.nn as nn

class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False); self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False); self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + idt)

class Net(nn.Module):  # torchvision's ResNet layout and key names
    def __init__(self, widths, blocks=(2, 2, 2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False); self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True); self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                layers.append(Block(cin, w, 2 if (i > 0 and j == 0) else 1)); cin = w
            setattr(self, f"layer{i+1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1); self.fc = nn.Linear(cin, 3)
    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

def fixture_input():
    n, c, h, w = np.meshgrid(*[np.arange(k) for k in (2, 3, 64, 64)], indexing="ij")
    return (np.sin(0.37 * h + 0.23 * w * (c + 1) + 1.3 * n) + 0.1 * c).astype(np.float32)

torch.manual_seed(0)
net = Net((4, 6, 8, 10))
with torch.no_grad():
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.3, 0.3)
            m.running_mean.uniform_(-0.2, 0.2); m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
net.eval()
with torch.no_grad():
    y = net.features(torch.from_numpy(fixture_input()))
out = "tests/data/models"
torch.save(net.state_dict(), f"{out}/resnet18_tiny.pth")
torch.save(net.state_dict(), f"{out}/resnet18_tiny_legacy.pth", _use_new_zipfile_serialization=False)
np.savez_compressed(f"{out}/resnet18_tiny_io.npz", features_nchw=y.numpy())
'''
