"""Sparse keypoint network (the paper's Sec. 4.2, Table 5): GDR-Net's encoder and decoder, one
heatmap per keypoint, DSNT locations and standard deviations, w2d = 1 / std.

The network is GDR-Net (`lcpose.models.gdrnet`) with its dense outputs replaced: the same ResNet
encoder (`lcpose.models.resnet.ResNet`, module name "encoder", so converted ImageNet weights
merge as for GDR-Net) and the same CDPN/GDR decoder (`gdrnet.RotHead`, "rot_head") whose final
1x1 conv has one channel per keypoint. Output (``__call__(images, train)``)::

    heatmap_logits  (B, h, w, Kp)   one map of logits per keypoint, h = w = input / 4

Per instance the head's contract of `lcpose.models.registry` (the caller vmaps):

* `decode_train` -- `lcpose.models.dsnt.dsnt` of the logits: x2d = the DSNT means
  (output-grid pixels, pair with ``K_out``), w2d = 1 / sqrt(var + 1/12) per axis (the one-pixel
  floor of `dsnt.keypoint_std`), x3d = the example's fixed model keypoints ``kpt3d`` (no
  gradient); keypoints whose ground-truth projection leaves the crop (``kpt_in_crop = 0``) or
  whose map is not finite are ``valid=False`` with w2d = 0, so the pose loss ignores them.
* `decode_test` -- the same points, valid wherever the map is finite (the crop is all the
  network sees: a keypoint outside it gets a wide map, hence a small weight).
* `surrogate_loss` -- the paper's "Laplace MLE": `dsnt.laplace_nll` of the DSNT means against
  ``kpt2d`` with b = std / sqrt(2), mean over the in-crop keypoints and both axes.

There is no scale branch: the DSNT weights have an absolute scale (1 / std in pixels) that the
maps themselves set, so `build` accepts and ignores the training loop's ``scale_branch``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcpose.correspondences import Correspondences
from lcpose.data.keypoints import DEFAULT_SPEC, spec_size
from lcpose.models.dsnt import dsnt, keypoint_std, laplace_nll
from lcpose.models.gdrnet import IMAGENET_MEAN, IMAGENET_STD, PRESETS, RotHead, check_images, output_size
from lcpose.models.resnet import TORCHVISION_WIDTHS, ResNet

__all__ = ["SparseKeypointNet", "EXAMPLE_KEYS", "TEST_KEYS", "build", "loader_kwargs", "map_size", "keypoint_estimates",
           "decode_train", "decode_test", "surrogate_loss"]

# Batch keys the head reads in training and at test time (lcpose.data.pipeline with
# make_loader(keypoints=spec); lcpose.models.registry).
EXAMPLE_KEYS = ("kpt3d", "kpt2d", "kpt_in_crop")
TEST_KEYS = ("kpt3d",)


class SparseKeypointNet(nn.Module):
    """ResNet encoder + GDR-Net decoder with one heatmap of logits per keypoint.

    Attributes as `lcpose.models.gdrnet.GDRNet` (depth, encoder_widths, head_*, deconv_kernel,
    normalize_input, axis_name, dtype, bn_momentum), plus ``keypoints``: the keypoint spec of
    `lcpose.data.keypoints` ("fps16": 16 by farthest point sampling, the paper's), which sets
    the number of heatmaps and the keypoints the data loader adds (`loader_kwargs`).
    """

    keypoints: str = DEFAULT_SPEC
    depth: int = 34
    encoder_widths: Sequence[int] = TORCHVISION_WIDTHS
    head_channels: int = 256
    head_stages: int = 3
    head_convs_per_stage: int = 2
    deconv_kernel: int = 4
    normalize_input: bool = True
    axis_name: Optional[str] = None
    dtype: Any = None
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, images, train: bool = False):
        images = check_images(images)
        if not isinstance(train, bool):
            raise ValueError(f"train must be a Python bool (it selects BatchNorm mode), got {train!r}")
        x = images
        if self.normalize_input:   # the encoder's ImageNet statistics, as GDRNet
            x = (x - jnp.asarray(IMAGENET_MEAN, x.dtype)) / jnp.asarray(IMAGENET_STD, x.dtype)
        feats = ResNet(depth=self.depth, widths=tuple(self.encoder_widths), axis_name=self.axis_name,
                       dtype=self.dtype, bn_momentum=self.bn_momentum, name="encoder")(x, train)
        logits, _ = RotHead(channels=self.head_channels, stages=self.head_stages,
                            convs_per_stage=self.head_convs_per_stage, deconv_kernel=self.deconv_kernel,
                            out_channels=self.num_keypoints, axis_name=self.axis_name, dtype=self.dtype,
                            bn_momentum=self.bn_momentum, name="rot_head")(feats, train)
        return {"heatmap_logits": logits.astype(jnp.promote_types(images.dtype, jnp.float32))}

    @property
    def num_keypoints(self) -> int:
        return spec_size(self.keypoints)   # ValueError for a bad spec or fewer than 4 keypoints


def build(*, preset: str = "cpu", keypoints: str = DEFAULT_SPEC, scale_branch: Optional[bool] = None,
          **overrides) -> SparseKeypointNet:
    """The model registry's constructor: GDR-Net's preset encoder / decoder sizes
    (`gdrnet.PRESETS`) with one heatmap per keypoint of the spec ``keypoints``; keyword
    overrides replace attributes. ``scale_branch`` is ignored (no scale branch: see the module
    docstring)."""
    del scale_branch
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec_size(keypoints)   # checks the spec here, not at the first call
    return SparseKeypointNet(**{**PRESETS[preset]["model"], "keypoints": keypoints, **overrides})


def loader_kwargs(model: SparseKeypointNet) -> dict:
    """What `lcpose.data.pipeline.make_loader` needs for this model: its keypoints."""
    return {"keypoints": model.keypoints}


def map_size(model: SparseKeypointNet, input_size: int) -> int:
    """Side of the heatmaps for square crops of ``input_size``."""
    return output_size(input_size, model.head_stages)


def keypoint_estimates(outputs):
    """(mean (Kp, 2) px, std (Kp, 2) px, finite (Kp,)) of ONE instance's heatmaps (DSNT)."""
    est = dsnt(outputs["heatmap_logits"])
    return est.mean, keypoint_std(est.var), est.finite


def _check_keypoints(example, kp: int):
    shape = jnp.shape(example["kpt3d"])
    if shape != (kp, 3):
        raise ValueError(f"example['kpt3d'] must have shape ({kp}, 3) to match the {kp} heatmaps, got {shape}")


def decode_train(key, outputs, example, cfg):
    """(Correspondences of the Kp keypoints, aux {"std"}) for the pose loss (module docstring)."""
    del key, cfg
    mean, std, finite = keypoint_estimates(outputs)
    _check_keypoints(example, mean.shape[0])
    valid = finite & (jnp.asarray(example["kpt_in_crop"]) > 0)
    w2d = jnp.where(valid[:, None], 1.0 / std, 0.0)
    x3d = jax.lax.stop_gradient(jnp.asarray(example["kpt3d"], mean.dtype))
    return Correspondences(x2d=mean, x3d=x3d, w2d=w2d, valid=valid), {"std": std}


def decode_test(outputs, example, cfg):
    """The Kp keypoint correspondences for the test-time solver (valid where the map is finite)."""
    del cfg
    mean, std, finite = keypoint_estimates(outputs)
    _check_keypoints(example, mean.shape[0])
    w2d = jnp.where(finite[:, None], 1.0 / std, 0.0)
    return Correspondences(x2d=mean, x3d=jnp.asarray(example["kpt3d"], mean.dtype), w2d=w2d, valid=finite)


def surrogate_loss(outputs, example, cfg):
    """The Laplace MLE of one example and its metrics (``cfg`` unused).

    Metrics: ``loss/nll`` (the loss), ``kpt/err_px`` (mean |x - x_gt| per axis) and
    ``kpt/std_px`` (mean DSNT std) over the in-crop keypoints, ``kpt/in_crop`` (their count),
    ``kpt/nonfinite`` (keypoints whose map was not finite; they are masked).
    """
    del cfg
    mean, std, finite = keypoint_estimates(outputs)
    _check_keypoints(example, mean.shape[0])
    gt = jnp.asarray(example["kpt2d"], mean.dtype)
    valid = finite & (jnp.asarray(example["kpt_in_crop"]) > 0)
    nll, _ = laplace_nll(mean, gt, std, valid)
    n = jnp.maximum(jnp.sum(valid), 1)
    v = valid[:, None]
    err = jnp.sum(jnp.where(v, jnp.abs(jnp.where(v, mean - gt, 0.0)), 0.0)) / (2 * n)
    return nll, {"loss/nll": nll, "kpt/err_px": err, "kpt/std_px": jnp.sum(jnp.where(v, std, 0.0)) / (2 * n),
                 "kpt/in_crop": jnp.sum(valid).astype(mean.dtype),
                 "kpt/nonfinite": jnp.sum(~finite).astype(mean.dtype)}
