"""ResNet-18/34 encoders in the torchvision layout (Flax linen, NHWC).

The module tree mirrors torchvision's `resnet18`/`resnet34` so that ImageNet weights convert
one to one (`data_prep.convert_resnet`):

    torchvision                      Flax (this module)
    conv1 / bn1                      conv1 / bn1
    layer{i}.{j}.conv1 / bn1         layer{i}_{j}/conv1 / bn1
    layer{i}.{j}.conv2 / bn2         layer{i}_{j}/conv2 / bn2
    layer{i}.{j}.downsample.0 / .1   layer{i}_{j}/downsample_conv / downsample_bn

Paddings are explicit and symmetric, as in torchvision (conv1 7x7/2 pad 3, max-pool 3x3/2
pad 1, 3x3 convs pad 1), so a converted network computes the same features as the torch one
(Flax's "SAME" pads stride-2 layers asymmetrically and would shift the features by half a
pixel). BatchNorm uses torch's epsilon 1e-5 and momentum 0.1 (Flax momentum 0.9); its
`axis_name` lets `jax.pmap`/`jax.vmap` training average batch statistics over a named axis.
The final average pool and classifier are not part of the encoder.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Optional, Sequence

import flax.linen as nn

# Blocks per stage for the BasicBlock ResNets.
STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
TORCHVISION_WIDTHS = (64, 128, 256, 512)

# torchvision initialises convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _batch_norm(train: bool, axis_name, dtype, momentum, epsilon, name):
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        axis_name=axis_name,  # only used when train (batch statistics)
        dtype=dtype,
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN + ReLU and an identity (or 1x1 conv + BN) shortcut."""

    features: int
    strides: int = 1
    axis_name: Optional[str] = None
    dtype: Any = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool):
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_kernel_init)
        bn = partial(_batch_norm, train, self.axis_name, self.dtype, self.bn_momentum, self.bn_epsilon)
        s = (self.strides, self.strides)
        y = conv(self.features, (3, 3), strides=s, padding=((1, 1), (1, 1)), name="conv1")(x)
        y = nn.relu(bn("bn1")(y))
        y = conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
        y = bn("bn2")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, (1, 1), strides=s, padding="VALID", name="downsample_conv")(x)
            shortcut = bn("downsample_bn")(shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """ResNet-18/34 feature extractor: (B, H, W, C) -> (B, H/32, W/32, widths[-1]).

    Attributes:
      depth: 18 or 34.
      widths: channels of layer1..layer4 (torchvision: 64, 128, 256, 512). Smaller widths give
        CPU-sized networks (ImageNet weights then do not apply).
      stem_width: channels of conv1 (default: widths[0], as torchvision).
      axis_name: BatchNorm cross-replica axis for training under pmap/vmap (None: local batch).
      dtype: computation dtype (None: follow the inputs and float32 params).
    """

    depth: int = 34
    widths: Sequence[int] = TORCHVISION_WIDTHS
    stem_width: Optional[int] = None
    axis_name: Optional[str] = None
    dtype: Any = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.depth not in STAGE_BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got depth={self.depth}")
        if len(self.widths) != 4:
            raise ValueError(f"widths must give 4 stage widths, got widths={tuple(self.widths)}")
        stem = self.stem_width or self.widths[0]
        x = nn.Conv(
            stem, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
            dtype=self.dtype, kernel_init=conv_kernel_init, name="conv1",
        )(x)
        x = _batch_norm(train, self.axis_name, self.dtype, self.bn_momentum, self.bn_epsilon, "bn1")(x)
        x = nn.relu(x)
        # Padding with -inf (Flax's max_pool) equals torch's MaxPool2d(3, 2, padding=1).
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, (blocks, width) in enumerate(zip(STAGE_BLOCKS[self.depth], self.widths)):
            for j in range(blocks):
                x = BasicBlock(
                    width,
                    strides=2 if (i > 0 and j == 0) else 1,
                    axis_name=self.axis_name,
                    dtype=self.dtype,
                    bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon,
                    name=f"layer{i + 1}_{j}",
                )(x, train)
        return x


def output_stride() -> int:
    """Spatial downsampling of the encoder (conv1, max-pool and layer2..4 halve the size)."""
    return 32


__all__ = ["BasicBlock", "ResNet", "STAGE_BLOCKS", "TORCHVISION_WIDTHS", "conv_kernel_init", "output_stride"]
